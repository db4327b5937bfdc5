//! Every example KCI of tests/fixtures/kcis (the docs' examples, 3 per KCI type) is accepted and
//! recorded.

use entity::tracked_entity::Correlation;
use serde_json::Value;

use crate::helpers::{BACKENDS, Backend, fixture, fixture_names, spawn_app};

/// The docs reuse one KCI id for three different examples (spec section 6, item 12).
const REUSED_ID: &str = "1256cf7d-4471-42e4-a5be-c24ed58a7aa6";

async fn every_fixture_is_accepted_and_recorded(backend: Backend) {
    let app = spawn_app(backend).await;
    let names = fixture_names();
    assert_eq!(names.len(), 21, "the shared fixtures");

    for name in &names {
        let body = fixture(name);
        let response = app.post_kci(&body, &format!("conv-{name}")).await;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(status, 204, "{name}: {text}");
        assert!(text.is_empty(), "a 204 has no body");
    }

    // 21 bodies, 19 distinct KCI ids: the two later uses of the reused id are anomalies.
    assert_eq!(app.count("FROM kci").await, 19);
    let reused = app
        .rows(&format!(
            "SELECT * FROM kci WHERE kci_id = {}",
            app.uuid_sql(REUSED_ID)
        ))
        .await;
    assert_eq!(reused[0]["anomaly_count"], 2);
    assert_eq!(
        app.count("FROM state_transition WHERE flag_anomaly = true")
            .await,
        2
    );
    assert_eq!(
        app.count("FROM outbox_event").await,
        19,
        "one event per accepted KCI"
    );
    assert_eq!(
        app.count("FROM audit_log").await,
        21,
        "every request audited"
    );
    assert_eq!(
        app.count("FROM audit_log WHERE outcome = 'ANOMALY' AND response_status = 204")
            .await,
        2
    );

    // Every entity holds the state of its newest KCI.
    let provide = app.entity("PROVIDE_ORDER", "12345").await;
    assert_eq!(provide.status, "PENDING");
    assert_eq!(provide.last_sequence_number, 5);
    assert_eq!(provide.supplier_reference.as_deref(), Some("FC123"));
    let problem = app.entity("SERVICE_PROBLEM", "12346").await;
    assert_eq!(problem.status, "RESOLVED");
    let cease = app.entity("UNSOLICITED_CEASE_ORDER", "12345").await;
    assert_eq!(cease.status, "COMPLETED");
    assert_eq!(cease.correlation, Correlation::Unsolicited);
    let ethernet = app.entity("PROVIDE_ETHERNET_ORDER", "2001").await;
    assert_eq!(ethernet.status, "IN_PROGRESS");

    // The raw body is kept byte for byte.
    let raw = app
        .rows(&format!(
            "SELECT raw_body FROM kci WHERE kci_id = {}",
            app.uuid_sql("0c6f2b8e-5a51-4d0b-9a0e-7d2f3c1b4e21")
        ))
        .await;
    let stored: Value = serde_json::from_str(raw[0]["raw_body"].as_str().unwrap()).unwrap();
    assert_eq!(stored, fixture("ProvideServiceOrderUpdate-2"));
}

#[tokio::test]
async fn every_fixture_is_accepted_and_recorded_on_sqlite() {
    every_fixture_is_accepted_and_recorded(Backend::Sqlite).await;
}

#[tokio::test]
async fn every_fixture_is_accepted_and_recorded_on_postgres() {
    every_fixture_is_accepted_and_recorded(Backend::Postgres).await;
}

#[tokio::test]
async fn each_fixture_writes_an_outbox_event_with_the_contract_routing_key_and_envelope() {
    let expected: &[(&str, &str)] = &[
        (
            "ProvideServiceOrderUpdate-2",
            "kci.provide_order.informational.committed",
        ),
        (
            "ProvideServiceOrderUpdate-3",
            "kci.provide_order.action_required.reappoint",
        ),
        (
            "CeaseServiceOrderUpdate-3",
            "kci.cease_order.error.supplier_timed_out",
        ),
        (
            "ServiceProblemUpdate-3",
            "kci.service_problem.action_required.confirm",
        ),
        (
            "ServiceTestUpdate-3",
            "kci.service_test.informational.completed",
        ),
        (
            "UnsolicitedCeaseServiceOrderUpdate-1",
            "kci.unsolicited_cease_order.informational.created",
        ),
        (
            "ProvideEthernetOrderUpdate-3",
            "kci.provide_ethernet_order.informational.warning",
        ),
    ];
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        for (name, routing_key) in expected {
            let body = fixture(name);
            let request_id = format!("req-{name}");
            let response = app.post_kci_as(&body, "conv-outbox", &request_id).await;
            assert_eq!(response.status().as_u16(), 204, "{name}");
            let events = app
                .rows(&format!(
                    "SELECT o.* FROM outbox_event o JOIN kci k ON k.id = o.kci_ref WHERE k.kci_id = {}",
                    app.uuid_sql(body["id"].as_str().unwrap())
                ))
                .await;
            assert_eq!(events.len(), 1, "{name}");
            let event = &events[0];
            assert_eq!(event["routing_key"], *routing_key, "{name}");
            assert_eq!(event["status"], "PENDING");
            assert_eq!(event["message_type"], body["entityType"]);
            let payload = json_column(&event["payload"]);
            assert_eq!(payload["eventId"], event["event_id"]);
            assert_eq!(payload["kci"], body, "the KCI as received");
            assert_eq!(payload["entity"]["type"], body["entityType"]);
            assert_eq!(
                payload["entity"]["gatewayId"],
                body["entity"]["id"].to_string().trim_matches('"')
            );
            assert_eq!(payload["entity"]["newStatus"], body["entity"]["status"]);
            assert_eq!(payload["correlation"]["conversationId"], "conv-outbox");
            assert_eq!(payload["correlation"]["requestId"], request_id.as_str());
            assert_eq!(
                payload["sequence"]["sequenceNumber"],
                body["sequenceNumber"]
            );
            let headers = json_column(&event["headers"]);
            assert_eq!(headers["x-request-id"], request_id.as_str());
            assert_eq!(headers["supplier"], body["supplier"]);
            assert_eq!(headers["sequence-number"], body["sequenceNumber"]);
            assert_eq!(headers["new-status"], body["entity"]["status"]);
        }
    }
}

/// JSON columns come back as JSON on PostgreSQL and as text on SQLite.
pub fn json_column(value: &Value) -> Value {
    match value {
        Value::String(text) => serde_json::from_str(text).unwrap_or_else(|_| value.clone()),
        other => other.clone(),
    }
}

/// Migration 6 gave the outbox its `correlation_id` column: events written before it get theirs
/// from their `x-conversation-id` header, on both databases (down, then up again, re-creates
/// exactly that situation).
#[tokio::test]
async fn events_written_before_the_correlation_column_get_it_from_their_header() {
    use migration::MigratorTrait;
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        for (n, name) in fixture_names().iter().enumerate() {
            let status = app
                .post_kci(&fixture(name), &format!("conv-{n}"))
                .await
                .status();
            assert_eq!(status.as_u16(), 204, "{name}");
        }
        let events = app.count("FROM outbox_event").await;
        assert!(events > 10, "{backend:?}: {events} events");
        migration::Migrator::down(app.db.connection(), Some(1))
            .await
            .unwrap();
        migration::Migrator::up(app.db.connection(), None)
            .await
            .unwrap();
        let rows = app
            .rows("SELECT correlation_id, headers FROM outbox_event ORDER BY id")
            .await;
        assert_eq!(rows.len() as i64, events, "{backend:?}");
        for row in rows {
            let headers: Value = match &row["headers"] {
                Value::String(text) => serde_json::from_str(text).unwrap(),
                other => other.clone(),
            };
            assert_eq!(
                row["correlation_id"], headers["x-conversation-id"],
                "{backend:?}"
            );
            assert!(row["correlation_id"].as_str().unwrap().starts_with("conv-"));
        }
    }
}
