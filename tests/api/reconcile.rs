//! Gap repair (issue 14): KCIs the gateway never delivered are recovered from the Tenant API's
//! `GET` of their entity (`updates[]`), recorded through intake's rules and published as
//! recovered; late deliveries within the grace period are left alone; every way the gateway can
//! fail is recorded, backed off, and never blocks intake.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use kci_receiver::config::Settings;
use kci_tools::simulator::tenant_api::SimulatedTenantApi;
use kci_tools::simulator::{Options, run};
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::broker::{TestBroker, assert_valid_by_asyncapi};
use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_USER, BACKENDS, Backend, GATEWAY_PASSWORD, READ_PASSWORD, READ_USER,
    TestApp, enable_egress, eventually, kci, spawn_app_with,
};

/// Reconciliation on, fast: gaps after `grace`, the scheduler every second, no rate to speak of.
fn reconcile_quickly(settings: &mut Settings, base_url: &str, grace_seconds: u64) {
    enable_egress(
        settings,
        format!("{base_url}/v1"),
        format!("{base_url}/token"),
        ("tenant-client", "tenant-secret"),
    );
    let reconcile = &mut settings.reconcile;
    reconcile.enabled = true;
    reconcile.gap_grace_seconds = grace_seconds;
    reconcile.poll_interval_seconds = 1;
    reconcile.max_per_minute = 6000;
    // Not in these tests: a silent entity is reconciled only when a test asks.
    reconcile.stuck_after_seconds = 86_400;
}

async fn post_reconcile(app: &TestApp, path: &str, user: (&str, &str)) -> reqwest::Response {
    post_reconcile_at(&app.address, path, user).await
}

async fn post_reconcile_at(address: &str, path: &str, user: (&str, &str)) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{address}/api/v1/{path}/reconcile"))
        .basic_auth(user.0, Some(user.1))
        .send()
        .await
        .expect("POST reconcile")
}

fn resource_of(entity_type: &str) -> &'static str {
    match entity_type {
        "PROVIDE_ETHERNET_ORDER" => "ethernet/service-orders",
        "SERVICE_TEST" => "service-tests",
        "SERVICE_PROBLEM" => "service-problems",
        _ => "service-orders",
    }
}

/// The simulated gateway loses a quarter of its deliveries. Gaps are reconciled on their own
/// after the grace period; KCIs lost at the end of a story (no later KCI shows the gap) are
/// reconciled on demand. Every dropped KCI is then recorded exactly once, in sequence order
/// among the recovered ones of its entity, marked RECONCILIATION in the history, and published
/// with the recovered flag and header; a second reconciliation changes nothing.
#[tokio::test]
async fn dropped_kcis_are_recovered_in_order_once_and_published_as_recovered() {
    for backend in BACKENDS {
        dropped_kcis_are_recovered_on(backend).await;
    }
}

async fn dropped_kcis_are_recovered_on(backend: Backend) {
    let gateway = SimulatedTenantApi::start("127.0.0.1:0").unwrap();
    let broker = TestBroker::new(true).await;
    let capture = broker.capture("kci.#").await;
    let app = spawn_app_with(backend, |settings| {
        broker.apply(settings);
        reconcile_quickly(settings, &gateway.base_url, 1);
    })
    .await;
    let report = run(Options {
        base_url: app.address.clone(),
        gateway_password: GATEWAY_PASSWORD.to_owned(),
        orders: 12,
        ethernet_orders: 2,
        unsolicited_ceases: 2,
        tests: 6,
        problems: 6,
        concurrency: 4,
        seed: 14,
        redelivery_chance: 0.0,
        out_of_order_chance: 0.0,
        gap_chance: 0.0,
        drop_rate: 0.25,
        gateway_record: Some(gateway.record.clone()),
        ..Options::default()
    })
    .await
    .unwrap();
    assert!(report.dropped.len() >= 8, "{}", report.summary());

    // Gaps: recovered by the scheduler, no request needed.
    assert!(
        eventually(Duration::from_secs(30), || async {
            app.count("FROM tracked_entity WHERE gap_open_since IS NOT NULL")
                .await
                == 0
        })
        .await,
        "every gap was reconciled"
    );
    // Lost at the end of a story: no gap shows; an operator (or the stuck timer) asks.
    for dropped in &report.dropped {
        let recorded = app
            .count(&format!(
                "FROM kci WHERE kci_id = {}",
                app.uuid_sql(&dropped.kci_id)
            ))
            .await;
        if recorded == 0 {
            let path = format!(
                "{}/{}",
                resource_of(&dropped.entity_type),
                dropped.gateway_id
            );
            let answer = post_reconcile(&app, &path, (ADMIN_USER, ADMIN_PASSWORD)).await;
            assert_eq!(answer.status().as_u16(), 200, "{path}");
        }
    }

    let mut recovered_by_entity: HashMap<i64, Vec<(i64, i64)>> = HashMap::new();
    for dropped in &report.dropped {
        let rows = app
            .rows(&format!(
                "SELECT k.id, k.tracked_entity_id, k.sequence_number, t.source, o.payload, o.headers \
                 FROM kci k JOIN state_transition t ON t.kci_ref = k.id JOIN outbox_event o ON o.kci_ref = k.id \
                 WHERE k.kci_id = {}",
                app.uuid_sql(&dropped.kci_id)
            ))
            .await;
        assert_eq!(rows.len(), 1, "{} recorded exactly once", dropped.kci_id);
        let row = &rows[0];
        assert_eq!(row["source"], "RECONCILIATION", "{row}");
        let payload: Value =
            serde_json::from_str(row["payload"].as_str().unwrap()).expect("payload");
        assert_eq!(payload["recovered"], true);
        assert_eq!(payload["source"], "RECONCILIATION");
        let headers: Value = match &row["headers"] {
            Value::String(text) => serde_json::from_str(text).unwrap(),
            other => other.clone(),
        };
        assert_eq!(headers["x-recovered"], true, "{headers}");
        recovered_by_entity
            .entry(row["tracked_entity_id"].as_i64().unwrap())
            .or_default()
            .push((
                row["id"].as_i64().unwrap(),
                row["sequence_number"].as_i64().unwrap(),
            ));
    }
    for (entity, mut recovered) in recovered_by_entity {
        recovered.sort();
        let sequence: Vec<i64> = recovered.iter().map(|(_, number)| *number).collect();
        assert!(
            sequence.windows(2).all(|w| w[0] < w[1]),
            "entity {entity}: recovered in sequence order, got {sequence:?}"
        );
    }
    assert_eq!(
        app.count("FROM state_transition WHERE source = 'RECONCILIATION'")
            .await,
        report.dropped.len() as i64,
        "only the dropped KCIs were recovered"
    );

    // Published with the flag and the header, each once.
    let published = capture
        .wait_for_distinct(
            report.posted as usize + report.dropped.len(),
            Duration::from_secs(30),
        )
        .await;
    let recovered: Vec<_> = published
        .iter()
        .filter(|m| m.body["recovered"] == true)
        .collect();
    assert_eq!(recovered.len(), report.dropped.len());
    assert!(
        recovered
            .iter()
            .all(|m| m.headers["x-recovered"] == true
                && m.headers["x-kci-source"] == "RECONCILIATION")
    );
    // Delivered and recovered messages alike are what docs/asyncapi.yaml's schemas say.
    assert_valid_by_asyncapi(&published);

    // Idempotent: a second reconciliation of an entity finds it in sync and records nothing.
    let kcis_before = app.count("FROM kci").await;
    let events_before = app.count("FROM outbox_event").await;
    let dropped = &report.dropped[0];
    let path = format!(
        "{}/{}",
        resource_of(&dropped.entity_type),
        dropped.gateway_id
    );
    let again: Value = post_reconcile(&app, &path, (ADMIN_USER, ADMIN_PASSWORD))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["outcome"], "IN_SYNC", "{again}");
    assert_eq!(again["recovered"], 0);
    assert_eq!(app.count("FROM kci").await, kcis_before);
    assert_eq!(app.count("FROM outbox_event").await, events_before);

    // Visible: attention, the entity's detail, metrics.
    let attention = app.ops_json("/api/v1/attention").await;
    assert_eq!(attention["openGaps"]["total"], 0, "{attention}");
    assert!(attention["reconciliations"]["total"].as_u64().unwrap() >= 1);
    assert!(
        attention["reconciliations"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["outcome"] == "RECOVERED"),
        "{}",
        attention["reconciliations"]
    );
    let detail = app.ops_json(&format!("/api/v1/{path}")).await;
    let outcomes: Vec<&str> = detail["reconciliations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes[0], "IN_SYNC", "{outcomes:?}");
    assert!(outcomes.contains(&"RECOVERED"), "{outcomes:?}");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(&format!(
            "kci_receiver_recovered_kcis_total {}",
            report.dropped.len()
        )),
        "{metrics}"
    );
    assert!(metrics.contains("kci_receiver_reconciliations_total{outcome=\"RECOVERED\"}"));

    // A late delivery of a recovered KCI is a plain redelivery (the gateway's bookkeeping in
    // updates[] does not make it an anomaly).
    let late = gateway
        .record
        .entity(
            resource_of(&dropped.entity_type),
            &dropped.gateway_id.to_string(),
        )
        .unwrap()["updates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == dropped.kci_id.as_str())
        .unwrap()
        .clone();
    let mut delivered = late.clone();
    delivered.as_object_mut().unwrap().remove("deliveryStatus");
    assert_eq!(
        app.post_kci(&delivered, "late").await.status().as_u16(),
        204
    );
    let row = app
        .rows(&format!(
            "SELECT redelivery_count, anomaly_count FROM kci WHERE kci_id = {}",
            app.uuid_sql(&dropped.kci_id)
        ))
        .await;
    assert_eq!(row[0]["redelivery_count"], 1);
    assert_eq!(row[0]["anomaly_count"], 0);
}

/// The KCI after a gap arrives first, the missing one a moment later: within
/// `reconcile.gap_grace_seconds` nothing asks the gateway, and the gap closes by itself.
#[tokio::test]
async fn a_gap_filled_by_a_late_delivery_within_the_grace_period_is_not_reconciled() {
    let gateway = SimulatedTenantApi::start("127.0.0.1:0").unwrap();
    let app = spawn_app_with(Backend::Sqlite, |settings| {
        reconcile_quickly(settings, &gateway.base_url, 4);
    })
    .await;
    let first = kci("SERVICE_TEST", 501, 1, "SENT_TO_SUPPLIER", "UPDATE");
    let second = kci("SERVICE_TEST", 501, 2, "IN_PROGRESS", "UPDATE");
    let third = kci("SERVICE_TEST", 501, 3, "IN_PROGRESS", "UPDATE");
    for body in [&first, &second, &third] {
        gateway.record.record(body);
    }
    for body in [&first, &third] {
        assert_eq!(app.post_kci(body, "c-501").await.status().as_u16(), 204);
    }
    let entity = app.entity("SERVICE_TEST", "501").await;
    assert_eq!(entity.missing_sequences.as_deref(), Some("2"));
    assert!(entity.gap_open_since.is_some());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.post_kci(&second, "c-501").await.status().as_u16(), 204);
    let entity = app.entity("SERVICE_TEST", "501").await;
    assert_eq!(
        entity.missing_sequences, None,
        "the late KCI filled the gap"
    );
    assert_eq!(entity.gap_open_since, None);
    // Past the grace period and several scheduler rounds: the gateway was never asked.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(gateway.entity_gets(), 0);
    assert_eq!(app.count("FROM reconciliation").await, 0);

    // The contrast: a gap nobody fills is reconciled once the grace period is over.
    let lone = kci("SERVICE_TEST", 502, 1, "SENT_TO_SUPPLIER", "UPDATE");
    let lost = kci("SERVICE_TEST", 502, 2, "IN_PROGRESS", "UPDATE");
    let last = kci("SERVICE_TEST", 502, 3, "IN_PROGRESS", "UPDATE");
    for body in [&lone, &lost, &last] {
        gateway.record.record(body);
    }
    for body in [&lone, &last] {
        assert_eq!(app.post_kci(body, "c-502").await.status().as_u16(), 204);
    }
    // Grace (4 s) plus a scheduler round or two; generous for a loaded machine.
    assert!(
        eventually(Duration::from_secs(30), || async {
            app.count("FROM reconciliation WHERE outcome = 'RECOVERED'")
                .await
                == 1
        })
        .await,
        "the unfilled gap was reconciled"
    );
    assert_eq!(gateway.entity_gets(), 1);
    let history = app
        .history(app.entity("SERVICE_TEST", "502").await.id)
        .await;
    let recovered: Vec<(i64, bool)> = history
        .iter()
        .filter(|t| t.source == entity::state_transition::KciSource::Reconciliation)
        .map(|t| (t.sequence_number, t.flag_stale))
        .collect();
    // Recorded exactly as a late delivery would be: older than the applied 3, so stale.
    assert_eq!(recovered, [(2, true)]);
}

/// One scripted answer of the fake Tenant API.
#[derive(Clone)]
enum Scripted {
    Answer {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Answers only after this long (longer than the egress timeout: a hung gateway).
    Hang(Duration),
}

#[derive(Default)]
struct Script {
    answers: VecDeque<Scripted>,
    entity_gets: usize,
    tokens: usize,
}

/// A Tenant API whose entity GETs answer what the test scripted, in turn (then 500).
#[derive(Clone)]
struct ScriptedGateway {
    base_url: String,
    script: Arc<Mutex<Script>>,
}

impl ScriptedGateway {
    async fn start() -> ScriptedGateway {
        let script = Arc::new(Mutex::new(Script::default()));
        let shared = web::Data::new(script.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .route(
                    "/token",
                    web::post().to(|script: web::Data<Arc<Mutex<Script>>>| async move {
                        script.lock().unwrap().tokens += 1;
                        HttpResponse::Ok().json(json!({"access_token": "t", "expires_in": 3600}))
                    }),
                )
                .default_service(web::to(scripted))
        })
        .workers(2)
        .bind("127.0.0.1:0")
        .unwrap();
        let base_url = format!("http://{}", server.addrs()[0]);
        tokio::spawn(server.run());
        ScriptedGateway { base_url, script }
    }

    fn push(&self, answer: Scripted) {
        self.script.lock().unwrap().answers.push_back(answer);
    }

    fn answer(&self, status: u16, body: &str) {
        self.push(Scripted::Answer {
            status,
            headers: Vec::new(),
            body: body.to_owned(),
        });
    }

    fn entity_gets(&self) -> usize {
        self.script.lock().unwrap().entity_gets
    }

    fn tokens(&self) -> usize {
        self.script.lock().unwrap().tokens
    }
}

async fn scripted(_request: HttpRequest, script: web::Data<Arc<Mutex<Script>>>) -> HttpResponse {
    let next = {
        let mut script = script.lock().unwrap();
        script.entity_gets += 1;
        script.answers.pop_front()
    };
    match next {
        Some(Scripted::Answer {
            status,
            headers,
            body,
        }) => {
            let mut response =
                HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap());
            for (name, value) in headers {
                response.insert_header((name, value));
            }
            response.content_type("application/json").body(body)
        }
        Some(Scripted::Hang(duration)) => {
            tokio::time::sleep(duration).await;
            HttpResponse::Ok().json(json!({"updates": []}))
        }
        None => HttpResponse::InternalServerError().body("nothing scripted"),
    }
}

/// On demand only (the scheduler off), egress timeout short.
async fn app_against(gateway: &ScriptedGateway, backend: Backend) -> TestApp {
    spawn_app_with(backend, |settings| {
        reconcile_quickly(settings, &gateway.base_url, 1);
        settings.reconcile.enabled = false;
        settings.egress.timeout_ms = 1_000;
    })
    .await
}

async fn reconcile_test_entity(app: &TestApp, id: u64) -> Value {
    let answer = post_reconcile(
        app,
        &format!("service-tests/{id}"),
        (ADMIN_USER, ADMIN_PASSWORD),
    )
    .await;
    assert_eq!(answer.status().as_u16(), 200);
    answer.json().await.unwrap()
}

/// Every way the gateway can fail: recorded with what it answered, backed off (at least as long
/// as its `Retry-After`), flagged where a person must look, and intake goes on meanwhile.
#[tokio::test]
async fn every_gateway_failure_is_recorded_backed_off_and_never_blocks_intake() {
    let gateway = ScriptedGateway::start().await;
    let app = app_against(&gateway, Backend::Postgres).await;
    let first = kci("SERVICE_TEST", 601, 1, "SENT_TO_SUPPLIER", "UPDATE");
    let third = kci("SERVICE_TEST", 601, 3, "IN_PROGRESS", "UPDATE");
    for body in [&first, &third] {
        assert_eq!(app.post_kci(body, "c-601").await.status().as_u16(), 204);
    }

    // 503 with Retry-After: failed, the gateway's body kept, next try not before it.
    gateway.push(Scripted::Answer {
        status: 503,
        headers: vec![("Retry-After", "900".to_owned())],
        body: r#"{"uuid":"u","code":"GATEWAY_FAULT","messages":["down for maintenance"]}"#
            .to_owned(),
    });
    let failed = reconcile_test_entity(&app, 601).await;
    assert_eq!(failed["outcome"], "FAILED", "{failed}");
    assert_eq!(failed["gatewayStatus"], 503);
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("down for maintenance")
    );
    let entity = app.entity("SERVICE_TEST", "601").await;
    assert_eq!(entity.reconcile_attempts, 1);
    let wait = entity.reconcile_next_at.unwrap() - chrono::Utc::now();
    assert!(wait.num_seconds() >= 890, "{wait}");
    assert_eq!(
        entity.missing_sequences.as_deref(),
        Some("2"),
        "the gap stays open"
    );

    // 429: the same, and the back-off grows without Retry-After too.
    gateway.answer(429, r#"{"code":"TOO_MANY"}"#);
    assert_eq!(reconcile_test_entity(&app, 601).await["gatewayStatus"], 429);
    assert_eq!(
        app.entity("SERVICE_TEST", "601").await.reconcile_attempts,
        2
    );

    // A hung gateway: a timeout, while intake answers as usual.
    gateway.push(Scripted::Hang(Duration::from_secs(5)));
    let hung = {
        let app_address = app.address.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{app_address}/api/v1/service-tests/601/reconcile"))
                .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let other = kci("SERVICE_TEST", 602, 1, "SENT_TO_SUPPLIER", "UPDATE");
    assert_eq!(app.post_kci(&other, "c-602").await.status().as_u16(), 204);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "intake did not wait"
    );
    let hung = hung.await.unwrap();
    assert_eq!(hung["outcome"], "FAILED");
    assert!(
        hung["detail"].as_str().unwrap().contains("did not answer"),
        "{hung}"
    );

    // Malformed: not an entity with updates[].
    gateway.answer(200, "<html>maintenance</html>");
    let malformed = reconcile_test_entity(&app, 601).await;
    assert_eq!(malformed["outcome"], "FAILED");
    assert!(
        malformed["detail"].as_str().unwrap().contains("malformed"),
        "{malformed}"
    );

    // 401 twice: the token is renewed once, then the failure is recorded.
    let tokens = gateway.tokens();
    gateway.answer(401, r#"{"code":"NOT_AUTHORISED"}"#);
    gateway.answer(401, r#"{"code":"NOT_AUTHORISED"}"#);
    let refused = reconcile_test_entity(&app, 601).await;
    assert_eq!(refused["gatewayStatus"], 401);
    assert_eq!(gateway.tokens(), tokens + 1, "renewed once");

    // 404: the gateway does not know it; flagged for a person.
    gateway.answer(404, r#"{"code":"NOT_FOUND","messages":["No such test"]}"#);
    let unknown = reconcile_test_entity(&app, 601).await;
    assert_eq!(unknown["outcome"], "NOT_FOUND");
    let entity = app.entity("SERVICE_TEST", "601").await;
    assert_eq!(entity.reconcile_status.as_deref(), Some("NOT_FOUND"));

    // Finally an answer: the missing KCI and one update that is not a KCI. The KCI is
    // recovered, the other kept raw, the entity flagged; the states agree otherwise.
    let mut second = kci("SERVICE_TEST", 601, 2, "IN_PROGRESS", "UPDATE");
    second["deliveryStatus"] = json!("PENDING");
    let answer = format!(
        r#"{{"id": 601, "status": "IN_PROGRESS", "updates": [{first}, {second}, {third}, {{"note": "not a KCI"}}]}}"#
    );
    gateway.answer(200, &answer);
    let repaired = reconcile_test_entity(&app, 601).await;
    assert_eq!(repaired["outcome"], "DIFFERS", "{repaired}");
    assert_eq!(repaired["recovered"], 1);
    assert_eq!(repaired["unusable"], 1);
    let unusable: Value =
        serde_json::from_str(repaired["unusableUpdates"].as_str().unwrap()).unwrap();
    assert_eq!(unusable[0]["index"], 3);
    assert_eq!(unusable[0]["raw"], r#"{"note": "not a KCI"}"#);
    let entity = app.entity("SERVICE_TEST", "601").await;
    assert!(entity.flag_anomaly);
    assert_eq!(entity.missing_sequences, None);
    assert_eq!(entity.reconcile_attempts, 0);
    assert_eq!(entity.reconcile_next_at, None);
    let raw = app
        .rows(&format!(
            "SELECT raw_body FROM kci WHERE kci_id = {}",
            app.uuid_sql(second["id"].as_str().unwrap())
        ))
        .await;
    assert!(
        raw[0]["raw_body"]
            .as_str()
            .unwrap()
            .contains("deliveryStatus"),
        "raw kept"
    );

    // The gateway's status differs and nothing is missing: flagged, not overwritten.
    let answer =
        format!(r#"{{"id": 601, "status": "COMPLETED", "updates": [{first}, {second}, {third}]}}"#);
    gateway.answer(200, &answer);
    let differs = reconcile_test_entity(&app, 601).await;
    assert_eq!(differs["outcome"], "DIFFERS");
    assert!(differs["detail"].as_str().unwrap().contains("COMPLETED"));
    assert_eq!(
        app.entity("SERVICE_TEST", "601").await.status,
        "IN_PROGRESS"
    );

    // Unreachable: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let unreachable = spawn_app_with(Backend::Sqlite, |settings| {
        reconcile_quickly(settings, &closed_url, 1);
        settings.reconcile.enabled = false;
    })
    .await;
    let failed = reconcile_test_entity(&unreachable, 601).await;
    assert_eq!(failed["outcome"], "FAILED");
    assert!(
        failed["detail"].as_str().unwrap().contains("token"),
        "{failed}"
    );

    // Who may ask: admin only; and without egress there is nothing to ask with.
    let read = post_reconcile(&app, "service-tests/601", (READ_USER, READ_PASSWORD)).await;
    assert_eq!(read.status().as_u16(), 403);
    let plain = crate::helpers::spawn_app(Backend::Sqlite).await;
    let off = post_reconcile(&plain, "service-tests/601", (ADMIN_USER, ADMIN_PASSWORD)).await;
    assert_eq!(off.status().as_u16(), 409);
}

/// Two instances on one PostgreSQL database asked to reconcile the same entity at once: one
/// asks the gateway, the other is told it is under way; a lease left by a dead instance is
/// taken over once it has run out.
#[tokio::test]
async fn one_instance_at_a_time_reconciles_an_entity() {
    let gateway = ScriptedGateway::start().await;
    let first = app_against(&gateway, Backend::Postgres).await;
    let mut settings = crate::helpers::test_settings(first.database_url());
    reconcile_quickly(&mut settings, &gateway.base_url, 1);
    settings.reconcile.enabled = false;
    settings.egress.timeout_ms = 5_000;
    let second = crate::helpers::spawn_second(settings).await;
    assert_eq!(
        first
            .post_kci(
                &kci("SERVICE_TEST", 701, 2, "IN_PROGRESS", "UPDATE"),
                "c-701"
            )
            .await
            .status()
            .as_u16(),
        204
    );
    gateway.push(Scripted::Hang(Duration::from_millis(1500)));
    let (a, b) = tokio::join!(
        post_reconcile(&first, "service-tests/701", (ADMIN_USER, ADMIN_PASSWORD)),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            post_reconcile_at(&second, "service-tests/701", (ADMIN_USER, ADMIN_PASSWORD)).await
        }
    );
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 409]);
    assert_eq!(gateway.entity_gets(), 1);

    // A lease whose instance died: taken over once past `lease_until`.
    first
        .db
        .execute_unprepared(
            "INSERT INTO reconciliation (resource, gateway_id, trigger, outcome, recovered, unusable, started_at, lease_until) \
             VALUES ('service-tests', '701', 'GAP', 'RUNNING', 0, 0, now() - interval '10 minutes', now() - interval '1 minute')",
        )
        .await
        .unwrap();
    gateway.answer(200, r#"{"updates": []}"#);
    let taken_over =
        post_reconcile(&first, "service-tests/701", (ADMIN_USER, ADMIN_PASSWORD)).await;
    assert_eq!(taken_over.status().as_u16(), 200);
    assert_eq!(
        first
            .count("FROM reconciliation WHERE detail LIKE 'abandoned%' AND outcome = 'FAILED'")
            .await,
        1
    );
    assert_eq!(
        first
            .count("FROM reconciliation WHERE outcome = 'RUNNING'")
            .await,
        0
    );
}

/// `kci-receiver reconcile`: one entity (also one never seen here), or every open gap; one
/// JSON line per reconciliation; exit 1 when one failed; a clear refusal without egress.
#[tokio::test]
async fn the_reconcile_command_reconciles_one_entity_or_every_open_gap() {
    let gateway = SimulatedTenantApi::start("127.0.0.1:0").unwrap();
    let app = spawn_app_with(Backend::Sqlite, |settings| {
        reconcile_quickly(settings, &gateway.base_url, 1);
        settings.reconcile.enabled = false;
    })
    .await;
    let story: Vec<Value> = (1..=3)
        .map(|n| kci("SERVICE_PROBLEM", 801, n, "IN_PROGRESS", "UPDATE"))
        .collect();
    let never_delivered = kci("SERVICE_TEST", 802, 1, "SENT_TO_SUPPLIER", "UPDATE");
    for body in story.iter().chain([&never_delivered]) {
        gateway.record.record(body);
    }
    for body in [&story[0], &story[2]] {
        assert_eq!(app.post_kci(body, "c-801").await.status().as_u16(), 204);
    }
    let command = |args: &[&str]| {
        let mut command = crate::cli::kci_receiver();
        command
            .arg("reconcile")
            .args(args)
            .env("KCI__DATABASE__URL", app.database_url())
            .env("KCI__EGRESS__ENABLED", "true")
            .env(
                "KCI__EGRESS__UPSTREAM_BASE_URL",
                format!("{}/v1", gateway.base_url),
            )
            .env(
                "KCI__EGRESS__TOKEN_URL",
                format!("{}/token", gateway.base_url),
            )
            .env("KCI__EGRESS__CLIENT_ID", "c")
            .env("KCI__EGRESS__CLIENT_SECRET", "s")
            .env("KCI__RECONCILE__MAX_PER_MINUTE", "6000");
        command.output().expect("kci-receiver reconcile")
    };
    let gaps = command(&["--all-gaps"]);
    assert!(
        gaps.status.success(),
        "{}",
        String::from_utf8_lossy(&gaps.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&gaps.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["outcome"], "RECOVERED");
    assert_eq!(lines[0]["requestedBy"], "cli");
    assert_eq!(app.count("FROM kci").await, 3);

    let one = command(&["--entity-type", "SERVICE_TEST", "--gateway-id", "802"]);
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    assert_eq!(
        app.entity("SERVICE_TEST", "802").await.kci_count,
        1,
        "created from updates[]"
    );

    let unknown = command(&["--entity-type", "SERVICE_TEST", "--gateway-id", "999"]);
    assert_eq!(
        unknown.status.code(),
        Some(1),
        "a NOT_FOUND is a failure for scripts"
    );
    assert!(String::from_utf8_lossy(&unknown.stdout).contains("NOT_FOUND"));

    let bad = command(&["--entity-type", "NOT_A_TYPE", "--gateway-id", "1"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a listed entity type"));

    let without_egress = crate::cli::kci_receiver()
        .args(["reconcile", "--all-gaps"])
        .env("KCI__DATABASE__URL", app.database_url())
        .output()
        .unwrap();
    assert!(!without_egress.status.success());
    assert!(String::from_utf8_lossy(&without_egress.stderr).contains("egress.enabled"));
}

/// The gateway lost every KCI of a test: kci-receiver knows it only by its original request.
/// Once the request has been silent for `reconcile.stuck_after_seconds`, the scheduler asks the
/// gateway, and the recovered KCIs create the entity, matched to its request.
#[tokio::test]
async fn an_entity_whose_every_kci_was_lost_is_recovered_from_its_original_request() {
    let gateway = SimulatedTenantApi::start("127.0.0.1:0").unwrap();
    let app = spawn_app_with(Backend::Postgres, |settings| {
        reconcile_quickly(settings, &gateway.base_url, 1);
        settings.reconcile.stuck_after_seconds = 2;
    })
    .await;
    let registration = json!({
        "conversationId": "conv-lost-test",
        "operation": "POST /service-tests",
        "requestBody": {"serviceId": "S1"},
        "gatewayId": 903,
        "responseStatus": 201,
    });
    assert_eq!(
        app.register_conversation(&registration)
            .await
            .status()
            .as_u16(),
        201
    );
    for (sequence, status) in [(1, "SENT_TO_SUPPLIER"), (2, "IN_PROGRESS")] {
        gateway
            .record
            .record(&kci("SERVICE_TEST", 903, sequence, status, "UPDATE"));
    }
    // Silent for stuck_after (2 s) plus a scheduler round or two.
    assert!(
        eventually(Duration::from_secs(30), || async {
            app.count("FROM kci WHERE entity_type = 'SERVICE_TEST'")
                .await
                == 2
        })
        .await,
        "the lost KCIs were recovered"
    );
    let entity = app.entity("SERVICE_TEST", "903").await;
    assert_eq!(entity.status, "IN_PROGRESS");
    assert_eq!(
        entity.correlation,
        entity::tracked_entity::Correlation::Matched
    );
    assert_eq!(entity.conversation_id, "conv-lost-test");
    // (Later rounds may find it in sync again once it is silent for stuck_after.)
    let rows = app
        .rows("SELECT trigger, recovered FROM reconciliation WHERE outcome = 'RECOVERED'")
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["trigger"], "STUCK");
    assert_eq!(rows[0]["recovered"], 2);
}
