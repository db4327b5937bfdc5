//! Concurrent KCIs about one entity never lose an update: history and current state agree.

use entity::{state_transition, tracked_entity};
use futures_util::future::join_all;
use serde_json::Value;

use crate::helpers::{BACKENDS, Backend, TestApp, kci, spawn_app};

/// Checks that the applied entries of a history form one chain: increasing sequence numbers,
/// each starting where the previous one ended, and the entity at the chain's end.
fn assert_history_is_one_consistent_chain(
    history: &[state_transition::Model],
    entity: &tracked_entity::Model,
) {
    let mut last_sequence: Option<i64> = None;
    let mut last_status: Option<String> = None;
    for row in history {
        assert_eq!(
            row.previous_sequence_number, last_sequence,
            "each entry saw the state left by the one before: {row:?}"
        );
        assert_eq!(row.from_status, last_status, "{row:?}");
        if row.applied {
            assert!(
                last_sequence.is_none_or(|last| row.sequence_number > last),
                "applied only when newer: {row:?}"
            );
            last_sequence = Some(row.sequence_number);
            last_status = Some(row.to_status.clone());
        } else {
            assert!(row.flag_stale || row.flag_duplicate, "{row:?}");
        }
    }
    assert_eq!(Some(entity.last_sequence_number), last_sequence);
    assert_eq!(Some(entity.status.clone()), last_status);
}

fn status_for(sequence: i64) -> &'static str {
    if sequence % 2 == 0 {
        "HELD"
    } else {
        "IN_PROGRESS"
    }
}

async fn many_concurrent_kcis_on_one_entity(app: &TestApp, count: i64) {
    // Sequence numbers 1..=count in a scrambled order (37 is coprime with 100 and 50).
    let bodies: Vec<Value> = (0..count)
        .map(|i| (i * 37) % count + 1)
        .map(|sequence| {
            kci(
                "PROVIDE_ORDER",
                4242,
                sequence,
                status_for(sequence),
                "UPDATE",
            )
        })
        .collect();
    let responses = join_all(
        bodies
            .iter()
            .map(|body| app.post_kci(body, "conv-concurrent")),
    )
    .await;
    for response in responses {
        assert_eq!(response.status().as_u16(), 204);
    }
    let entity = app.entity("PROVIDE_ORDER", "4242").await;
    assert_eq!(entity.last_sequence_number, count);
    assert_eq!(entity.status, status_for(count));
    assert_eq!(entity.kci_count, count);
    let history = app.history(entity.id).await;
    assert_eq!(history.len() as i64, count);
    assert_history_is_one_consistent_chain(&history, &entity);
    assert_eq!(app.count("FROM kci").await, count);
    assert_eq!(app.count("FROM outbox_event").await, count);
}

#[tokio::test]
async fn a_hundred_concurrent_kcis_on_one_entity_lose_no_update_on_postgres() {
    let app = spawn_app(Backend::Postgres).await;
    many_concurrent_kcis_on_one_entity(&app, 100).await;
}

#[tokio::test]
async fn fifty_concurrent_kcis_on_one_entity_lose_no_update_on_sqlite() {
    let app = spawn_app(Backend::Sqlite).await;
    many_concurrent_kcis_on_one_entity(&app, 50).await;
}

#[tokio::test]
async fn the_same_new_kci_delivered_many_times_at_once_is_recorded_once() {
    for backend in BACKENDS {
        let app = spawn_app(backend).await;
        let body = kci("SERVICE_TEST", 31, 1, "SENT_TO_SUPPLIER", "UPDATE");
        let responses = join_all((0..20).map(|_| app.post_kci(&body, "conv-race"))).await;
        assert!(responses.iter().all(|r| r.status().as_u16() == 204));
        assert_eq!(app.count("FROM kci").await, 1, "{backend:?}");
        assert_eq!(
            app.rows("SELECT redelivery_count FROM kci").await[0]["redelivery_count"],
            19
        );
        assert_eq!(app.count("FROM tracked_entity").await, 1);
        assert_eq!(app.count("FROM state_transition").await, 1);
        assert_eq!(app.count("FROM outbox_event").await, 1);
        assert_eq!(app.count("FROM audit_log").await, 20);
    }
}
