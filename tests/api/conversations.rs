//! `POST /api/v1/conversations`: registering original requests.

use entity::tracked_entity::Correlation;
use serde_json::{Value, json};

use crate::errors::assert_gateway_error;
use crate::helpers::{Backend, kci, spawn_app};

#[tokio::test]
async fn registering_a_conversation_is_idempotent_and_fills_in_what_was_missing() {
    let app = spawn_app(Backend::Postgres).await;
    let first = json!({"conversationId": "conv-idem", "requestId": "r1", "operation": "POST /service-tests"});
    let response = app.register_conversation(&first).await;
    assert_eq!(response.status().as_u16(), 201);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["created"], true);
    assert_eq!(created["conversation"]["entityType"], "SERVICE_TEST");

    let mut again = first.clone();
    again["gatewayId"] = json!("4242");
    again["operation"] = json!("POST /something-else");
    let response = app.register_conversation(&again).await;
    assert_eq!(response.status().as_u16(), 200);
    let existing: Value = response.json().await.unwrap();
    assert_eq!(existing["created"], false);
    assert_eq!(
        existing["conversation"]["operation"], "POST /service-tests",
        "never overwritten"
    );
    assert_eq!(existing["conversation"]["gatewayId"], "4242", "filled in");
    assert_eq!(app.count("FROM conversation").await, 1);
}

/// PostgreSQL: a batch takes its conversations' shared locks before it reads them (in the same
/// statement as its known KCIs), so a registration of the same conversation in progress (holding
/// the lock exclusively) is waited for and then seen: the KCI's new entity is matched, never left
/// UNMATCHED by a read that missed the registration's uncommitted row. Also when no KCI of the
/// batch is known (the locks must not depend on finding one).
#[tokio::test]
async fn a_kci_waits_for_a_registration_of_its_conversation_in_progress_and_is_matched() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let app = spawn_app(Backend::Postgres).await;
    let registration = app.db.begin().await.unwrap();
    // What a registration holds while it writes (intake::conversations, namespace "KCI2").
    registration
        .execute_unprepared(
            "SELECT pg_advisory_xact_lock(x'4b434932'::int, hashtext('conv-in-progress'))",
        )
        .await
        .unwrap();
    registration
        .execute_unprepared(
            "INSERT INTO conversation (conversation_id, operation, source, registered_at) \
             VALUES ('conv-in-progress', 'POST /service-tests', 'API', now())",
        )
        .await
        .unwrap();
    let body = kci("SERVICE_TEST", 7100, 1, "IN_PROGRESS", "TEST_STARTED");
    let answered = std::sync::atomic::AtomicBool::new(false);
    let posting = async {
        let status = app
            .post_kci(&body, "conv-in-progress")
            .await
            .status()
            .as_u16();
        answered.store(true, std::sync::atomic::Ordering::SeqCst);
        status
    };
    let registering = async {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        let waited = !answered.load(std::sync::atomic::Ordering::SeqCst);
        registration.commit().await.unwrap();
        waited
    };
    let (status, waited) = tokio::join!(posting, registering);
    assert!(waited, "the KCI waits for the registration's lock");
    assert_eq!(status, 204);
    assert_eq!(
        app.entity("SERVICE_TEST", "7100").await.correlation,
        Correlation::Matched,
        "the registration committed meanwhile is seen"
    );
}

#[tokio::test]
async fn a_registration_with_the_gateway_id_matches_the_entity_even_under_another_conversation_id()
{
    let app = spawn_app(Backend::Sqlite).await;
    let body = kci("CEASE_ORDER", 9001, 1, "SENT_TO_SUPPLIER", "UPDATE");
    assert_eq!(
        app.post_kci(&body, "conv-unexpected")
            .await
            .status()
            .as_u16(),
        204
    );
    let registration = json!({
        "conversationId": "conv-cease",
        "operation": "POST /service-orders",
        "requestBody": {"orderType": "CEASE"},
        "gatewayId": 9001
    });
    let answer: Value = app
        .register_conversation(&registration)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["matchedEntities"], 1);
    assert_eq!(
        app.entity("CEASE_ORDER", "9001").await.correlation,
        Correlation::Matched
    );
}

#[tokio::test]
async fn an_invalid_registration_names_its_problems() {
    let app = spawn_app(Backend::Sqlite).await;
    let response = app
        .register_conversation(
            &json!({"conversationId": "", "operation": "create order", "gatewayId": -3}),
        )
        .await;
    let body = assert_gateway_error(response, 422, "INVALID_REQUEST").await;
    let messages = body["messages"].to_string();
    for field in ["conversationId", "operation", "gatewayId"] {
        assert!(messages.contains(field), "{messages}");
    }
    let response = app.register_conversation(&json!({"operation": 5})).await;
    assert_gateway_error(response, 422, "INVALID_REQUEST").await;
}

/// Registrations arriving together are recorded together (several per transaction): each is
/// still answered for itself (201 once per conversation, 200 for the repeats), each stored
/// once, each matching the entities that waited for it.
async fn many_registrations_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    // Entities waiting for their original request.
    for n in 0..10u64 {
        let body = kci("PROVIDE_ORDER", 7000 + n, 1, "ACKNOWLEDGED", "UPDATE");
        let status = app
            .post_kci(&body, &format!("conv-many-{n}"))
            .await
            .status();
        assert_eq!(status.as_u16(), 204);
    }
    let app = &app;
    let register = |n: u64| async move {
        let response = app
            .register_conversation(&json!({
                "conversationId": format!("conv-many-{}", n % 20),
                "operation": "POST /service-orders",
                "requestBody": {"orderType": "PROVIDE"}
            }))
            .await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        (n, status, body)
    };
    let answers = futures_util::future::join_all((0..60).map(register)).await;
    let mut created = std::collections::HashMap::new();
    for (n, status, body) in &answers {
        assert!(
            matches!(status, 200 | 201),
            "registration {n}: {status} {body}"
        );
        assert_eq!(
            body["conversation"]["conversationId"],
            format!("conv-many-{}", n % 20)
        );
        if *status == 201 {
            *created.entry(n % 20).or_insert(0) += 1;
        }
    }
    assert_eq!(
        created.len(),
        20,
        "each conversation created once: {created:?}"
    );
    assert!(created.values().all(|count| *count == 1), "{created:?}");
    assert_eq!(app.count("FROM conversation").await, 20);
    let matched: u64 = answers
        .iter()
        .map(|(_, _, body)| body["matchedEntities"].as_u64().unwrap())
        .sum();
    assert_eq!(matched, 10, "each waiting entity matched once");
    for n in 0..10u64 {
        assert_eq!(
            app.entity("PROVIDE_ORDER", &(7000 + n).to_string())
                .await
                .correlation,
            Correlation::Matched
        );
    }
}

#[tokio::test]
async fn many_registrations_at_once_are_each_recorded_and_answered_on_sqlite() {
    many_registrations_at_once(Backend::Sqlite).await;
}

#[tokio::test]
async fn many_registrations_at_once_are_each_recorded_and_answered_on_postgres() {
    many_registrations_at_once(Backend::Postgres).await;
}

/// Registrations recorded together (one transaction, a fixed number of statements) do exactly
/// what they do one after the other: which conversations are created or filled in, which waiting
/// entities each matches (by conversation id, or by the entity the response names), an entity
/// waiting for two of them matched to the first.
#[tokio::test]
async fn registrations_recorded_together_match_exactly_as_one_by_one() {
    use kci_receiver::intake::conversations::{
        NewConversation, Registration, register, register_together,
    };
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let alone = spawn_app(backend).await;
        let together = spawn_app(backend).await;
        let registrations: Vec<NewConversation> = [
            json!({"conversationId": "conv-a", "operation": "POST /service-orders",
                   "requestBody": {"orderType": "PROVIDE"}}),
            // Its response names entity 8003, which also waits for conv-c by its conversation
            // id: conv-b comes first, so 8003 is conv-b's.
            json!({"conversationId": "conv-b", "operation": "POST /service-orders",
                   "requestBody": {"orderType": "PROVIDE"}, "gatewayId": 8003}),
            json!({"conversationId": "conv-c", "operation": "POST /service-orders",
                   "requestBody": {"orderType": "PROVIDE"}}),
            // Registered before without its gateway id: filled in, and matches 8004 by it.
            json!({"conversationId": "conv-d", "operation": "POST /service-orders",
                   "requestBody": {"orderType": "PROVIDE"}, "gatewayId": "8004",
                   "responseStatus": 201}),
            json!({"conversationId": "  conv-e  ", "operation": "POST /service-tests"}),
        ]
        .into_iter()
        .map(|body| serde_json::from_value(body).unwrap())
        .collect();
        for app in [&alone, &together] {
            for (gateway_id, conversation) in [
                (8001, "conv-a"),
                (8002, "conv-other"),
                (8003, "conv-c"),
                (8004, "conv-d-kci"),
                (8005, "conv-nobody"),
            ] {
                let body = kci("PROVIDE_ORDER", gateway_id, 1, "ACKNOWLEDGED", "UPDATE");
                assert_eq!(
                    app.post_kci(&body, conversation).await.status().as_u16(),
                    204
                );
            }
            let response = app
                .register_conversation(&json!({"conversationId": "conv-d",
                    "operation": "POST /service-orders", "requestBody": {"orderType": "PROVIDE"}}))
                .await;
            assert_eq!(response.status().as_u16(), 201);
        }
        let source = entity::conversation::ConversationSource::Api;

        let mut one_by_one = Vec::new();
        for new in &registrations {
            one_by_one.push(register(&alone.db, new, source).await.expect("registered"));
        }
        let pairs: Vec<_> = registrations.iter().map(|new| (new, source)).collect();
        let at_once = register_together(&together.db, &pairs)
            .await
            .expect("registered");

        let outcome = |registrations: &[Registration]| -> Vec<Value> {
            registrations
                .iter()
                .map(|r| {
                    let c = &r.conversation;
                    json!([
                        c.conversation_id,
                        c.entity_type,
                        c.gateway_id,
                        c.response_status,
                        c.request_body,
                        r.created,
                        r.matched_entities
                    ])
                })
                .collect()
        };
        assert_eq!(outcome(&at_once), outcome(&one_by_one), "{backend:?}");
        let entities = "SELECT e.gateway_id, e.correlation, c.conversation_id FROM tracked_entity e \
                        LEFT JOIN conversation c ON c.id = e.conversation_ref ORDER BY e.gateway_id";
        let stored = together.rows(entities).await;
        assert_eq!(stored, alone.rows(entities).await, "{backend:?}");
        // Not vacuous: what the rules say happened.
        assert_eq!(
            outcome(&at_once)
                .iter()
                .map(|o| (o[5].clone(), o[6].clone()))
                .collect::<Vec<_>>(),
            [
                (json!(true), json!(1)),  // conv-a: 8001 by conversation id
                (json!(true), json!(1)),  // conv-b: 8003 by the key its response names
                (json!(true), json!(0)),  // conv-c: 8003 was conv-b's
                (json!(false), json!(1)), // conv-d: filled in, 8004 by key
                (json!(true), json!(0)),
            ],
            "{backend:?}"
        );
        let matched_to = |gateway_id: &str| {
            stored
                .iter()
                .find(|row| row["gateway_id"] == gateway_id)
                .map(|row| row["conversation_id"].clone())
                .unwrap()
        };
        assert_eq!(matched_to("8003"), "conv-b", "{backend:?}");
        assert_eq!(matched_to("8004"), "conv-d", "{backend:?}");
        // Waiting under conversation ids nobody registered.
        assert_eq!(matched_to("8002"), Value::Null, "{backend:?}");
        assert_eq!(matched_to("8005"), Value::Null, "{backend:?}");
        assert_eq!(at_once[4].conversation.conversation_id, "conv-e");
    }
}
