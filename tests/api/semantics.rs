//! design.md's Guarantees: idempotent on the KCI id, monotonic state per entity, lifecycles as
//! flags (never 4xx), open-ended values kept, correlation to the original request.

use entity::tracked_entity::Correlation;
use serde_json::json;

use crate::fixtures::json_column;
use crate::helpers::{BACKENDS, Backend, kci, spawn_app};

#[tokio::test]
async fn a_redelivery_answers_204_and_changes_nothing_but_its_counter() {
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        let first = kci("PROVIDE_ORDER", 500, 1, "SENT_TO_SUPPLIER", "UPDATE");
        assert_eq!(app.post_kci(&first, "conv-r").await.status().as_u16(), 204);
        let mut again = first.clone();
        again["deliveredOn"] = json!("2024-04-10T11:00:00.000Z"); // the gateway restamps it
        for _ in 0..2 {
            assert_eq!(app.post_kci(&again, "conv-r").await.status().as_u16(), 204);
        }
        let row = &app.rows("SELECT * FROM kci").await[0];
        assert_eq!(row["redelivery_count"], 2, "{backend:?}");
        assert_eq!(row["anomaly_count"], 0);
        assert_eq!(app.count("FROM state_transition").await, 1);
        assert_eq!(app.count("FROM outbox_event").await, 1);
        assert_eq!(
            app.count("FROM audit_log WHERE outcome = 'REDELIVERED'")
                .await,
            2
        );
        let entity = app.entity("PROVIDE_ORDER", "500").await;
        assert_eq!(entity.kci_count, 1);
    }
}

#[tokio::test]
async fn a_redelivery_with_different_content_is_an_anomaly_and_is_not_applied() {
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        let first = kci("PROVIDE_ORDER", 501, 1, "SENT_TO_SUPPLIER", "UPDATE");
        assert_eq!(app.post_kci(&first, "conv-a").await.status().as_u16(), 204);
        let mut conflicting = first.clone();
        conflicting["entity"]["status"] = json!("COMPLETED");
        conflicting["sequenceNumber"] = json!(9);
        assert_eq!(
            app.post_kci(&conflicting, "conv-a").await.status().as_u16(),
            204
        );

        let entity = app.entity("PROVIDE_ORDER", "501").await;
        assert_eq!(entity.status, "SENT_TO_SUPPLIER", "not applied");
        assert_eq!(entity.last_sequence_number, 1);
        assert!(entity.flag_anomaly);
        let history = app.history(entity.id).await;
        assert_eq!(history.len(), 2);
        assert!(history[1].flag_anomaly);
        assert!(!history[1].applied);
        assert_eq!(history[1].to_status, "COMPLETED");
        let note = history[1].note.as_deref().unwrap();
        assert!(
            note.contains("entity") && note.contains("sequenceNumber"),
            "{note}"
        );
        assert_eq!(
            app.rows("SELECT anomaly_count FROM kci").await[0]["anomaly_count"],
            1
        );
        assert_eq!(
            app.count("FROM outbox_event").await,
            1,
            "an anomaly publishes nothing"
        );
    }
}

#[tokio::test]
async fn an_older_kci_is_recorded_as_stale_and_does_not_move_the_state_back() {
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        let newer = kci("PROVIDE_ORDER", 502, 3, "IN_PROGRESS", "COMMITTED");
        let older = kci("PROVIDE_ORDER", 502, 2, "ACKNOWLEDGED", "ACKNOWLEDGED");
        let same_sequence = kci("PROVIDE_ORDER", 502, 3, "HELD", "DELAY");
        for body in [&newer, &older, &same_sequence] {
            assert_eq!(app.post_kci(body, "conv-s").await.status().as_u16(), 204);
        }
        let entity = app.entity("PROVIDE_ORDER", "502").await;
        assert_eq!(entity.status, "IN_PROGRESS");
        assert_eq!(entity.last_sequence_number, 3);
        assert!(entity.flag_stale);
        let history = app.history(entity.id).await;
        assert_eq!(history.len(), 3);
        assert!(history[1].flag_stale && !history[1].applied);
        assert_eq!(history[1].from_status.as_deref(), Some("IN_PROGRESS"));
        assert_eq!(history[1].to_status, "ACKNOWLEDGED");
        assert!(history[2].flag_duplicate && !history[2].applied);

        // Stale KCIs are still published, marked as such.
        let payload = json_column(
            &app.rows(&format!(
                "SELECT o.payload FROM outbox_event o JOIN kci k ON k.id = o.kci_ref WHERE k.kci_id = {}",
                app.uuid_sql(older["id"].as_str().unwrap())
            ))
            .await[0]["payload"],
        );
        assert_eq!(payload["sequence"]["stale"], true);
        assert_eq!(payload["entity"]["changed"], false);
        assert_eq!(payload["entity"]["newStatus"], "IN_PROGRESS");
        assert_eq!(payload["entity"]["kciStatus"], "ACKNOWLEDGED");
    }
}

#[tokio::test]
async fn a_jump_in_sequence_is_recorded_as_a_gap_and_applied() {
    let app = spawn_app(Backend::Sqlite).await;
    for body in [
        kci("SERVICE_TEST", 77, 1, "SENT_TO_SUPPLIER", "UPDATE"),
        kci("SERVICE_TEST", 77, 2, "IN_PROGRESS", "UPDATE"),
        kci("SERVICE_TEST", 77, 5, "COMPLETED", "COMPLETED"),
    ] {
        assert_eq!(app.post_kci(&body, "conv-g").await.status().as_u16(), 204);
    }
    let entity = app.entity("SERVICE_TEST", "77").await;
    assert_eq!(entity.status, "COMPLETED");
    assert!(entity.flag_gap);
    let history = app.history(entity.id).await;
    let gaps: Vec<bool> = history.iter().map(|row| row.flag_gap).collect();
    assert_eq!(gaps, [false, false, true]);
    assert!(
        history[2]
            .note
            .as_deref()
            .unwrap()
            .contains("expected 3, got 5")
    );
    assert!(
        !history[2].flag_illegal,
        "IN_PROGRESS -> COMPLETED is allowed"
    );
}

#[tokio::test]
async fn a_transition_the_lifecycle_does_not_allow_is_applied_but_flagged_illegal() {
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        let completed = kci("SERVICE_PROBLEM", 88, 1, "COMPLETED", "COMPLETED");
        let reopened = kci("SERVICE_PROBLEM", 88, 2, "IN_PROGRESS", "UPDATE");
        assert_eq!(
            app.post_kci(&completed, "conv-i").await.status().as_u16(),
            204
        );
        assert_eq!(
            app.post_kci(&reopened, "conv-i").await.status().as_u16(),
            204
        );
        let entity = app.entity("SERVICE_PROBLEM", "88").await;
        assert_eq!(
            entity.status, "IN_PROGRESS",
            "the gateway's snapshot is the truth"
        );
        assert!(entity.flag_illegal);
        let history = app.history(entity.id).await;
        assert!(history[1].flag_illegal && history[1].applied);
        assert!(
            history[1]
                .note
                .as_deref()
                .unwrap()
                .contains("COMPLETED -> IN_PROGRESS")
        );
    }
}

#[tokio::test]
async fn an_undocumented_reason_code_or_status_is_kept_and_flagged() {
    let app = spawn_app(Backend::Sqlite).await;
    let mut body = kci("MODIFY_ORDER", 90, 1, "SENT_TO_SUPPLIER", "UPDATE");
    body["information"] = json!({"type": "TELEPORTED", "code": "NEW_PROBLEM_CODE", "text": "new"});
    body["entity"]["status"] = json!("QUANTUM_STATE");
    body["someNewTopLevelField"] = json!({"kept": true});
    assert_eq!(app.post_kci(&body, "conv-u").await.status().as_u16(), 204);
    let entity = app.entity("MODIFY_ORDER", "90").await;
    assert_eq!(entity.status, "QUANTUM_STATE");
    assert!(entity.flag_unknown_value);
    let note = app.history(entity.id).await[0]
        .note
        .as_deref()
        .unwrap()
        .to_owned();
    for value in [
        "information.type = TELEPORTED",
        "information.code = NEW_PROBLEM_CODE",
        "entity.status = QUANTUM_STATE",
    ] {
        assert!(note.contains(value), "{note}");
    }
    let raw = app.rows("SELECT raw_body FROM kci").await;
    assert!(
        raw[0]["raw_body"]
            .as_str()
            .unwrap()
            .contains("someNewTopLevelField")
    );
    let routing = app.rows("SELECT routing_key FROM outbox_event").await;
    assert_eq!(
        routing[0]["routing_key"],
        "kci.modify_order.informational.teleported"
    );
}

#[tokio::test]
async fn an_unsolicited_cease_is_a_new_entity_that_no_request_started_and_is_not_unmatched() {
    let app = spawn_app(Backend::Sqlite).await;
    let body = crate::helpers::fixture("UnsolicitedCeaseServiceOrderUpdate-1");
    assert_eq!(
        app.post_kci(&body, "gateway-made-conversation")
            .await
            .status()
            .as_u16(),
        204
    );
    let entity = app.entity("UNSOLICITED_CEASE_ORDER", "12345").await;
    assert_eq!(entity.correlation, Correlation::Unsolicited);
    assert_eq!(entity.status, "RECEIVED_BY_GATEWAY");
    let payload = json_column(&app.rows("SELECT payload FROM outbox_event").await[0]["payload"]);
    assert_eq!(payload["correlation"]["status"], "UNSOLICITED");
    assert_eq!(payload["correlation"]["matched"], false);
}

#[tokio::test]
async fn a_kci_about_a_registered_request_is_matched_and_carries_the_request_in_its_event() {
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        let registration = json!({
            "conversationId": "conv-known",
            "requestId": "req-create-1",
            "operation": "POST /service-orders",
            "requestBody": {"orderType": "NEW", "supplier": "FIBRECO"},
            "gatewayId": 600,
            "responseStatus": 201
        });
        assert_eq!(
            app.register_conversation(&registration)
                .await
                .status()
                .as_u16(),
            201
        );
        let body = kci("PROVIDE_ORDER", 600, 1, "SENT_TO_SUPPLIER", "UPDATE");
        assert_eq!(
            app.post_kci(&body, "conv-known").await.status().as_u16(),
            204
        );
        let entity = app.entity("PROVIDE_ORDER", "600").await;
        assert_eq!(entity.correlation, Correlation::Matched);
        assert!(entity.conversation_ref.is_some());
        let payload =
            json_column(&app.rows("SELECT payload FROM outbox_event").await[0]["payload"]);
        assert_eq!(payload["correlation"]["matched"], true);
        let original = &payload["correlation"]["originalRequest"];
        assert_eq!(original["operation"], "POST /service-orders");
        assert_eq!(original["requestId"], "req-create-1");
        assert_eq!(original["entityType"], "PROVIDE_ORDER");
        assert_eq!(original["gatewayId"], "600");
    }
}

#[tokio::test]
async fn an_unknown_conversation_leaves_the_entity_unmatched_until_its_request_is_registered() {
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        let first = kci("SERVICE_PROBLEM", 700, 1, "SENT_TO_SUPPLIER", "UPDATE");
        assert_eq!(
            app.post_kci(&first, "conv-late").await.status().as_u16(),
            204
        );
        assert_eq!(
            app.entity("SERVICE_PROBLEM", "700").await.correlation,
            Correlation::Unmatched
        );

        let registration =
            json!({"conversationId": "conv-late", "operation": "POST /service-problems"});
        let response = app.register_conversation(&registration).await;
        assert_eq!(response.status().as_u16(), 201);
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["matchedEntities"], 1);
        let entity = app.entity("SERVICE_PROBLEM", "700").await;
        assert_eq!(entity.correlation, Correlation::Matched);

        // The next KCI's event carries the match; the entity keeps its link.
        let second = kci("SERVICE_PROBLEM", 700, 2, "ACKNOWLEDGED", "ACKNOWLEDGED");
        assert_eq!(
            app.post_kci(&second, "conv-other").await.status().as_u16(),
            204
        );
        let entity = app.entity("SERVICE_PROBLEM", "700").await;
        assert_eq!(entity.correlation, Correlation::Matched);
        let payloads = app
            .rows("SELECT payload FROM outbox_event ORDER BY id")
            .await;
        assert_eq!(
            json_column(&payloads[0]["payload"])["correlation"]["matched"],
            false
        );
        let second_payload = json_column(&payloads[1]["payload"]);
        assert_eq!(second_payload["correlation"]["matched"], true);
        assert_eq!(
            second_payload["correlation"]["originalRequest"]["conversationId"],
            "conv-late"
        );
    }
}
