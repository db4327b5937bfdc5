//! The AMQP message of one accepted KCI, as design.md's "AMQP contract" describes it: routing key,
//! headers and the envelope body. Built at intake time and stored in the outbox, so the relay
//! publishes exactly what was decided inside the transaction.

use chrono::{DateTime, SecondsFormat, Utc};
use entity::conversation;
use entity::tracked_entity::Correlation;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::kci::Kci;

/// Everything the envelope says about one KCI, decided by intake.
pub struct EnvelopeFacts<'a> {
    pub event_id: Uuid,
    pub kci: &'a Kci,
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
    pub accepted_at: DateTime<Utc>,
}

/// A ready-to-publish message.
pub struct Message {
    pub routing_key: String,
    pub message_type: String,
    pub headers: Value,
    pub payload: Value,
}

/// One word of a topic routing key: lower case, with anything but letters, digits and `_`
/// replaced, since `.` separates words and `*`/`#` are wildcards.
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
        word
    }
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

    let payload = json!({
        "eventId": facts.event_id,
        "kci": kci.body,
        "entity": {
            "type": kci.entity_type.as_str(),
            "gatewayId": kci.entity.gateway_id,
            "supplier": kci.supplier,
            "supplierReference": kci.entity.supplier_reference,
            "previousStatus": facts.previous_status,
            "newStatus": facts.new_status,
            "kciStatus": kci.entity.status,
            "changed": changed,
        },
        "correlation": {
            "conversationId": facts.conversation_id,
            "requestId": facts.request_id,
            "matched": facts.correlation == Correlation::Matched,
            "status": correlation,
            "originalRequest": original_request,
        },
        "sequence": {
            "sequenceNumber": kci.sequence_number,
            "previousSequenceNumber": facts.previous_sequence_number,
            "applied": facts.applied,
            "stale": facts.stale,
            "gap": facts.gap,
            "duplicate": facts.duplicate,
        },
        "flags": {
            "illegalTransition": facts.illegal,
            "unknownValues": unknown_values,
        },
        "timestamps": {
            "issuedOn": timestamp(kci.issued_on),
            "receivedOn": timestamp(kci.received_on),
            "deliveredOn": timestamp(Some(kci.delivered_on)),
            "acceptedAt": timestamp(Some(facts.accepted_at)),
        },
    });
    let headers = json!({
        "x-request-id": facts.request_id,
        "x-conversation-id": facts.conversation_id,
        "supplier": kci.supplier,
        "entity-type": kci.entity_type.as_str(),
        "entity-id": kci.entity.gateway_id,
        "sequence-number": kci.sequence_number,
        "previous-status": facts.previous_status.unwrap_or(""),
        "new-status": facts.new_status,
    });
    Message {
        routing_key: routing_key(kci),
        message_type: kci.entity_type.as_str().to_owned(),
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
}
