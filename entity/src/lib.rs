//! sea-orm entities of kci-receiver: one module per table created in `migration/`.
//!
//! Closed sets of values (correlation, KCI outcome, outbox status) are `DeriveActiveEnum`s stored as
//! strings. Gateway statuses stay plain strings: the gateway's status enums are open-ended
//! (spec section 3) and an unknown status must be stored, not rejected.

pub mod audit_log;
pub mod conversation;
pub mod kci;
pub mod outbox_event;
pub mod reconciliation;
pub mod state_transition;
pub mod tracked_entity;

/// Serializes JSON text as the JSON it holds (not as a string); text that is somehow not JSON is
/// shown as a string.
pub fn as_raw_json<S: serde::Serializer>(text: &str, serializer: S) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    match serde_json::from_str::<&serde_json::value::RawValue>(text) {
        Ok(raw) => raw.serialize(serializer),
        Err(_) => text.serialize(serializer),
    }
}
