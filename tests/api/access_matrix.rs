//! Who may call what, cell by cell: every route of the application, enumerated from its own
//! OpenAPI document (a new route cannot be forgotten), x every kind of credential, for each way
//! the gateway can authenticate (Basic, bearer JWT, mutual TLS). A cell is either allowed (the
//! status the route's rightful caller gets for the same request) or exactly 401 or 403.

use std::fmt;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use kci_receiver::config::{GatewayAuthMethod, JwtKeySettings, Settings};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::auth::{claims, now, rs256};
use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_USER, Backend, EGRESS_PASSWORD, EGRESS_USER, GATEWAY_PASSWORD,
    GATEWAY_USER, READ_PASSWORD, READ_USER, TestApp, fixture, spawn_app_with,
};
use crate::mtls::{Ca, Files, GATEWAY_NAME, client, use_mtls};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deployment {
    Basic,
    Jwt,
    Mtls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Credential {
    None,
    WrongBasic,
    GatewayBasic,
    Jwt,
    JwtWithoutScope,
    JwtExpired,
    JwtAlgNone,
    /// HS256 "signed" with the RSA public key as the HMAC secret (algorithm confusion).
    JwtHs256WithRsaPublicKey,
    OpsRead,
    OpsAdmin,
    OpsEgress,
    /// The gateway's client certificate, no `Authorization`.
    MtlsClient,
}

const CREDENTIALS: [Credential; 12] = [
    Credential::None,
    Credential::WrongBasic,
    Credential::GatewayBasic,
    Credential::Jwt,
    Credential::JwtWithoutScope,
    Credential::JwtExpired,
    Credential::JwtAlgNone,
    Credential::JwtHs256WithRsaPublicKey,
    Credential::OpsRead,
    Credential::OpsAdmin,
    Credential::OpsEgress,
    Credential::MtlsClient,
];

/// Who a route is for, read from its `security` in the OpenAPI document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Audience {
    Anyone,
    Gateway,
    OperationsRead,
    OperationsAdmin,
    OperationsEgress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expected {
    Allowed,
    Status(u16),
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Allowed => write!(f, "allowed"),
            Expected::Status(status) => write!(f, "{status}"),
        }
    }
}

/// The rule the matrix checks, in one place.
fn expected(deployment: Deployment, audience: Audience, credential: Credential) -> Expected {
    use Credential as C;
    match audience {
        Audience::Anyone => Expected::Allowed,
        Audience::Gateway => match (deployment, credential) {
            (Deployment::Basic, C::GatewayBasic)
            | (Deployment::Jwt, C::Jwt)
            | (Deployment::Mtls, C::MtlsClient) => Expected::Allowed,
            // Known callers who are not the gateway: the operations users, a token without
            // the scope.
            (Deployment::Basic, C::OpsRead | C::OpsAdmin | C::OpsEgress)
            | (Deployment::Jwt, C::JwtWithoutScope) => Expected::Status(403),
            _ => Expected::Status(401),
        },
        Audience::OperationsRead | Audience::OperationsAdmin | Audience::OperationsEgress => {
            let needed_role = match audience {
                Audience::OperationsRead => C::OpsRead,
                Audience::OperationsEgress => C::OpsEgress,
                _ => C::OpsAdmin,
            };
            match credential {
                C::OpsAdmin => Expected::Allowed,
                role if role == needed_role => Expected::Allowed,
                C::OpsRead | C::OpsEgress => Expected::Status(403),
                // The gateway's own Basic credentials are known (only when it uses Basic).
                C::GatewayBasic if deployment == Deployment::Basic => Expected::Status(403),
                _ => Expected::Status(401),
            }
        }
    }
}

const RSA_PUBLIC_PEM: &str = include_str!("keys/test-rsa-public.pem");

fn token(credential: Credential) -> Option<String> {
    let base64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    Some(match credential {
        Credential::Jwt => rs256(&claims(json!({})), "test-key-1"),
        Credential::JwtWithoutScope => rs256(&claims(json!({"scope": "openid"})), "test-key-1"),
        Credential::JwtExpired => rs256(&claims(json!({"exp": now() - 120})), "test-key-1"),
        Credential::JwtAlgNone => format!(
            "{}.{}.",
            base64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            base64.encode(claims(json!({})).to_string())
        ),
        Credential::JwtHs256WithRsaPublicKey => encode(
            &Header::new(Algorithm::HS256),
            &claims(json!({})),
            &EncodingKey::from_secret(RSA_PUBLIC_PEM.as_bytes()),
        )
        .unwrap(),
        _ => return None,
    })
}

fn basic(credential: Credential) -> Option<(&'static str, &'static str)> {
    Some(match credential {
        Credential::WrongBasic => (ADMIN_USER, "not-the-password"),
        Credential::GatewayBasic => (GATEWAY_USER, GATEWAY_PASSWORD),
        Credential::OpsRead => (READ_USER, READ_PASSWORD),
        Credential::OpsAdmin => (ADMIN_USER, ADMIN_PASSWORD),
        Credential::OpsEgress => (EGRESS_USER, EGRESS_PASSWORD),
        _ => return None,
    })
}

/// One operation of the document, made concrete.
struct Route {
    method: reqwest::Method,
    template: String,
    audience: Audience,
}

fn routes(document: &Value, egress_prefix: &str) -> Vec<Route> {
    let mut routes = Vec::new();
    for (template, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let schemes: Vec<&str> = operation["security"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|requirement| requirement.as_object())
                .flat_map(|requirement| requirement.keys().map(String::as_str))
                .collect();
            let audience = if schemes.is_empty() {
                Audience::Anyone
            } else if schemes.contains(&"operations_basic") {
                if template.starts_with(egress_prefix) {
                    Audience::OperationsEgress
                } else if method == "get" {
                    Audience::OperationsRead
                } else {
                    Audience::OperationsAdmin
                }
            } else {
                Audience::Gateway
            };
            routes.push(Route {
                method: method.to_uppercase().parse().unwrap(),
                template: template.clone(),
                audience,
            });
        }
    }
    routes
}

/// A request to `route` its rightful caller would send; every call differs (new ids), so that
/// each one has the same effect.
fn concrete(route: &Route, document: &Value) -> (String, Option<Value>) {
    let mut path = route.template.clone();
    for (name, value) in [
        ("{id}", "424242".to_owned()),
        ("{conversationId}", format!("conv-{}", Uuid::new_v4())),
        ("{kciId}", Uuid::new_v4().to_string()),
        ("{xRequestId}", format!("req-{}", Uuid::new_v4())),
        ("{eventId}", Uuid::new_v4().to_string()),
        ("{path}", "service-orders/1".to_owned()),
    ] {
        path = path.replace(name, &value);
    }
    assert!(
        !path.contains('{'),
        "{path}: a path parameter the matrix does not know; add it to `concrete`"
    );
    let operation = &document["paths"][&route.template][route.method.as_str().to_lowercase()];
    let required_query: Vec<String> = operation["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["in"] == "query" && p["required"] == true)
        .map(|p| format!("{}=x", p["name"].as_str().unwrap()))
        .collect();
    if !required_query.is_empty() {
        path = format!("{path}?{}", required_query.join("&"));
    }
    let body = operation.get("requestBody").map(|_| {
        match (route.method.as_str(), route.template.as_str()) {
            ("POST", "/kcis") => {
                let mut kci = fixture("ProvideServiceOrderUpdate-1");
                kci["id"] = json!(Uuid::new_v4().to_string());
                kci
            }
            ("POST", "/api/v1/conversations") => json!({
                "conversationId": format!("conv-{}", Uuid::new_v4()),
                "operation": "POST /service-orders"
            }),
            ("POST", "/api/v1/outbox/replay") => json!({"conversationId": "conv-none"}),
            ("POST", template) if template.ends_with("/skip") => json!({"reason": "matrix"}),
            (_, template) if template.contains("{path}") => json!({"orderType": "NEW"}),
            (method, template) => {
                panic!("{method} {template}: a body the matrix does not know; add it to `concrete`")
            }
        }
    });
    (path, body)
}

async fn send(
    client: &reqwest::Client,
    base: &str,
    route: &Route,
    (path, body): &(String, Option<Value>),
    credential: Credential,
) -> u16 {
    let mut request = client
        .request(route.method.clone(), format!("{base}{path}"))
        .header("X-Request-ID", Uuid::new_v4().to_string())
        .header("X-Conversation-ID", format!("conv-{}", Uuid::new_v4()));
    if let Some(body) = body {
        request = request.json(body);
    }
    if let Some((user, password)) = basic(credential) {
        request = request.basic_auth(user, Some(password));
    }
    if let Some(token) = token(credential) {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

/// The gateway's credential in each deployment: what the rightful caller of `/kcis` sends.
fn gateway_credential(deployment: Deployment) -> Credential {
    match deployment {
        Deployment::Basic => Credential::GatewayBasic,
        Deployment::Jwt => Credential::Jwt,
        Deployment::Mtls => Credential::MtlsClient,
    }
}

fn rightful(deployment: Deployment, audience: Audience) -> Credential {
    match audience {
        Audience::Gateway => gateway_credential(deployment),
        Audience::OperationsEgress => Credential::OpsEgress,
        _ => Credential::OpsAdmin,
    }
}

fn with_egress(settings: &mut Settings) {
    // An upstream nobody listens on: an allowed egress call is the proxy's 502.
    crate::helpers::enable_egress(
        settings,
        "http://127.0.0.1:9/v1".to_owned(),
        "http://127.0.0.1:9/token".to_owned(),
        ("matrix-client", "matrix-secret"),
    );
    settings.egress.timeout_ms = 500;
    settings.egress.connect_timeout_ms = 200;
    settings.operations_auth.egress_password = Some(secrecy::SecretString::from(EGRESS_PASSWORD));
}

fn with_jwt(settings: &mut Settings) {
    settings.gateway_auth.method = GatewayAuthMethod::Jwt;
    let jwt = &mut settings.gateway_auth.jwt;
    jwt.issuer = "https://auth.fibre-cafe.test/".to_owned();
    jwt.audience = vec!["kci-receiver".to_owned()];
    jwt.required_scope = "kci.write".to_owned();
    jwt.algorithms = vec!["RS256".to_owned()];
    jwt.leeway_seconds = 0;
    jwt.jwks_url = None;
    jwt.keys = vec![JwtKeySettings {
        kid: None,
        algorithm: "RS256".to_owned(),
        pem: Some(RSA_PUBLIC_PEM.to_owned()),
        secret: None,
    }];
}

/// Runs the matrix for one deployment; returns the cells that differ from [`expected`].
async fn matrix(
    deployment: Deployment,
    app: &TestApp,
    base: &str,
    client_for: impl Fn(Credential) -> reqwest::Client,
) -> Vec<String> {
    let document: Value = app.get("/openapi.json").await.json().await.unwrap();
    // The document names the one way this deployment's gateway authenticates, and defines it.
    let schemes = &document["paths"]["/kcis"]["post"]["security"];
    assert_eq!(schemes.as_array().map(Vec::len), Some(1), "{schemes}");
    for scheme in schemes[0].as_object().unwrap().keys() {
        assert!(
            document["components"]["securitySchemes"]
                .get(scheme)
                .is_some(),
            "{deployment:?}: {scheme} is defined"
        );
    }
    let routes = routes(&document, "/fibre-cafe/v1");
    assert!(routes.len() >= 30, "{} routes", routes.len());
    let mut wrong = Vec::new();
    for route in &routes {
        let owner = rightful(deployment, route.audience);
        let allowed = send(
            &client_for(owner),
            base,
            route,
            &concrete(route, &document),
            owner,
        )
        .await;
        if matches!(allowed, 401 | 403 | 429) || (allowed >= 500 && allowed != 502) {
            wrong.push(format!(
                "{deployment:?} {} {}: its rightful caller ({owner:?}) got {allowed}",
                route.method, route.template
            ));
            continue;
        }
        for credential in CREDENTIALS {
            if credential == Credential::MtlsClient && deployment != Deployment::Mtls {
                continue; // no TLS listener to present it to
            }
            let status = send(
                &client_for(credential),
                base,
                route,
                &concrete(route, &document),
                credential,
            )
            .await;
            let want = expected(deployment, route.audience, credential);
            let holds = match want {
                Expected::Allowed => status == allowed,
                Expected::Status(expected) => status == expected,
            };
            if !holds {
                wrong.push(format!(
                    "{deployment:?} {} {} with {credential:?}: expected {want} ({allowed} when allowed), got {status}",
                    route.method, route.template
                ));
            }
        }
    }
    wrong
}

#[tokio::test]
async fn every_route_answers_every_credential_as_the_access_rules_say() {
    let basic_app = spawn_app_with(Backend::Sqlite, with_egress).await;
    let jwt_app = spawn_app_with(Backend::Sqlite, |settings| {
        with_egress(settings);
        with_jwt(settings);
        settings.validate().unwrap();
    })
    .await;
    let (server_ca, client_ca) = (Ca::new("matrix server CA"), Ca::new("matrix client CA"));
    let files = Files::new();
    files.write(&server_ca, &client_ca);
    let mtls_app = spawn_app_with(Backend::Sqlite, |settings| {
        with_egress(settings);
        use_mtls(settings, &files, Vec::new());
    })
    .await;
    let gateway_certificate = client_ca.issue(GATEWAY_NAME, &[], true, false);
    let with_certificate = client(&server_ca, Some(&gateway_certificate));
    let without_certificate = client(&server_ca, None);

    let mut wrong = matrix(Deployment::Basic, &basic_app, &basic_app.address, |_| {
        basic_app.client.clone()
    })
    .await;
    wrong.extend(
        matrix(Deployment::Jwt, &jwt_app, &jwt_app.address, |_| {
            jwt_app.client.clone()
        })
        .await,
    );
    let tls = mtls_app.tls_address.clone().unwrap();
    wrong.extend(
        matrix(Deployment::Mtls, &mtls_app, &tls, |credential| {
            if credential == Credential::MtlsClient {
                with_certificate.clone()
            } else {
                without_certificate.clone()
            }
        })
        .await,
    );
    assert!(
        wrong.is_empty(),
        "{} cells wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
