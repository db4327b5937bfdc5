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
    entity: EntityPart<'a>,
    correlation: CorrelationPart<'a>,
    sequence: SequencePart,
    flags: FlagsPart<'a>,
    timestamps: TimestampsPart,
}

// The envelope's parts, borrowed from the KCI and the facts rather than built as JSON trees
// (every KCI builds one; the trees were most of its allocations). Fields in the alphabetical
// order the trees had, so the payload is the same byte for byte.

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EntityPart<'a> {
    changed: bool,
    gateway_id: &'a str,
    kci_status: &'a str,
    new_status: &'a str,
    previous_status: Option<&'a str>,
    supplier: &'a str,
    supplier_reference: Option<&'a str>,
    #[serde(rename = "type")]
    entity_type: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CorrelationPart<'a> {
    conversation_id: &'a str,
    matched: bool,
    original_request: Option<OriginalRequestPart<'a>>,
    request_id: &'a str,
    status: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OriginalRequestPart<'a> {
    conversation_id: &'a str,
    entity_type: Option<&'a str>,
    gateway_id: Option<&'a str>,
    operation: &'a str,
    registered_at: Option<String>,
    request_id: Option<&'a str>,
    response_status: Option<i32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SequencePart {
    applied: bool,
    duplicate: bool,
    gap: bool,
    previous_sequence_number: Option<i64>,
    sequence_number: i64,
    stale: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FlagsPart<'a> {
    illegal_transition: bool,
    unknown_values: &'a [crate::kci::UnknownValue],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TimestampsPart {
    accepted_at: Option<String>,
    delivered_on: Option<String>,
    issued_on: Option<String>,
    received_on: Option<String>,
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

fn timestamp(value: Option<DateTime<Utc>>) -> Option<String> {
    value.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

pub fn build(facts: &EnvelopeFacts<'_>) -> Message {
    let kci = facts.kci;
    let changed = facts.applied && facts.previous_status != Some(facts.new_status);
    let correlation = match facts.correlation {
        Correlation::Matched => "MATCHED",
        Correlation::Unmatched => "UNMATCHED",
        Correlation::Unsolicited => "UNSOLICITED",
    };
    let original_request = facts.original_request.map(|request| OriginalRequestPart {
        conversation_id: &request.conversation_id,
        entity_type: request.entity_type.as_deref(),
        gateway_id: request.gateway_id.as_deref(),
        operation: &request.operation,
        registered_at: timestamp(Some(request.registered_at)),
        request_id: request.request_id.as_deref(),
        response_status: request.response_status,
    });

    // The raw body was parsed when it arrived: it is JSON, and stays exactly as sent.
    let raw_kci: &RawValue = serde_json::from_str(facts.raw_body).unwrap_or(RawValue::NULL);
    let envelope = Envelope {
        schema_version: SCHEMA_VERSION,
        event_id: facts.event_id,
        source: facts.source.as_str(),
        recovered: facts.source == KciSource::Reconciliation,
        kci: raw_kci,
        entity: EntityPart {
            changed,
            gateway_id: &kci.entity.gateway_id,
            kci_status: &kci.entity.status,
            new_status: facts.new_status,
            previous_status: facts.previous_status,
            supplier: &kci.supplier,
            supplier_reference: kci.entity.supplier_reference.as_deref(),
            entity_type: kci.entity_type.as_str(),
        },
        correlation: CorrelationPart {
            conversation_id: facts.conversation_id,
            matched: facts.correlation == Correlation::Matched,
            original_request,
            request_id: facts.request_id,
            status: correlation,
        },
        sequence: SequencePart {
            applied: facts.applied,
            duplicate: facts.duplicate,
            gap: facts.gap,
            previous_sequence_number: facts.previous_sequence_number,
            sequence_number: kci.sequence_number,
            stale: facts.stale,
        },
        flags: FlagsPart {
            illegal_transition: facts.illegal,
            unknown_values: &kci.unknown_values,
        },
        timestamps: TimestampsPart {
            accepted_at: timestamp(Some(facts.accepted_at)),
            delivered_on: timestamp(Some(kci.delivered_on)),
            issued_on: timestamp(kci.issued_on),
            received_on: timestamp(kci.received_on),
        },
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
    fn the_envelope_says_what_the_facts_say_and_each_part_keeps_its_keys_in_order() {
        let body = json!({
            "id": "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e21", "supplier": "FIBRECO", "sequenceNumber": 7,
            "deliveredOn": "2024-04-10T10:15:24.310Z", "issuedOn": "2024-04-10T10:15:20.000Z",
            "updateType": "INFORMATIONAL", "entityType": "PROVIDE_ORDER",
            "entity": {"id": "ORD-1", "status": "ACKNOWLEDGED", "supplierReference": "S-9"},
            "information": {"type": "NEW_THING"}
        });
        let mut kci = crate::kci::parse_kci(&body).unwrap();
        assert_eq!(kci.unknown_values.len(), 1, "NEW_THING is not in the docs");
        kci.entity.supplier_reference = Some("S-9".to_owned());
        let original = conversation::Model {
            id: 3,
            conversation_id: "conv-\"1\"".to_owned(),
            request_id: None,
            operation: "POST /provide-orders".to_owned(),
            entity_type: Some("PROVIDE_ORDER".to_owned()),
            gateway_id: Some("ORD-1".to_owned()),
            request_body: None,
            response_status: Some(201),
            source: conversation::ConversationSource::Api,
            registered_at: "2024-04-10T10:00:00Z".parse().unwrap(),
        };
        let raw_body = body.to_string();
        let facts = |original_request| EnvelopeFacts {
            event_id: Uuid::nil(),
            kci: &kci,
            raw_body: &raw_body,
            request_id: "req-1",
            conversation_id: "conv-\"1\"",
            previous_status: None,
            new_status: "ACKNOWLEDGED",
            applied: true,
            correlation: Correlation::Matched,
            original_request,
            previous_sequence_number: Some(5),
            stale: false,
            gap: true,
            duplicate: false,
            illegal: false,
            source: KciSource::Delivery,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            accepted_at: "2024-04-10T10:15:25.123456Z".parse().unwrap(),
        };
        for original_request in [None, Some(&original)] {
            let payload = build(&facts(original_request)).payload;
            let envelope: Value = serde_json::from_str(&payload).unwrap();
            let expected = json!({
                "schemaVersion": 1, "eventId": Uuid::nil(), "source": "DELIVERY", "recovered": false,
                "kci": body,
                "entity": {"type": "PROVIDE_ORDER", "gatewayId": "ORD-1", "supplier": "FIBRECO",
                    "supplierReference": "S-9", "previousStatus": null, "newStatus": "ACKNOWLEDGED",
                    "kciStatus": "ACKNOWLEDGED", "changed": true},
                "correlation": {"conversationId": "conv-\"1\"", "requestId": "req-1", "matched": true,
                    "status": "MATCHED", "originalRequest": original_request.map(|_| json!({
                        "conversationId": "conv-\"1\"", "requestId": null, "operation": "POST /provide-orders",
                        "entityType": "PROVIDE_ORDER", "gatewayId": "ORD-1", "responseStatus": 201,
                        "registeredAt": "2024-04-10T10:00:00.000Z"}))},
                "sequence": {"sequenceNumber": 7, "previousSequenceNumber": 5, "applied": true,
                    "stale": false, "gap": true, "duplicate": false},
                "flags": {"illegalTransition": false,
                    "unknownValues": [{"path": "information.type", "value": "NEW_THING"}]},
                "timestamps": {"issuedOn": "2024-04-10T10:15:20.000Z", "receivedOn": null,
                    "deliveredOn": "2024-04-10T10:15:24.310Z", "acceptedAt": "2024-04-10T10:15:25.123Z"},
            });
            assert_eq!(envelope, expected);
            // Each part as a JSON object with sorted keys would write it (what the payload was
            // when the parts were built as `serde_json::Value`): consumers see the same bytes.
            for part in ["entity", "correlation", "sequence", "flags", "timestamps"] {
                let sorted = format!("\"{part}\":{}", expected[part]);
                assert!(payload.contains(&sorted), "{part}: {payload}");
            }
        }
    }

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
