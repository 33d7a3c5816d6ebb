//! Selling credits with Stripe: the catalogue (`catalog`), calls to the Stripe API
//! (`client`: customers, Checkout Sessions, subscription changes; `error`: how a call fails),
//! incoming webhooks (`webhook`: signature and lenient parsing; `events`: what each event does,
//! exactly once, one file per event family; the endpoint itself is `admin::stripe_webhook`),
//! and outgoing alerts (`alerts`: low balance, 80 % / 100 % of the allowance).
//!
//! The money rule everywhere: an event is recorded in `stripe_events` in the same Postgres
//! transaction as its business row (purchase, invoice, refund, subscription), and the Redis
//! effect is idempotent on the business object (a mark per session, invoice, refund state), so
//! a redelivered, concurrent or retried event can never credit twice.

pub mod alerts;
pub mod catalog;
pub mod client;
pub mod error;
pub mod events;
pub mod webhook;
