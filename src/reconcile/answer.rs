//! Reading the Tenant API's answer to `GET /{resource}/{id}`: the entity with `updates[]`, every
//! KCI the gateway produced about it (spec section 4; section 2.2 on the fields seen only there).
//!
//! What is assumed, since the spec shows these answers only by example: the answer is a JSON
//! object whose `updates` is an array of KCI bodies, each with the fields a delivered KCI has
//! (plus the gateway's bookkeeping, like `deliveryStatus`); its top-level `status`, when present,
//! is the entity's current status. An item is used only if it parses as a KCI exactly as
//! `POST /kcis` would parse it, about this entity; anything else is kept, raw, as unusable,
//! never guessed. The one field filled in is `deliveredOn` when a never-delivered KCI lacks it
//! (it is the gateway's bookkeeping, not the KCI's content): the time we fetched it, for the
//! parsed form only. The raw text of each item is kept byte for byte.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::kci::{EntityType, Kci, parse_kci_with};
use crate::operations::queries::Family;

/// An item of `updates[]` that is a KCI about the entity asked for.
pub struct UsableUpdate {
    pub kci: Kci,
    /// The item's text exactly as the gateway sent it.
    pub raw: String,
}

/// An item of `updates[]` that does not carry what a KCI needs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnusableUpdate {
    pub index: usize,
    pub problem: String,
    pub raw: String,
}

/// The gateway's entity, read.
pub struct GatewayEntity {
    /// Its top-level `status`, when it has one.
    pub status: Option<String>,
    /// Usable KCIs in sequence order (the gateway's order among equal numbers).
    pub usable: Vec<UsableUpdate>,
    pub unusable: Vec<UnusableUpdate>,
}

#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    updates: Vec<&'a RawValue>,
    #[serde(default)]
    status: Option<Value>,
}

/// Reads a 200 answer; `Err` says why it is not an entity with `updates[]` (malformed).
pub fn read(
    body: &str,
    family: Family,
    gateway_id: &str,
    aliases: &HashMap<String, EntityType>,
    fetched_at: DateTime<Utc>,
) -> Result<GatewayEntity, String> {
    let answer: Answer<'_> = serde_json::from_str(body)
        .map_err(|error| format!("the answer is not an entity with an updates array: {error}"))?;
    let mut usable = Vec::new();
    let mut unusable = Vec::new();
    for (index, raw) in answer.updates.iter().enumerate() {
        match usable_update(raw.get(), family, gateway_id, aliases, fetched_at) {
            Ok(kci) => usable.push(UsableUpdate {
                kci,
                raw: raw.get().to_owned(),
            }),
            Err(problem) => unusable.push(UnusableUpdate {
                index,
                problem,
                raw: raw.get().to_owned(),
            }),
        }
    }
    usable.sort_by_key(|update| update.kci.sequence_number);
    Ok(GatewayEntity {
        status: answer.status.and_then(|s| s.as_str().map(str::to_owned)),
        usable,
        unusable,
    })
}

fn usable_update(
    raw: &str,
    family: Family,
    gateway_id: &str,
    aliases: &HashMap<String, EntityType>,
    fetched_at: DateTime<Utc>,
) -> Result<Kci, String> {
    let mut value: Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let Some(object) = value.as_object_mut() else {
        return Err("not a JSON object".to_owned());
    };
    if object.get("deliveredOn").is_none_or(Value::is_null) {
        object.insert(
            "deliveredOn".to_owned(),
            Value::String(fetched_at.to_rfc3339_opts(SecondsFormat::Millis, true)),
        );
    }
    let kci = parse_kci_with(&value, aliases).map_err(|problems| {
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        format!("not a KCI: {}", problems.join("; "))
    })?;
    if kci.entity.gateway_id != gateway_id {
        return Err(format!(
            "about entity {}, not {gateway_id}",
            kci.entity.gateway_id
        ));
    }
    if let Some(listed) = kci.entity_type.listed()
        && Family::of(listed) != family
    {
        return Err(format!(
            "a {} is not one of the {}",
            listed.as_str(),
            family.resource()
        ));
    }
    Ok(kci)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kci(sequence: i64, id: &str) -> Value {
        json!({
            "id": id, "supplier": "FIBRECO", "sequenceNumber": sequence,
            "deliveredOn": "2024-04-10T10:15:24.310Z", "updateType": "INFORMATIONAL",
            "entityType": "SERVICE_TEST", "entity": {"id": 77, "status": "IN_PROGRESS"},
            "information": {"type": "UPDATE"}, "deliveryStatus": "PENDING"
        })
    }

    fn read_answer(body: &Value) -> Result<GatewayEntity, String> {
        read(
            &body.to_string(),
            Family::ServiceTests,
            "77",
            &HashMap::new(),
            Utc::now(),
        )
    }

    #[test]
    fn usable_updates_come_in_sequence_order_with_their_raw_text() {
        let body = json!({"id": 77, "status": "IN_PROGRESS", "updates": [
            kci(2, "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e22"),
            kci(1, "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e21"),
        ]});
        let entity = read_answer(&body).unwrap();
        assert_eq!(entity.status.as_deref(), Some("IN_PROGRESS"));
        let numbers: Vec<i64> = entity
            .usable
            .iter()
            .map(|u| u.kci.sequence_number)
            .collect();
        assert_eq!(numbers, [1, 2]);
        assert!(
            entity.usable[0]
                .raw
                .contains("\"deliveryStatus\":\"PENDING\"")
        );
        assert!(entity.unusable.is_empty());
    }

    #[test]
    fn a_never_delivered_kci_without_delivered_on_is_still_a_kci() {
        let mut update = kci(1, "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e21");
        update.as_object_mut().unwrap().remove("deliveredOn");
        let entity = read_answer(&json!({"updates": [update]})).unwrap();
        assert_eq!(entity.usable.len(), 1);
        assert!(!entity.usable[0].raw.contains("deliveredOn"), "raw kept");
    }

    #[test]
    fn what_is_not_a_kci_about_this_entity_is_unusable_never_guessed() {
        let mut other_entity = kci(3, "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e23");
        other_entity["entity"]["id"] = json!(78);
        let mut other_family = kci(4, "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e24");
        other_family["entityType"] = json!("SERVICE_PROBLEM");
        let mut no_sequence = kci(5, "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e25");
        no_sequence
            .as_object_mut()
            .unwrap()
            .remove("sequenceNumber");
        let body = json!({"updates": [other_entity, "text", no_sequence, other_family, null]});
        let entity = read_answer(&body).unwrap();
        assert!(entity.usable.is_empty());
        let problems: Vec<(usize, &str)> = entity
            .unusable
            .iter()
            .map(|u| (u.index, u.problem.as_str()))
            .collect();
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems[0].1.contains("about entity 78"));
        assert!(problems[2].1.contains("sequenceNumber"));
        assert!(problems[3].1.contains("SERVICE_PROBLEM"));
        assert_eq!(entity.unusable[1].raw, "\"text\"");
    }

    #[test]
    fn an_answer_without_updates_is_malformed() {
        for body in ["", "[]", "{}", "{\"updates\": 3}", "<html>"] {
            assert!(
                read(
                    body,
                    Family::ServiceTests,
                    "77",
                    &HashMap::new(),
                    Utc::now()
                )
                .is_err(),
                "{body}"
            );
        }
    }
}
