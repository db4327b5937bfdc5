//! Both ways the gateway can authenticate (HTTP Basic, OAuth2 bearer JWT), and the separation
//! between the gateway's credentials and the operations API's.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{App, HttpResponse, HttpServer, web};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use kci_receiver::config::{GatewayAuthMethod, JwtKeySettings};
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::errors::assert_gateway_error;
use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_USER, Backend, GATEWAY_PASSWORD, GATEWAY_USER, READ_PASSWORD, READ_USER,
    TestApp, fixture, spawn_app, spawn_app_with,
};

const ISSUER: &str = "https://auth.fibre-cafe.test/";
const AUDIENCE: &str = "kci-receiver";
const HMAC_SECRET: &str = "a-shared-secret-for-the-tests-only";

fn fresh_kci() -> Value {
    let mut body = fixture("ProvideServiceOrderUpdate-1");
    body["id"] = json!(Uuid::new_v4().to_string());
    body
}

async fn post_with(
    app: &TestApp,
    authorise: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
) -> reqwest::Response {
    let request = app
        .client
        .post(format!("{}/kcis", app.address))
        .header("X-Request-ID", Uuid::new_v4().to_string())
        .header("X-Conversation-ID", "conv-auth")
        .json(&fresh_kci());
    authorise(request).send().await.unwrap()
}

#[tokio::test]
async fn basic_credentials_are_checked_and_the_operations_users_may_not_post_kcis() {
    let app = spawn_app(Backend::Sqlite).await;
    let good = post_with(&app, |r| r.basic_auth(GATEWAY_USER, Some(GATEWAY_PASSWORD))).await;
    assert_eq!(good.status().as_u16(), 204);

    let wrong = post_with(&app, |r| r.basic_auth(GATEWAY_USER, Some("wrong"))).await;
    assert!(
        wrong.headers()["WWW-Authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    assert_gateway_error(wrong, 401, "NOT_AUTHORISED").await;

    let missing = post_with(&app, |r| r).await;
    assert_gateway_error(missing, 401, "NOT_AUTHORISED").await;

    let garbage = post_with(&app, |r| r.header("Authorization", "Basic !!!")).await;
    assert_gateway_error(garbage, 401, "NOT_AUTHORISED").await;

    let operations_user = post_with(&app, |r| r.basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))).await;
    assert_gateway_error(operations_user, 403, "NOT_AUTHORISED").await;

    assert_eq!(
        app.count("FROM kci").await,
        1,
        "only the authorised KCI was recorded"
    );
    assert_eq!(
        attempts_eventually(&app, "response_status IN (401, 403)", 4).await,
        4,
        "failed authentication is audited, aggregated per source"
    );
}

#[tokio::test]
async fn the_operations_api_has_its_own_credentials_and_roles() {
    let app = spawn_app(Backend::Sqlite).await;
    let conversation = json!({"conversationId": "c-roles", "operation": "POST /service-orders"});
    let url = format!("{}/api/v1/conversations", app.address);
    let as_user = |user: &'static str, password: &'static str| {
        app.client
            .post(&url)
            .basic_auth(user, Some(password))
            .json(&conversation)
            .send()
    };
    assert_gateway_error(
        as_user(GATEWAY_USER, GATEWAY_PASSWORD).await.unwrap(),
        403,
        "NOT_AUTHORISED",
    )
    .await;
    assert_gateway_error(
        as_user(READ_USER, READ_PASSWORD).await.unwrap(),
        403,
        "NOT_AUTHORISED",
    )
    .await;
    assert_gateway_error(
        as_user(ADMIN_USER, "wrong").await.unwrap(),
        401,
        "NOT_AUTHORISED",
    )
    .await;
    let none = app
        .client
        .post(&url)
        .json(&conversation)
        .send()
        .await
        .unwrap();
    assert_gateway_error(none, 401, "NOT_AUTHORISED").await;
    assert_eq!(
        as_user(ADMIN_USER, ADMIN_PASSWORD)
            .await
            .unwrap()
            .status()
            .as_u16(),
        201
    );
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub(crate) fn claims(overrides: Value) -> Value {
    let mut claims = json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "fibre-cafe-gateway",
        "exp": now() + 300,
        "iat": now(),
        "scope": "openid kci.write",
    });
    for (key, value) in overrides.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(key);
        } else {
            claims[key] = value.clone();
        }
    }
    claims
}

pub(crate) fn hs256(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub(crate) fn rs256(claims: &Value, kid: &str) -> String {
    let pem = include_bytes!("keys/test-rsa-private.pem");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    encode(&header, claims, &EncodingKey::from_rsa_pem(pem).unwrap()).unwrap()
}

fn jwt_settings(settings: &mut kci_receiver::config::Settings, jwks_url: Option<String>) {
    settings.gateway_auth.method = GatewayAuthMethod::Jwt;
    let jwt = &mut settings.gateway_auth.jwt;
    jwt.issuer = ISSUER.to_owned();
    jwt.audience = vec![AUDIENCE.to_owned()];
    jwt.required_scope = "kci.write".to_owned();
    jwt.algorithms = vec!["RS256".to_owned(), "HS256".to_owned()];
    jwt.leeway_seconds = 0;
    jwt.jwks_url = jwks_url;
    jwt.keys = vec![JwtKeySettings {
        kid: None,
        algorithm: "HS256".to_owned(),
        pem: None,
        secret: Some(SecretString::from(HMAC_SECRET)),
    }];
    settings.validate().unwrap();
}

/// Serves the test JWK Set, like an authorisation server's `/.well-known/jwks.json`.
async fn start_jwks_server() -> String {
    let jwks: Value = serde_json::from_str(include_str!("keys/test-jwks.json")).unwrap();
    let server = HttpServer::new(move || {
        let jwks = jwks.clone();
        App::new().route(
            "/jwks.json",
            web::get().to(move || {
                let jwks = jwks.clone();
                async move { HttpResponse::Ok().json(jwks) }
            }),
        )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    format!("http://127.0.0.1:{port}/jwks.json")
}

#[tokio::test]
async fn bearer_tokens_are_checked_for_signature_issuer_audience_expiry_and_scope() {
    let jwks_url = start_jwks_server().await;
    let app = spawn_app_with(Backend::Sqlite, |settings| {
        jwt_settings(settings, Some(jwks_url))
    })
    .await;
    let bearer = |token: String| move |r: reqwest::RequestBuilder| r.bearer_auth(token);

    // Good: an RS256 token whose key comes from the JWK Set, and an HS256 token with the configured secret.
    let response = post_with(&app, bearer(rs256(&claims(json!({})), "test-key-1"))).await;
    assert_eq!(response.status().as_u16(), 204);
    let response = post_with(&app, bearer(hs256(&claims(json!({})), HMAC_SECRET))).await;
    assert_eq!(response.status().as_u16(), 204);

    let unauthorised = [
        (
            "wrong signature",
            hs256(&claims(json!({})), "another-secret"),
        ),
        ("unknown key id", rs256(&claims(json!({})), "no-such-key")),
        (
            "expired",
            hs256(&claims(json!({"exp": now() - 60})), HMAC_SECRET),
        ),
        (
            "wrong audience",
            hs256(&claims(json!({"aud": "someone-else"})), HMAC_SECRET),
        ),
        (
            "wrong issuer",
            hs256(&claims(json!({"iss": "https://evil.test/"})), HMAC_SECRET),
        ),
        (
            "no expiry",
            hs256(&claims(json!({"exp": null})), HMAC_SECRET),
        ),
        ("not a token", "not.a.token".to_owned()),
    ];
    for (name, token) in unauthorised {
        let response = post_with(&app, bearer(token)).await;
        assert_eq!(response.status().as_u16(), 401, "{name}");
        assert!(
            response.headers()["WWW-Authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let body = assert_gateway_error(response, 401, "NOT_AUTHORISED").await;
        assert!(
            body["messages"][0]
                .as_str()
                .unwrap()
                .starts_with("Invalid bearer token"),
            "{name}: {body}"
        );
    }

    let no_scope = post_with(
        &app,
        bearer(hs256(&claims(json!({"scope": "openid"})), HMAC_SECRET)),
    )
    .await;
    assert_gateway_error(no_scope, 403, "NOT_AUTHORISED").await;
    let scp_list = post_with(
        &app,
        bearer(hs256(
            &claims(json!({"scope": null, "scp": ["kci.write"]})),
            HMAC_SECRET,
        )),
    )
    .await;
    assert_eq!(
        scp_list.status().as_u16(),
        204,
        "scope given as an scp list"
    );

    let basic = post_with(&app, |r| r.basic_auth(GATEWAY_USER, Some(GATEWAY_PASSWORD))).await;
    assert_gateway_error(basic, 401, "NOT_AUTHORISED").await;

    assert_eq!(app.count("FROM kci").await, 3);
    let principals = app
        .rows("SELECT DISTINCT principal FROM audit_log WHERE response_status = 204")
        .await;
    assert_eq!(principals, vec![json!({"principal": "fibre-cafe-gateway"})]);
}

/// The attempts that audit records with `where_clause` stand for, once they reach `expected`
/// (within 10 s): aggregated records are written in the background. Summed here, not in SQL:
/// SQLite gives a computed column no type sea-orm can read as JSON.
pub async fn attempts_eventually(app: &TestApp, where_clause: &str, expected: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let rows = app
            .rows(&format!(
                "SELECT attempts FROM audit_log WHERE {where_clause}"
            ))
            .await;
        let attempts: i64 = rows.iter().filter_map(|row| row["attempts"].as_i64()).sum();
        if attempts >= expected || tokio::time::Instant::now() >= deadline {
            return attempts;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A JWK Set endpoint the test steers: failing (500 after a delay) or serving the test key under
/// a given `kid`; it counts every fetch.
struct SteeredJwks {
    url: String,
    state: std::sync::Arc<std::sync::Mutex<JwksState>>,
}

struct JwksState {
    /// `None`: answer 500 (after `delay`).
    kid: Option<String>,
    delay: std::time::Duration,
    fetches: usize,
}

impl SteeredJwks {
    async fn start(kid: Option<&str>, delay: std::time::Duration) -> SteeredJwks {
        let state = std::sync::Arc::new(std::sync::Mutex::new(JwksState {
            kid: kid.map(str::to_owned),
            delay,
            fetches: 0,
        }));
        let shared = state.clone();
        let server = HttpServer::new(move || {
            let state = shared.clone();
            App::new().route(
                "/jwks.json",
                web::get().to(move || {
                    let state = state.clone();
                    async move {
                        let (kid, delay) = {
                            let mut state = state.lock().unwrap();
                            state.fetches += 1;
                            (state.kid.clone(), state.delay)
                        };
                        tokio::time::sleep(delay).await;
                        match kid {
                            None => HttpResponse::InternalServerError().finish(),
                            Some(kid) => {
                                let mut jwks: Value =
                                    serde_json::from_str(include_str!("keys/test-jwks.json"))
                                        .unwrap();
                                jwks["keys"][0]["kid"] = json!(kid);
                                HttpResponse::Ok().json(jwks)
                            }
                        }
                    }
                }),
            )
        })
        .workers(1)
        .bind("127.0.0.1:0")
        .unwrap();
        let url = format!("http://127.0.0.1:{}/jwks.json", server.addrs()[0].port());
        tokio::spawn(server.run());
        SteeredJwks { url, state }
    }

    fn fetches(&self) -> usize {
        self.state.lock().unwrap().fetches
    }

    fn serve(&self, kid: Option<&str>) {
        self.state.lock().unwrap().kid = kid.map(str::to_owned);
    }
}

#[tokio::test]
async fn a_failing_identity_provider_is_asked_once_per_interval_however_many_tokens_arrive() {
    let jwks = SteeredJwks::start(None, std::time::Duration::from_millis(300)).await;
    let url = jwks.url.clone();
    let app = spawn_app_with(Backend::Sqlite, |settings| {
        jwt_settings(settings, Some(url));
        settings.gateway_auth.jwt.jwks_min_refresh_seconds = 2;
    })
    .await;
    assert_eq!(jwks.fetches(), 1, "fetched once at startup");
    let token = rs256(&claims(json!({})), "test-key-1");
    let bearer = |token: String| move |r: reqwest::RequestBuilder| r.bearer_auth(token);
    // A burst of tokens whose key is not known: refused at once, no fetch (one was just tried).
    let statuses =
        futures_util::future::join_all((0..50).map(|_| post_with(&app, bearer(token.clone()))))
            .await;
    assert!(statuses.iter().all(|r| r.status().as_u16() == 401));
    assert_eq!(jwks.fetches(), 1, "the failure is remembered");

    // Once the interval has passed, concurrent tokens share one (slow, failing) fetch.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let statuses =
        futures_util::future::join_all((0..50).map(|_| post_with(&app, bearer(token.clone()))))
            .await;
    assert!(statuses.iter().all(|r| r.status().as_u16() == 401));
    assert_eq!(
        jwks.fetches(),
        2,
        "one fetch in flight at a time, then remembered"
    );

    // The provider recovers: the next token after the interval is accepted.
    jwks.serve(Some("test-key-1"));
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(
        post_with(&app, bearer(token.clone()))
            .await
            .status()
            .as_u16(),
        204
    );
    assert!(jwks.fetches() <= 4, "{} fetches", jwks.fetches());
}

#[tokio::test]
async fn a_rotated_key_is_fetched_when_its_first_token_arrives_and_the_old_one_goes() {
    let jwks = SteeredJwks::start(Some("key-2026"), std::time::Duration::ZERO).await;
    let url = jwks.url.clone();
    let app = spawn_app_with(Backend::Sqlite, |settings| {
        jwt_settings(settings, Some(url));
        settings.gateway_auth.jwt.jwks_min_refresh_seconds = 1;
    })
    .await;
    let bearer = |token: String| move |r: reqwest::RequestBuilder| r.bearer_auth(token);
    let old = rs256(&claims(json!({})), "key-2026");
    assert_eq!(
        post_with(&app, bearer(old.clone())).await.status().as_u16(),
        204
    );

    jwks.serve(Some("key-2027"));
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let new = rs256(&claims(json!({})), "key-2027");
    assert_eq!(
        post_with(&app, bearer(new)).await.status().as_u16(),
        204,
        "the new kid triggers a fetch"
    );
    assert_eq!(
        post_with(&app, bearer(old)).await.status().as_u16(),
        401,
        "the rotated-out key is gone"
    );
    assert_eq!(jwks.fetches(), 2);
}
