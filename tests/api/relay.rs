//! Publishing the outbox to a real RabbitMQ: the AMQP contract to the letter, the alternate
//! exchange, broker outages, several relays, a relay killed mid-batch, dead events, replays.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::future::join_all;
use kci_receiver::config::Settings;
use kci_receiver::outbox::relay::{Relay, RelayHealth};
use kci_receiver::outbox::signal::OutboxSignal;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::broker::{Captured, TestBroker, assert_valid_by_asyncapi};
use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_USER, Backend, TcpProxy, TestApp, TestDatabase, eventually, fixture,
    fixture_names, kci, spawn_app_with, spawn_on, test_settings,
};

/// Every message's body, keyed by message id, keeping the first arrival.
fn first_arrivals(messages: &[Captured]) -> Vec<&Captured> {
    let mut seen = HashSet::new();
    messages
        .iter()
        .filter(|m| seen.insert(m.message_id.clone()))
        .collect()
}

/// Per entity, the first arrivals come in increasing sequence order.
fn assert_per_entity_order(messages: &[Captured]) {
    let mut last: HashMap<String, i64> = HashMap::new();
    for message in first_arrivals(messages) {
        let (entity, sequence) = message.entity_and_sequence();
        if let Some(previous) = last.get(&entity) {
            assert!(
                sequence > *previous,
                "{entity}: sequence {sequence} arrived after {previous}"
            );
        }
        last.insert(entity, sequence);
    }
}

fn duplicates(messages: &[Captured]) -> usize {
    messages.len() - first_arrivals(messages).len()
}

/// Event ids the database marks published.
async fn published_event_ids(app: &TestApp) -> HashSet<String> {
    app.rows("SELECT event_id FROM outbox_event WHERE status = 'PUBLISHED'")
        .await
        .iter()
        .map(|row| uuid_text(&row["event_id"]))
        .collect()
}

/// A uuid column as text (SQLite gives its 16 bytes as an array).
fn uuid_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(bytes) => {
            let bytes: Vec<u8> = bytes
                .iter()
                .map(|b| b.as_u64().unwrap_or(0) as u8)
                .collect();
            uuid::Uuid::from_slice(&bytes)
                .map(|u| u.to_string())
                .unwrap_or_default()
        }
        other => other.to_string(),
    }
}

fn expected_routing_key(body: &Value) -> String {
    let update_type = body["updateType"].as_str().unwrap();
    let reason = match update_type {
        "INFORMATIONAL" => &body["information"]["type"],
        "ACTION_REQUIRED" => &body["action"]["type"],
        _ => &body["error"]["code"],
    };
    format!(
        "kci.{}.{}.{}",
        body["entityType"].as_str().unwrap().to_lowercase(),
        update_type.to_lowercase(),
        reason.as_str().unwrap().to_lowercase()
    )
}

#[tokio::test]
async fn every_fixture_is_published_exactly_as_the_amqp_contract_says() {
    let broker = TestBroker::new(true).await;
    let capture = broker.capture("kci.#").await;
    let app = spawn_app_with(Backend::Sqlite, |settings| broker.apply(settings)).await;
    let registration = json!({
        "conversationId": "conv-ProvideServiceOrderUpdate-1",
        "requestId": "req-create-12345",
        "operation": "POST /service-orders",
        "requestBody": {"orderType": "NEW"},
        "gatewayId": 12345,
    });
    assert_eq!(
        app.register_conversation(&registration)
            .await
            .status()
            .as_u16(),
        201
    );

    let mut sent: HashMap<String, (Value, String, String)> = HashMap::new();
    for name in fixture_names() {
        let body = fixture(&name);
        // The provide order's KCIs all carry the conversation of the request that created it.
        let conversation = if name.starts_with("ProvideServiceOrder") {
            "conv-ProvideServiceOrderUpdate-1".to_owned()
        } else {
            format!("conv-{name}")
        };
        let request_id = format!("req-{name}");
        assert_eq!(
            app.post_kci_as(&body, &conversation, &request_id)
                .await
                .status()
                .as_u16(),
            204
        );
        sent.entry(body["id"].as_str().unwrap().to_owned())
            .or_insert((body, conversation, request_id));
    }

    let messages = capture.wait_for(sent.len(), Duration::from_secs(20)).await;
    assert_eq!(
        messages.len(),
        sent.len(),
        "one message per accepted KCI (19 distinct ids)"
    );
    for message in &messages {
        let kci_id = message.body["kci"]["id"].as_str().unwrap();
        let (body, conversation, request_id) = &sent[kci_id];
        assert_eq!(message.body["kci"], *body, "the KCI as received");
        assert_eq!(message.routing_key, expected_routing_key(body));
        assert_eq!(
            message.message_id.as_deref(),
            message.body["eventId"].as_str()
        );
        assert_eq!(
            message.correlation_id.as_deref(),
            Some(conversation.as_str())
        );
        assert_eq!(message.content_type.as_deref(), Some("application/json"));
        assert_eq!(message.delivery_mode, Some(2), "persistent");
        assert!(message.timestamp.is_some_and(|t| t > 1_700_000_000));
        assert_eq!(message.kind.as_deref(), body["entityType"].as_str());
        let headers = &message.headers;
        assert_eq!(headers["x-request-id"], request_id.as_str());
        assert_eq!(headers["supplier"], body["supplier"]);
        assert_eq!(
            headers["entity-id"],
            body["entity"]["id"].to_string().trim_matches('"')
        );
        assert_eq!(headers["sequence-number"], body["sequenceNumber"]);
        assert_eq!(headers["new-status"], message.body["entity"]["newStatus"]);
        assert_eq!(
            headers["previous-status"],
            message.body["entity"]["previousStatus"]
                .as_str()
                .unwrap_or("")
        );
        let correlation = &message.body["correlation"];
        assert_eq!(correlation["conversationId"], conversation.as_str());
        assert_eq!(correlation["requestId"], request_id.as_str());
        if body["entityType"] == "PROVIDE_ORDER" {
            assert_eq!(correlation["matched"], true);
            assert_eq!(
                correlation["originalRequest"]["requestId"],
                "req-create-12345"
            );
            assert_eq!(
                correlation["originalRequest"]["operation"],
                "POST /service-orders"
            );
        }
    }
    assert_per_entity_order(&messages);
    // Every message, headers and payload, is what docs/asyncapi.yaml's schemas say.
    assert_valid_by_asyncapi(&messages);
    let pending_or_dead = app
        .count("FROM outbox_event WHERE status <> 'PUBLISHED'")
        .await;
    assert_eq!(pending_or_dead, 0);
    assert_eq!(
        app.count("FROM outbox_event WHERE publish_count = 1").await,
        sent.len() as i64
    );
    // Each confirmed event's lag from commit to ack is in the histogram.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(&format!(
            "kci_receiver_outbox_publish_lag_seconds_count {}",
            sent.len()
        )),
        "{metrics}"
    );
    assert!(!metrics.contains("kci_receiver_relay_round_duration_seconds_count 0\n"));
}

#[tokio::test]
async fn a_message_no_binding_wants_lands_in_the_alternate_exchanges_queue() {
    let broker = TestBroker::new(true).await;
    let orders = broker.capture("kci.provide_order.#").await;
    let unrouted = broker.capture_unrouted().await;
    let app = spawn_app_with(Backend::Sqlite, |settings| broker.apply(settings)).await;
    assert_eq!(
        app.post_kci(&fixture("ProvideServiceOrderUpdate-2"), "c1")
            .await
            .status()
            .as_u16(),
        204
    );
    assert_eq!(
        app.post_kci(&fixture("ServiceTestUpdate-3"), "c2")
            .await
            .status()
            .as_u16(),
        204
    );
    let wanted = orders.wait_for(1, Duration::from_secs(10)).await;
    let kept = unrouted.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(wanted.len(), 1);
    assert_eq!(
        wanted[0].routing_key,
        "kci.provide_order.informational.committed"
    );
    assert_eq!(kept.len(), 1, "the unroutable message is kept, not dropped");
    assert_eq!(
        kept[0].routing_key,
        "kci.service_test.informational.completed"
    );
    // Recorded once confirmed: a consumer may get a message before the relay's record commits.
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.count("FROM outbox_event WHERE status = 'PUBLISHED'")
                .await
                == 2
        })
        .await,
        "both recorded as published"
    );
    // The relay's recording transactions are timed under their own writer (on SQLite: who held
    // the one writer's turn).
    let timed = crate::helpers::eventually(Duration::from_secs(5), || async {
        app.get("/metrics").await.text().await.unwrap().contains(
            r#"kci_receiver_write_transaction_seconds_count{phase="held",writer="relay"}"#,
        )
    })
    .await;
    assert!(timed, "the relay's write transactions in /metrics");
}

#[tokio::test]
async fn a_broker_down_at_start_up_or_cut_mid_run_stops_nothing_and_loses_nothing() {
    let broker = TestBroker::new(true).await;
    let capture = broker.capture("kci.#").await;
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    proxy.cut(); // the broker is unreachable when the service starts
    let database = TestDatabase::create(Backend::Postgres).await;
    let mut settings = test_settings(&database.url);
    broker.apply(&mut settings);
    settings.amqp.url =
        secrecy::SecretString::from(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port));
    let app = spawn_on(database, settings).await;

    let bodies: Vec<Value> = (1..=8)
        .flat_map(|sequence| {
            (0..10).map(move |entity| {
                kci(
                    "PROVIDE_ORDER",
                    300 + entity,
                    sequence,
                    "IN_PROGRESS",
                    "UPDATE",
                )
            })
        })
        .collect();
    // Intake goes on without the broker.
    for body in &bodies[..20] {
        assert_eq!(
            app.post_kci(body, "conv-broker").await.status().as_u16(),
            204
        );
    }
    let ready = app
        .get_json_until("/readyz", |ready| ready["outbox"]["pending"] == 20)
        .await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ready["broker"]["status"], "down");
    assert_eq!(ready["outbox"]["pending"], 20, "{ready}");
    assert!(capture.messages().is_empty());

    // The broker comes back; then goes away again while KCIs keep arriving.
    proxy.restore();
    for (index, body) in bodies[20..].iter().enumerate() {
        if index == 15 {
            proxy.cut();
        }
        if index == 40 {
            proxy.restore();
        }
        assert_eq!(
            app.post_kci(body, "conv-broker").await.status().as_u16(),
            204
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let messages = capture
        .wait_for_distinct(bodies.len(), Duration::from_secs(30))
        .await;
    let arrived: HashSet<String> = messages
        .iter()
        .filter_map(|m| m.message_id.clone())
        .collect();
    assert_eq!(arrived.len(), bodies.len(), "every accepted KCI arrived");
    let published = published_event_ids(&app).await;
    assert!(
        published.is_subset(&arrived),
        "nothing is marked published that the broker did not take"
    );
    assert_per_entity_order(&messages);
    // The relay commits its marks just after the broker's confirms.
    assert!(
        eventually(Duration::from_secs(10), || async {
            published_event_ids(&app).await.len() == bodies.len()
        })
        .await
    );
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["broker"]["status"], "up");
}

/// Starts a relay with a database pool of its own, as another process would have.
async fn start_relay(settings: &Settings, shutdown: &CancellationToken) -> RelayHealth {
    let db = kci_receiver::store::connect(&settings.database)
        .await
        .unwrap();
    let health = RelayHealth::default();
    let relay = Relay::new(
        db.into(),
        settings.amqp.clone(),
        settings.relay.clone(),
        OutboxSignal::default(),
        health.clone(),
    );
    tokio::spawn(relay.run(shutdown.child_token()));
    health
}

/// Posts `per_entity` KCIs for each of `entities` entities: entities in parallel, each entity's
/// KCIs in order. Like the gateway, it sends a KCI again after a 503 (the database pool may be
/// exhausted under this load; nothing was acknowledged then).
async fn post_lifecycles(app: &TestApp, first_gateway_id: u64, entities: u64, per_entity: i64) {
    join_all((0..entities).map(|entity| async move {
        for sequence in 1..=per_entity {
            let body = kci(
                "SERVICE_PROBLEM",
                first_gateway_id + entity,
                sequence,
                "IN_PROGRESS",
                "UPDATE",
            );
            let mut status = 0;
            for _ in 0..10 {
                status = app.post_kci(&body, "conv-many").await.status().as_u16();
                if status != 503 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert_eq!(status, 204);
        }
    }))
    .await;
}

#[tokio::test]
async fn two_relays_on_one_postgres_share_the_work_and_keep_per_entity_order() {
    let broker = TestBroker::new(true).await;
    let capture = broker.capture("kci.#").await;
    let database = TestDatabase::create(Backend::Postgres).await;
    let mut settings = test_settings(&database.url);
    broker.apply(&mut settings);
    settings.relay.enabled = false; // the two relays below do the publishing
    settings.relay.notify_other_processes = true; // and are woken by NOTIFY
    settings.relay.batch_size = 20;
    let app = spawn_on(database, settings.clone()).await;
    let shutdown = CancellationToken::new();
    let first = start_relay(&settings, &shutdown).await;
    let second = start_relay(&settings, &shutdown).await;

    post_lifecycles(&app, 5000, 50, 20).await;
    let messages = capture
        .wait_for_distinct(1000, Duration::from_secs(60))
        .await;
    // A relay counts an event once its outcome is committed, a moment after the consumer may
    // have it.
    eventually(Duration::from_secs(10), || async {
        first.published() + second.published() >= 1000
    })
    .await;
    shutdown.cancel();
    assert_eq!(first_arrivals(&messages).len(), 1000, "every event arrived");
    assert_per_entity_order(&messages);
    let duplicated = duplicates(&messages);
    println!(
        "two relays, 1000 events over 50 entities: {} + {} published, {duplicated} duplicates",
        first.published(),
        second.published()
    );
    assert!(
        first.published() > 0 && second.published() > 0,
        "both relays did part of the work"
    );
    assert_eq!(
        first.published() + second.published(),
        1000,
        "no event was published twice"
    );
    assert_eq!(duplicated, 0, "no duplicates in the normal case");
    assert_eq!(
        app.count("FROM outbox_event WHERE status = 'PUBLISHED'")
            .await,
        1000
    );
}

fn relay_process(settings: &Settings, database_url: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kci-receiver"))
        .arg("relay")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("KCI_ENVIRONMENT", "test-no-such-file")
        .env("KCI__GATEWAY_AUTH__BASIC_PASSWORD", "unused")
        .env("KCI__DATABASE__URL", database_url)
        .env("KCI__AMQP__URL", crate::helpers::amqp_url())
        .env("KCI__AMQP__EXCHANGE", &settings.amqp.exchange)
        .env(
            "KCI__AMQP__ALTERNATE_EXCHANGE",
            &settings.amqp.alternate_exchange,
        )
        .env("KCI__AMQP__UNROUTED_QUEUE", &settings.amqp.unrouted_queue)
        .env("KCI__RELAY__BATCH_SIZE", "10")
        .env("KCI__LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kci-receiver relay")
}

#[tokio::test]
async fn a_relay_killed_mid_batch_and_restarted_delivers_every_event_at_least_once() {
    let broker = TestBroker::new(true).await;
    let capture = broker.capture("kci.#").await;
    let database = TestDatabase::create(Backend::Postgres).await;
    let database_url = database.url.clone();
    let mut settings = test_settings(&database.url);
    broker.apply(&mut settings);
    settings.relay.enabled = false;
    settings.relay.notify_other_processes = true;
    let app = spawn_on(database, settings.clone()).await;
    post_lifecycles(&app, 7000, 30, 10).await;

    let mut relay = relay_process(&settings, &database_url);
    let started = capture.wait_for(25, Duration::from_secs(30)).await;
    relay.kill().expect("SIGKILL the relay");
    relay.wait().unwrap();
    let before_restart = first_arrivals(&capture.messages()).len();
    println!(
        "relay killed after {} of 300 events ({} seen when the kill was sent)",
        before_restart,
        started.len()
    );

    let mut relay = relay_process(&settings, &database_url);
    let messages = capture
        .wait_for_distinct(300, Duration::from_secs(60))
        .await;
    assert_eq!(
        first_arrivals(&messages).len(),
        300,
        "every event arrived at least once"
    );
    assert_per_entity_order(&messages);
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.count("FROM outbox_event WHERE status = 'PUBLISHED'")
                .await
                == 300
        })
        .await
    );

    // SIGTERM: the relay finishes its round and exits cleanly.
    let pid = relay.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = relay.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay stops within 15 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "graceful exit: {status}");
}

#[tokio::test]
async fn events_the_broker_refuses_become_dead_and_are_published_once_retried() {
    // No topology: the exchange does not exist, so the broker refuses every publish.
    let broker = TestBroker::new(false).await;
    let app = spawn_app_with(Backend::Sqlite, |settings| {
        broker.apply(settings);
        settings.amqp.declare_topology = false;
        settings.relay.max_attempts = 3;
    })
    .await;
    let first = kci("SERVICE_TEST", 801, 1, "SENT_TO_SUPPLIER", "UPDATE");
    let second = kci("SERVICE_TEST", 802, 1, "SENT_TO_SUPPLIER", "UPDATE");
    // Entity 801's next event: it waits behind 801's dead head, never attempted.
    let held = kci("SERVICE_TEST", 801, 2, "IN_PROGRESS", "UPDATE");
    for body in [&first, &second, &held] {
        assert_eq!(app.post_kci(body, "conv-dead").await.status().as_u16(), 204);
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            app.count("FROM outbox_event WHERE status = 'DEAD'").await == 2
        })
        .await,
        "both events die after 3 refusals"
    );
    let dead = app
        .rows("SELECT attempts, last_error FROM outbox_event WHERE status = 'DEAD'")
        .await;
    for row in &dead {
        assert_eq!(row["attempts"], 3);
        assert!(
            row["last_error"].as_str().unwrap().contains("NOT_FOUND")
                || row["last_error"].as_str().unwrap().contains("404"),
            "{row}"
        );
    }

    let listed: Value = app
        .client
        .get(format!("{}/api/v1/outbox/dead", app.address))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let first_event = items[0]["eventId"].as_str().unwrap().to_owned();

    // The operator fixes the broker, then retries one event, then all.
    broker.declare_topology().await;
    let capture = broker.capture("kci.#").await;
    let admin_post = |path: String| {
        app.client
            .post(format!("{}{path}", app.address))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .send()
    };
    assert_eq!(
        app.count("FROM outbox_event WHERE status = 'PENDING' AND attempts = 0")
            .await,
        1,
        "801's second event was held, never attempted"
    );
    let retried = admin_post(format!("/api/v1/outbox/dead/{first_event}/retry"))
        .await
        .unwrap();
    assert_eq!(retried.status().as_u16(), 200);
    // The retried head goes first, then the event that waited behind it: order kept.
    let one = capture.wait_for(2, Duration::from_secs(15)).await;
    assert_eq!(one.len(), 2);
    assert_eq!(one[0].message_id.as_deref(), Some(first_event.as_str()));
    assert_eq!(one[1].body["kci"]["id"], held["id"]);
    let again = admin_post(format!("/api/v1/outbox/dead/{first_event}/retry"))
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 404, "no longer dead");
    let all: Value = admin_post("/api/v1/outbox/dead/retry".to_owned())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["requeued"], 1);
    let all_three = capture.wait_for(3, Duration::from_secs(15)).await;
    assert_eq!(all_three.len(), 3);
    // Recorded once confirmed: a consumer may get a message before the relay's record commits.
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.count("FROM outbox_event WHERE status = 'PUBLISHED'")
                .await
                == 3
        })
        .await,
        "all three recorded as published"
    );
}

/// A connection that lets another session commit `between` right after the first statement it
/// answers: the worst moment for a reader that looks at the database twice.
struct Interleaved<'a> {
    db: &'a sea_orm::DatabaseConnection,
    between: std::sync::Mutex<Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>>>,
}

impl Interleaved<'_> {
    /// `answer`, then `between` if it has not run yet.
    async fn answered<T>(
        &self,
        answer: impl Future<Output = Result<T, sea_orm::DbErr>>,
    ) -> Result<T, sea_orm::DbErr> {
        let answer = answer.await;
        let between = self.between.lock().unwrap().take();
        if let Some(between) = between {
            between.await;
        }
        answer
    }
}

type Answer<'a, T> = std::pin::Pin<Box<dyn Future<Output = Result<T, sea_orm::DbErr>> + Send + 'a>>;

impl sea_orm::ConnectionTrait for Interleaved<'_> {
    fn get_database_backend(&self) -> sea_orm::DbBackend {
        self.db.get_database_backend()
    }

    fn execute_raw<'s, 'f>(
        &'s self,
        statement: sea_orm::Statement,
    ) -> Answer<'f, sea_orm::ExecResult>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(self.answered(self.db.execute_raw(statement)))
    }

    fn execute_unprepared<'s, 'q, 'f>(&'s self, sql: &'q str) -> Answer<'f, sea_orm::ExecResult>
    where
        's: 'f,
        'q: 'f,
        Self: 'f,
    {
        Box::pin(self.answered(self.db.execute_unprepared(sql)))
    }

    fn query_one_raw<'s, 'f>(
        &'s self,
        statement: sea_orm::Statement,
    ) -> Answer<'f, Option<sea_orm::QueryResult>>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(self.answered(self.db.query_one_raw(statement)))
    }

    fn query_all_raw<'s, 'f>(
        &'s self,
        statement: sea_orm::Statement,
    ) -> Answer<'f, Vec<sea_orm::QueryResult>>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(self.answered(self.db.query_all_raw(statement)))
    }
}

/// An operator retries an entity's dead event while the relay reads what is due: whenever the
/// retry commits, the event that waited behind the dead one is never due before it (per-entity
/// order). The relay once read its window of pending events and which entities a dead event
/// holds in two statements: a retry committed between them made the entity look free while its
/// retried event was not in the window, and the later event went first (seen once in CI).
#[tokio::test]
async fn a_retry_committed_while_the_relay_reads_never_lets_a_later_event_go_first() {
    use kci_receiver::outbox::store::{self, Selection};
    use sea_orm::ConnectionTrait;
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let app = spawn_app_with(backend, |settings| settings.relay.enabled = false).await;
        for sequence in [1, 2] {
            let body = kci("SERVICE_TEST", 901, sequence, "IN_PROGRESS", "UPDATE");
            assert_eq!(
                app.post_kci(&body, "conv-race").await.status().as_u16(),
                204
            );
        }
        let events = app
            .rows("SELECT id, event_id FROM outbox_event ORDER BY id")
            .await;
        let (head, later) = (
            events[0]["id"].as_i64().unwrap(),
            events[1]["id"].as_i64().unwrap(),
        );
        let head_event: uuid::Uuid = events[0]["event_id"].as_str().unwrap().parse().unwrap();
        app.db
            .execute_unprepared(&format!(
                "UPDATE outbox_event SET status = 'DEAD', attempts = 3 WHERE id = {head}"
            ))
            .await
            .unwrap();

        let connection = app.db.connection();
        let retry = async move {
            let retried = store::requeue(connection, &Selection::DeadEvent(head_event))
                .await
                .unwrap();
            assert_eq!(retried, 1);
        };
        let interleaved = Interleaved {
            db: connection,
            between: std::sync::Mutex::new(Some(Box::pin(retry))),
        };
        let due = store::due_events(
            &interleaved,
            chrono::Utc::now() + chrono::Duration::seconds(1),
            100,
            16,
            u64::MAX,
            &HashSet::new(),
        )
        .await
        .unwrap();
        let ids: Vec<i64> = due.iter().map(|event| event.id).collect();
        if let Some(later_at) = ids.iter().position(|id| *id == later) {
            let head_at = ids.iter().position(|id| *id == head);
            assert!(
                head_at.is_some_and(|head_at| head_at < later_at),
                "{backend:?}: the later event is due before its retried head: {ids:?} (head {head}, later {later})"
            );
        }
        // Once the retry is seen, the head goes first.
        let due = store::due_events(
            connection,
            chrono::Utc::now() + chrono::Duration::seconds(1),
            100,
            16,
            u64::MAX,
            &HashSet::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            due.iter().map(|event| event.id).collect::<Vec<_>>(),
            [head, later],
            "{backend:?}"
        );
    }
}

/// Several events of one entity go in one round (`relay.events_per_entity`), each only after the
/// broker confirmed the one before: when the broker refuses the second (nack), the third is not
/// sent at all; it waits, never attempted, behind the refused one, which dies after
/// `max_attempts`; once retried, the two go in order. The other entity is not held up.
#[tokio::test]
async fn a_refused_event_withholds_the_later_events_of_its_entity_in_the_same_round() {
    let broker = TestBroker::new(true).await;
    // Not kci.#: a nacked message still reaches the other queues it was routed to (RabbitMQ
    // nacks when any queue refused it), and this capture is to see what was accepted.
    let capture = broker.capture("kci.*.*.update").await;
    // Everything whose reason is REFUSE_ME is nacked.
    let refusing = broker.refusing_queue("kci.*.*.refuse_me").await;
    let database = TestDatabase::create(Backend::Postgres).await;
    let mut settings = test_settings(&database.url);
    broker.apply(&mut settings);
    settings.relay.enabled = false;
    settings.relay.max_attempts = 2;
    let app = spawn_on(database, settings.clone()).await;
    let story = [
        kci("SERVICE_TEST", 701, 1, "SENT_TO_SUPPLIER", "UPDATE"),
        kci("SERVICE_TEST", 701, 2, "IN_PROGRESS", "REFUSE_ME"),
        kci("SERVICE_TEST", 701, 3, "IN_PROGRESS", "UPDATE"),
        kci("SERVICE_TEST", 702, 1, "SENT_TO_SUPPLIER", "UPDATE"),
        kci("SERVICE_TEST", 702, 2, "IN_PROGRESS", "UPDATE"),
    ];
    for body in &story {
        assert_eq!(
            app.post_kci(body, "conv-chain").await.status().as_u16(),
            204
        );
    }
    // The relay starts with all five pending: one round takes them all.
    let shutdown = CancellationToken::new();
    let health = start_relay(&settings, &shutdown).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            app.count("FROM outbox_event WHERE status = 'DEAD'").await == 1
        })
        .await,
        "the refused event dies after 2 refusals"
    );
    let arrived: Vec<Value> = capture
        .wait_for(3, Duration::from_secs(10))
        .await
        .iter()
        .map(|m| m.body["kci"]["id"].clone())
        .collect();
    assert_eq!(
        arrived,
        [
            story[0]["id"].clone(),
            story[3]["id"].clone(),
            story[4]["id"].clone()
        ],
        "701's first event, and entity 702's two, in order"
    );
    let third = app
        .rows(&format!(
            "SELECT o.status, o.attempts FROM outbox_event o JOIN kci k ON k.id = o.kci_ref WHERE k.kci_id = {}",
            app.uuid_sql(story[2]["id"].as_str().unwrap())
        ))
        .await;
    assert_eq!(third[0]["status"], "PENDING");
    assert_eq!(
        third[0]["attempts"], 0,
        "never sent: withheld behind the refusal"
    );

    // The broker accepts it now; the operator retries: the refused event, then the third.
    broker.delete_queue(&refusing).await;
    let everything = broker.capture("kci.#").await;
    let retried = app
        .client
        .post(format!("{}/api/v1/outbox/dead/retry", app.address))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status().as_u16(), 200);
    let after: Vec<Value> = everything
        .wait_for(2, Duration::from_secs(15))
        .await
        .iter()
        .map(|m| m.body["kci"]["id"].clone())
        .collect();
    assert_eq!(
        after,
        [story[1]["id"].clone(), story[2]["id"].clone()],
        "in order"
    );
    assert!(health.published() >= 5);
    shutdown.cancel();
}

/// `relay.rounds_in_flight`: the next round is read, claimed and published while the one before
/// waits for its confirms. Here the broker hangs (its connection frozen) with a round in flight:
/// a second round, of other entities, is published too, and no third (the limit is two). Once
/// the broker answers, every event arrives once and in order per entity: no two rounds shared an
/// entity. Both stores (on PostgreSQL the rounds also hold their entities' advisory locks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_round_is_published_while_the_one_before_waits_for_its_confirms() {
    for backend in crate::helpers::BACKENDS {
        let broker = TestBroker::new(true).await;
        let capture = broker.capture("kci.#").await;
        let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
        let database = TestDatabase::create(backend).await;
        let mut settings = test_settings(&database.url);
        broker.apply(&mut settings);
        settings.amqp.url = secrecy::SecretString::from(
            crate::helpers::amqp_url()
                .replace("127.0.0.1:5672", &format!("127.0.0.1:{}", proxy.port)),
        );
        settings.relay.enabled = false;
        settings.relay.batch_size = 5;
        settings.relay.rounds_in_flight = 2;
        settings.relay.confirm_timeout_ms = 60_000;
        let app = spawn_on(database, settings.clone()).await;
        let shutdown = CancellationToken::new();
        let health = start_relay(&settings, &shutdown).await;
        let post = |gateway_id: u64, sequence: i64| {
            let body = kci(
                "SERVICE_PROBLEM",
                gateway_id,
                sequence,
                "IN_PROGRESS",
                "UPDATE",
            );
            let app = &app;
            async move {
                assert_eq!(
                    app.post_kci(&body, "conv-rounds").await.status().as_u16(),
                    204
                );
            }
        };
        for gateway_id in 1..=5 {
            post(gateway_id, 1).await;
        }
        assert_eq!(
            capture
                .wait_for_distinct(5, Duration::from_secs(15))
                .await
                .len(),
            5,
            "{backend:?}: the relay publishes"
        );

        proxy.freeze();
        for gateway_id in 1..=15 {
            for sequence in 1..=2 {
                post(
                    gateway_id,
                    if gateway_id <= 5 {
                        sequence + 1
                    } else {
                        sequence
                    },
                )
                .await;
            }
        }
        assert!(
            eventually(Duration::from_secs(10), || async {
                health.rounds_in_flight() == 2
            })
            .await,
            "{backend:?}: a second round while the first waits for its confirms"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(health.rounds_in_flight(), 2, "{backend:?}: no third");
        assert_eq!(
            app.count("FROM outbox_event WHERE status = 'PUBLISHED'")
                .await,
            5,
            "{backend:?}: nothing is recorded without its confirm"
        );

        proxy.thaw();
        let messages = capture.wait_for_distinct(35, Duration::from_secs(30)).await;
        assert_eq!(first_arrivals(&messages).len(), 35, "{backend:?}");
        assert_per_entity_order(&messages);
        assert_eq!(
            duplicates(&messages),
            0,
            "{backend:?}: no event published twice"
        );
        assert!(
            eventually(Duration::from_secs(10), || async {
                app.count("FROM outbox_event WHERE status = 'PUBLISHED'")
                    .await
                    == 35
            })
            .await,
            "{backend:?}: every event recorded as published"
        );
        assert_eq!(health.published(), 35, "{backend:?}");
        shutdown.cancel();
    }
}

#[tokio::test]
async fn replaying_an_entity_publishes_its_events_again_with_the_same_message_ids_in_order() {
    let broker = TestBroker::new(true).await;
    let capture = broker.capture("kci.#").await;
    let app = spawn_app_with(Backend::Postgres, |settings| broker.apply(settings)).await;
    for sequence in 1..=3 {
        let body = kci("MODIFY_ORDER", 901, sequence, "IN_PROGRESS", "UPDATE");
        assert_eq!(
            app.post_kci(&body, "conv-replay").await.status().as_u16(),
            204
        );
    }
    let other = kci("MODIFY_ORDER", 902, 1, "IN_PROGRESS", "UPDATE");
    assert_eq!(
        app.post_kci(&other, "conv-other").await.status().as_u16(),
        204
    );
    let first_round = capture.wait_for(4, Duration::from_secs(15)).await;
    assert_eq!(first_round.len(), 4);

    let replay = |body: Value| {
        app.client
            .post(format!("{}/api/v1/outbox/replay", app.address))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .json(&body)
            .send()
    };
    let answer: Value = replay(json!({"entityType": "MODIFY_ORDER", "gatewayId": "901"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["requeued"], 3);
    let messages = capture.wait_for(7, Duration::from_secs(15)).await;
    let ids = |messages: &[Captured]| -> Vec<Option<String>> {
        messages
            .iter()
            .filter(|m| m.body["entity"]["gatewayId"] == "901")
            .map(|m| m.message_id.clone())
            .collect()
    };
    assert_eq!(
        ids(&messages[4..]),
        ids(&first_round),
        "same message ids, same order"
    );
    assert_eq!(
        app.count("FROM outbox_event WHERE publish_count = 2").await,
        3
    );

    let by_conversation: Value = replay(json!({"conversationId": "conv-other"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(by_conversation["requeued"], 1);
    let everything = json!({"from": "2000-01-01T00:00:00Z", "to": "2999-01-01T00:00:00Z"});
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.count("FROM outbox_event WHERE status = 'PENDING'")
                .await
                == 0
        })
        .await
    );
    let by_time: Value = replay(everything).await.unwrap().json().await.unwrap();
    assert_eq!(by_time["requeued"], 4, "every event created in the range");
    let all = capture.wait_for(12, Duration::from_secs(15)).await;
    assert_eq!(all.len(), 12);
    let bad = replay(json!({"conversationId": "x", "entityType": "MODIFY_ORDER"}))
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 422);
}

/// Selection reads a window of pending events in id order: an entity's first pending event is
/// its head, followed by up to `events_per_entity - 1` of its next ones; later events of an
/// entity whose head waits for a retry are held back, and the other entities go ahead.
#[tokio::test]
async fn an_entity_waiting_for_a_retry_holds_back_its_later_events_only() {
    use kci_receiver::outbox::store::due_events;
    use sea_orm::ConnectionTrait;
    for backend in crate::helpers::BACKENDS {
        let app = crate::helpers::spawn_app(backend).await;
        for (gateway_id, sequence) in [(1, 1), (2, 1), (1, 2), (3, 1), (2, 2)] {
            let body = crate::helpers::kci(
                "SERVICE_TEST",
                gateway_id,
                sequence,
                "IN_PROGRESS",
                "TEST_STARTED",
            );
            assert_eq!(app.post_kci(&body, "conv").await.status().as_u16(), 204);
        }
        let events = app
            .rows("SELECT id, tracked_entity_id FROM outbox_event ORDER BY id")
            .await;
        let id = |n: usize| events[n]["id"].as_i64().unwrap();
        let entity = |n: usize| events[n]["tracked_entity_id"].as_i64().unwrap();
        let now = chrono::Utc::now();
        let due = |limit: u32, per_entity: u32, busy: &[i64]| {
            let busy: HashSet<i64> = busy.iter().copied().collect();
            let db = &app.db;
            async move {
                due_events(db, now, limit, per_entity, u64::MAX, &busy)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|event| event.id)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            due(10, 1, &[]).await,
            [id(0), id(1), id(3)],
            "{backend:?}: one head per entity, oldest first"
        );
        assert_eq!(due(2, 1, &[]).await, [id(0), id(1)]);
        assert_eq!(
            due(10, 8, &[]).await,
            [id(0), id(1), id(2), id(3), id(4)],
            "{backend:?}: heads with their followers, in id order"
        );
        assert_eq!(
            due(2, 8, &[]).await,
            [id(0), id(1), id(2), id(4)],
            "{backend:?}: two entities, each with its followers"
        );
        // The entities of rounds in flight are passed over, with all their events.
        assert_eq!(
            due(10, 8, &[entity(0)]).await,
            [id(1), id(3), id(4)],
            "{backend:?}: nothing of a busy entity"
        );
        assert_eq!(
            due(1, 8, &[entity(0), entity(1)]).await,
            [id(3)],
            "{backend:?}: the next entity that is not busy"
        );

        // Entity 1's head is refused and waits for its retry: its second event waits too.
        let later = (now + chrono::Duration::minutes(5)).to_rfc3339();
        app.db
            .execute_unprepared(&format!(
                "UPDATE outbox_event SET next_attempt_at = '{later}', attempts = 1 WHERE id = {}",
                id(0)
            ))
            .await
            .unwrap();
        assert_eq!(due(10, 1, &[]).await, [id(1), id(3)], "{backend:?}");
        assert_eq!(
            due(10, 8, &[]).await,
            [id(1), id(3), id(4)],
            "{backend:?}: nothing of entity 1 while its head waits"
        );
        // Published heads make room for the next event of their entity.
        app.db
            .execute_unprepared(&format!(
                "UPDATE outbox_event SET status = 'PUBLISHED' WHERE id IN ({}, {})",
                id(1),
                id(3)
            ))
            .await
            .unwrap();
        assert_eq!(due(10, 1, &[]).await, [id(4)], "{backend:?}");
    }
}

/// A round's events are read in chunks (the driver holds a chunk's rows, not a whole round's,
/// beside the models): what comes back is still exactly the pending ones among the ids asked
/// for, in id order, once each, across chunk boundaries and whatever order the ids come in.
#[tokio::test]
async fn a_rounds_events_are_read_in_id_order_across_chunks() {
    use futures_util::StreamExt;
    use kci_receiver::outbox::store::pending_by_id;
    use sea_orm::ConnectionTrait;
    for backend in crate::helpers::BACKENDS {
        let app = crate::helpers::spawn_app(backend).await;
        let app = &app;
        let statuses: Vec<u16> = futures_util::stream::iter(1..=600u64)
            .map(|gateway_id| async move {
                let body = kci("SERVICE_TEST", gateway_id, 1, "IN_PROGRESS", "TEST_STARTED");
                app.post_kci(&body, "conv-chunks").await.status().as_u16()
            })
            .buffer_unordered(32)
            .collect()
            .await;
        assert!(statuses.iter().all(|status| *status == 204), "{backend:?}");
        let ids: Vec<i64> = app
            .rows("SELECT id FROM outbox_event ORDER BY id")
            .await
            .iter()
            .map(|row| row["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids.len(), 600, "{backend:?}");
        // Every seventh event is published already; it must not come back.
        let published: Vec<i64> = ids.iter().copied().step_by(7).collect();
        app.db
            .execute_unprepared(&format!(
                "UPDATE outbox_event SET status = 'PUBLISHED' WHERE id IN ({})",
                published
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ))
            .await
            .unwrap();
        // Asked for in reverse, some twice, and one that does not exist.
        let mut asked: Vec<i64> = ids.iter().rev().copied().collect();
        asked.extend_from_slice(&ids[250..270]);
        asked.push(ids[599] + 1_000_000);
        let read: Vec<i64> = pending_by_id(&app.db, &asked)
            .await
            .unwrap()
            .into_iter()
            .map(|event| event.id)
            .collect();
        let expected: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !published.contains(id))
            .collect();
        assert_eq!(read, expected, "{backend:?}");
    }
}

/// design.md, "Per-entity order": a dead event holds its entity. Here the first event of entity
/// 901 cannot be made into an AMQP message (a routing key over 255 bytes, as an older version
/// could write): it is refused without being sent, dies after `max_attempts`, and the entity's
/// second event waits behind it, while other entities go on; the relay never restarts. An
/// operator skips it (recorded), and the second event goes.
#[tokio::test]
async fn a_dead_event_holds_its_entity_until_an_operator_skips_or_retries_it() {
    for backend in crate::helpers::BACKENDS {
        let broker = TestBroker::new(true).await;
        let capture = broker.capture("kci.#").await;
        let database = TestDatabase::create(backend).await;
        let mut settings = test_settings(&database.url);
        broker.apply(&mut settings);
        settings.relay.enabled = false;
        settings.relay.max_attempts = 2;
        let app = spawn_on(database, settings.clone()).await;
        let bodies = [
            kci("SERVICE_TEST", 901, 1, "SENT_TO_SUPPLIER", "UPDATE"),
            kci("SERVICE_TEST", 901, 2, "IN_PROGRESS", "UPDATE"),
            kci("SERVICE_TEST", 903, 1, "SENT_TO_SUPPLIER", "UPDATE"),
        ];
        for body in &bodies {
            assert_eq!(app.post_kci(body, "conv-hold").await.status().as_u16(), 204);
        }
        let first = app
            .rows("SELECT id, event_id FROM outbox_event ORDER BY id LIMIT 1")
            .await;
        let poison_id = first[0]["id"].as_i64().unwrap();
        let poison_event = uuid_text(&first[0]["event_id"]);
        use sea_orm::ConnectionTrait;
        app.db
            .execute_unprepared(&format!(
                "UPDATE outbox_event SET routing_key = 'kci.{}' WHERE id = {poison_id}",
                "x".repeat(300)
            ))
            .await
            .unwrap();

        let shutdown = CancellationToken::new();
        let health = start_relay(&settings, &shutdown).await;
        let others = capture.wait_for(1, Duration::from_secs(15)).await;
        assert_eq!(
            others.len(),
            1,
            "{backend:?}: the other entity is published"
        );
        assert_eq!(others[0].body["entity"]["gatewayId"], "903");
        assert!(
            eventually(Duration::from_secs(15), || async {
                app.count("FROM outbox_event WHERE status = 'DEAD'").await == 1
            })
            .await,
            "{backend:?}: the unencodable event dies"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            capture.messages().len(),
            1,
            "{backend:?}: entity 901's second event waits behind its dead head"
        );
        assert_eq!(health.restarts(), 0, "refused, not a panic");
        let last_error = app
            .rows(&format!(
                "SELECT last_error FROM outbox_event WHERE id = {poison_id}"
            ))
            .await;
        assert!(
            last_error[0]["last_error"]
                .as_str()
                .unwrap()
                .contains("routing key"),
            "{last_error:?}"
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
        assert_eq!(attention["heldEntities"]["total"], 1);
        assert_eq!(attention["heldEntities"]["items"][0]["gatewayId"], "901");

        // Skipped by an operator: recorded, and the held event goes.
        let skipped = app
            .client
            .post(format!(
                "{}/api/v1/outbox/dead/{poison_event}/skip",
                app.address
            ))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .json(&json!({"reason": "written by an old version; consumers told"}))
            .send()
            .await
            .unwrap();
        assert_eq!(skipped.status().as_u16(), 200);
        let released = capture.wait_for(2, Duration::from_secs(15)).await;
        assert_eq!(released.len(), 2, "{backend:?}");
        assert_eq!(released[1].body["entity"]["gatewayId"], "901");
        assert_eq!(released[1].body["sequence"]["sequenceNumber"], 2);
        let skip = app
            .rows(&format!(
                "SELECT status, last_error FROM outbox_event WHERE id = {poison_id}"
            ))
            .await;
        assert_eq!(skip[0]["status"], "SKIPPED");
        let note = skip[0]["last_error"].as_str().unwrap();
        assert!(
            note.contains("skipped by ops-admin") && note.contains("consumers told"),
            "{note}"
        );
        shutdown.cancel();
    }
}

/// W3C Trace Context: the gateway's `traceparent` goes on into the AMQP message, as intake's
/// child (same trace id and flags, intake's own span id); without one, or with a malformed one
/// (never refused), intake starts a trace of its own. With CloudEvents on, the attributes ride
/// along as `cloudEvents_*` headers.
#[tokio::test]
async fn the_gateways_trace_continues_into_the_amqp_message() {
    let broker = TestBroker::new(true).await;
    let capture = broker.capture("kci.#").await;
    let app = spawn_app_with(Backend::Sqlite, |settings| {
        broker.apply(settings);
        settings.amqp.cloudevents = true;
    })
    .await;
    let gateway_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let cases = [
        (91, Some(gateway_parent)),
        (92, None),
        (
            93,
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        ),
        (94, Some("not a traceparent")),
    ];
    for (id, traceparent) in cases {
        let mut request = app
            .client
            .post(format!("{}/kcis", app.address))
            .basic_auth(
                crate::helpers::GATEWAY_USER,
                Some(crate::helpers::GATEWAY_PASSWORD),
            )
            .header("X-Request-ID", format!("r-{id}"))
            .header("X-Conversation-ID", format!("c-{id}"))
            .json(&kci("SERVICE_TEST", id, 1, "SENT_TO_SUPPLIER", "UPDATE"));
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        assert_eq!(request.send().await.unwrap().status().as_u16(), 204);
    }
    let messages = capture.wait_for(cases.len(), Duration::from_secs(20)).await;
    let traceparent_of = |id: u64| -> String {
        let message = messages
            .iter()
            .find(|m| m.headers["entity-id"].as_str().and_then(|s| s.parse().ok()) == Some(id))
            .expect("published");
        message.headers["traceparent"].as_str().unwrap().to_owned()
    };
    for message in &messages {
        assert_eq!(message.headers["cloudEvents_specversion"], "1.0");
        assert_eq!(
            message.headers["cloudEvents_id"].as_str(),
            message.message_id.as_deref()
        );
        assert_eq!(
            message.headers["cloudEvents_traceparent"],
            message.headers["traceparent"]
        );
        assert_eq!(
            message.headers["cloudEvents_type"],
            format!("com.fibrecafe.{}", message.routing_key)
        );
    }
    assert_valid_by_asyncapi(&messages);
    let continued = traceparent_of(91);
    let parts: Vec<&str> = continued.split('-').collect();
    assert_eq!(parts[0], "00");
    assert_eq!(
        parts[1], "4bf92f3577b34da6a3ce929d0e0e4736",
        "the gateway's trace"
    );
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "intake's own span, the parent's child"
    );
    assert_eq!(parts[3], "00", "the gateway's flags");
    let mut fresh_traces = HashSet::new();
    for id in [92, 93, 94] {
        let fresh = traceparent_of(id);
        let context = kci_receiver::trace_context::TraceContext::parse(&fresh)
            .unwrap_or_else(|| panic!("a valid traceparent: {fresh}"));
        assert_ne!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        fresh_traces.insert(context.trace_id_hex());
    }
    assert_eq!(fresh_traces.len(), 3, "a new trace each");
}
