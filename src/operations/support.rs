//! The text of a support request about one exchange with the gateway, in the form the Fibre
//! Cafe support desk asks for: environment, gateway ids, tenant, supplier, timestamp,
//! X-Request-ID, X-Conversation-ID, the request and the response, the error uuid.

use std::fmt::Write;

use chrono::SecondsFormat;
use entity::{audit_log, tracked_entity};
use serde_json::Value;

/// Renders the support text for an audit record and the entities it concerns.
pub fn support_text(
    environment: &str,
    tenant: &str,
    record: &audit_log::Model,
    entities: &[tracked_entity::Model],
) -> String {
    let body: Option<Value> = record
        .request_body
        .as_deref()
        .and_then(|b| serde_json::from_str(b).ok());
    let supplier = body
        .as_ref()
        .and_then(|b| b.get("supplier"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| entities.first().map(|e| e.supplier.clone()))
        .unwrap_or_else(|| "(unknown)".to_owned());
    let gateway_ids = if entities.is_empty() {
        body.as_ref()
            .and_then(|b| {
                Some(format!(
                    "{} {}",
                    b.get("entityType")?.as_str()?,
                    b.get("entity")?.get("id")?
                ))
            })
            .unwrap_or_else(|| "(none)".to_owned())
    } else {
        entities
            .iter()
            .map(|e| match &e.supplier_reference {
                Some(reference) => format!(
                    "{} {} (supplier reference {reference})",
                    e.entity_type, e.gateway_id
                ),
                None => format!("{} {}", e.entity_type, e.gateway_id),
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let or_none = |value: &Option<String>| value.clone().unwrap_or_else(|| "(none)".to_owned());

    let mut text = String::new();
    let _ = writeln!(
        text,
        "Subject: Fibre Cafe support request - {} {} answered {}",
        record.method, record.path, record.response_status
    );
    let _ = writeln!(text);
    let _ = writeln!(text, "Environment:       {environment}");
    let _ = writeln!(text, "Tenant:            {tenant}");
    let _ = writeln!(text, "Supplier:          {supplier}");
    let _ = writeln!(text, "Gateway ids:       {gateway_ids}");
    let _ = writeln!(
        text,
        "Timestamp:         {}",
        record
            .received_at
            .to_rfc3339_opts(SecondsFormat::Millis, true)
    );
    let _ = writeln!(text, "X-Request-ID:      {}", or_none(&record.request_id));
    let _ = writeln!(
        text,
        "X-Conversation-ID: {}",
        or_none(&record.conversation_id)
    );
    let _ = writeln!(
        text,
        "Error uuid:        {}",
        record.error_uuid.map_or_else(
            || "(none: the request succeeded)".to_owned(),
            |u| u.to_string()
        )
    );
    let _ = writeln!(text);
    let _ = writeln!(text, "Request:");
    let _ = writeln!(text, "{} {}", record.method, record.path);
    if let Some(headers) = record.request_headers.as_object() {
        for (name, value) in headers {
            let _ = writeln!(text, "{name}: {}", value.as_str().unwrap_or_default());
        }
    }
    let _ = writeln!(text);
    match (&body, &record.request_body) {
        (Some(json), _) => {
            let _ = writeln!(
                text,
                "{}",
                serde_json::to_string_pretty(json).unwrap_or_default()
            );
        }
        (None, Some(raw)) => {
            let _ = writeln!(text, "{raw}");
        }
        (None, None) => {
            let _ = writeln!(
                text,
                "(body of {} bytes not kept)",
                record.request_body_size
            );
        }
    }
    let _ = writeln!(text);
    let _ = writeln!(text, "Response:");
    let _ = writeln!(text, "{}", record.response_status);
    if let Some(response) = &record.response_body {
        let pretty = serde_json::from_str::<Value>(response)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| response.clone());
        let _ = writeln!(text, "{pretty}");
    }
    text
}
