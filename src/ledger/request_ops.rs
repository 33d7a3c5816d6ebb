//! A request's housekeeping besides its debit: concurrency leases released or renewed, and a
//! resource count taken back.

use super::*;

impl Ledger {
    /// Releases a concurrency lease (best effort: it expires on its own anyway).
    pub async fn release_lease(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
        charge_id: &str,
        action: Option<&str>,
    ) -> Result<(), LedgerError> {
        let k = self.keys(account_id);
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM").arg(&k.leases).arg(charge_id).ignore();
        if let Some(action) = action {
            pipe.cmd("ZREM")
                .arg(k.action_leases(action))
                .arg(charge_id)
                .ignore();
        }
        let () = self.timed(pipe.query_async(conn)).await?;
        Ok(())
    }

    /// Pushes a running request's lease(s) `ttl_ms` into the future (only if still present).
    pub async fn renew_lease(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
        charge_id: &str,
        action: Option<&str>,
        ttl_ms: u64,
    ) -> Result<(), LedgerError> {
        let k = self.keys(account_id);
        let until = now_ms() + ttl_ms as i64;
        let mut pipe = redis::pipe();
        let mut zsets = vec![k.leases.clone()];
        zsets.extend(action.map(|a| k.action_leases(a)));
        for zset in &zsets {
            // Every member expires by now + ttl at the latest, so this never shortens one.
            pipe.cmd("ZADD")
                .arg(zset)
                .arg("XX")
                .arg(until)
                .arg(charge_id)
                .ignore()
                .cmd("PEXPIRE")
                .arg(zset)
                .arg(ttl_ms)
                .ignore();
        }
        let () = self.timed(pipe.query_async(conn)).await?;
        Ok(())
    }

    /// Takes back a resource count of a request that did not succeed.
    pub async fn uncount(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
        resource: &str,
        delta: i64,
    ) -> Result<(), LedgerError> {
        let k = self.keys(account_id);
        let _: i64 = self
            .timed(
                self.uncount
                    .key(&k.account)
                    .arg(resource)
                    .arg(delta)
                    .invoke_async(conn),
            )
            .await?;
        Ok(())
    }
}
