//! Phase 1 — which route. The table is built with each config snapshot, so it lives in
//! [`crate::routing`]; re-exported here for the request path.

pub use crate::routing::table::Router;
