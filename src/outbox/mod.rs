//! The transactional outbox: every accepted KCI writes one event in the same transaction
//! (design.md, flow step 2); the relay publishes it to RabbitMQ after commit (step 4).
//!
//! - [`envelope`]: what is published (routing key, headers, body), decided at intake;
//! - [`store`]: the outbox table: due events, outcomes, dead events, retries and replays;
//! - [`relay`]: publishing with confirms, reconnecting, retrying;
//! - [`topology`]: the exchanges and queue, as data;
//! - [`signal`]: waking the relay when events are committed.

pub mod envelope;
pub mod relay;
pub mod signal;
pub mod store;
pub mod topology;
