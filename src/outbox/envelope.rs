//! The AMQP message of one accepted KCI, as design.md's "AMQP contract" describes it: routing key,
//! headers and the envelope body. Built at intake time and stored in the outbox, so the relay
//! publishes exactly what was decided inside the transaction.

use chrono::{DateTime, SecondsFormat, Utc};
use entity::conversation;
use entity::state_transition::KciSource;
use entity::tracked_entity::Correlation;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::kci::Kci;
use crate::store::text::{HEADER_VALUE_MAX, ROUTING_WORD_MAX, bounded};

/// The version of the envelope's shape (`schemaVersion`); it changes when a field changes
/// meaning or goes away, not when one is added.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything the envelope says about one KCI, decided by intake.
pub struct EnvelopeFacts<'a> {
    pub event_id: Uuid,
    pub kci: &'a Kci,
    /// The body exactly as received: the envelope's `kci`, byte for byte.
    pub raw_body: &'a str,
    pub request_id: &'a str,
    pub conversation_id: &'a str,
    /// The entity's status before this KCI (none for its first KCI).
    pub previous_status: Option<&'a str>,
    /// The entity's status after this KCI (unchanged when the KCI was stale).
    pub new_status: &'a str,
    pub applied: bool,
    pub correlation: Correlation,
    pub original_request: Option<&'a conversation::Model>,
    pub previous_sequence_number: Option<i64>,
    pub stale: bool,
    pub gap: bool,
    pub duplicate: bool,
    pub illegal: bool,
    /// Delivered by the gateway, or recovered by reconciliation from the Tenant API.
    pub source: KciSource,
    /// W3C `traceparent` of intake's span: the consumer's span continues it.
    pub traceparent: &'a str,
    pub accepted_at: DateTime<Utc>,
}

/// A ready-to-publish message.
pub struct Message {
    pub routing_key: String,
    pub message_type: String,
    /// The AMQP `correlation_id`: the `X-Conversation-ID`, bounded as its header is.
    pub correlation_id: String,
    pub headers: Value,
    /// The envelope, serialized: published as it is stored.
    pub payload: String,
}

/// One word of a topic routing key: lower case, with anything but letters, digits and `_`
/// replaced, since `.` separates words and `*`/`#` are wildcards; at most
/// [`ROUTING_WORD_MAX`] bytes (a longer word keeps its beginning and ends with `_` and 16
/// hexadecimal digits of its hash), so that a routing key never exceeds AMQP's 255 bytes.
fn routing_word(value: &str) -> String {
    let word: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if word.is_empty() {
        "unknown".to_owned()
    } else {
        bounded(&word, ROUTING_WORD_MAX).replace('~', "_")
    }
}

/// An AMQP header value: NUL replaced, at most [`HEADER_VALUE_MAX`] bytes (`store::text`).
fn header(value: &str) -> Value {
    Value::String(bounded(value, HEADER_VALUE_MAX).into_owned())
}

/// The message body (design.md, "AMQP contract": Body).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    schema_version: u32,
    event_id: Uuid,
    /// `DELIVERY` (POSTed by the gateway) or `RECONCILIATION` (recovered from the Tenant API:
    /// the gateway never delivered it).
    source: &'static str,
    /// `source` is `RECONCILIATION`.
    recovered: bool,
    /// The KCI exactly as the gateway sent it.
    kci: &'a RawValue,
    entity: Value,
    correlation: Value,
    sequence: Value,
    flags: Value,
    timestamps: Value,
}

/// `kci.<entity_type>.<update_type>.<reason>`, e.g. `kci.provide_order.informational.committed`.
pub fn routing_key(kci: &Kci) -> String {
    format!(
        "kci.{}.{}.{}",
        routing_word(kci.entity_type.as_str()),
        routing_word(kci.update.update_type().as_str()),
        routing_word(kci.update.reason())
    )
}

fn timestamp(value: Option<DateTime<Utc>>) -> Value {
    value.map_or(Value::Null, |t| {
        Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true))
    })
}

pub fn build(facts: &EnvelopeFacts<'_>) -> Message {
    let kci = facts.kci;
    let changed = facts.applied && facts.previous_status != Some(facts.new_status);
    let correlation = match facts.correlation {
        Correlation::Matched => "MATCHED",
        Correlation::Unmatched => "UNMATCHED",
        Correlation::Unsolicited => "UNSOLICITED",
    };
    let original_request = facts.original_request.map(|request| {
        json!({
            "conversationId": request.conversation_id,
            "requestId": request.request_id,
            "operation": request.operation,
            "entityType": request.entity_type,
            "gatewayId": request.gateway_id,
            "responseStatus": request.response_status,
            "registeredAt": timestamp(Some(request.registered_at)),
        })
    });
    let unknown_values: Vec<Value> = kci
        .unknown_values
        .iter()
        .map(|u| json!({"path": u.path, "value": u.value}))
        .collect();

    // The raw body was parsed when it arrived: it is JSON, and stays exactly as sent.
    let raw_kci: &RawValue = serde_json::from_str(facts.raw_body).unwrap_or(RawValue::NULL);
    let envelope = Envelope {
        schema_version: SCHEMA_VERSION,
        event_id: facts.event_id,
        source: facts.source.as_str(),
        recovered: facts.source == KciSource::Reconciliation,
        kci: raw_kci,
        entity: json!({
            "type": kci.entity_type.as_str(),
            "gatewayId": kci.entity.gateway_id,
            "supplier": kci.supplier,
            "supplierReference": kci.entity.supplier_reference,
            "previousStatus": facts.previous_status,
            "newStatus": facts.new_status,
            "kciStatus": kci.entity.status,
            "changed": changed,
        }),
        correlation: json!({
            "conversationId": facts.conversation_id,
            "requestId": facts.request_id,
            "matched": facts.correlation == Correlation::Matched,
            "status": correlation,
            "originalRequest": original_request,
        }),
        sequence: json!({
            "sequenceNumber": kci.sequence_number,
            "previousSequenceNumber": facts.previous_sequence_number,
            "applied": facts.applied,
            "stale": facts.stale,
            "gap": facts.gap,
            "duplicate": facts.duplicate,
        }),
        flags: json!({
            "illegalTransition": facts.illegal,
            "unknownValues": unknown_values,
        }),
        timestamps: json!({
            "issuedOn": timestamp(kci.issued_on),
            "receivedOn": timestamp(kci.received_on),
            "deliveredOn": timestamp(Some(kci.delivered_on)),
            "acceptedAt": timestamp(Some(facts.accepted_at)),
        }),
    };
    // Serializing values that came from JSON cannot fail.
    let payload = serde_json::to_string(&envelope).unwrap_or_default();
    let headers = json!({
        "x-request-id": header(facts.request_id),
        "x-conversation-id": header(facts.conversation_id),
        "supplier": header(&kci.supplier),
        "entity-type": header(kci.entity_type.as_str()),
        "entity-id": header(&kci.entity.gateway_id),
        "sequence-number": kci.sequence_number,
        "previous-status": header(facts.previous_status.unwrap_or("")),
        "new-status": header(facts.new_status),
        "x-kci-source": facts.source.as_str(),
        "x-recovered": facts.source == KciSource::Reconciliation,
        "traceparent": facts.traceparent,
    });
    Message {
        routing_key: routing_key(kci),
        message_type: kci.entity_type.as_str().to_owned(),
        correlation_id: bounded(facts.conversation_id, HEADER_VALUE_MAX).into_owned(),
        headers,
        payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routing_keys_are_lower_case_words() {
        let body = json!({
            "id": "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e21", "supplier": "FIBRECO", "sequenceNumber": 1,
            "deliveredOn": "2024-04-10T10:15:24.310Z", "updateType": "ERROR", "entityType": "SERVICE_TEST",
            "entity": {"id": 1, "status": "FAILED_TO_SEND"},
            "error": {"code": "SUPPLIER.TIMED#OUT", "messages": []}
        });
        let kci = crate::kci::parse_kci(&body).unwrap();
        assert_eq!(
            routing_key(&kci),
            "kci.service_test.error.supplier_timed_out"
        );
    }

    #[test]
    fn routing_keys_stay_within_amqp_limits_whatever_the_reason() {
        for reason in ["A".repeat(300), "é".repeat(500), "x.".repeat(1000)] {
            let body = json!({
                "id": "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e21", "supplier": "FIBRECO", "sequenceNumber": 1,
                "deliveredOn": "2024-04-10T10:15:24.310Z", "updateType": "INFORMATIONAL",
                "entityType": format!("X{}", "Y".repeat(49)),
                "entity": {"id": 1, "status": "S"}, "information": {"type": reason}
            });
            let key = routing_key(&crate::kci::parse_kci(&body).unwrap());
            assert!(key.len() <= 255, "{} bytes", key.len());
            assert!(
                key.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.'),
                "{key}"
            );
            assert_eq!(key.split('.').count(), 4, "{key}");
        }
    }
}
