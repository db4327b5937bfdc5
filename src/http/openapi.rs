//! `GET /openapi.json`: the whole HTTP surface as OpenAPI 3.1, generated from the handlers'
//! annotations and the types they return, so that it cannot drift from the code, then completed
//! where annotations cannot say enough:
//!
//! - the `POST /kcis` body, written out as the JSON Schema the parser enforces (`crate::kci`):
//!   a client generated from the document sends what is accepted, and what the document forbids
//!   is refused;
//! - the answers every operation can give (400 for a request that cannot be understood, 401 and
//!   403 where credentials are needed, 413/415/422 where a body is read, 500, 503 with
//!   `Retry-After`), each with the gateway's error body;
//! - the egress proxy, present only when it is enabled, at its configured prefix, with one
//!   operation id per method.
//!
//! The document is built once at start-up (`AppState::openapi`). The test suite validates it and
//! runs schemathesis against it with every role's credentials.

use actix_web::HttpResponse;
use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{conversations, kcis, operations, outbox};
use crate::config::Settings;
use crate::error::{ErrorBody, ErrorCode};
use crate::operations::duration;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kci-receiver",
        description = "Receives the Fibre Cafe gateway's KCIs (Tenant Updates API 1.14, `POST /kcis`) and serves operations staff and dashboards (`/api/v1`). Every error has the gateway's error body.",
    ),
    paths(
        kcis::post_kci,
        conversations::register,
        operations::list_service_orders, operations::get_service_order, operations::service_order_history,
        operations::list_ethernet_service_orders, operations::get_ethernet_service_order, operations::ethernet_service_order_history,
        operations::list_service_tests, operations::get_service_test, operations::service_test_history,
        operations::list_service_problems, operations::get_service_problem, operations::service_problem_history,
        operations::list_all_entities,
        super::reconcile::reconcile_service_order, super::reconcile::reconcile_ethernet_service_order,
        super::reconcile::reconcile_service_test, super::reconcile::reconcile_service_problem,
        operations::get_conversation, operations::get_kci, operations::get_audit,
        operations::get_attention, operations::get_overview, operations::search,
        outbox::list_dead, outbox::retry_one, outbox::skip_one, outbox::retry_all, outbox::replay,
        super::egress::proxy,
        super::health::healthz, super::health::readyz, super::metrics_doc, super::openapi_doc, super::dashboard::dashboard,
    ),
    components(schemas(ErrorBody, ErrorCode)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "tenant updates", description = "The Fibre Cafe Tenant Updates API 1.14: called by the gateway"),
        (name = "operations", description = "For operations staff and dashboards (own credentials)"),
        (name = "egress", description = "The proxy to the Fibre Cafe Tenant API (optional)"),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let basic =
            || SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build());
        components.add_security_scheme("gateway_basic", basic());
        components.add_security_scheme(
            "gateway_bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme("operations_basic", basic());
    }
}

/// Where the annotations put the egress proxy (its default prefix).
const EGRESS_PATH: &str = "/fibre-cafe/v1/{path}";

/// The document for this configuration, as JSON.
pub fn document(settings: &Settings) -> Value {
    let mut document = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    document["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    document["components"]["schemas"]["KciBody"] = kci_body_schema();
    document["paths"]["/kcis"]["post"]["requestBody"]["content"]["application/json"]["schema"] =
        json!({"$ref": "#/components/schemas/KciBody"});
    // The correlation headers (spec 1.1 gives no format): 1 to 255 printable ASCII characters,
    // not blank, as `kcis::required_id_header` checks them.
    if let Some(parameters) = document["paths"]["/kcis"]["post"]
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    {
        for parameter in parameters.iter_mut().filter(|p| p["in"] == "header") {
            parameter["schema"] = json!({
                "type": "string",
                "allOf": [{"pattern": "^[\\t\\x20-\\x7E]{1,255}$"}, {"pattern": "[!-~]"}]
            });
        }
    }
    document["components"]["schemas"]["NewConversation"]["properties"]["requestBody"] =
        json!({"description": "The request body as sent to the Tenant API (any JSON)"});
    document["components"]["schemas"]["ReplayRequest"] = replay_schema();
    document["components"]["schemas"]["NewConversation"]["properties"]["responseStatus"] = json!({
        "description": "The Tenant API's response status, when known",
        "type": ["integer", "null"], "minimum": 0, "maximum": 65535
    });
    document["components"]["schemas"]["NewConversation"]["properties"]["gatewayId"] = json!({
        "description": "`id` from the Tenant API's response, when known",
        "oneOf": [
            {"type": "integer", "minimum": 1, "maximum": u64::MAX},
            {"type": "string", "pattern": NOT_BLANK},
            {"type": "null"}
        ]
    });
    document["components"]["headers"] = json!({
        "RetryAfter": {
            "description": "Seconds to wait before trying again",
            "schema": {"type": "integer", "minimum": 0}
        },
        "WwwAuthenticate": {
            "description": "The authentication scheme expected",
            "schema": {"type": "string"}
        }
    });
    // `POST /kcis` takes the one way the gateway authenticates in this configuration.
    let (scheme, definition) = match settings.gateway_auth.method {
        crate::config::GatewayAuthMethod::Basic => ("gateway_basic", None),
        crate::config::GatewayAuthMethod::Jwt => ("gateway_bearer", None),
        crate::config::GatewayAuthMethod::Mtls => (
            "gateway_mutual_tls",
            Some(json!({
                "type": "mutualTLS",
                "description": "The gateway's client certificate, on the HTTPS listener (tls.port), or as passed on by a trusted TLS-terminating proxy"
            })),
        ),
    };
    if let Some(paths) = document["paths"].as_object_mut() {
        match paths.remove(EGRESS_PATH) {
            Some(mut egress) if settings.egress.enabled => {
                if let Some(operations) = egress.as_object_mut() {
                    for (method, operation) in operations.iter_mut() {
                        operation["operationId"] = json!(format!("egress_{method}"));
                        for parameter in
                            operation["parameters"].as_array_mut().into_iter().flatten()
                        {
                            if parameter["in"] == "path" {
                                parameter["schema"] = egress_path_schema();
                            }
                        }
                        // Whatever the Tenant API answers comes back unchanged.
                        if let Some(success) = operation["responses"]
                            .as_object_mut()
                            .and_then(|responses| responses.remove("200"))
                        {
                            operation["responses"]["default"] = success;
                        }
                    }
                }
                paths.insert(format!("{}/{{path}}", settings.egress.path_prefix), egress);
            }
            _ => {}
        }
        if let Some(post) = paths.get_mut("/kcis").and_then(|p| p.get_mut("post")) {
            post["security"] = json!([{scheme: []}]);
        }
        // `/metrics` as configured: on a port of its own (not this one), or behind the
        // operations credentials.
        if settings.metrics.port.is_some() {
            paths.remove("/metrics");
        } else if settings.metrics.access == crate::config::MetricsAccess::Operations
            && let Some(get) = paths.get_mut("/metrics").and_then(|p| p.get_mut("get"))
        {
            get["security"] = json!([{"operations_basic": []}]);
        }
        for (path, item) in paths.iter_mut() {
            let Some(operations) = item.as_object_mut() else {
                continue;
            };
            for operation in operations.values_mut() {
                complete_responses(path, operation);
                refuse_nul_in_parameters(operation);
            }
        }
    }
    if let Some(schemes) = document["components"]["securitySchemes"].as_object_mut() {
        for unused in ["gateway_basic", "gateway_bearer"] {
            if unused != scheme {
                schemes.remove(unused);
            }
        }
        if let Some(definition) = definition {
            schemes.insert(scheme.to_owned(), definition);
        }
    }
    document
}

/// The egress `{path}` as `egress::confined_url` forwards it, described as one decoded segment
/// (OpenAPI path parameters cannot hold `/`; more segments are sent as they are, unencoded):
/// no control character, backslash, slash or percent sign (each would arrive percent-encoded,
/// which the proxy refuses), and not the dot segments `.` and `..`. The three alternatives spell
/// "not `.` or `..`" without a look-ahead, which not every JSON Schema validator supports.
fn egress_path_schema() -> Value {
    const ANY: &str = "[^\\x00-\\x1f\\x7f\\\\/%]";
    const NOT_DOT: &str = "[^\\x00-\\x1f\\x7f\\\\/%.]";
    json!({
        "type": "string",
        "pattern": format!("^(?:{NOT_DOT}{ANY}*|\\.{NOT_DOT}{ANY}*|\\.\\.{ANY}+)$")
    })
}

/// Every string parameter without a pattern of its own gets one that excludes U+0000: a path or
/// query string with an encoded NUL is refused before any handler (`super::refuse_nul`).
fn refuse_nul_in_parameters(operation: &mut Value) {
    let parameters = operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut);
    for parameter in parameters.into_iter().flatten() {
        let schema = &mut parameter["schema"];
        let is_string = schema["type"] == "string"
            || schema["type"]
                .as_array()
                .is_some_and(|types| types.contains(&json!("string")));
        if is_string && schema.get("pattern").is_none() && schema.get("enum").is_none() {
            schema["pattern"] = json!("^[^\\u0000]*$");
        }
    }
}

/// `POST /api/v1/outbox/replay`: exactly one kind of selection, no other field, no nulls.
fn replay_schema() -> Value {
    let text = json!({"type": "string"});
    let time = json!({"type": "string", "format": "date-time"});
    json!({
        "description": "What to replay: the events of one entity, of one conversation, or created in [from, to) (an empty or reversed range replays nothing)",
        "oneOf": [
            {"title": "Entity", "type": "object", "additionalProperties": false,
             "required": ["entityType", "gatewayId"],
             "properties": {"entityType": text, "gatewayId": text}},
            {"title": "Conversation", "type": "object", "additionalProperties": false,
             "required": ["conversationId"],
             "properties": {"conversationId": text}},
            {"title": "TimeRange", "type": "object", "additionalProperties": false,
             "required": ["from", "to"],
             "properties": {"from": time, "to": time}}
        ]
    })
}

/// An error answer with the gateway's error body.
fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

/// Adds the answers an operation can give whatever its handler says (see the module
/// documentation), without replacing what the handler documents.
fn complete_responses(path: &str, operation: &mut Value) {
    let secured = operation["security"]
        .as_array()
        .is_some_and(|requirements| !requirements.is_empty());
    let has_body = operation.get("requestBody").is_some();
    let Some(responses) = operation["responses"].as_object_mut() else {
        return;
    };
    let mut add = |status: &str, response: Value| {
        responses.entry(status).or_insert(response);
    };
    add(
        "400",
        error_response(
            "The request cannot be understood (a path, query string or header, e.g. an encoded NUL)",
        ),
    );
    if secured {
        let mut unauthorised = error_response("Missing or invalid credentials");
        unauthorised["headers"] =
            json!({"WWW-Authenticate": {"$ref": "#/components/headers/WwwAuthenticate"}});
        add("401", unauthorised);
        add(
            "403",
            error_response(
                "Valid credentials that may not do this (another role, another side, a cross-site request)",
            ),
        );
    }
    if path != "/healthz" && path != "/readyz" {
        let mut locked_out = error_response(
            "This address failed authentication too often (server.auth_failures_per_minute): nothing is checked until Retry-After seconds have passed",
        );
        locked_out["headers"] = json!({"Retry-After": {"$ref": "#/components/headers/RetryAfter"}});
        add("429", locked_out);
    }
    if has_body && path != "/kcis" {
        add("413", error_response("The body is larger than accepted"));
        add(
            "415",
            error_response("There is no body (a body of another type is refused with 403)"),
        );
        add(
            "422",
            error_response("The body fails validation; every problem is named"),
        );
    }
    add(
        "500",
        error_response("Unexpected fault (the cause is logged under the error uuid)"),
    );
    let mut unavailable = error_response(
        "Temporarily unavailable (the database down, slow or overloaded): retry after Retry-After seconds",
    );
    unavailable["headers"] = json!({"Retry-After": {"$ref": "#/components/headers/RetryAfter"}});
    responses
        .entry("503")
        .and_modify(|existing| {
            if existing.get("headers").is_none() {
                existing["headers"] = unavailable["headers"].clone();
            }
        })
        .or_insert(unavailable);
}

/// Not empty and not only ASCII blanks: what "must not be empty" means in the parser.
const NOT_BLANK: &str = "[^ \\t\\n\\r]";

/// The `POST /kcis` body (Tenant Updates API 1.14, spec section 2) exactly as `crate::kci`
/// checks it: the envelope of spec 2.2, the two discriminators, the companion object each
/// `updateType` requires, `entity.id` and `entity.status`. Everything else is kept as received
/// (additional properties allowed everywhere).
pub fn kci_body_schema() -> Value {
    let text = json!({"type": "string", "pattern": NOT_BLANK});
    let optional_text = json!({"type": ["string", "null"]});
    // RFC 3339; the pattern also says what `format` alone does not assert.
    let date_time = json!({
        "type": "string", "format": "date-time",
        "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
    });
    let optional_date_time = json!({
        "description": "RFC 3339; empty or null: not set",
        "type": ["string", "null"],
        "anyOf": [{"format": "date-time"}, {"maxLength": 0}]
    });
    let reason = json!({
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"description": "The reason, e.g. COMMITTED or REAPPOINT (undocumented values are accepted and flagged)", "type": "string", "pattern": NOT_BLANK},
            "code": {"description": "A Fibre Cafe problem code", "type": ["string", "null"]},
            "text": optional_text,
            "supplierCode": optional_text,
            "supplierCodes": {"type": ["array", "null"], "items": {"type": "string"}}
        }
    });
    let variant = |update_type: &str, companion: &str, schema: Value| {
        json!({
            "properties": {"updateType": {"const": update_type}, companion: schema},
            "required": ["updateType", companion]
        })
    };
    json!({
        "description": "A KCI: one of 7 entity types x 3 update types (Tenant Updates API 1.14). Unknown extra fields are kept. A well-formed entityType the docs do not list is accepted too (tracked with a generic lifecycle, flagged).",
        "type": "object",
        "required": ["id", "supplier", "sequenceNumber", "deliveredOn", "updateType", "entityType", "entity"],
        "properties": {
            "id": {"description": "UUID: the permanent idempotency key", "type": "string", "format": "uuid"},
            "supplier": {"type": "string", "pattern": "^[A-Za-z0-9_]{1,20}$"},
            "sequenceNumber": {"description": "Per entity", "type": "integer", "minimum": 1, "maximum": i64::MAX},
            "issuedOn": optional_date_time,
            "receivedOn": optional_date_time,
            "deliveredOn": date_time,
            "supplierNotes": {
                "type": ["array", "null"],
                "items": {
                    "type": "object",
                    "properties": {
                        "note": optional_text,
                        "type": optional_text,
                        "created": optional_date_time
                    }
                }
            },
            "updateType": {
                "description": "INFORMATIONAL (with `information`), ACTION_REQUIRED (with `action`) or ERROR (with `error`)",
                "type": "string",
                "enum": ["INFORMATIONAL", "ACTION_REQUIRED", "ERROR"]
            },
            "entityType": {
                "description": "PROVIDE_ORDER, CEASE_ORDER, MODIFY_ORDER, UNSOLICITED_CEASE_ORDER, PROVIDE_ETHERNET_ORDER, SERVICE_TEST, SERVICE_PROBLEM, or a type the docs do not list yet",
                "type": "string",
                "pattern": "^[A-Z][A-Z0-9_]{0,49}$"
            },
            "entity": {
                "description": "The latest snapshot of the entity",
                "type": "object",
                "required": ["id", "status"],
                "properties": {
                    "id": {
                        "description": "The gateway id: a number (or a short printable string)",
                        "oneOf": [
                            {"type": "integer", "minimum": 1, "maximum": u64::MAX},
                            {"type": "string", "allOf": [{"pattern": "^[^\\u0000-\\u001F\\u007F-\\u009F]{1,64}$"}, {"pattern": NOT_BLANK}]}
                        ]
                    },
                    "status": text
                }
            }
        },
        // The companion object of each update type; the other two are kept as extra fields.
        "oneOf": [
            variant("INFORMATIONAL", "information", reason.clone()),
            variant("ACTION_REQUIRED", "action", reason),
            variant("ERROR", "error", json!({
                "description": "The gateway's error body (spec 1.3)",
                "type": "object",
                "required": ["code"],
                "properties": {
                    "uuid": optional_text,
                    "code": {"type": "string", "pattern": NOT_BLANK},
                    "messages": {"type": ["array", "null"], "items": {"type": "string"}}
                }
            })),
        ],
        "example": {
            "id": "0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e21", "supplier": "FIBRECO", "sequenceNumber": 3,
            "deliveredOn": "2024-04-10T10:15:24.310Z", "updateType": "INFORMATIONAL", "entityType": "PROVIDE_ORDER",
            "entity": {"id": 12345, "status": "IN_PROGRESS"}, "information": {"type": "COMMITTED"}
        }
    })
}

/// The duration pattern the operations API publishes, for its parameters (see
/// [`duration::PATTERN`]); the annotations repeat it as a literal, checked equal by a test.
pub const DURATION_PATTERN: &str = duration::PATTERN;

pub async fn openapi_json(document: &[u8]) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document.to_vec())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_duration_pattern_in_the_annotations_is_the_parsers() {
        let document = super::document(&crate::config::Settings::defaults().unwrap());
        let stuck_for = document["paths"]["/api/v1/attention"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "stuckFor")
            .unwrap();
        assert_eq!(stuck_for["schema"]["pattern"], super::DURATION_PATTERN);
    }
}
