//! What the config snapshot builds for the request path and keeps across requests: the route
//! table and the rate limiters. Neutral ground between `state` (which holds them) and
//! `proxy` (which asks them), so neither depends on the other's internals.

pub mod limits;
pub mod table;
