//! Group commit for the exact path: while a call of a script (debit, settle) for a shard is in
//! flight, the next calls of that script on that shard wait, and go together in one call
//! (`batch.lua` around the script) when it returns. A busy shard then costs Redis one script
//! call per round trip instead of one per request, and tollgate one command to write and one
//! reply to read. Nothing about the money changes: each call runs exactly as the script alone,
//! in arrival order, atomically per call.
//!
//! One task per shard and script (spawned on its first call) owns the queue; a request that
//! cannot reach it (the task is gone with its runtime) makes its own single call instead.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::IntCounter;
use redis::{Script, Value};
use tokio::sync::{mpsc, oneshot};

use crate::redis_conn::RedisConn;

/// One call's keys and arguments, as the script takes them (a fixed number of each, so the
/// batch script can cut them apart).
pub(super) struct Call {
    pub keys: Vec<String>,
    pub args: Vec<Vec<u8>>,
}

/// Why a queued call has no reply. `outcome_unknown`: the call may have run (a dropped
/// connection, a timeout), so a debit is treated like any unanswered one.
#[derive(Debug, Clone)]
pub struct BatchFailure {
    pub outcome_unknown: bool,
    pub message: String,
}

/// Counts grouped calls and the requests they carried (`tollgate_redis_grouped_*_total`).
#[derive(Clone)]
pub struct GroupCounters {
    pub calls: IntCounter,
    pub requests: IntCounter,
}

struct Queued {
    call: Call,
    reply: oneshot::Sender<Result<Value, BatchFailure>>,
}

pub(super) struct GroupCommit {
    script: Arc<Script>,
    shape: Shape,
    max_batch: usize,
    timeout: Duration,
    counters: Option<GroupCounters>,
    shards: Vec<OnceLock<mpsc::UnboundedSender<Queued>>>,
}

/// Keys and arguments per call of the grouped script.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub keys: usize,
    pub args: usize,
}

/// `batch.lua` around `body` (the script with its prelude), which becomes `one(KEYS, ARGV)`.
pub(super) fn batch_script(body: &str) -> Script {
    Script::new(&format!(
        "local function one(KEYS, ARGV)\n{body}\nend\n{}",
        include_str!("batch.lua")
    ))
}

impl GroupCommit {
    /// `script`: [`batch_script`] of the script whose calls have `shape`.
    pub fn new(
        script: Script,
        shape: Shape,
        shards: u32,
        max_batch: usize,
        timeout: Duration,
        counters: Option<GroupCounters>,
    ) -> Self {
        GroupCommit {
            script: Arc::new(script),
            shape,
            max_batch: max_batch.max(1),
            timeout,
            counters,
            shards: (0..shards).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Queues the call on its shard and waits for its reply. `Err(call)` gives the call back
    /// when no queue can take it (the caller then makes a single call).
    pub async fn call(
        &self,
        shard: u32,
        conn: &RedisConn,
        call: Call,
    ) -> Result<Result<Value, BatchFailure>, Call> {
        debug_assert_eq!(
            (call.keys.len(), call.args.len()),
            (self.shape.keys, self.shape.args)
        );
        let Some(slot) = self.shards.get(shard as usize) else {
            return Err(call);
        };
        let tx = slot.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(
                rx,
                conn.clone(),
                Arc::clone(&self.script),
                self.shape,
                self.max_batch,
                self.timeout,
                self.counters.clone(),
            ));
            tx
        });
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(q)) = tx.send(Queued { call, reply }) {
            return Err(q.call);
        }
        Ok(rx.await.unwrap_or_else(|_| {
            Err(BatchFailure {
                outcome_unknown: true,
                message: "the shard's queue stopped before answering".into(),
            })
        }))
    }
}

/// The queue of one shard: takes what waits (up to `max_batch`), sends it as one call, answers each.
async fn run(
    mut rx: mpsc::UnboundedReceiver<Queued>,
    mut conn: RedisConn,
    script: Arc<Script>,
    shape: Shape,
    max_batch: usize,
    timeout: Duration,
    counters: Option<GroupCounters>,
) {
    let mut batch: Vec<Queued> = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        // A request that gave up waiting (its caller timed out) is not sent: its deadline
        // would refuse it anyway, and nobody reads the reply.
        batch.retain(|q| !q.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        if let Some(c) = &counters {
            c.calls.inc();
            c.requests.inc_by(batch.len() as u64);
        }
        let mut inv = script.prepare_invoke();
        inv.arg(shape.keys).arg(shape.args);
        for q in &batch {
            for k in &q.call.keys {
                inv.key(k.as_str());
            }
            for a in &q.call.args {
                inv.arg(a.as_slice());
            }
        }
        let result: Result<Vec<Value>, BatchFailure> =
            match tokio::time::timeout(timeout, inv.invoke_async(&mut conn)).await {
                Ok(Ok(replies)) => Ok(replies),
                Ok(Err(e)) => Err(BatchFailure {
                    outcome_unknown: !e.is_connection_refusal()
                        && (e.is_io_error() || e.is_connection_dropped() || e.is_timeout()),
                    message: e.to_string(),
                }),
                Err(_) => Err(BatchFailure {
                    outcome_unknown: true,
                    message: format!("redis did not answer within {timeout:?}"),
                }),
            };
        match result {
            Ok(replies) if replies.len() == batch.len() => {
                for (q, reply) in batch.drain(..).zip(replies) {
                    let _ = q.reply.send(Ok(reply));
                }
            }
            Ok(replies) => {
                let failure = BatchFailure {
                    outcome_unknown: true,
                    message: format!(
                        "the batch answered {} replies for {} calls",
                        replies.len(),
                        batch.len()
                    ),
                };
                for q in batch.drain(..) {
                    let _ = q.reply.send(Err(failure.clone()));
                }
            }
            Err(failure) => {
                for q in batch.drain(..) {
                    let _ = q.reply.send(Err(failure.clone()));
                }
            }
        }
    }
}
