//! Nothing poisons the pipeline (design.md, "No poison"): a corpus of hostile and unlucky KCIs,
//! each followed by a normal one that must still reach RabbitMQ, on both databases. Every KCI
//! the parser accepts is stored byte for byte and published; what is refused is refused with a
//! 4xx in the gateway's format, never a 5xx; the relay never stops.

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::broker::TestBroker;
use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_USER, BACKENDS, Backend, GATEWAY_PASSWORD, GATEWAY_USER, TestApp,
    eventually, kci, spawn_app_with,
};

/// One hostile request and what it must get.
struct Case {
    name: &'static str,
    body: Vec<u8>,
    /// Extra or replacing headers: (name, value bytes).
    headers: Vec<(&'static str, Vec<u8>)>,
    status: u16,
    /// For a refusal: the field the error names.
    names: Option<&'static str>,
}

fn accepted(name: &'static str, body: Value) -> Case {
    Case {
        name,
        body: serde_json::to_vec(&body).unwrap(),
        headers: Vec::new(),
        status: 204,
        names: None,
    }
}

fn refused(name: &'static str, body: Vec<u8>, status: u16, names: &'static str) -> Case {
    Case {
        name,
        body,
        headers: Vec::new(),
        status,
        names: Some(names),
    }
}

/// Text that does not compress: hex digits of random UUIDs.
fn incompressible(bytes: usize) -> String {
    let mut text = String::with_capacity(bytes + 32);
    while text.len() < bytes {
        text.push_str(&Uuid::new_v4().simple().to_string());
    }
    text.truncate(bytes);
    text.to_uppercase()
}

fn nested(depth: usize) -> Value {
    (0..depth).fold(json!("bottom"), |inner, _| json!({ "n": inner }))
}

fn corpus() -> Vec<Case> {
    let base = |gateway_id: u64| kci("PROVIDE_ORDER", gateway_id, 1, "SENT_TO_SUPPLIER", "UPDATE");
    let mut cases = Vec::new();

    let mut body = base(1);
    body["information"]["type"] = json!("R".repeat(300));
    cases.push(accepted(
        "a 300-character reason (routing key over 255 bytes)",
        body,
    ));

    let mut body = base(2);
    body["information"]["type"] = json!("é€😀漢".repeat(120));
    cases.push(accepted("a long multi-byte reason", body));

    let mut body = base(3);
    body["entity"]["status"] = json!(incompressible(3000));
    cases.push(accepted(
        "a 3,000-character incompressible status (btree limit)",
        body,
    ));

    let mut body = base(4);
    body["entity"]["status"] = json!(incompressible(200 * 1024));
    cases.push(accepted(
        "a 200 KiB status (over an AMQP frame as a header)",
        body,
    ));

    let mut body = base(5);
    body["information"]["text"] = json!("before \u{0} after");
    body["entity"]["status"] = json!("IN\u{0}PROGRESS");
    body["entity"]["note\u{0}key"] = json!(["\u{0}"]);
    body["supplierNotes"] = json!([{"note": "a\u{0}b", "type": "Engineer Note"}]);
    cases.push(accepted("U+0000 in values and keys", body));

    let mut body = base(6);
    body["updateType"] = json!("ERROR");
    body.as_object_mut().unwrap().remove("information");
    body["error"] = json!({"code": "E".repeat(300), "messages": ["m".repeat(10_000)]});
    cases.push(accepted("a 300-character error code", body));

    let mut body = base(7);
    body["information"]["type"] = json!("A.B*#C D");
    cases.push(accepted(
        "a reason with routing-key separators and wildcards",
        body,
    ));

    let mut body = base(8);
    body["supplierNotes"] = json!(
        (0..5000)
            .map(|n| json!({"note": format!("note {n}"), "type": "Engineer Note", "created": "2024-04-10T10:15:22.044Z"}))
            .collect::<Vec<_>>()
    );
    cases.push(accepted("very wide JSON (5,000 supplier notes)", body));

    let mut body = base(9);
    body["extension"] = nested(100);
    cases.push(accepted("deeply nested JSON (100 levels)", body));

    let mut body = base(10);
    body["entityType"] = json!("CEASE_ETHERNET_ORDER");
    body["entity"]["status"] = json!("SOMETHING_NEW");
    cases.push(accepted("an entityType the docs do not list", body));

    let mut body = base(11);
    body["sequenceNumber"] = json!(i64::MAX);
    cases.push(accepted("the largest sequence number", body));

    let mut body = base(12);
    body["entity"]["id"] = json!("é".repeat(64));
    cases.push(accepted(
        "a 64-character multi-byte string gateway id",
        body,
    ));

    let mut body = base(13);
    body["entity"]["supplierOrderNumber"] = json!(incompressible(5000));
    cases.push(accepted("a 5,000-character supplier reference", body));

    let mut body = base(14);
    body["extra"] = json!(incompressible(500 * 1024));
    cases.push(accepted("a 500 KiB extra field", body));

    let mut case = accepted("the longest X-Request-ID and X-Conversation-ID", base(15));
    case.headers = vec![
        ("x-request-id", "r".repeat(255).into_bytes()),
        ("x-conversation-id", "c".repeat(255).into_bytes()),
    ];
    cases.push(case);

    let mut case = accepted("a 16 KiB User-Agent", base(16));
    case.headers = vec![("user-agent", incompressible(16 * 1024).into_bytes())];
    cases.push(case);

    // Refused, with a 4xx naming what is wrong.
    let mut body = base(20);
    body["sequenceNumber"] = json!(9_223_372_036_854_775_808u64);
    cases.push(refused(
        "a sequence number beyond a 64-bit integer",
        serde_json::to_vec(&body).unwrap(),
        422,
        "sequenceNumber",
    ));
    let text = serde_json::to_string(&base(21))
        .unwrap()
        .replace("\"sequenceNumber\":1", "\"sequenceNumber\":1e400");
    cases.push(refused(
        "a number no float can hold",
        text.into_bytes(),
        400,
        "JSON",
    ));
    let mut body = base(22);
    body["extension"] = nested(200);
    cases.push(refused(
        "JSON nested deeper than 128 levels",
        serde_json::to_vec(&body).unwrap(),
        400,
        "JSON",
    ));
    let mut text = serde_json::to_vec(&base(23)).unwrap();
    let at = text.windows(7).position(|w| w == b"UPDATE\"").unwrap();
    text[at] = 0xff;
    cases.push(refused("invalid UTF-8 in a string", text, 400, "JSON"));
    let mut body = base(24);
    body["entityType"] = json!("provide.order");
    cases.push(refused(
        "a malformed entityType",
        serde_json::to_vec(&body).unwrap(),
        422,
        "entityType",
    ));
    let mut body = base(25);
    body["entity"]["id"] = json!("12\u{0}34");
    cases.push(refused(
        "a control character in a string gateway id",
        serde_json::to_vec(&body).unwrap(),
        422,
        "entity.id",
    ));
    let mut body = base(26);
    body["supplier"] = json!("S".repeat(21));
    cases.push(refused(
        "a supplier over the API's 20 characters",
        serde_json::to_vec(&body).unwrap(),
        422,
        "supplier",
    ));
    let mut case = refused(
        "a 3 KB X-Request-ID",
        serde_json::to_vec(&base(27)).unwrap(),
        400,
        "X-Request-ID",
    );
    case.headers = vec![("x-request-id", "r".repeat(3000).into_bytes())];
    cases.push(case);
    let mut case = refused(
        "a 300-character X-Conversation-ID",
        serde_json::to_vec(&base(28)).unwrap(),
        400,
        "X-Conversation-ID",
    );
    case.headers = vec![("x-conversation-id", "c".repeat(300).into_bytes())];
    cases.push(case);
    let mut case = refused(
        "a non-ASCII X-Request-ID",
        serde_json::to_vec(&base(29)).unwrap(),
        400,
        "X-Request-ID",
    );
    case.headers = vec![("x-request-id", b"caf\xe9".to_vec())];
    cases.push(case);
    cases
}

async fn post_raw(
    app: &TestApp,
    body: &[u8],
    headers: &[(&'static str, Vec<u8>)],
) -> reqwest::Response {
    let mut request = app
        .client
        .post(format!("{}/kcis", app.address))
        .basic_auth(GATEWAY_USER, Some(GATEWAY_PASSWORD))
        .header("content-type", "application/json")
        .body(body.to_vec());
    let replaced: Vec<&str> = headers.iter().map(|(name, _)| *name).collect();
    if !replaced.contains(&"x-request-id") {
        request = request.header("x-request-id", Uuid::new_v4().to_string());
    }
    if !replaced.contains(&"x-conversation-id") {
        request = request.header("x-conversation-id", "conv-hostile");
    }
    for (name, value) in headers {
        request = request.header(
            *name,
            reqwest::header::HeaderValue::from_bytes(value).expect("a header value"),
        );
    }
    request.send().await.expect("POST /kcis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_kci_however_hostile_stops_the_others_or_gets_a_server_error() {
    for backend in BACKENDS {
        hostile_corpus_on(backend).await;
    }
}

async fn hostile_corpus_on(backend: Backend) {
    let broker = TestBroker::new(true).await;
    let capture = broker.capture("kci.#").await;
    let app = spawn_app_with(backend, |settings| broker.apply(settings)).await;
    let mut expected_ids: Vec<String> = Vec::new();
    let mut raw_bodies: Vec<(String, Vec<u8>)> = Vec::new();

    for (index, case) in corpus().into_iter().enumerate() {
        let response = post_raw(&app, &case.body, &case.headers).await;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(
            status, case.status,
            "{backend:?}: {} answered {status}: {text}",
            case.name
        );
        if let Some(field) = case.names {
            let error: Value = serde_json::from_str(&text).expect("the gateway's error body");
            assert!(
                error["uuid"].is_string() && error["code"].is_string(),
                "{}: {text}",
                case.name
            );
            assert!(text.contains(field), "{}: names {field}: {text}", case.name);
        } else {
            let body: Value = serde_json::from_slice(&case.body).unwrap();
            let id = body["id"].as_str().unwrap().to_owned();
            expected_ids.push(id.clone());
            raw_bodies.push((id, case.body.clone()));
        }
        // A normal KCI right after: it must be accepted and published.
        let normal = kci(
            "SERVICE_TEST",
            1000 + index as u64,
            1,
            "SENT_TO_SUPPLIER",
            "UPDATE",
        );
        assert_eq!(
            app.post_kci(&normal, "conv-normal").await.status().as_u16(),
            204,
            "{backend:?}: the KCI after {}",
            case.name
        );
        expected_ids.push(normal["id"].as_str().unwrap().to_owned());
    }

    // Every accepted KCI, hostile or not, reaches RabbitMQ.
    let messages = capture
        .wait_for_distinct(expected_ids.len(), Duration::from_secs(60))
        .await;
    let arrived: std::collections::HashSet<String> = messages
        .iter()
        .filter_map(|m| m.body["kci"]["id"].as_str().map(str::to_owned))
        .collect();
    for id in &expected_ids {
        assert!(arrived.contains(id), "{backend:?}: KCI {id} was published");
    }
    for message in &messages {
        assert!(message.routing_key.len() <= 255);
        assert_eq!(
            message.routing_key.split('.').count(),
            4,
            "{}",
            message.routing_key
        );
    }
    // Byte for byte: in the database and in the published envelope.
    for (id, raw) in &raw_bodies {
        let stored = app
            .rows(&format!(
                "SELECT raw_body FROM kci WHERE kci_id = {}",
                app.uuid_sql(id)
            ))
            .await;
        assert_eq!(
            stored[0]["raw_body"].as_str().unwrap().as_bytes(),
            raw.as_slice(),
            "{backend:?}: raw body of {id} kept byte for byte"
        );
        let published = messages
            .iter()
            .find(|m| m.body["kci"]["id"] == json!(id))
            .unwrap();
        let raw_text = std::str::from_utf8(&published.raw).unwrap();
        assert!(
            raw_text.contains(std::str::from_utf8(raw).unwrap()),
            "{backend:?}: the published envelope carries KCI {id} as sent"
        );
    }
    // The unlisted type is published under its own routing key and listed for attention.
    assert!(
        messages
            .iter()
            .any(|m| m.routing_key == "kci.cease_ethernet_order.informational.update")
    );
    let attention: Value = app
        .client
        .get(format!("{}/api/v1/attention", app.address))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(attention["unlistedTypes"]["total"], 1, "{attention}");
    // Refusals are audited (the 3 KB X-Request-ID too, bounded), and the relay never restarted.
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.count("FROM audit_log WHERE response_status IN (400, 422)")
                .await
                == 10
        })
        .await,
        "{backend:?}: every refusal audited"
    );
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["relay"]["status"], "running", "{ready}");
    assert_eq!(ready["relay"]["restarts"], 0, "{ready}");
}

/// What reaches the database from a path or a query string is bounded too.
#[tokio::test]
async fn paths_and_filters_with_nul_or_huge_durations_are_refused_with_400() {
    let app = spawn_app_with(Backend::Postgres, |_| {}).await;
    for path in [
        "/api/v1/service-orders/12%00",
        "/api/v1/service-orders?supplier=A%00B",
        "/api/v1/search?q=%00",
        "/api/v1/service-orders?stuckFor=PT9223372036854776S",
        "/api/v1/attention?stuckFor=P99999999999W",
        "/api/v1/conversations/conv%00",
    ] {
        let response = app
            .client
            .get(format!("{}{path}", app.address))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "MALFORMED_REQUEST", "{path}: {body}");
    }
}
