//! End-to-end tests: the real `tollgate` binary against a local Redis and Postgres, with an
//! in-process fake upstream. Each test gets its own database and Redis key prefix, so tests run
//! in parallel and leave nothing behind. See `harness.rs` for the environment variables.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod browser;
mod cluster_util;
mod harness;
mod leases;
mod ledger_util;
mod upstream;
mod ws_client;

mod admin;
mod ai_pricing;
mod ai_sessions;
mod auth;
mod check_config;
mod deploy_files;
mod group_commit;
mod jwks;
mod jwt;
mod layout;
mod ledger_admin;
mod ledger_buckets;
mod ledger_exactness;
mod ledger_failures;
mod ledger_gates;
mod ledger_headers;
mod ledger_metrics;
mod ledger_model;
mod ledger_quotas;
mod ledger_reconcile;
mod lifecycle;
mod metrics;
mod plan_limits;
mod proxy_errors;
mod proxy_passthrough;
mod recipes;
mod reload;
mod revocation;
mod slice_holds;
mod sse;
mod telemetry;

mod journal_audit;
mod journal_crash;
mod journal_dedup;
mod journal_packed;
mod journal_partitions;
mod journal_pg_outage;
mod journal_redis_loss;
mod journal_shutdown;
mod journal_throughput;
mod journal_usage;
mod journal_util;
mod pg_outage_start;

mod fake_stripe;
mod stripe_alerts;
mod stripe_checkout;
mod stripe_config;
mod stripe_refunds;
mod stripe_reports;
mod stripe_subscriptions;
mod stripe_util;
mod stripe_webhooks;

mod cluster;

mod console;
mod lb;
mod loadtest;
mod openapi;
mod pg_outage_keys;
mod portal;
mod tls_listener;
mod tls_upstream;
mod walkthrough;
