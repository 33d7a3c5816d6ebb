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

mod backlog;
mod read;

pub const GROUP: &str = "tollgate-journal";
/// Stream entries per shard per read, at most. A read whose reply does not arrive in time (the
/// connection's response timeout) is retried with a quarter of the count, down to
/// MIN_READ_COUNT, and the count grows back after each good batch.
const MAX_READ_COUNT: usize = 1000;
/// Journal rows per shard per read, roughly: a stream entry may pack many rows (a credit
/// slice's batch report), so the count of entries read is also bounded by this many rows
/// divided by the rows per entry last seen. Keeps a batch (memory, one transaction) bounded
/// in rows, as it was when every entry was one row.
const MAX_READ_ROWS: usize = 1000;
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
    /// Stream entries read (each holds one row, or many when packed).
    stream_entries: usize,
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
        // Rows per stream entry in the last batch read (1 until packed entries are seen).
        let mut rows_per_entry: usize = 1;
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
            let read_count = count.min((MAX_READ_ROWS / rows_per_entry).max(MIN_READ_COUNT));
            let batch = match in_hand.take() {
                Some(b) => Ok(b),
                None if last_claim.elapsed() >= CLAIM_EVERY && !stopping => {
                    last_claim = Instant::now();
                    self.claim(read_count).await
                }
                None => {
                    pending_read = read_pending;
                    self.read(read_pending, read_count).await
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
            let full = batch.stream_entries >= read_count;
            if batch.stream_entries > 0 {
                rows_per_entry = batch.entries.len().div_ceil(batch.stream_entries).max(1);
            }
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
                let last = self.read(false, read_count).await;
                if let Ok(b) = last {
                    let _ = self.flush(&b).await;
                }
                return;
            }
        }
    }
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
