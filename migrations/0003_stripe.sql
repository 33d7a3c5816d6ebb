-- Stripe: the webhook dedup record, the business objects each event applies (each unique on
-- its Stripe id, so two events about one object apply it once), the customer of each account,
-- and the outgoing alerts outbox. Money is integer: cents for what Stripe charged, micro-credits
-- for what tollgate credited.

-- One row per Stripe event id ever processed, written in the same transaction as the event's
-- effect: a redelivered event finds its row and changes nothing.
CREATE TABLE IF NOT EXISTS stripe_events (
    event_id    TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    -- the event's own `created` (Stripe's clock), used to order events about one object
    created     TIMESTAMPTZ NOT NULL,
    -- applied | already_applied | stale | ignored | unknown_account
    outcome     TEXT NOT NULL,
    account_id  TEXT,
    object_id   TEXT,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The Stripe customer of an account, created once (on its first checkout) and reused.
CREATE TABLE IF NOT EXISTS stripe_customers (
    account_id  TEXT PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    customer_id TEXT NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Credit packs bought through Checkout: one row per Checkout Session, whichever event
-- (completed, async_payment_succeeded) delivered it first.
CREATE TABLE IF NOT EXISTS purchases (
    session_id        TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL,
    pack_id           TEXT NOT NULL,
    -- micro-credits credited (credits + bonus_credits of the pack)
    credits           BIGINT NOT NULL,
    bonus_credits     BIGINT NOT NULL,
    amount_cents      BIGINT NOT NULL,
    currency          TEXT NOT NULL,
    payment_intent_id TEXT,
    -- cumulative refunded amount seen on the charge (cents) and the micro-credits clawed back
    refunded_cents    BIGINT NOT NULL DEFAULT 0,
    clawed_back       BIGINT NOT NULL DEFAULT 0,
    event_id          TEXT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS purchases_payment_intent_idx ON purchases (payment_intent_id);
CREATE INDEX IF NOT EXISTS purchases_account_idx ON purchases (account_id, created_at);
CREATE INDEX IF NOT EXISTS purchases_created_idx ON purchases (created_at);

-- Each refund state of a charge (its cumulative amount_refunded) is applied once.
CREATE TABLE IF NOT EXISTS purchase_refunds (
    charge_id       TEXT NOT NULL,
    amount_refunded BIGINT NOT NULL,
    session_id      TEXT NOT NULL REFERENCES purchases(session_id),
    -- micro-credits taken back by this refund state (the increment over the previous ones)
    clawed_back     BIGINT NOT NULL,
    event_id        TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (charge_id, amount_refunded)
);

-- Subscriptions as the webhooks described them. `plan_event_at` / `payment_event_at` are the
-- `created` times of the newest events applied to the plan (tier, cancellation) and to the
-- payment state (paid, past due): an older event arriving late changes nothing.
CREATE TABLE IF NOT EXISTS subscriptions (
    subscription_id      TEXT PRIMARY KEY,
    account_id           TEXT NOT NULL,
    customer_id          TEXT,
    tier                 TEXT NOT NULL,
    -- month | year
    billing_interval     TEXT NOT NULL,
    price_id             TEXT,
    -- the price per interval, as Stripe charges it (cents)
    amount_cents         BIGINT,
    currency             TEXT,
    -- Stripe's status: active | past_due | canceled | trialing | incomplete | unpaid | …
    status               TEXT NOT NULL,
    cancel_at_period_end BOOLEAN NOT NULL DEFAULT false,
    current_period_start TIMESTAMPTZ,
    current_period_end   TIMESTAMPTZ,
    canceled_at          TIMESTAMPTZ,
    plan_event_at        TIMESTAMPTZ NOT NULL,
    payment_event_at     TIMESTAMPTZ NOT NULL,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS subscriptions_account_idx ON subscriptions (account_id, created_at DESC);

-- Subscription invoices: paid once, failed once (later failures of the same invoice are
-- retries of one failure).
CREATE TABLE IF NOT EXISTS invoices (
    invoice_id      TEXT NOT NULL,
    -- paid | failed
    outcome         TEXT NOT NULL,
    subscription_id TEXT,
    account_id      TEXT NOT NULL,
    billing_reason  TEXT,
    amount_cents    BIGINT NOT NULL,
    currency        TEXT NOT NULL,
    period_start    TIMESTAMPTZ,
    period_end      TIMESTAMPTZ,
    event_id        TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (invoice_id, outcome)
);
CREATE INDEX IF NOT EXISTS invoices_created_idx ON invoices (created_at);

-- Payment grace: set when a subscription invoice fails (the account keeps being served until
-- then, after which its allowance is frozen and only purchased credits are usable); cleared
-- when an invoice is paid or the subscription ends. Redis holds the same deadline in the
-- account hash (`status = past_due`, `grace_until`); hydration restores it from here.
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS grace_until TIMESTAMPTZ;

-- Outgoing alerts (low balance, 80 % / 100 % of the allowance), one per journal entry that
-- crossed a threshold, delivered with retries by a background task.
CREATE TABLE IF NOT EXISTS alert_outbox (
    id              BIGSERIAL PRIMARY KEY,
    entry_id        TEXT NOT NULL,
    kind            TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    payload         JSONB NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    locked_until    TIMESTAMPTZ,
    delivered_at    TIMESTAMPTZ,
    -- delivered | failed (gave up) | NULL (pending)
    state           TEXT,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (entry_id, kind)
);
CREATE INDEX IF NOT EXISTS alert_outbox_due_idx ON alert_outbox (next_attempt_at) WHERE state IS NULL;
