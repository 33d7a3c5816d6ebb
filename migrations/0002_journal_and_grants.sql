-- The journal: one row per credit movement, written by the usage flusher from the Redis shard
-- streams. Append-only. For every account, the sum of d_allowance + d_purchased is its balance.
--
-- The primary key includes created_at (the entry's own timestamp, set once by the Redis script
-- and carried in the stream entry, so a re-delivered entry has the same key) because a
-- partitioned table's unique constraints must include the partition key: the table can be
-- turned into `PARTITION BY RANGE (created_at)` with monthly partitions without changing how
-- rows are written (ON CONFLICT DO NOTHING still dedupes).
CREATE TABLE IF NOT EXISTS ledger_entries (
    entry_id        TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    -- debit | settle | refund | reset | grant | purchase | subscription | adjustment
    kind            TEXT NOT NULL,
    -- credits counted for usage statistics (the price of a debit, negative for a refund)
    amount          BIGINT NOT NULL,
    -- what the entry did to each bucket (micro-credits)
    d_allowance     BIGINT NOT NULL,
    d_purchased     BIGINT NOT NULL,
    -- the buckets right after the entry
    allowance_after BIGINT NOT NULL,
    purchased_after BIGINT NOT NULL,
    request_id      TEXT,
    route           TEXT,
    action          TEXT,
    tier            TEXT,
    tokens_in       BIGINT,
    tokens_out      BIGINT,
    upstream_status INTEGER,
    duration_ms     INTEGER,
    reason          TEXT,
    period_start    TIMESTAMPTZ,
    period_end      TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (entry_id, created_at)
);
CREATE INDEX IF NOT EXISTS ledger_entries_account_time_idx ON ledger_entries (account_id, created_at DESC, entry_id DESC);
CREATE INDEX IF NOT EXISTS ledger_entries_time_idx ON ledger_entries (created_at);

-- Manual grants, idempotent on (account, idempotency_key).
CREATE TABLE IF NOT EXISTS grants (
    account_id      TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    idempotency_key TEXT NOT NULL,
    credits         BIGINT NOT NULL,
    reason          TEXT NOT NULL,
    applied         BOOLEAN NOT NULL DEFAULT false,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, idempotency_key)
);

ALTER TABLE accounts ADD COLUMN IF NOT EXISTS anchor_day SMALLINT NOT NULL DEFAULT 1;
