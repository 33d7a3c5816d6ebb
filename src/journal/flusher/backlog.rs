//! The backlog gauges (stream length and age of the oldest unwritten entry), sampled also
//! while Postgres is not ready.

use super::*;

impl Flusher {
    /// The backlog's size (XLEN) and age (the oldest entry's id: entries are deleted once
    /// written, so the first one left is the oldest unwritten one), one pipeline per shard.
    pub(super) async fn sample_backlog(&mut self) {
        let samples = streams(&self.prefix, self.shards)
            .into_iter()
            .map(|stream| {
                let mut conn = self.redis.clone();
                async move {
                    let mut pipe = redis::pipe();
                    pipe.cmd("XLEN").arg(&stream);
                    pipe.cmd("XRANGE")
                        .arg(&stream)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(1);
                    pipe.query_async::<(i64, Value)>(&mut conn).await
                }
            });
        let samples: redis::RedisResult<Vec<(i64, Value)>> =
            join_all(samples).await.into_iter().collect();
        let Ok(samples) = samples else { return };
        self.metrics
            .journal_backlog
            .set(samples.iter().map(|(len, _)| len).sum());
        let oldest_ms = samples
            .iter()
            .filter_map(|(_, first)| first_id_millis(first))
            .min();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let age = oldest_ms.map_or(0, |ms| ((now_ms - ms) / 1000).max(0));
        self.metrics.journal_backlog_oldest_seconds.set(age);
    }

    /// Waits while Postgres is not ready yet, sampling the backlog; `true` when stopped.
    pub(super) async fn wait_for_postgres(&mut self, stop: &CancellationToken) -> bool {
        let Some(mut ready) = self.pg_ready.clone() else {
            return false;
        };
        while !*ready.borrow_and_update() {
            self.sample_backlog().await;
            tokio::select! {
                _ = stop.cancelled() => return true,
                _ = ready.changed() => {}
                _ = tokio::time::sleep(BACKLOG_EVERY) => {}
            }
        }
        false
    }
}

/// The millisecond timestamp of the first entry of an XRANGE reply (`[[id, fields]]`).
fn first_id_millis(reply: &Value) -> Option<i64> {
    let Value::Array(items) = reply else {
        return None;
    };
    let Value::Array(entry) = items.first()? else {
        return None;
    };
    let id = match entry.first()? {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => return None,
    };
    id.split_once('-')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use redis::Value;

    fn entry(id: &str) -> Value {
        Value::Array(vec![
            Value::BulkString(id.as_bytes().to_vec()),
            Value::Array(vec![]),
        ])
    }

    #[test]
    fn the_backlog_age_comes_from_the_first_entry_id() {
        let reply = Value::Array(vec![entry("1796245592981-3")]);
        assert_eq!(super::first_id_millis(&reply), Some(1_796_245_592_981));
        // An empty stream, or a reply of another shape: no age.
        assert_eq!(super::first_id_millis(&Value::Array(vec![])), None);
        assert_eq!(super::first_id_millis(&Value::Nil), None);
        assert_eq!(
            super::first_id_millis(&Value::Array(vec![entry("garbage")])),
            None
        );
    }
}
