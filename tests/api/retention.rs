//! Retention: the audit log, published outbox events and raw bodies of finished entities go
//! after their periods, in batches; nothing pending, nothing an open entity needs, no history and
//! no current state ever does. On both databases.

use chrono::{Duration, Utc};
use entity::outbox_event::{self, OutboxStatus};
use entity::{audit_log, kci as kci_row, state_transition, tracked_entity};
use kci_receiver::config::RetentionSettings;
use kci_receiver::store::retention::{self, Pruned};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};

use crate::helpers::{BACKENDS, Backend, TestApp, kci, spawn_app};

fn retention_of(days: u32, batch_size: u64) -> RetentionSettings {
    RetentionSettings {
        audit_log_days: days,
        published_events_days: days,
        finished_raw_bodies_days: days,
        interval_seconds: 3600,
        batch_size,
    }
}

/// Everything written so far happened `days` ago (as far as retention can tell).
async fn age_everything(app: &TestApp, days: i64) {
    let then = Utc::now() - Duration::days(days);
    audit_log::Entity::update_many()
        .col_expr(audit_log::Column::ReceivedAt, Expr::value(then))
        .exec(&app.db)
        .await
        .unwrap();
    kci_row::Entity::update_many()
        .col_expr(kci_row::Column::ReceivedAt, Expr::value(then))
        .exec(&app.db)
        .await
        .unwrap();
    outbox_event::Entity::update_many()
        .col_expr(outbox_event::Column::PublishedAt, Expr::value(then))
        .filter(outbox_event::Column::Status.eq(OutboxStatus::Published))
        .exec(&app.db)
        .await
        .unwrap();
}

async fn counts(app: &TestApp) -> Value {
    json!({
        "audit": audit_log::Entity::find().count(&app.db).await.unwrap(),
        "events": outbox_event::Entity::find().count(&app.db).await.unwrap(),
        "history": state_transition::Entity::find().count(&app.db).await.unwrap(),
        "entities": tracked_entity::Entity::find().count(&app.db).await.unwrap(),
        "kcis": kci_row::Entity::find().count(&app.db).await.unwrap(),
    })
}

#[tokio::test]
async fn old_audit_records_published_events_and_finished_bodies_go_and_nothing_else() {
    for backend in BACKENDS {
        prune_on(backend).await;
    }
}

async fn prune_on(backend: Backend) {
    let app = spawn_app(backend).await;
    // A finished order (its KCIs' bodies may go) and an open one (they stay).
    let finished: Vec<Value> = [
        (1, "ACKNOWLEDGED", "ACKNOWLEDGED"),
        (2, "COMPLETED", "COMPLETED"),
    ]
    .into_iter()
    .map(|(n, status, reason)| kci("PROVIDE_ORDER", 71, n, status, reason))
    .collect();
    let open = kci("PROVIDE_ORDER", 72, 1, "ACKNOWLEDGED", "ACKNOWLEDGED");
    for body in finished.iter().chain([&open]) {
        assert_eq!(app.post_kci(body, "c-ret").await.status().as_u16(), 204);
    }
    // A rejected request (audited, about no KCI) and its record in the background.
    let rejected = app
        .client
        .post(format!("{}/kcis", app.address))
        .basic_auth(
            crate::helpers::GATEWAY_USER,
            Some(crate::helpers::GATEWAY_PASSWORD),
        )
        .header("X-Request-ID", "r-bad")
        .header("X-Conversation-ID", "c-bad")
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status().as_u16(), 400);
    app.count_eventually("FROM audit_log WHERE request_id = 'r-bad'", 1)
        .await;
    // Two events published (the finished order's), the open order's still pending.
    let finished_entity = app.entity("PROVIDE_ORDER", "71").await;
    outbox_event::Entity::update_many()
        .col_expr(
            outbox_event::Column::Status,
            Expr::value(OutboxStatus::Published),
        )
        .col_expr(outbox_event::Column::PublishedAt, Expr::value(Utc::now()))
        .filter(outbox_event::Column::TrackedEntityId.eq(finished_entity.id))
        .exec(&app.db)
        .await
        .unwrap();

    // Nothing is old enough yet.
    let settings = retention_of(30, 2);
    assert_eq!(
        retention::prune(&app.db, &settings, Utc::now())
            .await
            .unwrap(),
        Pruned::default()
    );
    age_everything(&app, 31).await;
    let before = counts(&app).await;
    let expected = Pruned {
        // The finished order's two deliveries and the rejected request; not the open order's.
        audit_records: 3,
        published_events: 2,
        raw_bodies: 2,
        yielded: false,
    };
    assert_eq!(
        retention::dry_run(&app.db, &settings, Utc::now())
            .await
            .unwrap(),
        expected
    );
    assert_eq!(counts(&app).await, before, "a dry run deletes nothing");
    // Batches of two: several rounds, the same result.
    assert_eq!(
        retention::prune(&app.db, &settings, Utc::now())
            .await
            .unwrap(),
        expected
    );
    assert_eq!(
        retention::prune(&app.db, &settings, Utc::now())
            .await
            .unwrap(),
        Pruned::default(),
        "a second run finds nothing"
    );

    let after = counts(&app).await;
    assert_eq!(after["audit"], before["audit"].as_u64().unwrap() - 3);
    assert_eq!(after["events"], before["events"].as_u64().unwrap() - 2);
    for kept in ["history", "entities", "kcis"] {
        assert_eq!(after[kept], before[kept], "{kept} kept");
    }
    // The open order: its event still pending, its body and its delivery's audit record kept.
    let open_row = app
        .rows(&format!(
            "SELECT raw_body, raw_body_pruned_at FROM kci WHERE kci_id = {}",
            app.uuid_sql(open["id"].as_str().unwrap())
        ))
        .await;
    assert!(
        open_row[0]["raw_body"]
            .as_str()
            .unwrap()
            .contains("ACKNOWLEDGED")
    );
    assert_eq!(open_row[0]["raw_body_pruned_at"], Value::Null);
    assert_eq!(
        app.count("FROM outbox_event WHERE status = 'PENDING'")
            .await,
        1
    );
    assert_eq!(
        app.count(&format!(
            "FROM audit_log WHERE kci_id = {}",
            app.uuid_sql(open["id"].as_str().unwrap())
        ))
        .await,
        1
    );
    // The finished order: bodies emptied and marked, state and history intact.
    let pruned_rows = app
        .rows(&format!(
            "SELECT raw_body FROM kci WHERE tracked_entity_id = {} AND raw_body_pruned_at IS NOT NULL",
            finished_entity.id
        ))
        .await;
    assert_eq!(pruned_rows.len(), 2);
    assert!(pruned_rows.iter().all(|r| r["raw_body"] == ""));
    assert_eq!(app.entity("PROVIDE_ORDER", "71").await.status, "COMPLETED");
    // A late redelivery of a pruned KCI is a redelivery (its content can no longer be compared).
    assert_eq!(
        app.post_kci(&finished[1], "c-ret").await.status().as_u16(),
        204
    );
    let row = app
        .rows(&format!(
            "SELECT redelivery_count, anomaly_count FROM kci WHERE kci_id = {}",
            app.uuid_sql(finished[1]["id"].as_str().unwrap())
        ))
        .await;
    assert_eq!(row[0]["redelivery_count"], 1);
    assert_eq!(row[0]["anomaly_count"], 0);
}

/// `kci-receiver prune --dry-run` counts, `prune` deletes; both print JSON.
#[tokio::test]
async fn the_prune_command_shows_and_removes_what_the_periods_let_go() {
    let app = spawn_app(Backend::Sqlite).await;
    let body = kci("SERVICE_TEST", 81, 1, "COMPLETED", "UPDATE");
    assert_eq!(app.post_kci(&body, "c-81").await.status().as_u16(), 204);
    age_everything(&app, 10).await;
    let run = |args: &[&str]| {
        let output = crate::cli::kci_receiver()
            .arg("prune")
            .args(args)
            .env("KCI__DATABASE__URL", app.database_url())
            .env("KCI__RETENTION__AUDIT_LOG_DAYS", "7")
            .env("KCI__RETENTION__FINISHED_RAW_BODIES_DAYS", "7")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let dry = run(&["--dry-run"]);
    assert_eq!(
        dry,
        json!({"auditRecords": 1, "publishedEvents": 0, "rawBodies": 1, "yielded": false})
    );
    assert_eq!(run(&[]), dry);
    assert_eq!(run(&["--dry-run"])["rawBodies"], 0);
}
