//! The business rules, with no HTTP in them: accounts, usage and history, credits (grants by
//! hand, packs sold and refunds clawed back), keys and portal links. The admin API, the portal and console, the Stripe handlers and the proxy's
//! self-service endpoints all call these and map [`DomainError`] to their own answers.

pub mod accounts;
pub mod credits;
pub mod error;
pub mod keys;
pub mod portal_links;
pub mod purchases;
pub mod usage;

pub use error::DomainError;
