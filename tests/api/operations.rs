//! The operations API: lists with every filter and paging edge, details and histories, the
//! conversation, KCI and audit views, support text, "needs attention", roles, OpenAPI, metrics.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::errors::assert_gateway_error;
use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_USER, BACKENDS, Backend, GATEWAY_PASSWORD, GATEWAY_USER, READ_PASSWORD,
    READ_USER, TestApp, fixture, kci, spawn_app,
};

async fn read(app: &TestApp, path: &str) -> reqwest::Response {
    app.client
        .get(format!("{}{path}", app.address))
        .basic_auth(READ_USER, Some(READ_PASSWORD))
        .send()
        .await
        .unwrap()
}

async fn read_json(app: &TestApp, path: &str) -> Value {
    let response = read(app, path).await;
    assert_eq!(response.status().as_u16(), 200, "{path}");
    response.json().await.unwrap()
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["entityType"].as_str().unwrap(),
                e["gatewayId"].as_str().unwrap()
            )
        })
        .collect()
}

/// A small estate: orders, a test, a problem; some matched, flagged, waiting on us.
async fn seed(app: &TestApp) {
    let registration = json!({"conversationId": "conv-order-1", "requestId": "req-1", "operation": "POST /service-orders"});
    assert_eq!(
        app.register_conversation(&registration)
            .await
            .status()
            .as_u16(),
        201
    );
    let posts = [
        (
            kci("PROVIDE_ORDER", 1, 1, "SENT_TO_SUPPLIER", "UPDATE"),
            "conv-order-1",
        ),
        (
            kci("PROVIDE_ORDER", 1, 2, "ACKNOWLEDGED", "ACKNOWLEDGED"),
            "conv-order-1",
        ),
        (
            kci("CEASE_ORDER", 2, 1, "COMPLETED", "COMPLETED"),
            "conv-order-2",
        ),
        (
            kci("CEASE_ORDER", 2, 2, "IN_PROGRESS", "UPDATE"),
            "conv-order-2",
        ), // illegal: out of COMPLETED
        (
            kci("SERVICE_TEST", 3, 1, "IN_PROGRESS", "UPDATE"),
            "conv-test-3",
        ),
        (
            kci(
                "PROVIDE_ETHERNET_ORDER",
                4,
                1,
                "ACKNOWLEDGED",
                "ACKNOWLEDGED",
            ),
            "conv-eth-4",
        ),
    ];
    for (body, conversation) in &posts {
        assert_eq!(
            app.post_kci(body, conversation).await.status().as_u16(),
            204
        );
    }
    let mut waiting = fixture("ServiceProblemUpdate-3"); // ACTION_REQUIRED CONFIRM, RESOLVED
    waiting["entity"]["id"] = json!(5);
    waiting["supplier"] = json!("OTHERCO");
    assert_eq!(
        app.post_kci(&waiting, "conv-problem-5")
            .await
            .status()
            .as_u16(),
        204
    );
}

#[tokio::test]
async fn lists_mirror_the_tenant_api_paths_and_filter_by_every_criterion() {
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        seed(&app).await;
        let list = |path: &'static str| read_json(&app, path);
        assert_eq!(
            ids(&list("/api/v1/service-orders").await),
            ["CEASE_ORDER:2", "PROVIDE_ORDER:1"]
        );
        assert_eq!(
            ids(&list("/api/v1/ethernet/service-orders").await),
            ["PROVIDE_ETHERNET_ORDER:4"]
        );
        assert_eq!(
            ids(&list("/api/v1/service-tests").await),
            ["SERVICE_TEST:3"]
        );
        assert_eq!(
            ids(&list("/api/v1/service-problems").await),
            ["SERVICE_PROBLEM:5"]
        );
        assert_eq!(ids(&list("/api/v1/entities").await).len(), 5);

        let cases: [(&str, &[&str]); 12] = [
            (
                "/api/v1/service-orders?status=ACKNOWLEDGED",
                &["PROVIDE_ORDER:1"],
            ),
            (
                "/api/v1/entities?status=ACKNOWLEDGED,IN_PROGRESS",
                &[
                    "PROVIDE_ETHERNET_ORDER:4",
                    "SERVICE_TEST:3",
                    "CEASE_ORDER:2",
                    "PROVIDE_ORDER:1",
                ],
            ),
            ("/api/v1/entities?supplier=OTHERCO", &["SERVICE_PROBLEM:5"]),
            (
                "/api/v1/service-orders?entityType=CEASE_ORDER",
                &["CEASE_ORDER:2"],
            ),
            ("/api/v1/entities?correlation=matched", &["PROVIDE_ORDER:1"]),
            (
                "/api/v1/service-orders?correlation=unmatched",
                &["CEASE_ORDER:2"],
            ),
            ("/api/v1/entities?flagged=illegal", &["CEASE_ORDER:2"]),
            (
                "/api/v1/entities?flagged=any&entityType=SERVICE_PROBLEM",
                &["SERVICE_PROBLEM:5"],
            ), // a sequence gap (6)
            ("/api/v1/entities?flagged=anomaly", &[]),
            ("/api/v1/entities?updatedAfter=2999-01-01T00:00:00Z", &[]),
            (
                "/api/v1/service-tests?updatedBefore=2999-01-01T00:00:00Z",
                &["SERVICE_TEST:3"],
            ),
            (
                "/api/v1/service-orders?stuckFor=PT0S",
                &["CEASE_ORDER:2", "PROVIDE_ORDER:1"],
            ),
        ];
        for (path, expected) in cases {
            assert_eq!(
                ids(&read_json(&app, path).await),
                expected,
                "{path} on {backend:?}"
            );
        }
        // Stuck excludes what has finished and what moved recently.
        assert_eq!(
            ids(&read_json(&app, "/api/v1/entities?stuckFor=P1D").await).len(),
            0
        );
    }
}

/// "Stuck" is answered from the index of entities in flight (migration 12): on both databases,
/// for every entity type and every status final in some lifecycle (and some that are not),
/// the stuck list, page by page and by family, and attention's stuck list hold exactly the
/// entities silent since the cutoff whose status is not final in their own lifecycle; and the
/// text the queries say lets each database use that index.
#[tokio::test]
async fn stuck_entities_are_found_among_those_in_flight_for_every_lifecycle() {
    use entity::tracked_entity;
    use kci_receiver::kci::EntityType;
    use kci_receiver::operations::queries::in_flight_rows;
    use sea_orm::sea_query::Expr;
    use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, TransactionTrait};
    const STATUSES: [&str; 9] = [
        "COMPLETED",
        "CANCELLED",
        "REJECTED",
        "FAILED",
        "FAILED_TO_SEND",
        "PARTIAL",
        "RESOLVED",
        "IN_PROGRESS",
        "ACKNOWLEDGED",
    ];
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        let old = chrono::Utc::now() - chrono::Duration::days(2);
        let mut expected = HashSet::new();
        let mut gateway_id = 0;
        for entity_type in EntityType::ALL {
            for (n, status) in STATUSES.iter().enumerate() {
                gateway_id += 1;
                let body = kci(entity_type.as_str(), gateway_id, 1, "IN_PROGRESS", "UPDATE");
                assert_eq!(
                    app.post_kci(&body, "conv-stuck").await.status().as_u16(),
                    204
                );
                // Every other one silent for two days; then the status, set as it stands.
                let silent = n % 2 == 0 || *status == "RESOLVED";
                let mut update = tracked_entity::Entity::update_many()
                    .col_expr(tracked_entity::Column::Status, Expr::value(*status))
                    .filter(tracked_entity::Column::EntityType.eq(entity_type.as_str()))
                    .filter(tracked_entity::Column::GatewayId.eq(gateway_id.to_string()));
                if silent {
                    update = update.col_expr(tracked_entity::Column::LastKciAt, Expr::value(old));
                }
                update.exec(&app.db).await.unwrap();
                if silent && !entity_type.lifecycle().is_terminal(status) {
                    expected.insert(format!("{}:{gateway_id}", entity_type.as_str()));
                }
            }
        }
        assert!(expected.len() >= 10, "{backend:?}: {expected:?}");

        // The list, page by page (newest first, each id once).
        let mut listed = Vec::new();
        let mut path = "/api/v1/entities?stuckFor=P1D&limit=4".to_owned();
        loop {
            let page = read_json(&app, &path).await;
            listed.extend(ids(&page));
            match page["nextCursor"].as_str() {
                Some(cursor) => {
                    path = format!("/api/v1/entities?stuckFor=P1D&limit=4&cursor={cursor}")
                }
                None => break,
            }
        }
        assert_eq!(
            listed.iter().cloned().collect::<HashSet<_>>(),
            expected,
            "{backend:?}"
        );
        assert_eq!(listed.len(), expected.len(), "{backend:?}: each once");
        let gateway_ids: Vec<u64> = listed
            .iter()
            .map(|e| e.split(':').nth(1).unwrap().parse().unwrap())
            .collect();
        assert!(
            gateway_ids.windows(2).all(|w| w[0] > w[1]),
            "{backend:?}: newest first"
        );
        // By family, with another filter beside it.
        let tests = ids(&read_json(&app, "/api/v1/service-tests?stuckFor=P1D").await);
        let expected_tests: HashSet<String> = expected
            .iter()
            .filter(|e| e.starts_with("SERVICE_TEST:"))
            .cloned()
            .collect();
        assert_eq!(
            tests.into_iter().collect::<HashSet<_>>(),
            expected_tests,
            "{backend:?}"
        );
        let problems = ids(&read_json(
            &app,
            "/api/v1/service-problems?stuckFor=P1D&status=RESOLVED",
        )
        .await);
        assert_eq!(
            problems.len(),
            1,
            "{backend:?}: RESOLVED is not final for a problem"
        );

        // Attention's stuck list: the same entities.
        let attention = read_json(&app, "/api/v1/attention?stuckFor=P1D&limit=100").await;
        let stuck: HashSet<String> = ids(&attention["stuck"]).into_iter().collect();
        assert_eq!(stuck, expected, "{backend:?}");
        assert_eq!(attention["stuck"]["total"], expected.len(), "{backend:?}");

        // The index applies to the text the queries say.
        let sql = format!(
            "SELECT * FROM tracked_entity WHERE last_kci_at < '2999-01-01' AND {} ORDER BY id DESC LIMIT 5",
            in_flight_rows()
        );
        let txn = app.db.begin().await.unwrap();
        let explain = match backend {
            // Naming the index is an error if it cannot answer the text.
            Backend::Sqlite => format!(
                "EXPLAIN QUERY PLAN {}",
                sql.replace(
                    "FROM tracked_entity",
                    "FROM tracked_entity INDEXED BY ix_tracked_entity_in_flight"
                )
            ),
            Backend::Postgres => {
                // A few rows: without this PostgreSQL would rightly read the table instead.
                txn.execute_unprepared("SET LOCAL enable_seqscan = off")
                    .await
                    .unwrap();
                format!("EXPLAIN {sql}")
            }
        };
        let plan: Vec<String> = txn
            .query_all_raw(sea_orm::Statement::from_string(
                txn.get_database_backend(),
                explain,
            ))
            .await
            .unwrap()
            .iter()
            .map(|row| {
                row.try_get_by_index::<String>(0)
                    .or_else(|_| row.try_get_by_index::<String>(3))
                    .unwrap_or_default()
            })
            .collect();
        txn.rollback().await.unwrap();
        assert!(
            plan.iter()
                .any(|line| line.contains("ix_tracked_entity_in_flight")),
            "{backend:?}: {plan:?}"
        );
    }
}

#[tokio::test]
async fn pages_follow_their_cursor_to_the_end_and_bad_parameters_are_400() {
    let app = spawn_app(Backend::Postgres).await;
    let empty = read_json(&app, "/api/v1/service-tests").await;
    assert_eq!(empty, json!({"items": [], "nextCursor": null}));
    for gateway_id in 1..=7 {
        let body = kci("SERVICE_TEST", gateway_id, 1, "IN_PROGRESS", "UPDATE");
        assert_eq!(
            app.post_kci(&body, "conv-page").await.status().as_u16(),
            204
        );
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/service-tests?limit=3".to_owned();
    let mut pages = 0;
    loop {
        let page = read_json(&app, &path).await;
        pages += 1;
        seen.extend(ids(&page));
        match page["nextCursor"].as_str() {
            Some(cursor) => {
                // New arrivals do not disturb a walk in progress (newest first, by id).
                if pages == 1 {
                    let body = kci("SERVICE_TEST", 99, 1, "IN_PROGRESS", "UPDATE");
                    assert_eq!(
                        app.post_kci(&body, "conv-page").await.status().as_u16(),
                        204
                    );
                }
                path = format!("/api/v1/service-tests?limit=3&cursor={cursor}");
            }
            None => break,
        }
    }
    assert_eq!(pages, 3, "3 + 3 + 1");
    let expected: Vec<String> = (1..=7)
        .rev()
        .map(|id| format!("SERVICE_TEST:{id}"))
        .collect();
    assert_eq!(seen, expected);
    let exact = read_json(&app, "/api/v1/service-tests?limit=8").await;
    assert_eq!(
        exact["nextCursor"],
        Value::Null,
        "the last page has no cursor"
    );

    for (path, mentions) in [
        ("/api/v1/service-tests?cursor=bm9wZQ", "cursor"),
        ("/api/v1/service-tests?cursor=%%%", "cursor"),
        ("/api/v1/service-tests?stuckFor=4 hours", "stuckFor"),
        ("/api/v1/service-tests?stuckFor=P1M", "fixed length"),
        ("/api/v1/service-tests?flagged=purple", "flagged"),
        ("/api/v1/service-tests?correlation=maybe", "correlation"),
        ("/api/v1/service-tests?updatedAfter=yesterday", "query"),
        ("/api/v1/service-tests?limit=-1", "query"),
        ("/api/v1/attention?stuckFor=soon", "stuckFor"),
        ("/api/v1/service-tests?limit=100000", "limit"),
        ("/api/v1/service-tests?limit=0", "limit"),
        ("/api/v1/service-tests?colour=red", "colour"),
        ("/api/v1/kcis/not-a-uuid", "kciId"),
    ] {
        let body = assert_gateway_error(read(&app, path).await, 400, "MALFORMED_REQUEST").await;
        assert!(
            body["messages"].to_string().contains(mentions),
            "{path}: {body}"
        );
    }
    // What the document allows is accepted: the largest page, and a blank search.
    let largest = read_json(&app, "/api/v1/service-tests?limit=500").await;
    assert_eq!(largest["items"].as_array().unwrap().len(), 8);
    let blank = read_json(&app, "/api/v1/search?q=%20").await;
    assert_eq!(blank["entities"], json!([]));
}

#[tokio::test]
async fn an_entity_shows_its_snapshot_original_request_and_full_history() {
    let app = spawn_app(Backend::Sqlite).await;
    seed(&app).await;
    let detail = read_json(&app, "/api/v1/service-orders/1").await;
    assert_eq!(detail["entity"]["status"], "ACKNOWLEDGED");
    assert_eq!(detail["entity"]["snapshot"]["status"], "ACKNOWLEDGED");
    assert_eq!(detail["originalRequest"]["conversationId"], "conv-order-1");
    assert_eq!(
        detail["originalRequest"]["operation"],
        "POST /service-orders"
    );
    assert_eq!(detail["terminal"], false);

    let history = read_json(&app, "/api/v1/service-orders/2/history").await;
    let history = history.as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["fromStatus"], Value::Null);
    assert_eq!(history[0]["toStatus"], "COMPLETED");
    assert_eq!(history[1]["fromStatus"], "COMPLETED");
    assert_eq!(history[1]["flagIllegal"], true);
    assert_eq!(history[1]["sequenceNumber"], 2);
    assert!(history[1]["requestId"].is_string() && history[1]["kciId"].is_string());
    assert_eq!(history[1]["conversationId"], "conv-order-2");

    // Several order types can share a gateway id: the caller chooses.
    let modify = kci("MODIFY_ORDER", 1, 1, "SENT_TO_SUPPLIER", "UPDATE");
    assert_eq!(
        app.post_kci(&modify, "conv-modify").await.status().as_u16(),
        204
    );
    let ambiguous = read(&app, "/api/v1/service-orders/1").await;
    let body = assert_gateway_error(ambiguous, 422, "INVALID_REQUEST").await;
    assert!(body["messages"][0].as_str().unwrap().contains("entityType"));
    let chosen = read_json(&app, "/api/v1/service-orders/1?entityType=MODIFY_ORDER").await;
    assert_eq!(chosen["entity"]["entityType"], "MODIFY_ORDER");

    assert_gateway_error(
        read(&app, "/api/v1/service-tests/404404").await,
        404,
        "NOT_FOUND",
    )
    .await;
    assert_gateway_error(
        read(&app, "/api/v1/service-tests/404404/history").await,
        404,
        "NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn conversations_kcis_and_search_find_everything_by_any_id() {
    let app = spawn_app(Backend::Postgres).await;
    seed(&app).await;
    let conversation = read_json(&app, "/api/v1/conversations/conv-order-1").await;
    assert_eq!(conversation["originalRequest"]["requestId"], "req-1");
    assert_eq!(conversation["entities"].as_array().unwrap().len(), 1);
    assert_eq!(conversation["kcis"].as_array().unwrap().len(), 2);
    let unregistered = read_json(&app, "/api/v1/conversations/conv-order-2").await;
    assert_eq!(unregistered["originalRequest"], Value::Null);
    assert_eq!(unregistered["kcis"].as_array().unwrap().len(), 2);
    assert_gateway_error(
        read(&app, "/api/v1/conversations/never-seen").await,
        404,
        "NOT_FOUND",
    )
    .await;

    let body = kci("SERVICE_TEST", 8, 1, "IN_PROGRESS", "UPDATE");
    let kci_id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.post_kci_as(&body, "conv-8", "req-kci-8")
            .await
            .status()
            .as_u16(),
        204
    );
    assert_eq!(
        app.post_kci_as(&body, "conv-8", "req-kci-8-again")
            .await
            .status()
            .as_u16(),
        204
    );
    let view = read_json(&app, &format!("/api/v1/kcis/{kci_id}")).await;
    assert_eq!(view["body"], body);
    assert_eq!(view["kci"]["outcome"], "APPLIED");
    assert_eq!(view["kci"]["redeliveryCount"], 1);
    assert_eq!(view["entity"]["gatewayId"], "8");
    assert_eq!(view["transitions"].as_array().unwrap().len(), 1);
    assert_eq!(view["outboxEvent"]["status"], "PENDING");
    assert_eq!(
        view["deliveries"].as_array().unwrap().len(),
        2,
        "both deliveries, from the audit log"
    );
    assert_gateway_error(
        read(&app, "/api/v1/kcis/00000000-0000-0000-0000-000000000000").await,
        404,
        "NOT_FOUND",
    )
    .await;

    for (q, what) in [
        ("8", "entities"),
        ("conv-order-1", "conversations"),
        ("req-kci-8", "audit"),
        (kci_id.as_str(), "kcis"),
    ] {
        let found = read_json(&app, &format!("/api/v1/search?q={q}")).await;
        assert!(
            !found[what].as_array().unwrap().is_empty(),
            "{q} finds {what}: {found}"
        );
    }
}

/// `GET /api/v1/kcis/{kciId}` reads the KCI, its entity and its outbox event in one joined
/// statement: on both databases each equals sea-orm's own read of its table, every column, and
/// a KCI whose event is gone (published and purged by retention) shows without one. The KCI
/// summaries of a conversation and of a search, read without the bodies, say what the row says.
#[tokio::test]
async fn a_kcis_view_joins_its_entity_and_event_exactly_as_their_own_reads_give_them() {
    use entity::{kci as kci_table, outbox_event, tracked_entity};
    use kci_receiver::operations::queries::{conversation_view, kci_view, search};
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        // Another entity first, so that the KCI's row, its entity's and its event's ids differ.
        let other = kci("SERVICE_PROBLEM", 9, 1, "IN_PROGRESS", "UPDATE");
        assert_eq!(
            app.post_kci_as(&other, "conv-9", "req-9")
                .await
                .status()
                .as_u16(),
            204
        );
        let body = kci("SERVICE_TEST", 8, 1, "IN_PROGRESS", "UPDATE");
        assert_eq!(
            app.post_kci_as(&body, "conv-8", "req-8")
                .await
                .status()
                .as_u16(),
            204
        );
        let kci_id = uuid::Uuid::parse_str(body["id"].as_str().unwrap()).unwrap();

        let row = kci_table::Entity::find()
            .filter(kci_table::Column::KciId.eq(kci_id))
            .one(&app.db)
            .await
            .unwrap()
            .expect("the KCI is stored");
        let entity = tracked_entity::Entity::find_by_id(row.tracked_entity_id)
            .one(&app.db)
            .await
            .unwrap();
        let event = outbox_event::Entity::find()
            .filter(outbox_event::Column::KciRef.eq(row.id))
            .one(&app.db)
            .await
            .unwrap();
        assert!(entity.is_some() && event.is_some(), "{backend:?}");

        let view = kci_view(&app.db, kci_id).await.unwrap().expect("found");
        assert_eq!(view.kci, row, "{backend:?}");
        assert_eq!(view.entity, entity, "{backend:?}");
        assert_eq!(view.outbox_event, event, "{backend:?}");
        assert_eq!(view.body, body, "{backend:?}");
        assert_eq!(view.transitions.len(), 1, "{backend:?}");
        assert_eq!(view.deliveries.len(), 1, "{backend:?}");

        // The lists' summaries read only their columns, each as the full row has it.
        let summary = serde_json::json!({
            "kciId": row.kci_id,
            "requestId": row.request_id,
            "entityType": row.entity_type,
            "updateType": row.update_type,
            "reason": row.reason,
            "sequenceNumber": row.sequence_number,
            "outcome": row.outcome,
            "receivedAt": row.received_at,
        });
        let conversation = conversation_view(&app.db, "conv-8").await.unwrap().unwrap();
        assert_eq!(
            serde_json::to_value(&conversation.kcis).unwrap(),
            json!([summary]),
            "{backend:?}"
        );
        let found = search(&app.db, &kci_id.to_string()).await.unwrap();
        assert_eq!(
            serde_json::to_value(&found.kcis).unwrap(),
            json!([summary]),
            "{backend:?}"
        );

        outbox_event::Entity::delete_many()
            .filter(outbox_event::Column::KciRef.eq(row.id))
            .exec(&app.db)
            .await
            .unwrap();
        let view = kci_view(&app.db, kci_id).await.unwrap().expect("found");
        assert_eq!(view.outbox_event, None, "{backend:?}");
        assert_eq!((view.kci, view.entity), (row, entity), "{backend:?}");

        assert!(
            kci_view(&app.db, uuid::Uuid::new_v4())
                .await
                .unwrap()
                .is_none(),
            "{backend:?}: an unknown id is not found"
        );
    }
}

#[tokio::test]
async fn the_audit_record_and_support_text_cover_accepted_and_rejected_requests() {
    let app = spawn_app(Backend::Sqlite).await;
    let body = fixture("ProvideServiceOrderUpdate-2");
    assert_eq!(
        app.post_kci_as(&body, "conv-support", "req-accepted")
            .await
            .status()
            .as_u16(),
        204
    );
    let mut invalid = body.clone();
    invalid["sequenceNumber"] = json!(0);
    let rejected = app
        .post_kci_as(&invalid, "conv-support", "req-rejected")
        .await;
    let error = assert_gateway_error(rejected, 422, "INVALID_REQUEST").await;
    // Rejections are audited in the background.
    app.count_eventually("FROM audit_log WHERE request_id = 'req-rejected'", 1)
        .await;

    let records = read_json(&app, "/api/v1/audit/req-accepted").await;
    assert_eq!(records[0]["responseStatus"], 204);
    assert_eq!(records[0]["outcome"], "ACCEPTED");
    assert!(
        records[0]["requestHeaders"].get("authorization").is_none(),
        "credentials are never stored"
    );

    let app = &app;
    let support = |request_id: &'static str| async move {
        let response = read(app, &format!("/api/v1/audit/{request_id}?format=support")).await;
        assert_eq!(response.status().as_u16(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        response.text().await.unwrap()
    };
    let accepted = support("req-accepted").await;
    for line in [
        "Environment:       local",
        "Tenant:            unnamed-tenant",
        "Supplier:          FIBRECO",
        "Gateway ids:       PROVIDE_ORDER 12345 (supplier reference FC123)",
        "X-Request-ID:      req-accepted",
        "X-Conversation-ID: conv-support",
        "Error uuid:        (none: the request succeeded)",
        "POST /kcis",
        "\"sequenceNumber\": 3",
        "Response:\n204",
    ] {
        assert!(accepted.contains(line), "{line:?} in\n{accepted}");
    }
    assert!(!accepted.to_lowercase().contains("authorization"));
    let rejected = support("req-rejected").await;
    assert!(
        rejected.contains(&format!(
            "Error uuid:        {}",
            error["uuid"].as_str().unwrap()
        )),
        "{rejected}"
    );
    // The error UUID the gateway's operator quotes back finds the refused request.
    let found = read_json(
        app,
        &format!("/api/v1/search?q={}", error["uuid"].as_str().unwrap()),
    )
    .await;
    let found_ids: Vec<&str> = found["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| record["requestId"].as_str().unwrap())
        .collect();
    assert_eq!(found_ids, ["req-rejected"], "{found}");
    assert!(rejected.contains("Response:\n422"));
    assert!(rejected.contains("sequenceNumber: must be a whole number from 1 to"));
    assert!(rejected.contains("Gateway ids:       PROVIDE_ORDER 12345"));

    assert_gateway_error(
        read(app, "/api/v1/audit/nothing-like-it").await,
        404,
        "NOT_FOUND",
    )
    .await;
    assert_gateway_error(
        read(app, "/api/v1/audit/req-accepted?format=pdf").await,
        400,
        "MALFORMED_REQUEST",
    )
    .await;
}

#[tokio::test]
async fn what_needs_attention_comes_in_one_answer() {
    let app = spawn_app(Backend::Postgres).await;
    seed(&app).await;
    sea_orm::ConnectionTrait::execute_unprepared(
        &app.db,
        "UPDATE outbox_event SET status = 'DEAD' WHERE id = 1",
    )
    .await
    .unwrap();
    let attention = read_json(&app, "/api/v1/attention?stuckFor=PT0S").await;
    let names = |key: &str| -> HashSet<String> {
        attention[key]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e["entityType"].as_str().unwrap(),
                    e["gatewayId"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert_eq!(
        names("actionRequired"),
        HashSet::from(["SERVICE_PROBLEM:5".to_owned()])
    );
    assert_eq!(
        attention["unmatched"]["total"], 4,
        "all but the registered order"
    );
    assert!(names("stuck").contains("PROVIDE_ORDER:1"));
    assert_eq!(attention["deadEvents"]["total"], 1);
    assert_eq!(
        attention["recentAnomalies"]["total"], 1,
        "the illegal CEASE_ORDER move"
    );
    assert_eq!(
        attention["recentAnomalies"]["items"][0]["flagIllegal"],
        true
    );
    let calm = read_json(&app, "/api/v1/attention").await;
    assert_eq!(calm["stuck"]["total"], 0, "nothing has waited a day");
}

#[tokio::test]
async fn the_operations_api_needs_its_own_credentials_and_changes_need_the_admin_role() {
    let app = spawn_app(Backend::Sqlite).await;
    let url = |path: &str| format!("{}{path}", app.address);
    for path in [
        "/api/v1/service-orders",
        "/api/v1/attention",
        "/api/v1/outbox/dead",
        "/dashboard",
    ] {
        let none = app.client.get(url(path)).send().await.unwrap();
        assert_eq!(none.status().as_u16(), 401, "{path}");
        let gateway = app
            .client
            .get(url(path))
            .basic_auth(GATEWAY_USER, Some(GATEWAY_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_gateway_error(gateway, 403, "NOT_AUTHORISED").await;
        let admin = app
            .client
            .get(url(path))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(admin.status().as_u16(), 200, "{path}: admin includes read");
    }
    let dashboard = app.client.get(url("/dashboard")).send().await.unwrap();
    assert!(
        dashboard.headers()["WWW-Authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let read_only = app
        .client
        .post(url("/api/v1/outbox/dead/retry"))
        .basic_auth(READ_USER, Some(READ_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_gateway_error(read_only, 403, "NOT_AUTHORISED").await;
    let page = app
        .client
        .get(url("/dashboard"))
        .basic_auth(READ_USER, Some(READ_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("<title>kci-receiver</title>"));
    // Works offline: nothing is loaded from elsewhere.
    for external in [
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
        "src=\"//",
    ] {
        assert!(!html.contains(external), "no CDN: {external}");
    }
}

/// Walks a JSON document and collects every `$ref`.
fn references(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                found.push(reference.clone());
            }
            map.values().for_each(|v| references(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| references(v, found)),
        _ => {}
    }
}

#[tokio::test]
async fn the_openapi_document_is_valid_3_1_and_covers_every_route() {
    let app = spawn_app(Backend::Sqlite).await;
    let document: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["info"]["title"].is_string() && document["info"]["version"].is_string());

    // Every $ref points at a component that exists.
    let mut refs = Vec::new();
    references(&document, &mut refs);
    assert!(!refs.is_empty());
    for reference in refs {
        let (kind, name) = reference
            .strip_prefix("#/components/")
            .and_then(|r| r.split_once('/'))
            .unwrap_or_else(|| panic!("unexpected ref {reference}"));
        assert!(
            document["components"][kind].get(name).is_some(),
            "{reference} resolves"
        );
    }
    // Every operation answers something, and declares its path parameters.
    let paths = document["paths"].as_object().unwrap();
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            assert!(
                operation["responses"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty()),
                "{method} {path}"
            );
            let declared: Vec<&str> = operation["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            for segment in path.split('/').filter(|s| s.starts_with('{')) {
                let name = segment.trim_matches(|c| c == '{' || c == '}');
                assert!(declared.contains(&name), "{method} {path} declares {name}");
            }
            for security in operation["security"].as_array().into_iter().flatten() {
                for scheme in security.as_object().unwrap().keys() {
                    assert!(
                        document["components"]["securitySchemes"]
                            .get(scheme)
                            .is_some(),
                        "{scheme}"
                    );
                }
            }
        }
    }
    // The whole surface is there, POST /kcis included.
    for (path, method) in [
        ("/kcis", "post"),
        ("/api/v1/service-orders", "get"),
        ("/api/v1/service-orders/{id}", "get"),
        ("/api/v1/service-orders/{id}/history", "get"),
        ("/api/v1/ethernet/service-orders/{id}/history", "get"),
        ("/api/v1/service-tests/{id}", "get"),
        ("/api/v1/service-problems", "get"),
        ("/api/v1/conversations", "post"),
        ("/api/v1/conversations/{conversationId}", "get"),
        ("/api/v1/kcis/{kciId}", "get"),
        ("/api/v1/audit/{xRequestId}", "get"),
        ("/api/v1/attention", "get"),
        ("/api/v1/overview", "get"),
        ("/api/v1/search", "get"),
        ("/api/v1/outbox/dead", "get"),
        ("/api/v1/outbox/dead/{eventId}/retry", "post"),
        ("/api/v1/outbox/replay", "post"),
        ("/metrics", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/openapi.json", "get"),
        ("/dashboard", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is documented"
        );
    }
    let kcis = &paths["/kcis"]["post"]["responses"];
    for status in [
        "204", "400", "401", "403", "413", "422", "429", "500", "503",
    ] {
        assert!(kcis.get(status).is_some(), "POST /kcis documents {status}");
    }
}

#[tokio::test]
async fn metrics_count_kcis_latency_entities_outbox_and_the_pool() {
    let app = spawn_app(Backend::Sqlite).await;
    seed(&app).await;
    let mut invalid = kci("SERVICE_TEST", 9, 1, "IN_PROGRESS", "UPDATE");
    invalid["supplier"] = json!("not valid!");
    assert_eq!(app.post_kci(&invalid, "c").await.status().as_u16(), 422);
    // The gauges that need the database are read by a background task.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let text = loop {
        let text = app.get("/metrics").await.text().await.unwrap();
        if text.contains("kci_receiver_outbox_pending_events 7")
            || tokio::time::Instant::now() >= deadline
        {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for line in [
        r#"kci_receiver_kcis_received_total{entity_type="PROVIDE_ORDER",outcome="applied",update_type="INFORMATIONAL"} 2"#,
        r#"kci_receiver_kcis_received_total{entity_type="unknown",outcome="rejected_422",update_type="unknown"} 1"#,
        r#"kci_receiver_tracked_entities{entity_type="CEASE_ORDER",status="IN_PROGRESS"} 1"#,
        "kci_receiver_outbox_pending_events 7",
        "kci_receiver_outbox_dead_events 0",
        "kci_receiver_database_pool_max_connections 10",
        "kci_receiver_outbox_published_total 0",
        concat!(
            r#"kci_receiver_build_info{schema_version="1",version=""#,
            env!("CARGO_PKG_VERSION"),
            r#""} 1"#
        ),
        // Intake's batches (each KCI alone here) and the relay's lag, registered even idle.
        "kci_receiver_intake_batch_size_bucket{le=\"1\"}",
        "kci_receiver_intake_commit_duration_seconds_count",
        // Where intake's time goes, stage by stage (one queue wait per KCI recorded).
        r#"kci_receiver_intake_stage_duration_seconds_count{stage="queue_wait"} 7"#,
        r#"kci_receiver_intake_stage_duration_seconds_count{stage="begin"}"#,
        r#"kci_receiver_intake_stage_duration_seconds_count{stage="load"}"#,
        r#"kci_receiver_intake_stage_duration_seconds_count{stage="write"}"#,
        r#"kci_receiver_intake_stage_duration_seconds_count{stage="commit"}"#,
        // Who took the write transactions, and how long each waited and held them.
        r#"kci_receiver_write_transaction_seconds_count{phase="wait",writer="intake"}"#,
        r#"kci_receiver_write_transaction_seconds_count{phase="held",writer="intake"}"#,
        r#"kci_receiver_write_transaction_seconds_count{phase="held",writer="registrations"}"#,
        "kci_receiver_outbox_publish_lag_seconds_count 0",
        "kci_receiver_relay_round_duration_seconds_count 0",
        "kci_receiver_relay_rounds_in_flight 0",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    assert!(text.contains(r#"kci_receiver_http_request_duration_seconds_bucket{method="POST",route="/kcis",status="204""#));
    assert!(text.contains("kci_receiver_outbox_oldest_pending_age_seconds"));
}

/// `GET /api/v1/overview` of the instance at `address` (read role) until `ready` holds of it,
/// within 30 s.
async fn overview_until(
    client: &reqwest::Client,
    address: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let overview: Value = client
            .get(format!("{address}/api/v1/overview"))
            .basic_auth(READ_USER, Some(READ_PASSWORD))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or(Value::Null);
        if ready(&overview) || tokio::time::Instant::now() >= deadline {
            return overview;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Issue 16: the dashboard's overview is served from memory: funnels per lifecycle, KCIs per
/// minute by update type (each counted once, whatever the number of refresh rounds), the outbox
/// backlog over time; a new instance counts the KCIs already in the window, not older ones.
#[tokio::test]
async fn the_overview_counts_entities_kcis_and_the_backlog_once_each() {
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        assert_eq!(
            app.client
                .get(format!("{}/api/v1/overview", app.address))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            401
        );
        seed(&app).await;
        let totals = |overview: &Value| -> (u64, u64, i64, i64) {
            let minutes = overview["kcisPerMinute"]
                .as_array()
                .unwrap_or_else(|| panic!("not an overview: {overview}"));
            let sum = |key: &str| minutes.iter().map(|m| m[key].as_u64().unwrap()).sum();
            let funnels = overview["entityTypes"].as_array().unwrap();
            let entities = funnels.iter().map(|f| f["total"].as_i64().unwrap()).sum();
            let pending = overview["outbox"]
                .as_array()
                .unwrap()
                .last()
                .map_or(-1, |sample| sample["pending"].as_i64().unwrap());
            (
                sum("informational"),
                sum("actionRequired"),
                entities,
                pending,
            )
        };
        let overview =
            overview_until(&app.client, &app.address, |o| totals(o) == (6, 1, 5, 7)).await;
        assert_eq!(totals(&overview), (6, 1, 5, 7), "{backend:?}: {overview:#}");
        assert_eq!(overview["windowMinutes"], 180);
        assert_eq!(overview["kcisPerMinute"].as_array().unwrap().len(), 180);
        let funnel = |entity_type: &str| -> Value {
            overview["entityTypes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["entityType"] == entity_type)
                .cloned()
                .unwrap()
        };
        let provide = funnel("PROVIDE_ORDER");
        assert_eq!(provide["resource"], "service-orders");
        assert_eq!(
            (provide["total"].as_i64(), provide["inFlight"].as_i64()),
            (Some(1), Some(1))
        );
        let statuses: Vec<&str> = provide["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["status"].as_str().unwrap())
            .collect();
        assert_eq!(
            statuses,
            kci_receiver::kci::EntityType::ProvideOrder
                .lifecycle()
                .statuses,
            "the whole lifecycle, in order, zero counts included"
        );
        let acknowledged = provide["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["status"] == "ACKNOWLEDGED")
            .unwrap();
        assert_eq!(acknowledged["count"], 1);
        assert_eq!(
            funnel("PROVIDE_ETHERNET_ORDER")["resource"],
            "ethernet/service-orders"
        );

        // More KCIs, several refresh rounds: each is counted once.
        for sequence in 3..6 {
            let body = kci("PROVIDE_ORDER", 1, sequence, "IN_PROGRESS", "UPDATE");
            assert_eq!(
                app.post_kci(&body, "conv-order-1").await.status().as_u16(),
                204
            );
        }
        overview_until(&app.client, &app.address, |o| totals(o).0 == 9).await;
        tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
        let overview = read_json(&app, "/api/v1/overview").await;
        assert_eq!(
            totals(&overview),
            (9, 1, 5, 10),
            "{backend:?}: counted once"
        );
        assert!(
            overview["outbox"].as_array().unwrap().len() >= 2,
            "samples over time"
        );

        // A new instance: the two oldest KCIs are moved out of the window before it starts.
        let long_ago = (chrono::Utc::now() - chrono::Duration::hours(4)).to_rfc3339();
        sea_orm::ConnectionTrait::execute_unprepared(
            &app.db,
            &format!(
                "UPDATE kci SET received_at = '{long_ago}' WHERE id IN (SELECT id FROM kci ORDER BY id LIMIT 2)"
            ),
        )
        .await
        .unwrap();
        let second =
            crate::helpers::spawn_second(crate::helpers::test_settings(app.database_url())).await;
        let overview = overview_until(&app.client, &second, |o| !o["refreshedAt"].is_null()).await;
        assert!(
            !overview["refreshedAt"].is_null(),
            "{backend:?}: the second instance refreshed"
        );
        assert_eq!(
            totals(&overview).0 + totals(&overview).1,
            8,
            "{backend:?}: the window's KCIs only: {overview:#}"
        );
    }
}
