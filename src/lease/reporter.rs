//! The background side of credit slices: a report per shard every batch window (sooner when a
//! recall or an account change asks), expired slices swept back to their accounts, and at
//! shutdown every slice given back and every served request reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use super::{report, Leases, Stores};

pub async fn run(leases: Arc<Leases>, stores: Arc<impl Stores>, stop: CancellationToken) {
    let batch = Duration::from_millis(leases.cfg.batch_ms);
    let sweep_every = Duration::from_millis((leases.cfg.ttl_ms / 2).max(100));
    let mut last_sweep = Instant::now();
    let mut tick = tokio::time::interval(batch);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
            _ = leases.kick.notified() => {}
        }
        report_all(&leases, &*stores, false).await;
        if last_sweep.elapsed() >= sweep_every {
            last_sweep = Instant::now();
            match report::sweep_expired(&*stores, stores.ledger().shards).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(slices = n, "expired credit slices returned"),
                Err(e) => tracing::warn!(error = %e, "could not sweep expired credit slices"),
            }
        }
    }
    // Shutdown: report everything and give every slice back (a few tries: Redis may blink).
    for _ in 0..5 {
        if report_all(&leases, &*stores, true).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::error!("credit slices: the final report failed; unreported requests are forgiven and the slices expire back to their accounts");
}

/// One report per shard that has slices, shards in parallel. True when all succeeded.
async fn report_all(leases: &Leases, stores: &impl Stores, closing: bool) -> bool {
    let busy: Vec<usize> = (0..leases.shards.len())
        .filter(|&i| !leases.shards[i].read().is_empty())
        .collect();
    let results = join_all(
        busy.into_iter()
            .map(|shard| report::report_shard(leases, stores, shard, closing)),
    )
    .await;
    let mut ok = true;
    for r in results {
        if let Err(e) = r {
            ok = false;
            tracing::warn!(error = %e, "credit slice report failed; sent again next batch");
        }
    }
    ok
}
