//! tollgate: a metering reverse proxy for AI services.
//!
//! The request path reads in module order: [`proxy`] (route → auth → gate → debit → upstream →
//! meter → settle). The money path: [`money`] → [`ledger`] (Redis scripts) → journal.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod demo;
pub mod domain;
pub mod error;
pub mod journal;
pub mod lease;
pub mod ledger;
pub mod loadtest;
pub mod metrics;
pub mod money;
pub mod pricing;
pub mod proxy;
pub mod redis_conn;
pub mod reload;
pub mod routing;
pub mod server;
pub mod state;
pub mod store;
pub mod stripe;
pub mod telemetry;
pub mod tls;
pub mod web;
