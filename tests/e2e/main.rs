//! End-to-end tests: the real `tollgate` binary against a local Redis and Postgres, with an
//! in-process fake upstream. Each test gets its own database and Redis key prefix, so tests run
//! in parallel and leave nothing behind. See `harness.rs` for the environment variables.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;
mod upstream;

mod admin;
mod auth;
mod check_config;
mod jwt;
mod lifecycle;
mod metrics;
mod proxy_errors;
mod proxy_passthrough;
mod revocation;
mod sse;
