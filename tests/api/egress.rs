//! The egress proxy against a fake Tenant API and a fake token endpoint started by the test:
//! tokens, correlation headers, recording of original requests and matching, failures, sizes.

use entity::tracked_entity::Correlation;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use base64::Engine;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::errors::assert_gateway_error;
use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_USER, Backend, READ_PASSWORD, READ_USER, TestApp, kci, spawn_app_with,
};

const CLIENT_ID: &str = "tenant-client";
const CLIENT_SECRET: &str = "tenant-secret";

/// What the fake Tenant API received.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    query: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

#[derive(Default)]
struct FakeState {
    token_requests: usize,
    valid_tokens: HashSet<String>,
    expires_in: u64,
    received: Vec<Received>,
}

#[derive(Clone)]
struct FakeGateway {
    base: String,
    state: Arc<Mutex<FakeState>>,
}

impl FakeGateway {
    async fn start() -> FakeGateway {
        let state = Arc::new(Mutex::new(FakeState {
            expires_in: 3600,
            ..Default::default()
        }));
        let shared = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
                .route("/token", web::post().to(token))
                .default_service(web::to(tenant_api))
        })
        .workers(2)
        .bind("127.0.0.1:0")
        .unwrap();
        let base = format!("http://127.0.0.1:{}", server.addrs()[0].port());
        tokio::spawn(server.run());
        FakeGateway { base, state }
    }

    fn token_requests(&self) -> usize {
        self.state.lock().unwrap().token_requests
    }

    fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    fn revoke_tokens(&self) {
        self.state.lock().unwrap().valid_tokens.clear();
    }
}

async fn token(
    request: HttpRequest,
    form: web::Form<HashMap<String, String>>,
    state: web::Data<Arc<Mutex<FakeState>>>,
) -> HttpResponse {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    let authorised = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(expected.as_str());
    if !authorised || form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return HttpResponse::Unauthorized().json(json!({"error": "invalid_client"}));
    }
    let mut state = state.lock().unwrap();
    state.token_requests += 1;
    let token = format!("token-{}", state.token_requests);
    state.valid_tokens.insert(token.clone());
    HttpResponse::Ok().json(
        json!({"access_token": token, "token_type": "Bearer", "expires_in": state.expires_in}),
    )
}

/// Answers like the gateway, by path.
async fn tenant_api(
    request: HttpRequest,
    body: web::Bytes,
    state: web::Data<Arc<Mutex<FakeState>>>,
) -> HttpResponse {
    let bearer = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .unwrap_or_default();
    let error = |code: &str, message: &str| json!({"uuid": "7c1bfd8e-3a6b-4c0e-9d4f-1f2e3d4c5b6a", "code": code, "messages": [message]});
    {
        let mut state = state.lock().unwrap();
        if !state.valid_tokens.contains(&bearer) {
            return HttpResponse::Unauthorized()
                .json(error("NOT_AUTHORISED", "Access token missing or expired"));
        }
        state.received.push(Received {
            method: request.method().to_string(),
            path: request.path().to_owned(),
            query: request.query_string().to_owned(),
            headers: request
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: body.to_vec(),
        });
    }
    match (request.method().as_str(), request.path()) {
        ("POST", "/v1/service-orders") => {
            HttpResponse::Created().json(json!({"id": 777001, "status": "RECEIVED_BY_GATEWAY"}))
        }
        ("POST", "/v1/service-tests") => {
            HttpResponse::Created().json(json!({"id": 555, "status": "RECEIVED_BY_GATEWAY"}))
        }
        ("POST", "/v1/service-problems") => {
            HttpResponse::BadRequest().json(error("INVALID_REQUEST", "problemText too short"))
        }
        ("GET", "/v1/slow") => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            HttpResponse::Ok().finish()
        }
        ("GET", "/v1/boom") => HttpResponse::ServiceUnavailable()
            .content_type("text/html")
            .body("<html>down for maintenance</html>"),
        ("GET", "/v1/gateway-error") => {
            HttpResponse::InternalServerError().json(error("GATEWAY_FAULT", "The gateway broke"))
        }
        ("GET", "/v1/large") => HttpResponse::Ok()
            .content_type("application/octet-stream")
            .body(large_body()),
        ("POST", "/v1/echo") => HttpResponse::Ok()
            .insert_header(("X-Echo-Query", request.query_string()))
            .body(body),
        _ => HttpResponse::Ok()
            .insert_header(("X-Upstream", "fake"))
            .json(json!({"path": request.path(), "query": request.query_string()})),
    }
}

fn large_body() -> Vec<u8> {
    (0..2 * 1024 * 1024).map(|i| (i % 251) as u8).collect()
}

async fn spawn_with_egress(fake: &FakeGateway, upstream: &str) -> TestApp {
    let token_url = format!("{}/token", fake.base);
    let upstream = upstream.to_owned();
    spawn_app_with(Backend::Sqlite, move |settings| {
        crate::helpers::enable_egress(settings, upstream, token_url, (CLIENT_ID, CLIENT_SECRET));
        settings.egress.timeout_ms = 1000;
        settings.egress.connect_timeout_ms = 500;
        settings.operations_auth.egress_password = Some(SecretString::from("egress-password"));
        settings.validate().unwrap();
    })
    .await
}

fn through(app: &TestApp, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    app.client
        .request(method, format!("{}/fibre-cafe/v1{path}", app.address))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
}

#[tokio::test]
async fn requests_go_upstream_with_a_cached_token_and_correlation_headers_passed_or_generated() {
    let fake = FakeGateway::start().await;
    let app = spawn_with_egress(&fake, &format!("{}/v1", fake.base)).await;

    let generated = through(&app, reqwest::Method::GET, "/service-orders/1?x=1&y=two")
        .send()
        .await
        .unwrap();
    assert_eq!(generated.status().as_u16(), 200);
    assert_eq!(
        generated.headers()["X-Upstream"],
        "fake",
        "upstream headers come back"
    );
    let request_id = generated.headers()["X-Request-ID"]
        .to_str()
        .unwrap()
        .to_owned();
    let conversation_id = generated.headers()["X-Conversation-ID"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        uuid::Uuid::parse_str(&request_id).is_ok()
            && uuid::Uuid::parse_str(&conversation_id).is_ok()
    );
    assert_eq!(
        generated.json::<Value>().await.unwrap(),
        json!({"path": "/v1/service-orders/1", "query": "x=1&y=two"})
    );

    let given = through(&app, reqwest::Method::GET, "/service-tests/9")
        .header("X-Request-ID", "req-given")
        .header("X-Conversation-ID", "conv-given")
        .header("X-Scenario", "SERVICE_TEST_RED")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["X-Request-ID"], "req-given");
    assert_eq!(given.headers()["X-Conversation-ID"], "conv-given");

    let received = fake.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        (received[0].path.as_str(), received[0].query.as_str()),
        ("/v1/service-orders/1", "x=1&y=two")
    );
    assert_eq!(
        received[0].headers["x-request-id"], request_id,
        "the ids sent upstream are the ids returned"
    );
    assert_eq!(received[0].headers["x-conversation-id"], conversation_id);
    assert_eq!(received[1].headers["x-request-id"], "req-given");
    assert_eq!(
        received[1].headers["x-scenario"], "SERVICE_TEST_RED",
        "other headers pass through"
    );
    for request in &received {
        assert_eq!(
            request.headers["authorization"], "Bearer token-1",
            "our credentials never go upstream"
        );
    }
    assert_eq!(fake.token_requests(), 1, "the token is cached");
    assert_eq!(
        app.count_eventually("FROM audit_log WHERE outcome = 'PROXIED'", 2)
            .await,
        2
    );
    assert_eq!(
        app.count("FROM conversation").await,
        0,
        "reads are not original requests"
    );
}

#[tokio::test]
async fn the_token_is_renewed_before_expiry_and_after_a_401_for_idempotent_requests_only() {
    let fake = FakeGateway::start().await;
    fake.state.lock().unwrap().expires_in = 1;
    let app = spawn_with_egress(&fake, &format!("{}/v1", fake.base)).await;
    let get = || through(&app, reqwest::Method::GET, "/service-orders/1").send();

    assert_eq!(get().await.unwrap().status().as_u16(), 200);
    tokio::time::sleep(Duration::from_millis(700)).await; // past half its one-second life
    assert_eq!(get().await.unwrap().status().as_u16(), 200);
    assert_eq!(fake.token_requests(), 2, "renewed before it expired");

    fake.state.lock().unwrap().expires_in = 3600;
    fake.revoke_tokens();
    assert_eq!(
        get().await.unwrap().status().as_u16(),
        200,
        "a 401 renews the token and tries once more"
    );
    assert_eq!(fake.token_requests(), 3);

    fake.revoke_tokens();
    let post = through(&app, reqwest::Method::POST, "/service-tests")
        .json(&json!({"serviceId": "S1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 401, "a POST is never sent twice");
    assert_eq!(fake.token_requests(), 3);
    assert_eq!(
        fake.received()
            .iter()
            .filter(|r| r.method == "POST")
            .count(),
        0
    );
}

#[tokio::test]
async fn a_created_order_is_recorded_and_the_kcis_that_follow_are_matched() {
    let fake = FakeGateway::start().await;
    let app = spawn_with_egress(&fake, &format!("{}/v1", fake.base)).await;
    let order = json!({"orderType": "NEW", "supplier": "FIBRECO", "address": {"id": "10002429380", "type": "UPRN"}});
    let created = through(&app, reqwest::Method::POST, "/service-orders")
        .header("X-Conversation-ID", "conv-egress-order")
        .json(&order)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    assert_eq!(
        created.json::<Value>().await.unwrap()["id"],
        777001,
        "the answer comes back unchanged"
    );

    let conversations = app.rows("SELECT * FROM conversation").await;
    assert_eq!(conversations.len(), 1);
    let conversation = &conversations[0];
    assert_eq!(conversation["conversation_id"], "conv-egress-order");
    assert_eq!(conversation["operation"], "POST /service-orders");
    assert_eq!(conversation["entity_type"], "PROVIDE_ORDER");
    assert_eq!(conversation["gateway_id"], "777001");
    assert_eq!(conversation["response_status"], 201);
    assert_eq!(conversation["source"], "EGRESS");

    let first_kci = kci("PROVIDE_ORDER", 777_001, 1, "SENT_TO_SUPPLIER", "UPDATE");
    assert_eq!(
        app.post_kci(&first_kci, "conv-egress-order")
            .await
            .status()
            .as_u16(),
        204
    );
    assert_eq!(
        app.entity("PROVIDE_ORDER", "777001").await.correlation,
        Correlation::Matched
    );

    // A rejected creating call creates nothing: audited, not recorded.
    let rejected = through(&app, reqwest::Method::POST, "/service-problems")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status().as_u16(), 400);
    assert_eq!(
        rejected.json::<Value>().await.unwrap()["code"],
        "INVALID_REQUEST"
    );
    assert_eq!(app.count("FROM conversation").await, 1);
}

#[tokio::test]
async fn a_kci_that_arrived_first_is_matched_as_soon_as_its_creating_call_goes_through() {
    let fake = FakeGateway::start().await;
    let app = spawn_with_egress(&fake, &format!("{}/v1", fake.base)).await;
    let early = kci("SERVICE_TEST", 555, 1, "SENT_TO_SUPPLIER", "UPDATE");
    assert_eq!(
        app.post_kci(&early, "conv-late-test")
            .await
            .status()
            .as_u16(),
        204
    );
    assert_eq!(
        app.entity("SERVICE_TEST", "555").await.correlation,
        Correlation::Unmatched
    );
    let created = through(&app, reqwest::Method::POST, "/service-tests")
        .header("X-Conversation-ID", "conv-late-test")
        .json(&json!({"serviceId": "BBEU00537760", "problemType": "OUTAGE"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    assert_eq!(
        app.entity("SERVICE_TEST", "555").await.correlation,
        Correlation::Matched
    );
}

#[tokio::test]
async fn timeouts_refusals_and_broken_answers_come_back_in_the_gateway_format() {
    let fake = FakeGateway::start().await;
    let app = spawn_with_egress(&fake, &format!("{}/v1", fake.base)).await;

    let started = Instant::now();
    let slow = through(&app, reqwest::Method::GET, "/slow")
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "nothing hangs: {:?}",
        started.elapsed()
    );
    let body = assert_gateway_error(slow, 504, "GATEWAY_FAULT").await;
    assert!(
        body["messages"][0]
            .as_str()
            .unwrap()
            .contains("did not answer")
    );

    let boom = through(&app, reqwest::Method::GET, "/boom")
        .send()
        .await
        .unwrap();
    assert!(boom.headers().contains_key("X-Request-ID"));
    let body = assert_gateway_error(boom, 502, "GATEWAY_FAULT").await;
    assert!(body["messages"][0].as_str().unwrap().contains("503"));

    let gateway_error = through(&app, reqwest::Method::GET, "/gateway-error")
        .send()
        .await
        .unwrap();
    let body = assert_gateway_error(gateway_error, 500, "GATEWAY_FAULT").await;
    assert_eq!(
        body["messages"][0], "The gateway broke",
        "the gateway's own error body is passed on"
    );

    // Nothing listens on the upstream port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable_app = spawn_with_egress(&fake, &format!("http://127.0.0.1:{closed}/v1")).await;
    let refused = through(&unreachable_app, reqwest::Method::GET, "/service-orders/1")
        .send()
        .await
        .unwrap();
    let body = assert_gateway_error(refused, 502, "GATEWAY_FAULT").await;
    assert!(
        body["messages"][0]
            .as_str()
            .unwrap()
            .contains("could not be reached")
    );

    assert_eq!(
        app.count_eventually(
            "FROM audit_log WHERE outcome = 'PROXY_FAILED' AND error_uuid IS NOT NULL",
            2
        )
        .await,
        2
    );
    assert_eq!(
        app.count_eventually("FROM audit_log WHERE outcome = 'PROXIED_UPSTREAM_ERROR'", 1)
            .await,
        1
    );
    assert_eq!(
        unreachable_app
            .count_eventually(
                "FROM audit_log WHERE outcome = 'PROXY_FAILED' AND response_status = 502",
                1
            )
            .await,
        1
    );
}

#[tokio::test]
async fn large_bodies_and_query_strings_pass_unchanged() {
    let fake = FakeGateway::start().await;
    let app = spawn_with_egress(&fake, &format!("{}/v1", fake.base)).await;
    let large = through(&app, reqwest::Method::GET, "/large")
        .send()
        .await
        .unwrap();
    assert_eq!(large.status().as_u16(), 200);
    assert_eq!(
        large.bytes().await.unwrap().to_vec(),
        large_body(),
        "2 MiB streamed back intact"
    );

    let upload: Vec<u8> = (0..1_000_000).map(|i| (i % 7) as u8 + b'a').collect();
    let echoed = through(&app, reqwest::Method::POST, "/echo?a=1&b=%20x&a=2")
        .header("Content-Type", "application/json; charset=utf-8")
        .body(upload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["X-Echo-Query"], "a=1&b=%20x&a=2");
    assert_eq!(echoed.bytes().await.unwrap().to_vec(), upload);
    let received = fake.received();
    assert_eq!(
        received.last().unwrap().headers["content-type"],
        "application/json; charset=utf-8"
    );
    assert_eq!(received.last().unwrap().body.len(), 1_000_000);
}

#[tokio::test]
async fn the_proxy_takes_the_admin_or_egress_role_only() {
    let fake = FakeGateway::start().await;
    let app = spawn_with_egress(&fake, &format!("{}/v1", fake.base)).await;
    let url = format!("{}/fibre-cafe/v1/service-orders/1", app.address);
    let none = app.client.get(&url).send().await.unwrap();
    assert_gateway_error(none, 401, "NOT_AUTHORISED").await;
    let reader = app
        .client
        .get(&url)
        .basic_auth(READ_USER, Some(READ_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_gateway_error(reader, 403, "NOT_AUTHORISED").await;
    let egress = app
        .client
        .get(&url)
        .basic_auth("ops-egress", Some("egress-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(egress.status().as_u16(), 200);
    let egress_on_ops = app
        .client
        .get(format!("{}/api/v1/service-orders", app.address))
        .basic_auth("ops-egress", Some("egress-password"))
        .send()
        .await
        .unwrap();
    assert_gateway_error(egress_on_ops, 403, "NOT_AUTHORISED").await;
    assert_eq!(
        fake.received().len(),
        1,
        "refused calls never went upstream"
    );
}

#[tokio::test]
async fn the_egress_request_subcommand_uses_the_same_client() {
    let fake = FakeGateway::start().await;
    let database = crate::helpers::TestDatabase::create(Backend::Sqlite).await;
    let (base, database_url) = (fake.base.clone(), database.url.clone());
    // On a blocking thread: the fake gateway answers from this test's runtime meanwhile.
    let output = tokio::task::spawn_blocking(move || {
        crate::cli::kci_receiver()
            .args([
                "egress-request",
                "POST",
                "/service-orders",
                "--header",
                "X-Conversation-ID: conv-cli-egress",
                "--body",
                "-",
            ])
            .env("KCI__GATEWAY_AUTH__BASIC_PASSWORD", "unused")
            .env("KCI__DATABASE__URL", &database_url)
            .env("KCI__EGRESS__UPSTREAM_BASE_URL", format!("{base}/v1"))
            .env("KCI__EGRESS__TOKEN_URL", format!("{base}/token"))
            .env("KCI__EGRESS__CLIENT_ID", CLIENT_ID)
            .env("KCI__EGRESS__CLIENT_SECRET", CLIENT_SECRET)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(br#"{"orderType": "NEW"}"#)?;
                child.wait_with_output()
            })
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("HTTP 201"), "{stdout}");
    assert!(
        stdout.contains("x-conversation-id: conv-cli-egress") && stdout.contains("777001"),
        "{stdout}"
    );
    assert_eq!(fake.received()[0].body, br#"{"orderType": "NEW"}"#);
    let db = sea_orm::Database::connect(database.url.as_str())
        .await
        .unwrap();
    use sea_orm::EntityTrait;
    let recorded = entity::conversation::Entity::find().all(&db).await.unwrap();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].gateway_id.as_deref(), Some("777001"));
}

/// Sends a request with its path exactly as written (an HTTP client would normalise `..`
/// before sending); returns the status and the body.
async fn raw_request(app: &TestApp, method: &str, path: &str, extra: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("{ADMIN_USER}:{ADMIN_PASSWORD}"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Basic {credentials}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\n{extra}Connection: close\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[tokio::test]
async fn the_proxy_never_leaves_the_tenant_api_and_checks_ids_before_anything_goes_upstream() {
    let fake = FakeGateway::start().await;
    let app = spawn_with_egress(&fake, &format!("{}/v1", fake.base)).await;
    for (method, path) in [
        ("GET", "/fibre-cafe/v1/../../token"),
        ("GET", "/fibre-cafe/v1/%2e%2e/token"),
        ("GET", "/fibre-cafe/v1/%2E%2E/%2E%2E/token"),
        ("POST", "/fibre-cafe/v1/x/../service-orders"),
        ("GET", "/fibre-cafe/v1/service-orders%2f..%2f..%2ftoken"),
        ("GET", "/fibre-cafe/v1/..%5ctoken"),
        ("GET", "/fibre-cafe/v1/a\\..\\token"),
        ("GET", "/fibre-cafe/v1//token"),
        ("GET", "/fibre-cafe/v1/%252e%252e/token"),
    ] {
        let (status, body) = raw_request(&app, method, path, "").await;
        assert_eq!(status, 400, "{method} {path}: {body}");
        assert!(body.contains("INVALID_REQUEST"), "{path}: {body}");
    }
    for (header, value) in [
        ("X-Conversation-ID", "c".repeat(256)),
        ("X-Request-ID", "r".repeat(300)),
    ] {
        let (status, body) = raw_request(
            &app,
            "POST",
            "/fibre-cafe/v1/service-orders",
            &format!("{header}: {value}\r\n"),
        )
        .await;
        assert_eq!(status, 400, "{header}: {body}");
    }
    let state = fake.state.lock().unwrap();
    assert!(
        state.received.is_empty(),
        "nothing went upstream: {:?}",
        state.received
    );
    assert_eq!(state.token_requests, 0, "not even a token was asked for");
}

#[tokio::test]
async fn a_recording_that_fails_never_turns_the_gateways_answer_into_a_retry() {
    let fake = FakeGateway::start().await;
    let database = crate::helpers::TestDatabase::create(Backend::Postgres).await;
    let proxy = crate::helpers::TcpProxy::start(database.postgres_addr()).await;
    let mut settings = crate::helpers::test_settings(&database.url_via_port(proxy.port));
    crate::helpers::enable_egress(
        &mut settings,
        format!("{}/v1", fake.base),
        format!("{}/token", fake.base),
        (CLIENT_ID, CLIENT_SECRET),
    );
    settings.database.acquire_timeout_ms = 1000;
    let app = crate::helpers::spawn_on(database, settings).await;

    proxy.cut();
    let created = through(&app, reqwest::Method::POST, "/service-orders")
        .header("X-Conversation-ID", "conv-unrecorded")
        .json(&json!({"orderType": "NEW"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        created.status().as_u16(),
        201,
        "the gateway's answer, unchanged"
    );
    assert_eq!(created.json::<Value>().await.unwrap()["id"], 777001);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("kci_receiver_egress_unrecorded_requests 1"),
        "{metrics}"
    );

    proxy.restore();
    assert!(
        crate::helpers::eventually(Duration::from_secs(20), || async {
            app.count(
                "FROM conversation WHERE conversation_id = 'conv-unrecorded' AND source = 'EGRESS'",
            )
            .await
                == 1
        })
        .await,
        "recorded in the background once the database is back"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("kci_receiver_egress_unrecorded_requests 0"),
        "{metrics}"
    );
    let posted = fake
        .state
        .lock()
        .unwrap()
        .received
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posted, 1, "the order was placed once");
}

#[tokio::test]
async fn a_cross_site_form_or_fetch_goes_nowhere_near_the_gateway() {
    let fake = FakeGateway::start().await;
    let app = spawn_with_egress(&fake, &format!("{}/v1", fake.base)).await;
    let before = fake.received().len();
    for (content_type, headers) in [
        ("application/x-www-form-urlencoded", vec![]),
        ("text/plain", vec![]),
        (
            "application/json",
            vec![
                ("Origin", "https://attacker.example"),
                ("Sec-Fetch-Site", "cross-site"),
            ],
        ),
    ] {
        let mut request = through(&app, reqwest::Method::POST, "/service-orders")
            .header("Content-Type", content_type)
            .body(r#"{"orderType":"NEW"}"#);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let refused = request.send().await.unwrap();
        assert_gateway_error(refused, 403, "NOT_AUTHORISED").await;
    }
    let delete = through(&app, reqwest::Method::DELETE, "/service-orders/1")
        .header("Sec-Fetch-Site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_gateway_error(delete, 403, "NOT_AUTHORISED").await;
    assert_eq!(fake.received().len(), before, "nothing went upstream");
    assert_eq!(app.count("FROM conversation").await, 0);
}
