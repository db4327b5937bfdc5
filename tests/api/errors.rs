//! Every error row of design.md's HTTP contract: status, the gateway's error body, the echoed
//! correlation headers, and the audit record carrying the error uuid.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{BACKENDS, GATEWAY_USER, TestApp, fixture, spawn_app, spawn_app_with};

struct Case {
    name: &'static str,
    content_type: Option<&'static str>,
    request_id: Option<&'static str>,
    conversation_id: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    message_contains: &'static str,
}

fn valid_body() -> Vec<u8> {
    serde_json::to_vec(&fixture("ProvideServiceOrderUpdate-1")).unwrap()
}

fn cases() -> Vec<Case> {
    let mut wrong_schema = fixture("ProvideServiceOrderUpdate-1");
    wrong_schema["sequenceNumber"] = json!("three");
    wrong_schema["entity"]
        .as_object_mut()
        .unwrap()
        .remove("status");
    // A well-formed type the docs do not list is accepted (see hostile.rs); a malformed one is not.
    let mut malformed_type = fixture("ProvideServiceOrderUpdate-1");
    malformed_type["entityType"] = json!("provide-spaceship");
    vec![
        Case {
            name: "missing X-Request-ID",
            content_type: Some("application/json"),
            request_id: None,
            conversation_id: Some("conv"),
            body: valid_body(),
            status: 400,
            code: "MALFORMED_REQUEST",
            message_contains: "X-Request-ID",
        },
        Case {
            name: "missing X-Conversation-ID",
            content_type: Some("application/json"),
            request_id: Some("req-err-2"),
            conversation_id: None,
            body: valid_body(),
            status: 400,
            code: "MALFORMED_REQUEST",
            message_contains: "X-Conversation-ID",
        },
        Case {
            name: "body not JSON",
            content_type: Some("application/json"),
            request_id: Some("req-err-3"),
            conversation_id: Some("conv"),
            body: b"{\"id\": ".to_vec(),
            status: 400,
            code: "MALFORMED_REQUEST",
            message_contains: "not valid JSON",
        },
        Case {
            name: "wrong content type",
            content_type: Some("text/plain"),
            request_id: Some("req-err-4"),
            conversation_id: Some("conv"),
            body: valid_body(),
            status: 400,
            code: "MALFORMED_REQUEST",
            message_contains: "Content-Type",
        },
        Case {
            name: "no content type",
            content_type: None,
            request_id: Some("req-err-5"),
            conversation_id: Some("conv"),
            body: valid_body(),
            status: 400,
            code: "MALFORMED_REQUEST",
            message_contains: "Content-Type",
        },
        Case {
            name: "body too large",
            content_type: Some("application/json"),
            request_id: Some("req-err-6"),
            conversation_id: Some("conv"),
            body: vec![b' '; 2 * 1024 * 1024],
            status: 413,
            code: "MALFORMED_REQUEST",
            message_contains: "larger than",
        },
        Case {
            name: "JSON failing the schema",
            content_type: Some("application/json"),
            request_id: Some("req-err-7"),
            conversation_id: Some("conv"),
            body: serde_json::to_vec(&wrong_schema).unwrap(),
            status: 422,
            code: "INVALID_REQUEST",
            message_contains: "sequenceNumber: must be a number",
        },
        Case {
            name: "malformed entityType",
            content_type: Some("application/json"),
            request_id: Some("req-err-8"),
            conversation_id: Some("conv"),
            body: serde_json::to_vec(&malformed_type).unwrap(),
            status: 422,
            code: "INVALID_REQUEST",
            message_contains: "entityType: must match ^[A-Z][A-Z0-9_]{0,49}$",
        },
    ]
}

/// Checks the gateway's error body, and returns it.
pub async fn assert_gateway_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.expect("an error body");
    assert_eq!(body["code"], code, "{body}");
    Uuid::parse_str(body["uuid"].as_str().expect("uuid")).expect("the uuid is a UUID");
    assert!(
        body["messages"].as_array().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

async fn audit_of(app: &TestApp, error_uuid: &str) -> Value {
    let rows = app
        .rows_eventually(
            &format!(
                "SELECT * FROM audit_log WHERE error_uuid = {}",
                app.uuid_sql(error_uuid)
            ),
            1,
        )
        .await;
    assert_eq!(rows.len(), 1, "one audit record for error {error_uuid}");
    rows.into_iter().next().unwrap()
}

#[tokio::test]
async fn every_client_error_answers_in_the_gateway_format_and_is_audited() {
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        for case in cases() {
            let mut request = app
                .client
                .post(format!("{}/kcis", app.address))
                .basic_auth(
                    crate::helpers::GATEWAY_USER,
                    Some(crate::helpers::GATEWAY_PASSWORD),
                )
                .body(case.body.clone());
            if let Some(content_type) = case.content_type {
                request = request.header("Content-Type", content_type);
            }
            if let Some(id) = case.request_id {
                request = request.header("X-Request-ID", id);
            }
            if let Some(id) = case.conversation_id {
                request = request.header("X-Conversation-ID", id);
            }
            let response = request.send().await.unwrap();
            let echoed_request = response
                .headers()
                .get("X-Request-ID")
                .map(|v| v.to_str().unwrap().to_owned());
            let echoed_conversation = response
                .headers()
                .get("X-Conversation-ID")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(echoed_request.as_deref(), case.request_id, "{}", case.name);
            assert_eq!(
                echoed_conversation.as_deref(),
                case.conversation_id,
                "{}",
                case.name
            );
            let body = assert_gateway_error(response, case.status, case.code).await;
            let messages = body["messages"].to_string();
            assert!(
                messages.contains(case.message_contains),
                "{}: {messages}",
                case.name
            );

            let audit = audit_of(&app, body["uuid"].as_str().unwrap()).await;
            assert_eq!(audit["response_status"], case.status, "{}", case.name);
            assert_eq!(audit["outcome"], "REJECTED");
            assert_eq!(audit["error_code"], case.code);
            assert_eq!(audit["principal"], GATEWAY_USER);
        }
        assert_eq!(
            app.count("FROM kci").await,
            0,
            "nothing rejected was recorded"
        );
    }
}

#[tokio::test]
async fn a_schema_failure_names_every_failing_field_by_its_path() {
    let app = spawn_app(crate::helpers::Backend::Sqlite).await;
    let mut body = fixture("ServiceProblemUpdate-3");
    body["id"] = json!("nope");
    body["deliveredOn"] = json!("2024-13-45");
    body["action"] = json!({"code": 5});
    body["entity"]["id"] = json!(-1);
    body["supplierNotes"] = json!([{"note": "ok"}, "not an object"]);
    let response = app.post_kci(&body, "conv").await;
    let error = assert_gateway_error(response, 422, "INVALID_REQUEST").await;
    let messages: Vec<String> = serde_json::from_value(error["messages"].clone()).unwrap();
    for path in [
        "id:",
        "deliveredOn:",
        "supplierNotes[1]:",
        "action.type:",
        "action.code:",
        "entity.id:",
    ] {
        assert!(
            messages.iter().any(|m| m.starts_with(path)),
            "{path} in {messages:?}"
        );
    }
}

#[tokio::test]
async fn an_unexpected_fault_is_a_500_without_internals_and_the_cause_is_kept_for_the_audit() {
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        // Break the schema under the running app: recording a KCI can no longer succeed.
        sea_orm::ConnectionTrait::execute_unprepared(&app.db, "DROP TABLE outbox_event")
            .await
            .unwrap();
        let response = app
            .post_kci_as(
                &fixture("ProvideServiceOrderUpdate-1"),
                "conv-500",
                "req-500",
            )
            .await;
        assert_eq!(response.headers()["X-Request-ID"], "req-500");
        let body = assert_gateway_error(response, 500, "TENANT_FAULT").await;
        let text = body.to_string();
        assert!(
            !text.contains("outbox") && !text.to_lowercase().contains("sql"),
            "no internals: {text}"
        );
        assert_eq!(
            app.count("FROM kci").await,
            0,
            "the transaction rolled back"
        );
        let audit = audit_of(&app, body["uuid"].as_str().unwrap()).await;
        assert_eq!(audit["outcome"], "FAILED");
        assert_eq!(audit["response_status"], 500);
    }
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_in_the_gateway_format() {
    let app = spawn_app(crate::helpers::Backend::Sqlite).await;
    let response = app.get("/nowhere").await;
    assert_gateway_error(response, 404, "NOT_FOUND").await;
    let response = app.get("/kcis").await;
    assert_eq!(response.headers()["Allow"], "POST");
    assert_gateway_error(response, 405, "NOT_IMPLEMENTED").await;
}

#[tokio::test]
async fn a_body_just_under_the_limit_is_read_and_one_over_is_refused_without_reading_it() {
    let app = spawn_app_with(crate::helpers::Backend::Sqlite, |settings| {
        settings.server.max_body_bytes = 4096;
    })
    .await;
    let mut body = fixture("ProvideServiceOrderUpdate-1");
    body["padding"] = json!("x".repeat(3000));
    assert_eq!(app.post_kci(&body, "conv").await.status().as_u16(), 204);
    body["id"] = json!(Uuid::new_v4().to_string());
    body["padding"] = json!("x".repeat(5000));
    let response = app.post_kci(&body, "conv").await;
    assert_gateway_error(response, 413, "MALFORMED_REQUEST").await;
    // Unknown extra fields are kept with the KCI.
    let raw = app.rows("SELECT raw_body FROM kci").await;
    assert!(raw[0]["raw_body"].as_str().unwrap().contains("\"padding\""));
}
