//! Group commit: KCIs recorded together in one transaction end up exactly as if each had been
//! recorded alone, and one KCI the database refuses does not fail the others of its batch.

use chrono::Utc;
use kci_receiver::intake::{self, Delivery, Outcome};
use kci_receiver::kci::parse_kci;
use kci_receiver::store::audit::AuditRecord;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{BACKENDS, Backend, TestApp, kci, spawn_app};

fn delivery(body: &Value, conversation_id: &str, request_id: &str) -> Delivery {
    let raw_body = body.to_string();
    Delivery {
        kci: parse_kci(body).expect("a valid KCI"),
        raw_body: raw_body.clone(),
        request_id: request_id.to_owned(),
        conversation_id: conversation_id.to_owned(),
        audit: AuditRecord {
            request_id: Some(request_id.to_owned()),
            conversation_id: Some(conversation_id.to_owned()),
            method: "POST".to_owned(),
            path: "/kcis".to_owned(),
            remote_addr: None,
            principal: Some("test".to_owned()),
            headers: json!({}),
            body: Some(raw_body.clone()),
            body_size: raw_body.len() as i64,
            response_status: 204,
            response_body: None,
            error_uuid: None,
            error_code: None,
            outcome: kci_receiver::store::audit::AuditOutcome::Rejected,
            kci_id: None,
            received_at: Utc::now(),
        },
        source: entity::state_transition::KciSource::Delivery,
        trace: kci_receiver::trace_context::TraceContext::child_of(None),
    }
}

/// Everything intake stored, without ids, timestamps and event ids (which differ between runs).
async fn stored(app: &TestApp) -> Value {
    let entities = app
        .rows(
            "SELECT entity_type, gateway_id, status, supplier, last_sequence_number, last_update_type, \
             last_reason, conversation_id, correlation, conversation_ref IS NOT NULL AS linked, \
             flag_illegal, flag_stale, flag_gap, flag_anomaly, flag_unknown_value, kci_count \
             FROM tracked_entity ORDER BY entity_type, gateway_id",
        )
        .await;
    let history = app
        .rows(
            "SELECT e.gateway_id, k.request_id AS kci_request, a.request_id AS audit_request, \
             t.sequence_number, t.previous_sequence_number, t.from_status, t.to_status, t.applied, \
             t.flag_stale, t.flag_gap, t.flag_illegal, t.flag_duplicate, t.flag_anomaly, \
             t.flag_unknown_value, t.note \
             FROM state_transition t JOIN tracked_entity e ON e.id = t.tracked_entity_id \
             JOIN kci k ON k.id = t.kci_ref LEFT JOIN audit_log a ON a.id = t.audit_log_id \
             ORDER BY t.id",
        )
        .await;
    let kcis = app
        .rows(
            "SELECT k.request_id, e.gateway_id, k.outcome, k.redelivery_count, k.anomaly_count, \
             k.last_redelivered_at IS NOT NULL AS redelivered \
             FROM kci k JOIN tracked_entity e ON e.id = k.tracked_entity_id ORDER BY k.id",
        )
        .await;
    let audit = app
        .rows("SELECT request_id, outcome FROM audit_log WHERE path = '/kcis' ORDER BY id")
        .await;
    let mut events = app
        .rows(
            "SELECT o.routing_key, o.message_type, k.request_id, o.payload \
             FROM outbox_event o JOIN kci k ON k.id = o.kci_ref ORDER BY o.id",
        )
        .await;
    for event in &mut events {
        let mut payload = match &event["payload"] {
            Value::String(text) => serde_json::from_str(text).expect("a JSON payload"),
            other => other.clone(),
        };
        payload["eventId"] = Value::Null;
        payload["timestamps"]["acceptedAt"] = Value::Null;
        if let Some(request) = payload["correlation"]["originalRequest"].as_object_mut() {
            request.remove("registeredAt");
        }
        event["payload"] = payload;
    }
    json!({"entities": entities, "history": history, "kcis": kcis, "audit": audit, "events": events})
}

/// A KCI body with a given id.
fn with_id(mut body: Value, id: &str) -> Value {
    body["id"] = json!(id);
    body
}

#[tokio::test]
async fn a_batch_stores_exactly_what_recording_one_by_one_stores() {
    for backend in BACKENDS {
        let alone = spawn_app(backend).await;
        let together = spawn_app(backend).await;
        // Before the batch, in both: an original request, and one KCI already recorded.
        let before = with_id(
            kci("PROVIDE_ORDER", 3, 1, "ACKNOWLEDGED", "ORDER_ACKNOWLEDGED"),
            &Uuid::new_v4().to_string(),
        );
        for app in [&alone, &together] {
            let registered = app
                .register_conversation(&json!({
                    "conversationId": "conv-1", "operation": "POST /service-orders",
                    "entityType": "PROVIDE_ORDER", "gatewayId": "1"
                }))
                .await;
            let status = registered.status();
            assert!(
                status.is_success(),
                "{backend:?}: {status} {}",
                registered.text().await.unwrap_or_default()
            );
            intake::record(&app.db, &delivery(&before, "conv-3", "before-1"), false)
                .await
                .expect("recorded");
        }

        let id = |_: u8| Uuid::new_v4().to_string();
        let first = with_id(
            kci("PROVIDE_ORDER", 1, 1, "ACKNOWLEDGED", "ORDER_ACKNOWLEDGED"),
            &id(1),
        );
        let gap = with_id(kci("PROVIDE_ORDER", 1, 3, "HELD", "ORDER_HELD"), &id(2));
        let changed = with_id(
            kci("PROVIDE_ORDER", 1, 3, "COMPLETED", "ORDER_COMPLETED"),
            gap["id"].as_str().unwrap(),
        );
        let mut before_changed = before.clone();
        before_changed["entity"]["status"] = json!("REJECTED");
        let batch = [
            (first, "conv-1"),
            (gap.clone(), "conv-1"),
            (
                with_id(
                    kci("PROVIDE_ORDER", 1, 2, "IN_PROGRESS", "ORDER_ACCEPTED"),
                    &id(3),
                ),
                "conv-1",
            ),
            (gap, "conv-1"),     // the same KCI again, first seen in this batch
            (changed, "conv-1"), // its id with other content: an anomaly
            (
                with_id(
                    kci("SERVICE_TEST", 2, 1, "IN_PROGRESS", "TEST_STARTED"),
                    &id(4),
                ),
                "conv-2",
            ),
            (
                with_id(
                    kci("SERVICE_TEST", 2, 1, "IN_PROGRESS", "TEST_STARTED"),
                    &id(5),
                ),
                "conv-2",
            ), // another KCI with the applied sequence number
            (before.clone(), "conv-3"), // recorded before the batch: redelivered
            (before_changed, "conv-3"), // and changed: an anomaly
            (
                with_id(
                    kci("PROVIDE_ORDER", 3, 7, "COMPLETED", "ORDER_COMPLETED"),
                    &id(6),
                ),
                "conv-3",
            ),
        ];
        let deliveries: Vec<Delivery> = batch
            .iter()
            .enumerate()
            .map(|(n, (body, conversation))| delivery(body, conversation, &format!("req-{n}")))
            .collect();

        let mut one_by_one = Vec::new();
        for delivery in &deliveries {
            one_by_one.push(
                intake::record(&alone.db, delivery, false)
                    .await
                    .expect("recorded"),
            );
        }
        let references: Vec<&Delivery> = deliveries.iter().collect();
        let batched = intake::record_batch(&together.db, &references, false)
            .await
            .expect("recorded");

        let outcomes = |recorded: &[intake::Recorded]| -> Vec<Outcome> {
            recorded.iter().map(|r| r.outcome).collect()
        };
        assert_eq!(outcomes(&batched), outcomes(&one_by_one), "{backend:?}");
        assert_eq!(
            outcomes(&batched),
            [
                Outcome::Applied,
                Outcome::Applied,
                Outcome::Stale,
                Outcome::Redelivered,
                Outcome::Anomaly,
                Outcome::Applied,
                Outcome::DuplicateSequence,
                Outcome::Redelivered,
                Outcome::Anomaly,
                Outcome::Applied,
            ],
            "{backend:?}"
        );
        let (alone, together) = (stored(&alone).await, stored(&together).await);
        assert_eq!(together, alone, "{backend:?}");
        // The comparison is not vacuous: the batch did what the rules say.
        assert_eq!(together["events"].as_array().unwrap().len(), 7);
        assert_eq!(together["audit"].as_array().unwrap().len(), 11);
        let order = &together["entities"][0];
        assert_eq!(order["gateway_id"], "1", "{backend:?}");
        assert_eq!(order["status"], "HELD");
        assert_eq!(order["correlation"], "MATCHED");
        let first_kci = &together["kcis"][2];
        assert_eq!(first_kci["request_id"], "req-1", "{backend:?}");
        assert_eq!(first_kci["redelivery_count"], 1, "{backend:?}");
        assert_eq!(first_kci["anomaly_count"], 1, "{backend:?}");
    }
}

#[tokio::test]
async fn a_kci_the_database_refuses_does_not_fail_the_others_of_its_batch() {
    // PostgreSQL's text cannot hold U+0000; SQLite can, so this is PostgreSQL's case. (A KCI
    // from HTTP never has a raw NUL: JSON escapes it. This delivery is made by hand to be
    // refused by the database.)
    let app = spawn_app(Backend::Postgres).await;
    let good = |gateway_id| {
        kci(
            "PROVIDE_ORDER",
            gateway_id,
            1,
            "ACKNOWLEDGED",
            "ORDER_ACKNOWLEDGED",
        )
    };
    let mut refused = delivery(&good(2), "conv-b", "req-b");
    refused.raw_body.push('\u{0}');
    let deliveries = [
        delivery(&good(1), "conv-a", "req-a"),
        refused,
        delivery(&good(3), "conv-c", "req-c"),
    ];
    let committer = kci_receiver::intake::group_commit::GroupCommit::start(
        app.db.clone(),
        &kci_receiver::config::IntakeSettings {
            max_batch: 3,
            committers: 1,
            deadline_ms: 5000,
        },
        false,
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    // Queued together, so that one committer takes all three at once.
    let results = futures_util::future::join_all(
        deliveries
            .into_iter()
            .map(|delivery| committer.record(delivery, deadline)),
    )
    .await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(results[1].is_err(), "the database refuses U+0000 in text");
    assert!(results[2].is_ok(), "{:?}", results[2]);
    assert_eq!(app.count("FROM kci").await, 2);
    assert_eq!(app.count("FROM outbox_event").await, 2);
}
