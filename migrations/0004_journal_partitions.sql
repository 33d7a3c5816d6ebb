-- The journal partitioned by month: `ledger_entries` becomes `PARTITION BY RANGE (created_at)`
-- with one partition per calendar month in UTC (`ledger_entries_2026_11` holds
-- [2026-11-01 00:00 UTC, 2026-12-01 00:00 UTC)) and a DEFAULT partition as a safety net, so an
-- entry dated in a month whose partition does not exist yet is stored anyway (the flusher never
-- fails on a date); partition maintenance (src/journal/partitions.rs) creates the coming months
-- ahead of time and moves rows that landed in DEFAULT into their month.
--
-- Rows are written exactly as before: the primary key (entry_id, created_at) contains the
-- partition key, and created_at is the entry's own timestamp, identical on every re-delivery,
-- so a re-delivered entry is routed to the same partition and `ON CONFLICT DO NOTHING` still
-- stores it once.
--
-- Existing rows are copied into their monthly partitions inside this migration's transaction
-- (the journal is locked meanwhile: count about a minute per 10^7 rows; run `tollgate migrate`
-- ahead of a rolling upgrade on a large journal).

-- Month arithmetic below is done on UTC wall-clock time whatever the session's time zone.
SET LOCAL TimeZone = 'UTC';

ALTER TABLE ledger_entries RENAME TO ledger_entries_unpartitioned;
ALTER INDEX IF EXISTS ledger_entries_pkey RENAME TO ledger_entries_unpartitioned_pkey;
ALTER INDEX IF EXISTS ledger_entries_account_time_idx RENAME TO ledger_entries_unpartitioned_account_time_idx;
ALTER INDEX IF EXISTS ledger_entries_time_idx RENAME TO ledger_entries_unpartitioned_time_idx;

CREATE TABLE ledger_entries (
    entry_id        TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    -- debit | extend | settle | refund | reset | grant | purchase | subscription | adjustment |
    -- carry_forward (the sums of a month dropped by retention, see ledger_rollups)
    kind            TEXT NOT NULL,
    amount          BIGINT NOT NULL,
    d_allowance     BIGINT NOT NULL,
    d_purchased     BIGINT NOT NULL,
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
    created_at      TIMESTAMPTZ NOT NULL
) PARTITION BY RANGE (created_at);

CREATE TABLE ledger_entries_default PARTITION OF ledger_entries DEFAULT;

-- One partition per month that has rows, plus this month and the next two.
DO $$
DECLARE
    m timestamp;
BEGIN
    FOR m IN
        SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC')
          FROM ledger_entries_unpartitioned
        UNION
        SELECT date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => n)
          FROM generate_series(0, 2) AS n
        ORDER BY 1
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF ledger_entries FOR VALUES FROM (%L) TO (%L)',
            'ledger_entries_' || to_char(m, 'YYYY_MM'),
            to_char(m, 'YYYY-MM-DD') || ' 00:00:00+00',
            to_char(m + interval '1 month', 'YYYY-MM-DD') || ' 00:00:00+00');
    END LOOP;
END
$$;

INSERT INTO ledger_entries (entry_id, account_id, kind, amount, d_allowance, d_purchased,
        allowance_after, purchased_after, request_id, route, action, tier, tokens_in,
        tokens_out, upstream_status, duration_ms, reason, period_start, period_end, created_at)
SELECT entry_id, account_id, kind, amount, d_allowance, d_purchased,
       allowance_after, purchased_after, request_id, route, action, tier, tokens_in,
       tokens_out, upstream_status, duration_ms, reason, period_start, period_end, created_at
  FROM ledger_entries_unpartitioned;

DROP TABLE ledger_entries_unpartitioned;

-- Indexes after the copy: built by sorting each partition, much faster than maintained row by
-- row. Created on the parent, so every partition, present and future, gets them.
SET LOCAL maintenance_work_mem = '256MB';
ALTER TABLE ledger_entries ADD PRIMARY KEY (entry_id, created_at);
-- Every journal read is per account: history (newest first, keyset pagination), usage over a
-- time range, the audit's and the hydration's sums. The old index on created_at alone is not
-- recreated: nothing reads the journal by time across accounts, and monthly partition pruning
-- now does what it did (one index less to maintain per row written).
CREATE INDEX ledger_entries_account_time_idx
    ON ledger_entries (account_id, created_at DESC, entry_id DESC);

-- What retention rolled up: one row per monthly partition dropped (README: "Postgres at
-- volume"). For every account that had rows in it, a `carry_forward` entry dated `carried_to`
-- (the first instant of the oldest month kept) holds the sums of its dropped rows, so
-- balance = sum of entries still holds. `seq` > 1 only if rows of an already dropped month
-- came back (a replayed entry) and were rolled up again.
CREATE TABLE IF NOT EXISTS ledger_rollups (
    partition    TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    range_from   TIMESTAMPTZ NOT NULL,
    range_to     TIMESTAMPTZ NOT NULL,
    carried_to   TIMESTAMPTZ NOT NULL,
    rows         BIGINT NOT NULL,
    accounts     BIGINT NOT NULL,
    d_allowance  BIGINT NOT NULL,
    d_purchased  BIGINT NOT NULL,
    rolled_up_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, seq)
);
