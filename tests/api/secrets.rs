//! No secret in any log or audit record: the service runs as a process of its own with every
//! secret set to a recognisable value, logging at debug level, and gets traffic of every kind
//! (right and wrong credentials, bearer tokens, cookies, the operations API, the egress proxy
//! with a real token exchange, a broker that refuses its password). Then its output, every table
//! it wrote and `check-config` are searched for each secret, raw and as Basic credentials.

use std::process::Stdio;
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use base64::Engine;
use serde_json::json;
use uuid::Uuid;

use crate::cli::kci_receiver;
use crate::helpers::{Backend, TestDatabase, eventually, fixture};

const GATEWAY_PASSWORD: &str = "SECRET-gateway-pw-4d1c";
const ADMIN_PASSWORD: &str = "SECRET-admin-pw-88aa";
const READ_PASSWORD: &str = "SECRET-read-pw-19ef";
const EGRESS_PASSWORD: &str = "SECRET-egress-pw-7c02";
const CLIENT_SECRET: &str = "SECRET-client-secret-3b9e";
const ACCESS_TOKEN: &str = "SECRET-access-token-a0f4";
const DATABASE_PASSWORD: &str = "SECRET-db-pw-55d3";
const AMQP_PASSWORD: &str = "SECRET-amqp-pw-e6b7";
/// What callers send that must not be kept either: a guessed password, a bearer token, a cookie.
const GUESSED_PASSWORD: &str = "SECRET-guess-0c61";
const CALLER_TOKEN: &str = "SECRET-caller-token-2d2d";
const COOKIE: &str = "SECRET-cookie-9e14";

/// A Tenant API with an OAuth2 token endpoint that hands out [`ACCESS_TOKEN`].
async fn fake_tenant_api() -> String {
    let server = HttpServer::new(|| {
        App::new()
            .route(
                "/token",
                web::post().to(|| async {
                    HttpResponse::Ok().json(json!({
                        "access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 3600
                    }))
                }),
            )
            .route(
                "/v1/service-orders",
                web::post().to(|| async { HttpResponse::Created().json(json!({"id": 5150})) }),
            )
            .route(
                "/v1/service-orders/{id}",
                web::get().to(|| async { HttpResponse::Ok().json(json!({"id": 5150})) }),
            )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let base = format!("http://127.0.0.1:{}", server.addrs()[0].port());
    tokio::spawn(server.run());
    base
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn basic(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

#[tokio::test]
async fn no_secret_reaches_the_logs_the_audit_log_or_check_config() {
    let database = TestDatabase::create(Backend::Postgres).await;
    // Trust authentication accepts any password: the URL carries one all the same.
    let mut database_url = reqwest::Url::parse(&database.url).unwrap();
    database_url.set_password(Some(DATABASE_PASSWORD)).unwrap();
    let tenant_api = fake_tenant_api().await;
    let port = free_port();
    let log_dir = std::env::temp_dir().join(format!("kci-secrets-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&log_dir).unwrap();
    let environment: Vec<(&str, String)> = vec![
        ("KCI__SERVER__PORT", port.to_string()),
        ("KCI__DATABASE__URL", database_url.to_string()),
        ("KCI__GATEWAY_AUTH__BASIC_PASSWORD", GATEWAY_PASSWORD.into()),
        (
            "KCI__OPERATIONS_AUTH__ADMIN_PASSWORD",
            ADMIN_PASSWORD.into(),
        ),
        ("KCI__OPERATIONS_AUTH__READ_PASSWORD", READ_PASSWORD.into()),
        (
            "KCI__OPERATIONS_AUTH__EGRESS_PASSWORD",
            EGRESS_PASSWORD.into(),
        ),
        ("KCI__EGRESS__ENABLED", "true".into()),
        ("KCI__EGRESS__UPSTREAM_BASE_URL", format!("{tenant_api}/v1")),
        ("KCI__EGRESS__TOKEN_URL", format!("{tenant_api}/token")),
        ("KCI__EGRESS__CLIENT_ID", "kci-receiver".into()),
        ("KCI__EGRESS__CLIENT_SECRET", CLIENT_SECRET.into()),
        (
            "KCI__AMQP__URL",
            format!("amqp://guest:{AMQP_PASSWORD}@127.0.0.1:5672/%2f"),
        ),
        ("KCI__SERVER__AUTH_FAILURE_AUDIT_SECONDS", "1".into()),
    ];
    let stdout = std::fs::File::create(log_dir.join("stdout")).unwrap();
    let stderr = std::fs::File::create(log_dir.join("stderr")).unwrap();
    let mut serve = kci_receiver();
    serve
        .arg("serve")
        .envs(environment.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "debug")
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    let mut child = crate::helpers::ChildProcess::spawn(&mut serve);

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let address = format!("http://127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(30), || async {
        client
            .get(format!("{address}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(up, "the service starts");

    let post_kci = |authorization: String| {
        let mut body = fixture("ProvideServiceOrderUpdate-1");
        body["id"] = json!(Uuid::new_v4().to_string());
        client
            .post(format!("{address}/kcis"))
            .header("X-Request-ID", Uuid::new_v4().to_string())
            .header("X-Conversation-ID", "conv-secrets")
            .header("Authorization", authorization)
            .header("Cookie", format!("session={COOKIE}"))
            .header("Proxy-Authorization", format!("Bearer {CALLER_TOKEN}"))
            .json(&body)
            .send()
    };
    let statuses = [
        post_kci(format!("Basic {}", basic("fibrecafe", GATEWAY_PASSWORD))).await,
        post_kci(format!("Basic {}", basic("fibrecafe", GUESSED_PASSWORD))).await,
        post_kci(format!("Bearer {CALLER_TOKEN}")).await,
        post_kci(format!("Basic {}", basic("ops-admin", ADMIN_PASSWORD))).await,
    ]
    .map(|r| r.unwrap().status().as_u16());
    assert_eq!(statuses, [204, 401, 401, 403]);
    let operations = |method: reqwest::Method, path: &str, user: &str, password: &str| {
        client
            .request(method, format!("{address}{path}"))
            .basic_auth(user, Some(password))
            .header("Cookie", format!("session={COOKIE}"))
    };
    let answers = [
        operations(
            reqwest::Method::GET,
            "/api/v1/entities",
            "ops-read",
            READ_PASSWORD,
        )
        .send()
        .await,
        operations(
            reqwest::Method::GET,
            "/api/v1/entities",
            "ops-read",
            GUESSED_PASSWORD,
        )
        .send()
        .await,
        operations(
            reqwest::Method::POST,
            "/api/v1/conversations",
            "ops-admin",
            ADMIN_PASSWORD,
        )
        .json(&json!({"conversationId": "conv-registered", "operation": "POST /service-orders"}))
        .send()
        .await,
        operations(
            reqwest::Method::POST,
            "/fibre-cafe/v1/service-orders",
            "ops-egress",
            EGRESS_PASSWORD,
        )
        .header("X-Conversation-ID", "conv-egress")
        .json(&json!({"orderType": "NEW"}))
        .send()
        .await,
        operations(
            reqwest::Method::GET,
            "/fibre-cafe/v1/service-orders/5150",
            "ops-egress",
            EGRESS_PASSWORD,
        )
        .send()
        .await,
    ]
    .map(|r| r.unwrap().status().as_u16());
    assert_eq!(answers, [200, 401, 201, 201, 200]);
    // The aggregated audit of failed logins is written within a second; give the relay time to
    // be refused by the broker and say so.
    tokio::time::sleep(Duration::from_secs(3)).await;
    child.terminate();
    assert!(
        child.wait_for_exit(Duration::from_secs(30)).is_some(),
        "the service stops on SIGTERM"
    );

    let check_config = kci_receiver()
        .arg("check-config")
        .envs(environment.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(check_config.status.success());

    let db = sea_orm::Database::connect(database.url.as_str())
        .await
        .unwrap();
    let mut places: Vec<(String, String)> = vec![
        (
            "serve's stdout".into(),
            std::fs::read_to_string(log_dir.join("stdout")).unwrap(),
        ),
        (
            "serve's stderr".into(),
            std::fs::read_to_string(log_dir.join("stderr")).unwrap(),
        ),
        (
            "check-config".into(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&check_config.stdout),
                String::from_utf8_lossy(&check_config.stderr)
            ),
        ),
    ];
    for table in [
        "audit_log",
        "conversation",
        "kci",
        "outbox_event",
        "tracked_entity",
        "state_transition",
    ] {
        use sea_orm::{FromQueryResult, JsonValue, Statement};
        let rows = JsonValue::find_by_statement(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT to_jsonb(t)::text AS row FROM {table} t"),
        ))
        .all(&db)
        .await
        .unwrap();
        let text: Vec<String> = rows.iter().map(|r| r["row"].to_string()).collect();
        places.push((format!("table {table}"), text.join("\n")));
    }
    let _ = std::fs::remove_dir_all(&log_dir);

    let audited: usize = places
        .iter()
        .filter(|(place, _)| place == "table audit_log")
        .map(|(_, text)| text.lines().count())
        .sum();
    assert!(audited >= 5, "the traffic was audited ({audited} records)");
    assert!(
        places[1].1.contains("DEBUG") || places[0].1.contains("DEBUG"),
        "the service logged at debug level"
    );

    let mut secrets: Vec<(String, String)> = [
        GATEWAY_PASSWORD,
        ADMIN_PASSWORD,
        READ_PASSWORD,
        EGRESS_PASSWORD,
        CLIENT_SECRET,
        ACCESS_TOKEN,
        DATABASE_PASSWORD,
        AMQP_PASSWORD,
        GUESSED_PASSWORD,
        CALLER_TOKEN,
        COOKIE,
    ]
    .iter()
    .map(|secret| ((*secret).to_owned(), (*secret).to_owned()))
    .collect();
    for (user, password) in [
        ("fibrecafe", GATEWAY_PASSWORD),
        ("fibrecafe", GUESSED_PASSWORD),
        ("ops-admin", ADMIN_PASSWORD),
        ("ops-read", READ_PASSWORD),
        ("ops-read", GUESSED_PASSWORD),
        ("ops-egress", EGRESS_PASSWORD),
        ("kci-receiver", CLIENT_SECRET),
    ] {
        secrets.push((
            format!("Basic credentials of {user}"),
            basic(user, password),
        ));
    }
    // A secret spelled in part, e.g. a URL-encoded one, is caught by its distinctive tail.
    let mut found = Vec::new();
    for (place, text) in &places {
        for (name, secret) in &secrets {
            let tail = &secret[secret.len().saturating_sub(12)..];
            if let Some(at) = text.find(tail) {
                let start = text[..at]
                    .char_indices()
                    .rev()
                    .nth(80)
                    .map_or(0, |(i, _)| i);
                let context: String = text[start..].chars().take(200).collect();
                found.push(format!("{name} in {place}: ...{context}..."));
            }
        }
    }
    assert!(found.is_empty(), "secrets found:\n{}", found.join("\n"));
}
