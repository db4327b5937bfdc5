//! Black-box tests of kci-receiver: the real application on port 0, against SQLite and against a
//! fresh PostgreSQL database per test (dropped afterwards). One test binary, so it links once.
//!
//! PostgreSQL is found at `KCI_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); the tests fail, never skip, when it is not there.

mod helpers;

mod access;
mod access_matrix;
mod auth;
mod broker;
mod bulk;
mod cli;
mod concurrency;
mod contract;
mod conversations;
mod dashboard;
mod egress;
mod errors;
mod faults;
mod fixtures;
mod group_commit;
mod hostile;
mod mtls;
mod operations;
mod otel;
mod outage;
mod properties;
mod reconcile;
mod relay;
mod retention;
mod secrets;
mod semantics;
mod simulator;
mod store;
