//! The usage flusher: drains every shard stream into `ledger_entries`, exactly once.
//!
//! All proxy processes share one consumer group. A batch is read (XREADGROUP), written with one
//! statement (`ON CONFLICT DO NOTHING`), and only then acknowledged and deleted from the
//! stream (XACK + XDEL). If Postgres is down the batch stays in hand and is retried; nothing is
//! acknowledged, so nothing can be lost. Entries a dead consumer left pending are claimed with
//! XAUTOCLAIM once idle. A crash between commit and XACK only causes a re-delivery, which the
//! entry id makes harmless.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::redis_conn::RedisConn;
use futures_util::future::join_all;
use redis::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::entry::JournalEntry;
use crate::ledger::keys;
use crate::metrics::Metrics;

pub const GROUP: &str = "tollgate-journal";
/// Entries per shard per read, at most. A read whose reply does not arrive in time (the
/// connection's response timeout) is retried with a quarter of the count, down to
/// MIN_READ_COUNT, and the count grows back after each good batch.
const MAX_READ_COUNT: usize = 1000;
const MIN_READ_COUNT: usize = 1;
const IDLE_WAIT: Duration = Duration::from_millis(100);
const CLAIM_EVERY: Duration = Duration::from_secs(5);
const BACKLOG_EVERY: Duration = Duration::from_secs(2);

pub struct Flusher {
    pub redis: RedisConn,
    pub pg: PgPool,
    pub prefix: String,
    pub shards: u32,
    pub consumer: String,
    /// Pending entries idle this long belong to a dead consumer and are claimed.
    pub claim_idle: Duration,
    pub metrics: Arc<Metrics>,
    /// Sees every batch once it is committed (the outgoing alerts); must not block.
    pub on_flushed: Option<OnFlushed>,
    /// Streams whose reads failed: their own pending list is read back (from id 0) until it
    /// comes back empty, while the other streams go on with new entries.
    pub retry_streams: HashSet<String>,
    /// `true` once Postgres answers and is migrated (None: assume it is). Until then nothing
    /// is read from the streams (so nothing is delivered to, or acknowledged by, this
    /// consumer); the backlog is still sampled.
    pub pg_ready: Option<tokio::sync::watch::Receiver<bool>>,
}

/// A hook called with each committed batch.
pub type OnFlushed = Arc<dyn Fn(&[JournalEntry]) + Send + Sync>;

/// A read batch: entries to write, grouped by stream for the acknowledgement.
#[derive(Default)]
struct Batch {
    entries: Vec<JournalEntry>,
    /// (stream, stream ids) to XACK + XDEL after the commit.
    acks: Vec<(String, Vec<String>)>,
    /// Some streams could not be read (their node is down); the others were.
    partial: bool,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.acks.iter().all(|(_, ids)| ids.is_empty())
    }
}

fn streams(prefix: &str, shards: u32) -> Vec<String> {
    (0..shards).map(|s| keys::stream(prefix, s)).collect()
}

impl Flusher {
    /// A consumer name unique to this process.
    pub fn consumer_name() -> String {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "tollgate".into());
        format!(
            "{host}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    }

    /// Creates the consumer group on every shard stream (idempotent). One command per
    /// stream, sent together: the streams live in different slots, so on a cluster they are
    /// on different nodes (a pipeline may not span slots).
    pub async fn ensure_groups(&mut self) -> redis::RedisResult<()> {
        let calls = streams(&self.prefix, self.shards)
            .into_iter()
            .map(|stream| {
                let mut conn = self.redis.clone();
                async move {
                    redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(&stream)
                        .arg(GROUP)
                        .arg("0")
                        .arg("MKSTREAM")
                        .query_async::<()>(&mut conn)
                        .await
                }
            });
        for r in join_all(calls).await {
            if let Err(e) = r {
                if e.code() != Some("BUSYGROUP") {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Reads up to `count` entries per shard. `pending = true` re-reads this consumer's own
    /// unacknowledged entries (after a failed read, whose entries were delivered to this
    /// consumer although the reply never arrived, or a restart under the same name).
    async fn read(&mut self, pending: bool, count: usize) -> redis::RedisResult<Batch> {
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
    async fn claim(&mut self, count: usize) -> redis::RedisResult<Batch> {
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

    async fn collect(&mut self, stream: &str, items: &[Value], batch: &mut Batch) {
        let mut ids = Vec::new();
        for item in items {
            match JournalEntry::from_stream(item) {
                Ok(entry) => {
                    ids.push(entry.stream_id.clone());
                    batch.entries.push(entry);
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
            batch.acks.push((stream.to_string(), ids));
        }
    }

    /// Writes a batch and acknowledges it. On failure nothing is acknowledged.
    async fn flush(&mut self, batch: &Batch) -> Result<(), FlushError> {
        if batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let inserted = super::write::insert_batch(&self.pg, &batch.entries).await?;
        if let Some(hook) = &self.on_flushed {
            hook(&batch.entries);
        }
        // XACK + XDEL of one stream share its slot: one pipeline per stream, all at once.
        let acks = batch.acks.iter().map(|(stream, ids)| {
            let mut conn = self.redis.clone();
            async move {
                let mut pipe = redis::pipe();
                pipe.cmd("XACK").arg(stream).arg(GROUP).arg(ids).ignore();
                pipe.cmd("XDEL").arg(stream).arg(ids).ignore();
                (stream, pipe.query_async::<()>(&mut conn).await)
            }
        });
        // The rows are committed: a stream whose acknowledgement failed (its node went down)
        // keeps its entries pending under this consumer; they are read back from id 0 once
        // the node answers again and re-inserted harmlessly (ON CONFLICT DO NOTHING). The
        // other streams go on meanwhile.
        for (stream, r) in join_all(acks).await {
            if let Err(e) = r {
                tracing::warn!(error = %e, stream, "journal: acknowledging a written batch failed; its entries are read back later");
                self.metrics
                    .journal_errors
                    .with_label_values(&["redis"])
                    .inc();
                self.retry_streams.insert(stream.clone());
            }
        }
        self.metrics
            .journal_batch_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .journal_flushed
            .inc_by(batch.entries.len() as u64);
        tracing::debug!(
            entries = batch.entries.len(),
            inserted,
            "journal batch flushed"
        );
        Ok(())
    }

    /// The backlog's size (XLEN) and age (the oldest entry's id: entries are deleted once
    /// written, so the first one left is the oldest unwritten one), one pipeline per shard.
    async fn sample_backlog(&mut self) {
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
    async fn wait_for_postgres(&mut self, stop: &CancellationToken) -> bool {
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

    /// Runs until `stop`, then makes a last attempt to flush what it holds.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        // First the group, then our own pending entries (a restart under the same name).
        loop {
            match self.ensure_groups().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "journal: cannot create consumer groups yet");
                    if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        }
        if self.wait_for_postgres(&stop).await {
            return;
        }
        let mut in_hand: Option<Batch> = None;
        let mut read_pending = true;
        let mut count = MAX_READ_COUNT;
        let mut last_claim = Instant::now() - CLAIM_EVERY;
        let mut last_backlog = Instant::now() - BACKLOG_EVERY;
        loop {
            let stopping = stop.is_cancelled();
            if last_backlog.elapsed() >= BACKLOG_EVERY {
                self.sample_backlog().await;
                last_backlog = Instant::now();
            }
            // Whether this batch is a read of our own pending list.
            let mut pending_read = false;
            let batch = match in_hand.take() {
                Some(b) => Ok(b),
                None if last_claim.elapsed() >= CLAIM_EVERY && !stopping => {
                    last_claim = Instant::now();
                    self.claim(count).await
                }
                None => {
                    pending_read = read_pending;
                    self.read(read_pending, count).await
                }
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) if is_nogroup(&e) && !stopping => {
                    // The streams or the group vanished: Redis lost its data (a restart
                    // without AOF, a FLUSHALL) or a stream was deleted. New entries go to
                    // streams without our group; create it again (from the start of each
                    // stream, so nothing written since is skipped) and go on.
                    tracing::warn!(error = %e, "journal: consumer group missing; creating it again");
                    self.metrics
                        .journal_errors
                        .with_label_values(&["redis"])
                        .inc();
                    if let Err(e) = self.ensure_groups().await {
                        tracing::warn!(error = %e, "journal: cannot create consumer groups");
                        if sleep_or_stop(&stop, backoff).await {
                            return;
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, count, "journal: reading the streams failed");
                    self.metrics
                        .journal_errors
                        .with_label_values(&["redis"])
                        .inc();
                    // A timed-out XREADGROUP still delivered its entries to this consumer:
                    // read them back from our own pending list (not only after a claim
                    // timeout), in smaller batches in case the reply was too large.
                    read_pending = true;
                    count = (count / 4).max(MIN_READ_COUNT);
                    if stopping || sleep_or_stop(&stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let full = batch.entries.len() >= count;
            match self.flush(&batch).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    count = (count * 2).min(MAX_READ_COUNT);
                }
                Err(e) => {
                    tracing::warn!(error = %e, entries = batch.entries.len(), "journal: flush failed; will retry (entries stay in Redis)");
                    self.metrics
                        .journal_errors
                        .with_label_values(&[e.label()])
                        .inc();
                    if stopping {
                        return;
                    }
                    in_hand = Some(batch);
                    // Once it is written, look at our pending list again for anything else
                    // delivered to us but not yet written.
                    read_pending = true;
                    if sleep_or_stop(&stop, backoff).await {
                        // Last chance on shutdown: one more try.
                        if let Some(b) = in_hand.take() {
                            let _ = self.flush(&b).await;
                        }
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            if pending_read {
                // Our own pending list is read until it comes back empty, then new entries.
                read_pending = !batch.is_empty();
            }
            if batch.partial {
                // A node is down: do not spin on it; the healthy streams wait a moment too.
                let _stopped = sleep_or_stop(&stop, IDLE_WAIT).await;
            }
            if batch.is_empty() && !pending_read {
                if stopping {
                    return;
                }
                // Nothing new: wait a little (or until stop, then drain once more).
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(IDLE_WAIT) => {}
                }
            } else if !full && stopping {
                // Drained what there was at shutdown.
                let last = self.read(false, count).await;
                if let Ok(b) = last {
                    let _ = self.flush(&b).await;
                }
                return;
            }
        }
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

/// Whether a command (or any command of a pipeline) failed because a stream or the consumer
/// group does not exist.
fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP")
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, err)| err.code() == "NOGROUP"))
}

/// `true` when stopped during the sleep.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl FlushError {
    fn label(&self) -> &'static str {
        match self {
            FlushError::Postgres(_) => "postgres",
            FlushError::Redis(_) => "redis",
        }
    }
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
