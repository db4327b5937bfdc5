//! Validation of a `POST /kcis` body against the Tenant Updates API 1.14 (spec section 2), naming
//! every problem with its field path, so that one 422 tells the gateway everything that is wrong.
//!
//! What is required and how it is typed follows spec 2.2 (envelope), 2.1 (discriminators), 2.3
//! (information/action), 1.3 (error) and 2.4 (`entity.id`, `entity.status`). Values of open-ended
//! enums (reasons, problem codes, statuses) outside the documented lists are accepted and reported
//! in [`Kci::unknown_values`].

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::vocabulary::{ACTION_TYPES, ERROR_CODES, INFORMATION_TYPES, PROBLEM_CODES};
use super::{
    EntitySnapshot, EntityType, GatewayError, Kci, KciType, Reason, UnknownValue, Update,
    UpdateType,
};

/// One reason a body fails the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// Dotted path from the body's root, e.g. `entity.status` or `supplierNotes[1].note`.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The longest `supplier` the schema allows (`^\w{1,20}$`, spec 2.2).
const SUPPLIER_MAX_LEN: usize = 20;

/// The longest `entityType` we accept, listed or not (`^[A-Z][A-Z0-9_]{0,49}$`).
const ENTITY_TYPE_MAX_LEN: usize = 50;

/// Turns a JSON body into a [`Kci`], or lists every schema problem found.
pub fn parse_kci(body: &Value) -> Result<Kci, Vec<FieldProblem>> {
    parse_kci_with(body, &HashMap::new())
}

/// [`parse_kci`], with `aliases`: `entityType` values that stand for a listed type (config
/// `kci.entity_type_aliases`, for when the gateway's real value for a type is confirmed).
pub fn parse_kci_with(
    body: &Value,
    aliases: &HashMap<String, EntityType>,
) -> Result<Kci, Vec<FieldProblem>> {
    let mut kci = parse_fields(body, aliases)?;
    kci.body = body.clone();
    Ok(kci)
}

/// [`parse_kci_with`] of a body the caller no longer needs: it moves into the [`Kci`] instead of
/// being copied (intake's path, where the copy was one allocation per node of every body).
pub fn parse_owned_kci(
    body: Value,
    aliases: &HashMap<String, EntityType>,
) -> Result<Kci, Vec<FieldProblem>> {
    let mut kci = parse_fields(&body, aliases)?;
    kci.body = body;
    Ok(kci)
}

/// Everything but the body itself (left `Null` for the callers above to set).
fn parse_fields(
    body: &Value,
    aliases: &HashMap<String, EntityType>,
) -> Result<Kci, Vec<FieldProblem>> {
    let mut check = Checker::default();
    let Some(root) = body.as_object() else {
        check.problem(
            "$",
            format!("must be a JSON object, found {}", kind_of(body)),
        );
        return Err(check.problems);
    };

    let id = check
        .required_str(root, "id", "")
        .and_then(|raw| match Uuid::try_parse(raw) {
            // The API's pattern is the hyphenated form only (spec 2.2).
            Ok(id) if raw.len() == 36 => Some(id),
            _ => {
                check.problem("id", "must be a UUID (8-4-4-4-12 hexadecimal digits)");
                None
            }
        });
    let supplier = check.required_str(root, "supplier", "").and_then(|raw| {
        // `\w` of the API's pattern is ECMA-262's (JSON Schema's): ASCII letters, digits, `_`.
        let valid = (1..=SUPPLIER_MAX_LEN).contains(&raw.len())
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if valid {
            Some(raw.to_owned())
        } else {
            check.problem("supplier", "must match ^\\w{1,20}$");
            None
        }
    });
    let sequence_number = check.sequence_number(root);
    let issued_on = check.optional_date_time(root, "issuedOn");
    let received_on = check.optional_date_time(root, "receivedOn");
    let delivered_on = check
        .required_str(root, "deliveredOn", "")
        .and_then(|raw| check.date_time("deliveredOn", raw));
    check.supplier_notes(root);

    let entity_type = check
        .required_str(root, "entityType", "")
        .and_then(|raw| check.entity_type(raw, aliases));
    let update = check.update(root);
    let entity = check.entity(root, entity_type.as_ref());

    match (
        id,
        supplier,
        sequence_number,
        delivered_on,
        entity_type,
        update,
        entity,
    ) {
        (
            Some(id),
            Some(supplier),
            Some(sequence_number),
            Some(delivered_on),
            Some(entity_type),
            Some(update),
            Some(entity),
        ) if check.problems.is_empty() => Ok(Kci {
            id,
            supplier,
            sequence_number,
            issued_on,
            received_on,
            delivered_on,
            entity_type,
            update,
            entity,
            unknown_values: check.unknown_values,
            body: Value::Null,
        }),
        _ => Err(check.problems),
    }
}

#[derive(Default)]
struct Checker {
    problems: Vec<FieldProblem>,
    unknown_values: Vec<UnknownValue>,
}

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Empty, or only ASCII blanks (space, tab, CR, LF): what "must not be empty" means for every
/// text the APIs take. The OpenAPI document says the same with the pattern `[^ \t\n\r]`, so
/// that clients generated from it and the handlers agree to the character.
pub fn is_blank(text: &str) -> bool {
    text.chars().all(|c| matches!(c, ' ' | '\t' | '\n' | '\r'))
}

/// A value quoted in a problem message: at most 60 characters of it.
fn shorten(value: &str) -> String {
    if value.chars().count() <= 60 {
        value.to_owned()
    } else {
        format!("{}...", value.chars().take(60).collect::<String>())
    }
}

impl Checker {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(FieldProblem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn note_unknown(&mut self, path: String, value: &str, known: &[&str]) {
        if !known.contains(&value) {
            self.unknown_values.push(UnknownValue {
                path,
                value: value.to_owned(),
            });
        }
    }

    /// A required, non-empty string field.
    fn required_str<'v>(
        &mut self,
        object: &'v Map<String, Value>,
        field: &str,
        prefix: &str,
    ) -> Option<&'v str> {
        let path = join(prefix, field);
        match object.get(field) {
            None | Some(Value::Null) => {
                self.problem(path, "is required");
                None
            }
            Some(Value::String(s)) if is_blank(s) => {
                self.problem(path, "must not be empty");
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.problem(path, format!("must be a string, found {}", kind_of(other)));
                None
            }
        }
    }

    /// An optional string field: absent and null are both "not given".
    fn optional_str<'v>(
        &mut self,
        object: &'v Map<String, Value>,
        field: &str,
        prefix: &str,
    ) -> Option<&'v str> {
        match object.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                let path = join(prefix, field);
                self.problem(path, format!("must be a string, found {}", kind_of(other)));
                None
            }
        }
    }

    fn required_object<'v>(
        &mut self,
        object: &'v Map<String, Value>,
        field: &str,
        why: &str,
    ) -> Option<&'v Map<String, Value>> {
        match object.get(field) {
            None | Some(Value::Null) => {
                self.problem(field, format!("is required{why}"));
                None
            }
            Some(Value::Object(inner)) => Some(inner),
            Some(other) => {
                self.problem(
                    field,
                    format!("must be an object, found {}", kind_of(other)),
                );
                None
            }
        }
    }

    fn date_time(&mut self, path: &str, raw: &str) -> Option<DateTime<Utc>> {
        match DateTime::parse_from_rfc3339(raw) {
            Ok(parsed) => Some(parsed.with_timezone(&Utc)),
            Err(_) => {
                self.problem(
                    path,
                    format!(
                        "must be an RFC 3339 date-time (e.g. 2024-04-10T09:53:17.044Z), found {:?}",
                        shorten(raw)
                    ),
                );
                None
            }
        }
    }

    fn optional_date_time(
        &mut self,
        root: &Map<String, Value>,
        field: &str,
    ) -> Option<DateTime<Utc>> {
        // An optional timestamp sent empty is read as not set (the raw body keeps it).
        let raw = self
            .optional_str(root, field, "")
            .filter(|raw| !raw.is_empty())?;
        self.date_time(field, raw)
    }

    /// `sequenceNumber`: a number >= 1 (spec 2.2); we also require it to be whole and to fit a
    /// 64-bit signed integer (where it is stored): a larger one is refused, never saturated (a
    /// saturated number would make every later KCI of the entity look stale).
    fn sequence_number(&mut self, root: &Map<String, Value>) -> Option<i64> {
        match root.get("sequenceNumber") {
            None | Some(Value::Null) => {
                self.problem("sequenceNumber", "is required");
                None
            }
            Some(Value::Number(n)) => {
                // 2^63 as f64: every f64 below it converts exactly to an i64.
                const TWO_TO_THE_63: f64 = 9_223_372_036_854_775_808.0;
                let whole = n.as_i64().or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f < TWO_TO_THE_63)
                        .map(|f| f as i64)
                });
                match whole {
                    Some(value) if value >= 1 => Some(value),
                    _ => {
                        self.problem(
                            "sequenceNumber",
                            format!("must be a whole number from 1 to {}, found {n}", i64::MAX),
                        );
                        None
                    }
                }
            }
            Some(other) => {
                self.problem(
                    "sequenceNumber",
                    format!("must be a number, found {}", kind_of(other)),
                );
                None
            }
        }
    }

    /// `entityType` (spec 2.1): a listed type, an alias of one, or a well-formed type the docs do
    /// not list (accepted and flagged).
    fn entity_type(&mut self, raw: &str, aliases: &HashMap<String, EntityType>) -> Option<KciType> {
        if let Some(listed) = EntityType::from_wire(raw).or_else(|| aliases.get(raw).copied()) {
            return Some(KciType::Listed(listed));
        }
        let well_formed = raw.len() <= ENTITY_TYPE_MAX_LEN
            && raw.starts_with(|c: char| c.is_ascii_uppercase())
            && raw
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !well_formed {
            let listed: Vec<&str> = EntityType::ALL.iter().map(|t| t.as_str()).collect();
            self.problem(
                "entityType",
                format!(
                    "must match ^[A-Z][A-Z0-9_]{{0,49}}$, found {:?} - documented values are {}",
                    shorten(raw),
                    listed.join(", ")
                ),
            );
            return None;
        }
        self.unknown_values.push(UnknownValue {
            path: "entityType".to_owned(),
            value: raw.to_owned(),
        });
        Some(KciType::Unlisted(raw.to_owned()))
    }

    /// `supplierNotes`: optional array of `{note, type, created}` (spec 2.2). Only the shape is
    /// checked; the notes are kept in the raw body.
    fn supplier_notes(&mut self, root: &Map<String, Value>) {
        match root.get("supplierNotes") {
            None | Some(Value::Null) => {}
            Some(Value::Array(notes)) => {
                for (index, note) in notes.iter().enumerate() {
                    let prefix = format!("supplierNotes[{index}]");
                    let Some(note) = note.as_object() else {
                        self.problem(
                            prefix,
                            format!("must be an object, found {}", kind_of(note)),
                        );
                        continue;
                    };
                    self.optional_str(note, "note", &prefix);
                    self.optional_str(note, "type", &prefix);
                    if let Some(created) = self
                        .optional_str(note, "created", &prefix)
                        .filter(|created| !created.is_empty())
                    {
                        self.date_time(&join(&prefix, "created"), created);
                    }
                }
            }
            Some(other) => self.problem(
                "supplierNotes",
                format!("must be an array, found {}", kind_of(other)),
            ),
        }
    }

    /// `updateType` and its companion object (spec 2.1).
    fn update(&mut self, root: &Map<String, Value>) -> Option<Update> {
        let raw = self.required_str(root, "updateType", "")?;
        let Some(update_type) = UpdateType::from_wire(raw) else {
            self.problem(
                "updateType",
                format!(
                    "invalid value {:?} - accepted values are INFORMATIONAL, ACTION_REQUIRED, ERROR",
                    shorten(raw)
                ),
            );
            return None;
        };
        let field = update_type.companion_field();
        let why = format!(" when updateType is {}", update_type.as_str());
        let companion = self.required_object(root, field, &why)?;
        match update_type {
            UpdateType::Informational => self
                .reason(companion, field, INFORMATION_TYPES)
                .map(Update::Informational),
            UpdateType::ActionRequired => self
                .reason(companion, field, ACTION_TYPES)
                .map(Update::ActionRequired),
            UpdateType::Error => self.gateway_error(companion, field).map(Update::Error),
        }
    }

    fn reason(
        &mut self,
        object: &Map<String, Value>,
        prefix: &str,
        known_types: &[&str],
    ) -> Option<Reason> {
        let kind = self.required_str(object, "type", prefix).map(str::to_owned);
        let code = self.optional_str(object, "code", prefix).map(str::to_owned);
        let text = self.optional_str(object, "text", prefix).map(str::to_owned);
        self.optional_str(object, "supplierCode", prefix);
        self.string_array(object, "supplierCodes", prefix);
        let kind = kind?;
        self.note_unknown(join(prefix, "type"), &kind, known_types);
        if let Some(code) = &code {
            self.note_unknown(join(prefix, "code"), code, PROBLEM_CODES);
        }
        Some(Reason { kind, code, text })
    }

    fn gateway_error(&mut self, object: &Map<String, Value>, prefix: &str) -> Option<GatewayError> {
        let uuid = self.optional_str(object, "uuid", prefix).map(str::to_owned);
        let code = self.required_str(object, "code", prefix).map(str::to_owned);
        let messages = self.string_array(object, "messages", prefix);
        let code = code?;
        self.note_unknown(join(prefix, "code"), &code, ERROR_CODES);
        Some(GatewayError {
            uuid,
            code,
            messages,
        })
    }

    /// An optional array of strings.
    fn string_array(
        &mut self,
        object: &Map<String, Value>,
        field: &str,
        prefix: &str,
    ) -> Vec<String> {
        let path = join(prefix, field);
        match object.get(field) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                let mut strings = Vec::with_capacity(items.len());
                for (index, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => strings.push(s.clone()),
                        other => self.problem(
                            format!("{path}[{index}]"),
                            format!("must be a string, found {}", kind_of(other)),
                        ),
                    }
                }
                strings
            }
            Some(other) => {
                self.problem(path, format!("must be an array, found {}", kind_of(other)));
                Vec::new()
            }
        }
    }

    /// `entity`: an object with the gateway `id` (a number in the docs; a non-empty string is
    /// accepted too) and a `status` string.
    fn entity(
        &mut self,
        root: &Map<String, Value>,
        entity_type: Option<&KciType>,
    ) -> Option<EntitySnapshot> {
        let entity = self.required_object(root, "entity", "")?;
        let gateway_id = match entity.get("id") {
            None | Some(Value::Null) => {
                self.problem("entity.id", "is required");
                None
            }
            Some(Value::Number(n)) if n.as_u64().is_some_and(|id| id >= 1) => Some(n.to_string()),
            // A whole number written as a float (`12345.0`) is the same id.
            Some(Value::Number(n))
                if n.as_f64().is_some_and(|f| {
                    f.fract() == 0.0 && (1.0..9.007_199_254_740_992e15).contains(&f)
                }) =>
            {
                Some(format!("{}", n.as_f64().unwrap_or_default() as u64))
            }
            Some(Value::Number(n)) => {
                self.problem(
                    "entity.id",
                    format!("must be a whole number >= 1, found {n}"),
                );
                None
            }
            // Gateway ids are numbers (spec 2.4); a string is accepted when it is a plausible id:
            // it becomes a key of ours, so it is short and printable.
            Some(Value::String(s))
                if !is_blank(s) && s.chars().count() <= 64 && !s.chars().any(char::is_control) =>
            {
                Some(s.clone())
            }
            Some(Value::String(_)) => {
                self.problem(
                    "entity.id",
                    "must be a non-empty string of at most 64 printable characters",
                );
                None
            }
            Some(other) => {
                self.problem(
                    "entity.id",
                    format!("must be a number, found {}", kind_of(other)),
                );
                None
            }
        };
        let status = self
            .required_str(entity, "status", "entity")
            .map(str::to_owned);
        // Without a valid entityType (already reported) the shape is still checked.
        let entity_type = entity_type?;
        let supplier_reference = entity_type
            .supplier_reference_fields()
            .iter()
            .find_map(|field| entity.get(*field).and_then(Value::as_str))
            .filter(|reference| !reference.is_empty())
            .map(str::to_owned);
        let (gateway_id, status) = (gateway_id?, status?);
        let lifecycle = entity_type.lifecycle();
        if !lifecycle.knows(&status) {
            self.unknown_values.push(UnknownValue {
                path: "entity.status".to_owned(),
                value: status.clone(),
            });
        }
        Some(EntitySnapshot {
            gateway_id,
            status,
            supplier_reference,
            body: Value::Object(entity.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn valid_body() -> Value {
        json!({
            "id": "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e21",
            "supplier": "FIBRECO",
            "sequenceNumber": 3,
            "deliveredOn": "2024-04-10T10:15:24.310Z",
            "updateType": "INFORMATIONAL",
            "entityType": "PROVIDE_ORDER",
            "entity": {"id": 12345, "status": "IN_PROGRESS", "supplierOrderNumber": "FC123"},
            "information": {"type": "COMMITTED"}
        })
    }

    #[test]
    fn a_body_moved_in_or_copied_gives_the_same_kci_and_keeps_the_body() {
        let aliases = HashMap::new();
        let owned = parse_owned_kci(valid_body(), &aliases).expect("valid");
        assert_eq!(
            owned,
            parse_kci_with(&valid_body(), &aliases).expect("valid")
        );
        assert_eq!(owned.body, valid_body());
        let mut invalid = valid_body();
        invalid["sequenceNumber"] = json!("three");
        assert_eq!(
            parse_owned_kci(invalid.clone(), &aliases).unwrap_err(),
            parse_kci_with(&invalid, &aliases).unwrap_err()
        );
    }

    #[test]
    fn a_valid_body_becomes_a_typed_kci() {
        let kci = parse_kci(&valid_body()).expect("valid");
        assert_eq!(kci.entity_type, KciType::Listed(EntityType::ProvideOrder));
        assert_eq!(kci.sequence_number, 3);
        assert_eq!(kci.entity.gateway_id, "12345");
        assert_eq!(kci.entity.supplier_reference.as_deref(), Some("FC123"));
        assert_eq!(kci.update.reason(), "COMMITTED");
        assert!(kci.unknown_values.is_empty());
    }

    #[test]
    fn every_problem_is_named_with_its_path() {
        let body = json!({
            "id": "not-a-uuid",
            "supplier": "FIBRE CO",
            "sequenceNumber": 0,
            "deliveredOn": "yesterday",
            "updateType": "ACTION_REQUIRED",
            "entityType": "PROVIDE_ORDER",
            "entity": {"status": 7},
            "supplierNotes": [{"note": 1}]
        });
        let problems = parse_kci(&body).unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        for expected in [
            "id",
            "supplier",
            "sequenceNumber",
            "deliveredOn",
            "supplierNotes[0].note",
            "action",
            "entity.id",
            "entity.status",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {paths:?}"
            );
        }
    }

    #[test]
    fn malformed_entity_type_is_a_problem_but_unknown_reason_is_only_flagged() {
        let mut body = valid_body();
        body["entityType"] = json!("provide spaceship");
        body.as_object_mut().unwrap().remove("entity");
        let problems = parse_kci(&body).unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["entityType", "entity"]);

        let mut body = valid_body();
        body["information"] = json!({"type": "TELEPORTED", "code": "ALIEN_FAULT"});
        body["entity"]["status"] = json!("IN_ORBIT");
        let kci = parse_kci(&body).expect("open-ended values are accepted");
        let flagged: Vec<String> = kci.unknown_values.iter().map(|u| u.to_string()).collect();
        assert_eq!(
            flagged,
            vec![
                "information.type = TELEPORTED",
                "information.code = ALIEN_FAULT",
                "entity.status = IN_ORBIT"
            ]
        );
    }

    #[test]
    fn a_well_formed_unlisted_entity_type_is_accepted_and_flagged_and_aliases_map_it() {
        let mut body = valid_body();
        body["entityType"] = json!("CEASE_ETHERNET_ORDER");
        body["entity"]["status"] = json!("ANY_STATUS_AT_ALL");
        let kci = parse_kci(&body).expect("accepted");
        assert_eq!(
            kci.entity_type,
            KciType::Unlisted("CEASE_ETHERNET_ORDER".to_owned())
        );
        let flagged: Vec<String> = kci.unknown_values.iter().map(|u| u.to_string()).collect();
        assert_eq!(flagged, ["entityType = CEASE_ETHERNET_ORDER"]);

        let aliases = HashMap::from([("CEASE_ETHERNET_ORDER".to_owned(), EntityType::CeaseOrder)]);
        let kci = parse_kci_with(&body, &aliases).expect("accepted");
        assert_eq!(kci.entity_type, KciType::Listed(EntityType::CeaseOrder));

        for malformed in ["", "lower", "1ORDER", "ORDER-X", &"A".repeat(51)] {
            body["entityType"] = json!(malformed);
            let problems = parse_kci(&body).unwrap_err();
            assert_eq!(problems[0].path, "entityType", "{malformed:?}");
        }
    }

    #[test]
    fn sequence_numbers_beyond_a_64_bit_integer_are_refused_not_saturated() {
        let mut body = valid_body();
        body["sequenceNumber"] = json!(i64::MAX);
        assert_eq!(parse_kci(&body).unwrap().sequence_number, i64::MAX);
        for too_big in [
            json!(9_223_372_036_854_775_808u64),
            json!(u64::MAX),
            json!(1e19),
            json!(9.223372036854776e18),
        ] {
            body["sequenceNumber"] = too_big.clone();
            let problems = parse_kci(&body).unwrap_err();
            assert_eq!(problems[0].path, "sequenceNumber", "{too_big}");
        }
        body["sequenceNumber"] = json!(4.0);
        assert_eq!(parse_kci(&body).unwrap().sequence_number, 4);
    }

    #[test]
    fn string_gateway_ids_must_be_short_and_printable() {
        let mut body = valid_body();
        body["entity"]["id"] = json!("ORD-12345");
        assert_eq!(parse_kci(&body).unwrap().entity.gateway_id, "ORD-12345");
        for bad in ["a\u{0}b".to_owned(), "tab\there".to_owned(), "9".repeat(65)] {
            body["entity"]["id"] = json!(bad);
            let problems = parse_kci(&body).unwrap_err();
            assert_eq!(problems[0].path, "entity.id", "{bad:?}");
        }
    }

    #[test]
    fn redelivery_comparison_ignores_delivered_on_only() {
        let kci = parse_kci(&valid_body()).unwrap();
        let mut redelivered = valid_body();
        redelivered["deliveredOn"] = json!("2024-04-10T11:00:00.000Z");
        assert!(kci.same_content_as(&redelivered));
        redelivered["entity"]["status"] = json!("COMPLETED");
        assert!(!kci.same_content_as(&redelivered));
        assert_eq!(kci.differing_fields(&redelivered), vec!["entity"]);
    }

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("id".to_owned()),
                        Just("entity".to_owned()),
                        Just("status".to_owned()),
                        Just("updateType".to_owned()),
                        Just("information".to_owned()),
                        Just("sequenceNumber".to_owned()),
                        ".{0,8}".prop_map(|s| s),
                    ],
                    inner,
                    0..8
                )
                .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    fn valid_kci_body() -> impl Strategy<Value = Value> {
        (
            any::<u128>(),
            "[A-Z0-9_]{1,20}",
            1..i64::MAX,
            prop::sample::select(EntityType::ALL.to_vec()),
            0..3usize,
            1..u32::MAX,
            "[A-Z_]{1,30}",
            proptest::option::of("[A-Z_]{1,30}"),
            any::<bool>(),
        )
            .prop_map(
                |(id, supplier, sequence, entity_type, update, gateway_id, reason, code, issued)| {
                    let mut body = json!({
                        "id": Uuid::from_u128(id).to_string(),
                        "supplier": supplier,
                        "sequenceNumber": sequence,
                        "deliveredOn": "2024-04-10T10:15:24.310Z",
                        "entityType": entity_type.as_str(),
                        "entity": {"id": gateway_id, "status": reason.clone(), "anyExtra": [1, {"x": null}]},
                        "extraTopLevel": {"kept": true},
                    });
                    if issued {
                        body["issuedOn"] = json!("2024-04-10T10:15:22+01:00");
                    }
                    let companion = json!({"type": reason, "code": code});
                    match update {
                        0 => {
                            body["updateType"] = json!("INFORMATIONAL");
                            body["information"] = companion;
                        }
                        1 => {
                            body["updateType"] = json!("ACTION_REQUIRED");
                            body["action"] = companion;
                        }
                        _ => {
                            body["updateType"] = json!("ERROR");
                            body["error"] = json!({"code": reason, "messages": ["m"]});
                        }
                    }
                    body
                },
            )
    }

    proptest! {
        #[test]
        fn arbitrary_json_never_panics(body in arbitrary_json()) {
            let _ = parse_kci(&body);
        }

        #[test]
        fn every_generated_valid_kci_is_accepted(body in valid_kci_body()) {
            let kci = parse_kci(&body).map_err(|problems| {
                TestCaseError::fail(format!("{problems:?} for {body}"))
            })?;
            prop_assert_eq!(kci.body, body);
        }

        #[test]
        fn removing_any_required_envelope_field_is_named(
            body in valid_kci_body(),
            field in prop::sample::select(vec!["id", "supplier", "sequenceNumber", "deliveredOn", "updateType", "entityType", "entity"]),
        ) {
            let mut body = body;
            body.as_object_mut().unwrap().remove(field);
            let problems = parse_kci(&body).unwrap_err();
            prop_assert!(problems.iter().any(|p| p.path == field), "{:?}", problems);
        }
    }
}
