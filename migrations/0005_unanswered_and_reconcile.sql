-- Debits whose reply was lost (a Redis node died after running the script, a dropped
-- connection, a timeout), kept in Postgres as well as in the process that noted them, so that
-- another instance resolves them when that process dies first (src/ledger/unanswered.rs).
-- `claimed_until`: the instance working on the row (`owner`) keeps pushing it forward; once it
-- lies in the past, any instance may take the row over (resolution is idempotent).
CREATE TABLE IF NOT EXISTS unanswered_debits (
    charge_id     TEXT PRIMARY KEY,
    account_id    TEXT NOT NULL,
    request_id    TEXT NOT NULL,
    route         TEXT NOT NULL,
    action        TEXT NOT NULL,
    -- the debit script's deadline in Redis's clock (unix ms; 0 = none)
    deadline_ms   BIGINT NOT NULL,
    hold          BOOLEAN NOT NULL,
    noted_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_until TIMESTAMPTZ NOT NULL,
    -- the process working on the row (random per process); a claim is renewed only by it
    owner         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS unanswered_debits_claimed_idx ON unanswered_debits (claimed_until);

-- Credits recorded in Postgres are checked against the journal by their age
-- (src/ledger/reconcile.rs).
CREATE INDEX IF NOT EXISTS purchases_created_idx ON purchases (created_at);
CREATE INDEX IF NOT EXISTS purchase_refunds_created_idx ON purchase_refunds (created_at);
CREATE INDEX IF NOT EXISTS grants_created_idx ON grants (created_at);

-- The charge's amount as the refund event stated it (the clawback's journal reason quotes it);
-- NULL on rows from before this column (the session's amount stands in).
ALTER TABLE purchase_refunds ADD COLUMN IF NOT EXISTS charge_amount_cents BIGINT;
