//! The database going away: never a 204 for what is not committed, 503 with Retry-After while it
//! is gone, and recovery without a restart once it is back. The database is cut off through a TCP
//! proxy the test controls, not by stopping the machine's server.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::Value;

use crate::errors::assert_gateway_error;
use crate::helpers::{Backend, TcpProxy, TestDatabase, eventually, kci, spawn_on, test_settings};

#[tokio::test]
async fn losing_the_database_gives_503_never_204_and_the_service_recovers_by_itself() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let proxy = TcpProxy::start(database.postgres_addr()).await;
    let mut settings = test_settings(&database.url_via_port(proxy.port));
    // Requests give up on the pool quickly while the database is gone.
    settings.database.acquire_timeout_ms = 1500;
    let app = spawn_on(database, settings).await;
    let mut accepted: Vec<Value> = Vec::new();
    let mut next_id = 0u64;
    let mut new_kci = || {
        next_id += 1;
        kci(
            "PROVIDE_ORDER",
            10_000 + next_id,
            1,
            "SENT_TO_SUPPLIER",
            "UPDATE",
        )
    };

    // Healthy.
    for _ in 0..5 {
        let body = new_kci();
        assert_eq!(
            app.post_kci(&body, "conv-outage").await.status().as_u16(),
            204
        );
        accepted.push(body);
    }

    // Cut mid-run: requests in flight when the connection drops, and requests after.
    let in_flight: Vec<Value> = (0..20).map(|_| new_kci()).collect();
    let posts = join_all(
        in_flight
            .iter()
            .map(|body| app.post_kci(body, "conv-outage")),
    );
    let cut = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        proxy.cut();
    };
    let (responses, ()) = tokio::join!(posts, cut);
    for (body, response) in in_flight.iter().zip(responses) {
        match response.status().as_u16() {
            204 => accepted.push(body.clone()),
            503 => {
                assert!(response.headers().contains_key("Retry-After"));
                assert_gateway_error(response, 503, "TENANT_FAULT").await;
            }
            other => panic!("unexpected status {other} while the database was being cut off"),
        }
    }
    for _ in 0..3 {
        let response = app.post_kci(&new_kci(), "conv-outage").await;
        assert_eq!(response.headers()["Retry-After"], "5");
        assert_eq!(response.headers()["X-Conversation-ID"], "conv-outage");
        let body = assert_gateway_error(response, 503, "TENANT_FAULT").await;
        assert!(
            body["messages"][0]
                .as_str()
                .unwrap()
                .contains("temporarily unavailable")
        );
    }
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status().as_u16(), 503);

    // Back: the service recovers on its own.
    proxy.restore();
    let recovered = eventually(Duration::from_secs(15), || async {
        let body = new_kci_for_recovery();
        app.post_kci(&body, "conv-outage").await.status().as_u16() == 204
    })
    .await;
    assert!(
        recovered,
        "the service accepts KCIs again once the database is back"
    );
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status().as_u16(), 200);

    // Every 204 is committed, with its state, history and outbox event.
    for body in &accepted {
        let id = body["id"].as_str().unwrap();
        assert_eq!(
            app.count(&format!("FROM kci WHERE kci_id = {}", app.uuid_sql(id)))
                .await,
            1,
            "acknowledged KCI {id} is stored"
        );
        assert_eq!(
            app.count(&format!(
                "FROM outbox_event o JOIN kci k ON k.id = o.kci_ref WHERE k.kci_id = {}",
                app.uuid_sql(id)
            ))
            .await,
            1
        );
    }
    assert_eq!(
        app.count("FROM kci").await,
        app.count("FROM state_transition").await
    );
    assert_eq!(
        app.count("FROM kci").await,
        app.count("FROM outbox_event").await
    );
}

fn new_kci_for_recovery() -> Value {
    kci("SERVICE_TEST", 55, 1, "SENT_TO_SUPPLIER", "UPDATE")
}
