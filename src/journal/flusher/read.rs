//! Reading the shard streams: new entries, this consumer's pending ones, and entries a dead
//! consumer left pending (claimed).

use super::*;

impl Flusher {
    /// Reads up to `count` entries per shard. `pending = true` re-reads this consumer's own
    /// unacknowledged entries (after a failed read, whose entries were delivered to this
    /// consumer although the reply never arrived, or a restart under the same name).
    pub(super) async fn read(&mut self, pending: bool, count: usize) -> redis::RedisResult<Batch> {
        let all = streams(&self.prefix, self.shards);
        let consumer = self.consumer.clone();
        let retry = &self.retry_streams;
        let calls = all.iter().map(|stream| {
            let mut conn = self.redis.clone();
            let consumer = consumer.as_str();
            let from = if pending || retry.contains(stream) {
                "0"
            } else {
                ">"
            };
            async move {
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(count)
                    .arg("STREAMS")
                    .arg(stream)
                    .arg(from)
                    .query_async::<Value>(&mut conn)
                    .await
            }
        });
        let replies = join_all(calls).await;
        let mut batch = Batch::default();
        let mut last_err = None;
        let mut failed = 0;
        for (stream, reply) in all.iter().zip(replies) {
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    // One node down must not stop the journal of the others.
                    failed += 1;
                    self.retry_streams.insert(stream.clone());
                    last_err = Some(e);
                    continue;
                }
            };
            let before = batch.acks.len();
            // [[stream, [[id, fields], ...]]]
            if let Value::Array(per_stream) = reply {
                for s in per_stream {
                    let Value::Array(parts) = s else { continue };
                    if let Some(Value::Array(items)) = parts.get(1) {
                        self.collect(stream, items, &mut batch).await;
                    }
                }
            }
            if batch.acks.len() == before {
                // Nothing (more) pending on this stream: back to new entries.
                self.retry_streams.remove(stream);
            }
        }
        match last_err {
            Some(e) if failed == all.len() => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, failed, "journal: some shard streams cannot be read; the others go on");
                self.metrics
                    .journal_errors
                    .with_label_values(&["redis"])
                    .inc();
                batch.partial = true;
                Ok(batch)
            }
            None => Ok(batch),
        }
    }

    /// Claims entries other (dead) consumers left pending.
    pub(super) async fn claim(&mut self, count: usize) -> redis::RedisResult<Batch> {
        let mut batch = Batch::default();
        for stream in streams(&self.prefix, self.shards) {
            let reply: redis::RedisResult<Value> = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(self.claim_idle.as_millis() as u64)
                .arg("0")
                .arg("COUNT")
                .arg(count)
                .query_async(&mut self.redis)
                .await;
            let reply = match reply {
                Ok(r) => r,
                Err(e) if is_nogroup(&e) => return Err(e),
                Err(e) => {
                    // Claimed again on the next round, once the node is back.
                    tracing::debug!(error = %e, stream, "journal: cannot claim from a stream");
                    batch.partial = true;
                    continue;
                }
            };
            if let Value::Array(parts) = reply {
                if let Some(Value::Array(items)) = parts.get(1) {
                    self.collect(&stream, items, &mut batch).await;
                }
            }
        }
        Ok(batch)
    }

    pub(super) async fn collect(&mut self, stream: &str, items: &[Value], batch: &mut Batch) {
        let mut ids = Vec::new();
        for item in items {
            match JournalEntry::from_stream(item) {
                Ok(rows) => {
                    // One stream id per stream entry, however many rows it packs: it is
                    // acknowledged once, after all its rows are committed.
                    if let Some(first) = rows.first() {
                        ids.push(first.stream_id.clone());
                    }
                    batch.entries.extend(rows);
                }
                Err(bad) => {
                    // Never block the stream on one bad entry, never drop it either: park it.
                    tracing::error!(error = %bad, stream, "journal entry cannot be parsed; moved to the dead-letter stream");
                    self.metrics
                        .journal_errors
                        .with_label_values(&["bad_entry"])
                        .inc();
                    let dead = format!("{stream}:dead");
                    let raw = format!("{item:?}");
                    let _: redis::RedisResult<String> = redis::cmd("XADD")
                        .arg(&dead)
                        .arg("*")
                        .arg("raw")
                        .arg(raw)
                        .query_async(&mut self.redis)
                        .await;
                    ids.push(bad.stream_id);
                }
            }
        }
        if !ids.is_empty() {
            batch.stream_entries += ids.len();
            batch.acks.push((stream.to_string(), ids));
        }
    }
}
