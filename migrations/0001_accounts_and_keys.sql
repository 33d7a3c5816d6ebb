-- Accounts and their API keys. Balances live in Redis and in the journal (ledger_entries);
-- this table holds what identifies and classifies an account.
CREATE TABLE IF NOT EXISTS accounts (
    id           TEXT PRIMARY KEY,
    tier         TEXT NOT NULL,
    -- active | suspended | past_due
    status       TEXT NOT NULL DEFAULT 'active',
    period_start TIMESTAMPTZ NOT NULL,
    period_end   TIMESTAMPTZ NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Only a SHA-256 of each key is stored; the plaintext is shown once, at creation.
CREATE TABLE IF NOT EXISTS api_keys (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    -- first characters of the key, for display ("tg_AbC1234…")
    prefix      TEXT NOT NULL,
    key_hash    BYTEA NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS api_keys_account_idx ON api_keys (account_id);
