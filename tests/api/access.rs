//! Access beyond credentials: no cross-site request changes anything, a source that keeps
//! failing authentication is locked out, and failed authentication is audited aggregated.

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::json;
use uuid::Uuid;

use crate::auth::attempts_eventually;
use crate::errors::assert_gateway_error;
use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_USER, Backend, GATEWAY_PASSWORD, GATEWAY_USER, READ_PASSWORD, READ_USER,
    TestApp, fixture, spawn_app, spawn_app_with,
};

/// A registration as a browser on `origin` would send it, with the admin's cached credentials.
fn registration(
    app: &TestApp,
    conversation: &str,
    content_type: &str,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    let body = json!({"conversationId": conversation, "operation": "POST /service-orders", "gatewayId": 77});
    let mut request = app
        .client
        .post(format!("{}/api/v1/conversations", app.address))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .header("Content-Type", content_type)
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
}

#[tokio::test]
async fn cross_site_requests_change_nothing_and_same_origin_or_scripted_ones_do() {
    let app = spawn_app(Backend::Sqlite).await;
    let own_origin = app.address.clone();
    let attacker = [
        ("Origin", "https://attacker.example"),
        ("Sec-Fetch-Site", "cross-site"),
    ];

    // The forms and fetches a page on another site can send without a CORS preflight.
    let retry_form = app
        .client
        .post(format!("{}/api/v1/outbox/dead/retry", app.address))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Origin", "https://attacker.example")
        .header("Sec-Fetch-Site", "cross-site")
        .body("")
        .send()
        .await
        .unwrap();
    assert_gateway_error(retry_form, 403, "NOT_AUTHORISED").await;
    for content_type in [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        // Refused for its content type alone (an old browser sends no Origin) ...
        let refused = registration(&app, "conv-csrf", content_type, &[])
            .send()
            .await
            .unwrap();
        assert_gateway_error(refused, 403, "NOT_AUTHORISED").await;
        // ... and with the headers a browser adds.
        let refused = registration(&app, "conv-csrf", content_type, &attacker)
            .send()
            .await
            .unwrap();
        assert_gateway_error(refused, 403, "NOT_AUTHORISED").await;
    }
    // JSON is refused when the browser says it comes from elsewhere, by either header.
    for headers in [
        &attacker[..],
        &[("Origin", "https://attacker.example")][..],
        &[("Sec-Fetch-Site", "cross-site")][..],
        &[("Sec-Fetch-Site", "same-site")][..],
        &[("Origin", "null")][..],
    ] {
        let refused = registration(&app, "conv-csrf", "application/json", headers)
            .send()
            .await
            .unwrap();
        assert_gateway_error(refused, 403, "NOT_AUTHORISED").await;
    }
    // An untyped body (what a `no-cors` fetch of a Blob sends) is refused too.
    let untyped = app
        .client
        .post(format!("{}/api/v1/outbox/dead/retry", app.address))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_gateway_error(untyped, 403, "NOT_AUTHORISED").await;
    assert_eq!(
        app.count("FROM conversation").await,
        0,
        "nothing registered"
    );

    // The dashboard's own origin, and scripts that send no browser headers, may.
    let same_origin = registration(
        &app,
        "conv-same-origin",
        "application/json",
        &[
            ("Origin", own_origin.as_str()),
            ("Sec-Fetch-Site", "same-origin"),
        ],
    )
    .send()
    .await
    .unwrap();
    assert_eq!(same_origin.status().as_u16(), 201);
    let scripted = registration(&app, "conv-scripted", "application/json", &[])
        .send()
        .await
        .unwrap();
    assert_eq!(scripted.status().as_u16(), 201);
    let bodiless = app
        .client
        .post(format!("{}/api/v1/outbox/dead/retry", app.address))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(bodiless.status().as_u16(), 200, "curl -X POST works");
    // Reading is never refused: a cross-site GET cannot read the answer anyway.
    let read = app
        .client
        .get(format!(
            "{}/api/v1/conversations/conv-scripted",
            app.address
        ))
        .basic_auth(READ_USER, Some(READ_PASSWORD))
        .header("Sec-Fetch-Site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status().as_u16(), 200);
    // The gateway's own endpoint is not a browser's: a KCI posted as JSON is unaffected.
    assert_eq!(
        app.post_kci(&fixture("ProvideServiceOrderUpdate-1"), "conv-kci")
            .await
            .status()
            .as_u16(),
        204
    );
}

#[tokio::test]
async fn behind_a_proxy_that_rewrites_host_the_public_origin_is_allowed_when_configured() {
    let app = spawn_app_with(Backend::Sqlite, |settings| {
        settings.server.allowed_origins = vec!["https://kci.example.com".to_owned()];
    })
    .await;
    let public = registration(
        &app,
        "conv-public",
        "application/json",
        &[
            ("Origin", "https://kci.example.com"),
            ("Sec-Fetch-Site", "same-origin"),
        ],
    )
    .send()
    .await
    .unwrap();
    assert_eq!(public.status().as_u16(), 201);
    let other = registration(
        &app,
        "conv-other",
        "application/json",
        &[
            ("Origin", "https://kci.example.com.attacker.example"),
            ("Sec-Fetch-Site", "same-origin"),
        ],
    )
    .send()
    .await
    .unwrap();
    assert_gateway_error(other, 403, "NOT_AUTHORISED").await;
}

/// A KCI posted with Basic `user:password`.
async fn post_kci_basic(app: &TestApp, user: &str, password: &str) -> reqwest::Response {
    let mut body = fixture("ProvideServiceOrderUpdate-1");
    body["id"] = json!(Uuid::new_v4().to_string());
    app.client
        .post(format!("{}/kcis", app.address))
        .header("X-Request-ID", Uuid::new_v4().to_string())
        .header("X-Conversation-ID", "conv-access")
        .basic_auth(user, Some(password))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_source_that_keeps_failing_authentication_is_locked_out_credentials_unchecked() {
    let app = spawn_app_with(Backend::Sqlite, |settings| {
        settings.server.auth_failures_per_minute = 5;
    })
    .await;
    for _ in 0..5 {
        let wrong = post_kci_basic(&app, GATEWAY_USER, "guess").await;
        assert_eq!(wrong.status().as_u16(), 401);
    }
    // Forbidden (a valid user without the role) is no guess: it does not count.
    for _ in 0..3 {
        let forbidden = post_kci_basic(&app, READ_USER, READ_PASSWORD).await;
        assert_eq!(forbidden.status().as_u16(), 403);
    }
    let sixth = post_kci_basic(&app, GATEWAY_USER, "guess").await;
    let retry_after: u64 = sixth.headers()["Retry-After"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_gateway_error(sixth, 429, "NOT_AUTHORISED").await;
    // Locked out, the right password is not even checked (so guessing learns nothing) ...
    let right = post_kci_basic(&app, GATEWAY_USER, GATEWAY_PASSWORD).await;
    assert_eq!(right.status().as_u16(), 429);
    let operations = app
        .client
        .get(format!("{}/api/v1/service-orders", app.address))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(operations.status().as_u16(), 429);
    // ... but probes still answer.
    assert_eq!(app.get("/healthz").await.status().as_u16(), 200);
    assert_eq!(
        app.count("FROM kci").await,
        0,
        "nothing was accepted while locked out"
    );
    // The allowance comes back at 5 a minute: one attempt every 12 s.
    let back = crate::helpers::eventually(std::time::Duration::from_secs(20), || async {
        post_kci_basic(&app, GATEWAY_USER, GATEWAY_PASSWORD)
            .await
            .status()
            .as_u16()
            == 204
    })
    .await;
    assert!(back, "the source may try again once its allowance is back");
}

#[tokio::test]
async fn a_thousand_failed_logins_are_a_few_audit_records_that_count_them_all() {
    let app = spawn_app(Backend::Postgres).await;
    let attempts = 1_000;
    let statuses: Vec<u16> = futures_util::stream::iter(0..attempts)
        .map(|i| {
            let app = &app;
            async move {
                let request = if i % 2 == 0 {
                    app.client
                        .post(format!("{}/kcis", app.address))
                        .basic_auth(GATEWAY_USER, Some(format!("guess-{i}")))
                        .json(&json!({}))
                } else {
                    app.client
                        .request(Method::GET, format!("{}/api/v1/outbox/dead", app.address))
                        .basic_auth(ADMIN_USER, Some(format!("guess-{i}")))
                };
                request.send().await.unwrap().status().as_u16()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 401));

    assert_eq!(
        attempts_eventually(&app, "response_status = 401", attempts).await,
        attempts,
        "every attempt counted"
    );
    let rows = app
        .rows(
            "SELECT method, path, remote_addr, outcome, response_status, request_headers::text AS headers \
             FROM audit_log WHERE response_status = 401",
        )
        .await;
    assert!(
        rows.len() <= 40,
        "one record per source, method and path per second here, not {}",
        rows.len()
    );
    for row in &rows {
        assert_eq!(row["outcome"], "AUTH_FAILED");
        assert_eq!(row["remote_addr"], "127.0.0.1");
        assert!(
            !row["headers"]
                .as_str()
                .unwrap_or_default()
                .contains("guess"),
            "no password kept: {row}"
        );
    }
    let paths: std::collections::BTreeSet<String> = rows
        .iter()
        .map(|row| format!("{} {}", row["method"], row["path"]))
        .collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
}

#[tokio::test]
async fn metrics_can_need_the_operations_credentials() {
    let app = spawn_app_with(Backend::Sqlite, |settings| {
        settings.metrics.access = kci_receiver::config::MetricsAccess::Operations;
    })
    .await;
    let anonymous = app.get("/metrics").await;
    assert_gateway_error(anonymous, 401, "NOT_AUTHORISED").await;
    let scraped = app
        .client
        .get(format!("{}/metrics", app.address))
        .basic_auth(READ_USER, Some(READ_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status().as_u16(), 200);
    assert!(scraped.text().await.unwrap().contains("kci_receiver_"));
    let gateway = app
        .client
        .get(format!("{}/metrics", app.address))
        .basic_auth(GATEWAY_USER, Some(GATEWAY_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(gateway.status().as_u16(), 403, "the gateway is no operator");
    let document: serde_json::Value = app.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(
        document["paths"]["/metrics"]["get"]["security"],
        json!([{"operations_basic": []}])
    );
}

#[tokio::test]
async fn on_a_port_of_its_own_metrics_and_probes_are_all_that_port_serves() {
    let app = spawn_app_with(Backend::Sqlite, |settings| {
        settings.metrics.port = Some(0);
    })
    .await;
    let metrics = app.metrics_address.clone().expect("a metrics listener");
    let get = |url: String| {
        let client = app.client.clone();
        async move { client.get(url).send().await.unwrap() }
    };
    let scraped = get(format!("{metrics}/metrics")).await;
    assert_eq!(scraped.status().as_u16(), 200);
    assert!(scraped.text().await.unwrap().contains("kci_receiver_"));
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(
            get(format!("{metrics}{probe}")).await.status().as_u16(),
            200
        );
        assert_eq!(
            get(format!("{}{probe}", app.address))
                .await
                .status()
                .as_u16(),
            200
        );
    }
    for elsewhere in ["/api/v1/entities", "/dashboard", "/openapi.json"] {
        let response = app
            .client
            .get(format!("{metrics}{elsewhere}"))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_gateway_error(response, 404, "NOT_FOUND").await;
    }
    let mut body = fixture("ProvideServiceOrderUpdate-1");
    body["id"] = json!(Uuid::new_v4().to_string());
    let kci_on_metrics_port = app
        .client
        .post(format!("{metrics}/kcis"))
        .header("X-Request-ID", Uuid::new_v4().to_string())
        .header("X-Conversation-ID", "conv-metrics-port")
        .basic_auth(GATEWAY_USER, Some(GATEWAY_PASSWORD))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_gateway_error(kci_on_metrics_port, 404, "NOT_FOUND").await;
    assert_gateway_error(app.get("/metrics").await, 404, "NOT_FOUND").await;
    let document: serde_json::Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(document["paths"].get("/metrics").is_none());
}

#[tokio::test]
async fn every_answer_forbids_sniffing_framing_caching_and_referrers() {
    let app = spawn_app(Backend::Sqlite).await;
    let answers = [
        app.get("/healthz").await,
        app.get("/no-such-page").await,
        app.get("/openapi.json").await,
        app.client
            .get(format!("{}/dashboard", app.address))
            .basic_auth(READ_USER, Some(READ_PASSWORD))
            .send()
            .await
            .unwrap(),
        app.client
            .get(format!("{}/api/v1/entities", app.address))
            .basic_auth(READ_USER, Some(READ_PASSWORD))
            .send()
            .await
            .unwrap(),
        post_kci_basic(&app, GATEWAY_USER, GATEWAY_PASSWORD).await,
        post_kci_basic(&app, GATEWAY_USER, "wrong").await,
        app.get("/api/v1/entities").await,
    ];
    for answer in answers {
        let headers = answer.headers();
        let url = answer.url().path().to_owned();
        assert_eq!(headers["X-Content-Type-Options"], "nosniff", "{url}");
        assert_eq!(headers["X-Frame-Options"], "DENY", "{url}");
        assert_eq!(headers["Referrer-Policy"], "no-referrer", "{url}");
        assert_eq!(headers["Cache-Control"], "no-store", "{url}");
        if answer.status().as_u16() == 401 {
            // RFC 9110: a 401 says how to authenticate, on every route.
            let challenge = headers["WWW-Authenticate"].to_str().unwrap();
            assert!(challenge.starts_with("Basic realm="), "{url}: {challenge}");
        }
        if url == "/dashboard" {
            let policy = headers["Content-Security-Policy"].to_str().unwrap();
            assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
        }
    }
}
