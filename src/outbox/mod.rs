//! The transactional outbox: every accepted KCI writes one event in the same transaction
//! (design.md, flow step 2); a relay publishes it to RabbitMQ after commit (step 4).

pub mod envelope;
