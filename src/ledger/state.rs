//! Reading an account's live state and its plan counters from Redis.

use super::*;

impl Ledger {
    /// Reads an account's live state; `None` when it is not in Redis.
    const STATE_FIELDS: [&'static str; 7] = [
        "tier",
        "status",
        "allowance",
        "purchased",
        "period_start",
        "period_end",
        "leased",
    ];

    pub async fn state(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
    ) -> Result<Option<AccountState>, LedgerError> {
        let k = self.keys(account_id);
        let fields: Vec<Option<String>> = self
            .timed(
                redis::cmd("HMGET")
                    .arg(&k.account)
                    .arg(&Self::STATE_FIELDS)
                    .query_async(conn),
            )
            .await?;
        Ok(Self::parse_state(&fields))
    }

    /// The state and, read atomically with it, one field of another hash in the account's
    /// slot (the last credit-slice report Redis applied for an instance).
    pub async fn state_and(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
        hash: &str,
        field: &str,
    ) -> Result<(Option<AccountState>, Option<i64>), LedgerError> {
        let k = self.keys(account_id);
        let (fields, extra): (Vec<Option<String>>, Option<i64>) = self
            .timed(
                redis::pipe()
                    .atomic()
                    .cmd("HMGET")
                    .arg(&k.account)
                    .arg(&Self::STATE_FIELDS)
                    .cmd("HGET")
                    .arg(hash)
                    .arg(field)
                    .query_async(conn),
            )
            .await?;
        Ok((Self::parse_state(&fields), extra))
    }

    fn parse_state(fields: &[Option<String>]) -> Option<AccountState> {
        let get = |i: usize| fields.get(i).cloned().flatten();
        let tier = get(0)?;
        let num = |i: usize| get(i).and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
        Some(AccountState {
            tier,
            status: get(1).unwrap_or_else(|| "active".into()),
            allowance: Credits::from_micros(num(2)),
            purchased: Credits::from_micros(num(3)),
            period_start: num(4),
            period_end: num(5),
            leased: Credits::from_micros(num(6)),
        })
    }

    /// The account's plan counters: requests and tokens this period, counted resources.
    pub async fn counters(
        &self,
        conn: &mut RedisConn,
        account_id: &str,
    ) -> Result<Counters, LedgerError> {
        let k = self.keys(account_id);
        let all: std::collections::HashMap<String, String> = self
            .timed(redis::cmd("HGETALL").arg(&k.account).query_async(conn))
            .await?;
        let num = |v: Option<&String>| v.and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
        Ok(Counters {
            requests: num(all.get("req_p")),
            tokens: num(all.get("tok_p")),
            resources: all
                .iter()
                .filter_map(|(f, v)| Some((f.strip_prefix("r:")?.to_string(), num(Some(v)))))
                .collect(),
        })
    }
}
