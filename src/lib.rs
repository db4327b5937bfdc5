//! kci-receiver: receives the Fibre Cafe gateway's KCIs (Tenant Updates API 1.14), records them
//! with the state history of the entity they are about, and republishes them through an outbox.
//!
//! Where things are:
//! - [`http`]: the HTTP surface (`POST /kcis`, operations API, health);
//! - [`kci`]: where a KCI body is parsed and validated into typed data;
//! - [`lifecycle`]: the entity lifecycles, as data;
//! - [`intake`]: where a KCI is stored and matched, in one transaction with its effects; the
//!   rules themselves are a pure function (`intake::rules`);
//! - [`outbox`]: what is published to RabbitMQ, and the relay that publishes it;
//! - [`egress`]: the proxy to the Tenant API that records original requests on the way;
//! - [`operations`]: the read model behind the operations API and the dashboard;
//! - [`store`]: database connection, migrations, error classification, the write path
//!   (`store::Database`), audit log;
//! - [`auth`], [`config`], [`telemetry`], [`startup`], [`tls`] (the HTTPS listener);
//! - [`cli`]: the `kci-receiver` command line and what each subcommand does.
//!
//! The gateway simulator and the benchmark are tools, not the service: they live in the
//! `kci-tools` crate (`tools/`).

pub mod auth;
pub mod cli;
pub mod config;
pub mod egress;
pub mod error;
pub mod http;
pub mod intake;
pub mod kci;
pub mod lifecycle;
pub mod operations;
pub mod outbox;
pub mod reconcile;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod trace_context;
