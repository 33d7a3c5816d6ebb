//! Accounts: creation, their live Redis state (hydrated on demand), tier changes and
//! suspension. Called by the admin API, the console, the portal, Stripe's handlers and the
//! proxy's self-service endpoints alike.

use std::sync::Arc;

use super::DomainError;
use crate::state::AppState;
use crate::store::accounts::{self, AccountRow};

/// Creates an account on a configured tier; its Redis state is hydrated on first use.
pub async fn create(state: &AppState, id: &str, tier: &str) -> Result<AccountRow, DomainError> {
    if !accounts::valid_id(id) {
        return Err(DomainError::Invalid(
            "id must be 1-128 characters of letters, digits, '_', '-', '.', '@'".into(),
        ));
    }
    if state.config().tier(tier).is_none() {
        return Err(DomainError::UnknownTier(tier.to_string()));
    }
    let Some(row) = accounts::create(&state.pg, id, tier).await? else {
        return Err(DomainError::Conflict(format!(
            "account {id:?} already exists"
        )));
    };
    tracing::info!(account = %row.id, tier = %row.tier, "account created");
    Ok(row)
}

/// An account's live Redis state, hydrating it first if Redis does not hold it.
pub async fn live_state(
    state: &AppState,
    config: &crate::config::Config,
    id: &str,
) -> Result<Option<crate::ledger::AccountState>, crate::ledger::LedgerError> {
    let mut conn = state.redis.clone();
    if state.leases.holds(id) {
        // Requests this instance served from its slice and Redis has not applied yet.
        let shard = state.ledger.keys(id).shard;
        let (live, applied) = state
            .ledger
            .state_and(
                &mut conn,
                id,
                &crate::lease::report::slice_data_key(&state.ledger.prefix, shard),
                &format!("seq:{}", state.leases.instance),
            )
            .await?;
        if let Some(live) = live {
            let applied = applied.unwrap_or(0).max(0) as u64;
            let unconfirmed = state.leases.unconfirmed(id, applied);
            return Ok(Some(live.less_unconfirmed(
                crate::money::Credits::from_micros(unconfirmed),
            )));
        }
    } else if let Some(live) = state.ledger.state(&mut conn, id).await? {
        return Ok(Some(live));
    }
    match state.ledger.hydrate(&mut conn, &state.pg, config, id).await {
        Ok(created) => {
            if created {
                state.metrics.hydrations.inc();
            }
            state.ledger.state(&mut conn, id).await
        }
        Err(crate::ledger::LedgerError::NoSuchAccount(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Moves an account to another tier at once: features, quotas and rate follow immediately on
/// every instance; the allowance becomes the new tier's monthly credits (journaled as a
/// `subscription` entry); purchased credits are untouched. Returns the updated row.
pub async fn set_tier(
    state: &AppState,
    id: &str,
    new_tier: &str,
) -> Result<AccountRow, DomainError> {
    let config = state.config();
    let tier = config
        .tier(new_tier)
        .ok_or_else(|| DomainError::UnknownTier(new_tier.to_string()))?;
    let monthly = match tier.monthly_credits() {
        crate::config::MonthlyCredits::Limited(c) => Some(c),
        crate::config::MonthlyCredits::Unlimited => None,
    };
    // Make sure Redis holds the account (with the old tier) so the change is journaled there.
    if live_state(state, &config, id).await?.is_none() {
        return Err(DomainError::NotFound(format!("no account {id:?}")));
    }
    let row = accounts::set_tier(&state.pg, id, new_tier)
        .await?
        .ok_or_else(|| DomainError::NotFound(format!("no account {id:?}")))?;
    let entry_id = format!("{id}:tier:{}", uuid::Uuid::now_v7().simple());
    // Requests served from credit slices under the old tier are charged before its
    // allowance is replaced.
    crate::lease::recall::drain(&state.leases, state, id).await;
    let mut conn = state.redis.clone();
    state
        .ledger
        .set_tier(&mut conn, id, new_tier, monthly, &entry_id)
        .await?;
    crate::auth::invalidation::tier_changed(&mut conn, &config, &state.caches, id, new_tier).await;
    tracing::info!(account = %id, tier = %new_tier, "tier changed");
    Ok(row)
}

/// Suspends (`suspended`) or reinstates (`active`) an account. Needs Redis only: applied there
/// at once (every instance drops the account's cached keys within 2 s), recorded in the auth
/// outbox and written to Postgres by the drainer, now or when Postgres is back.
pub async fn set_status(state: &Arc<AppState>, id: &str, status: &str) -> Result<(), DomainError> {
    if !matches!(status, "active" | "suspended") {
        return Err(DomainError::Invalid(
            "status must be \"active\" or \"suspended\"".into(),
        ));
    }
    let config = state.config();
    let prefix = config.redis.key_prefix.clone();
    let mut conn = state.redis.clone();
    // The account must exist: Redis knows it if it was ever used; otherwise ask Postgres.
    let in_redis = state.ledger.state(&mut conn, id).await?.is_some();
    if !in_redis {
        let found = accounts::get(&state.pg, id).await.map_err(|e| {
            DomainError::Unavailable(format!("postgres (account {id:?} is not in redis): {e}"))
        })?;
        if found.is_none() {
            return Err(DomainError::NotFound(format!("no account {id:?}")));
        }
    }
    let index = crate::auth::redis_keys::KeyIndex::new(&prefix, config.redis.shards);
    let change = crate::auth::outbox::Change::Status {
        account_id: id.to_string(),
        status: status.to_string(),
        at: crate::auth::redis_keys::now_version(),
    };
    crate::auth::outbox::submit(&mut conn, &prefix, &index, &state.ledger, &change).await?;
    if let Err(e) = crate::auth::invalidation::publish(
        &mut conn,
        &prefix,
        &state.caches,
        crate::auth::invalidation::Invalidation::Account(id),
    )
    .await
    {
        tracing::error!(error = %e, account = %id, "could not announce the status change");
    }
    crate::auth::outbox::nudge(Arc::clone(state)).await;
    tracing::info!(account = %id, status = %status, "account status changed");
    Ok(())
}
