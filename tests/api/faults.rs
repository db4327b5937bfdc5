//! Nothing hangs (design.md, "Bounded time"): dependencies that hang instead of refusing. A TCP
//! proxy freezes PostgreSQL or RabbitMQ (connections stay open, not a byte goes through, as with
//! a frozen host or a dropped route); the gateway still gets an answer within the deadline, the
//! relay holds no transaction while it waits, everything recovers when the dependency thaws, and
//! SIGTERM ends the process in bounded time.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::Value;

use crate::broker::TestBroker;
use crate::helpers::{
    Backend, ChildProcess, TcpProxy, TestDatabase, amqp_url, eventually, kci, spawn_on,
    test_settings,
};

/// `intake.deadline_ms` in these tests.
const DEADLINE: Duration = Duration::from_millis(1000);
/// What a busy test machine may add to a deadline.
const SLACK: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_database_gets_503_within_the_deadline_and_intake_recovers_when_it_thaws() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let proxy = TcpProxy::start(database.postgres_addr()).await;
    let mut settings = test_settings(&database.url_via_port(proxy.port));
    settings.intake.deadline_ms = DEADLINE.as_millis() as u64;
    let app = spawn_on(database, settings).await;

    let mut accepted: Vec<Value> = Vec::new();
    for gateway_id in 1..=5 {
        let body = kci("PROVIDE_ORDER", gateway_id, 1, "SENT_TO_SUPPLIER", "UPDATE");
        assert_eq!(
            app.post_kci(&body, "conv-freeze").await.status().as_u16(),
            204
        );
        accepted.push(body);
    }

    proxy.freeze();
    let in_flight: Vec<Value> = (10..18)
        .map(|gateway_id| kci("PROVIDE_ORDER", gateway_id, 1, "SENT_TO_SUPPLIER", "UPDATE"))
        .collect();
    let answers = join_all(in_flight.iter().map(|body| async {
        let started = Instant::now();
        // A build without a deadline would hang here: fail instead.
        let response =
            tokio::time::timeout(Duration::from_secs(10), app.post_kci(body, "conv-freeze"))
                .await
                .expect("an answer while the database is frozen");
        (
            response.status().as_u16(),
            response.headers().contains_key("retry-after"),
            started.elapsed(),
        )
    }))
    .await;
    for (body, (status, retry_after, took)) in in_flight.iter().zip(answers) {
        assert!(took < DEADLINE + SLACK, "answered after {took:?}");
        match status {
            204 => accepted.push(body.clone()),
            503 => assert!(retry_after, "503 carries Retry-After"),
            other => panic!("{other} while the database is frozen"),
        }
    }
    let started = Instant::now();
    let ready = tokio::time::timeout(Duration::from_secs(10), app.get("/readyz"))
        .await
        .expect("readiness answers while the database is frozen");
    assert_eq!(ready.status().as_u16(), 503);
    assert!(
        started.elapsed() < Duration::from_millis(1000) + SLACK / 3,
        "readiness answers within a second"
    );

    proxy.thaw();
    let recovered = eventually(Duration::from_secs(20), || async {
        let body = kci("SERVICE_TEST", 77, 1, "SENT_TO_SUPPLIER", "UPDATE");
        app.post_kci(&body, "conv-freeze").await.status().as_u16() == 204
    })
    .await;
    assert!(recovered, "intake recovers when the database thaws");
    for body in &accepted {
        let id = body["id"].as_str().unwrap();
        assert_eq!(
            app.count(&format!("FROM kci WHERE kci_id = {}", app.uuid_sql(id)))
                .await,
            1,
            "acknowledged KCI {id} is stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_broker_holds_no_transaction_and_the_relay_recovers_when_it_thaws() {
    let broker = TestBroker::new(true).await;
    let capture = broker.capture("kci.#").await;
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let database = TestDatabase::create(Backend::Postgres).await;
    let mut settings = test_settings(&database.url);
    broker.apply(&mut settings);
    settings.amqp.url = secrecy::SecretString::from(
        amqp_url().replace("127.0.0.1:5672", &format!("127.0.0.1:{}", proxy.port)),
    );
    settings.relay.confirm_timeout_ms = 1500;
    settings.amqp.connect_timeout_ms = 1500;
    let app = spawn_on(database, settings).await;

    let body = |gateway_id, sequence| {
        kci(
            "SERVICE_PROBLEM",
            gateway_id,
            sequence,
            "IN_PROGRESS",
            "UPDATE",
        )
    };
    for gateway_id in 1..=5 {
        assert_eq!(
            app.post_kci(&body(gateway_id, 1), "c")
                .await
                .status()
                .as_u16(),
            204
        );
    }
    assert_eq!(
        capture
            .wait_for_distinct(5, Duration::from_secs(15))
            .await
            .len(),
        5
    );

    proxy.freeze();
    for sequence in 2..=4 {
        for gateway_id in 1..=5 {
            let started = Instant::now();
            let posted = tokio::time::timeout(
                Duration::from_secs(10),
                app.post_kci(&body(gateway_id, sequence), "c"),
            )
            .await
            .expect("an answer while the broker is frozen");
            assert_eq!(posted.status().as_u16(), 204);
            assert!(
                started.elapsed() < DEADLINE,
                "intake does not wait on the broker"
            );
        }
    }
    // While the broker hangs, no transaction is held open waiting for it (a session sits "idle
    // in transaction" between the statements of any transaction, for a moment; not for long).
    for _ in 0..15 {
        let idle = app
            .count(
                "FROM pg_stat_activity WHERE datname = current_database() \
                 AND state LIKE 'idle in transaction%' \
                 AND now() - state_change > interval '500 milliseconds'",
            )
            .await;
        assert_eq!(idle, 0, "a transaction is held open while the broker hangs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");

    proxy.thaw();
    let messages = capture.wait_for_distinct(20, Duration::from_secs(30)).await;
    let distinct: std::collections::HashSet<_> =
        messages.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(
        distinct.len(),
        20,
        "every KCI is published once the broker thaws"
    );
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    let mut seen = std::collections::HashSet::new();
    for message in &messages {
        if !seen.insert(message.message_id.clone()) {
            continue;
        }
        let (entity, sequence) = message.entity_and_sequence();
        if let Some(previous) = last.insert(entity.clone(), sequence) {
            assert!(sequence > previous, "{entity}: {sequence} after {previous}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_process_in_bounded_time_while_database_and_broker_hang() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let database_proxy = TcpProxy::start(database.postgres_addr()).await;
    let broker_proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let broker = TestBroker::new(true).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = ChildProcess::spawn(
        crate::cli::kci_receiver()
            .args(["serve"])
            .env(
                "KCI__GATEWAY_AUTH__BASIC_PASSWORD",
                crate::helpers::GATEWAY_PASSWORD,
            )
            .env(
                "KCI__DATABASE__URL",
                database.url_via_port(database_proxy.port),
            )
            .env("KCI__SERVER__PORT", port.to_string())
            .env("KCI__SERVER__SHUTDOWN_TIMEOUT_SECONDS", "3")
            .env("KCI__INTAKE__DEADLINE_MS", DEADLINE.as_millis().to_string())
            .env(
                "KCI__AMQP__URL",
                amqp_url().replace(
                    "127.0.0.1:5672",
                    &format!("127.0.0.1:{}", broker_proxy.port),
                ),
            )
            .env("KCI__AMQP__EXCHANGE", &broker.amqp.exchange)
            .env(
                "KCI__AMQP__ALTERNATE_EXCHANGE",
                &broker.amqp.alternate_exchange,
            )
            .env("KCI__AMQP__UNROUTED_QUEUE", &broker.amqp.unrouted_queue)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let ready = eventually(Duration::from_secs(30), || async {
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(ready, "the service starts");
    let post = |gateway_id: u64| {
        let client = client.clone();
        let base = base.clone();
        async move {
            client
                .post(format!("{base}/kcis"))
                .basic_auth(
                    crate::helpers::GATEWAY_USER,
                    Some(crate::helpers::GATEWAY_PASSWORD),
                )
                .header("X-Request-ID", uuid::Uuid::new_v4().to_string())
                .header("X-Conversation-ID", "conv-sigterm")
                .json(&kci(
                    "PROVIDE_ORDER",
                    gateway_id,
                    1,
                    "SENT_TO_SUPPLIER",
                    "UPDATE",
                ))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    };
    assert_eq!(post(1).await.unwrap(), 204);

    database_proxy.freeze();
    broker_proxy.freeze();
    let in_flight = tokio::spawn(join_all((10..14).map(post)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    child.terminate();
    let exited = tokio::task::spawn_blocking(move || child.wait_for_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    let took = signalled.elapsed();
    assert!(
        exited.is_some(),
        "the process did not exit within 15 s of SIGTERM"
    );
    assert!(
        took < Duration::from_secs(3) + Duration::from_secs(3),
        "exit took {took:?}"
    );
    // Answered 503 at the deadline, or cut when the process ended; never left hanging.
    for status in in_flight.await.unwrap().into_iter().flatten() {
        assert_eq!(status, 503);
    }
    database_proxy.thaw();
    broker_proxy.thaw();
}

/// Registrations of original requests (recorded several per transaction) against a database
/// that hangs: each is answered 503 by the deadline, none waits behind another's hung
/// transaction, and registering works again once the database thaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_against_a_frozen_database_get_503_within_the_deadline() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let proxy = TcpProxy::start(database.postgres_addr()).await;
    let mut settings = test_settings(&database.url_via_port(proxy.port));
    settings.intake.deadline_ms = DEADLINE.as_millis() as u64;
    let app = spawn_on(database, settings).await;
    let registration = |n: usize| serde_json::json!({"conversationId": format!("conv-frozen-{n}"), "operation": "POST /service-orders"});
    assert_eq!(
        app.register_conversation(&registration(0))
            .await
            .status()
            .as_u16(),
        201
    );

    proxy.freeze();
    let app = &app;
    let answers = join_all((1..=12).map(|n| async move {
        let started = Instant::now();
        let response = tokio::time::timeout(
            Duration::from_secs(20),
            app.register_conversation(&registration(n)),
        )
        .await
        .expect("an answer while the database is frozen");
        (response.status().as_u16(), started.elapsed())
    }))
    .await;
    for (status, took) in answers {
        assert_eq!(status, 503, "while the database is frozen");
        // A registration may queue behind a batch or two that hung: a few deadlines, never
        // one per registration (12 here).
        assert!(took < DEADLINE * 3 + SLACK, "answered after {took:?}");
    }

    proxy.thaw();
    let recovered = eventually(Duration::from_secs(20), || async {
        app.register_conversation(&registration(99))
            .await
            .status()
            .is_success()
    })
    .await;
    assert!(recovered, "registering works again once the database thaws");
}
