//! The egress proxy's client to the Fibre Cafe Tenant API (design.md, "Egress proxy").
//!
//! Every request gets an OAuth2 client-credentials token (cached, renewed before it expires, and
//! renewed once more when the Tenant API answers 401 to an idempotent request), and
//! `X-Request-ID` / `X-Conversation-ID` (passed through, or generated when absent). Calls that
//! create something KCIs will refer to are recorded as original requests, so that their KCIs are
//! matched without any extra call (and entities that arrived earlier are matched at once).

pub mod unrecorded;

use std::time::{Duration, Instant};

use actix_web::http::Method;
use entity::conversation::ConversationSource;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::config::EgressSettings;
use crate::intake::conversations::{NewConversation, Registration, register};
use crate::store::StoreError;

/// Hop-by-hop headers (RFC 9110 section 7.6.1): never passed on, either way.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
];

/// Whether a caller's header goes upstream: not hop-by-hop, not our caller's credentials, not
/// what the client sets itself.
fn is_forwarded(name: &str) -> bool {
    const OURS: &[&str] = &[
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "content-length",
        "accept-encoding",
        "x-request-id",
        "x-conversation-id",
    ];
    let name = name.to_ascii_lowercase();
    !HOP_BY_HOP.contains(&name.as_str()) && !OURS.contains(&name.as_str())
}

/// Whether an upstream answer's header goes back to the caller.
pub fn is_returned(name: &str) -> bool {
    const SET_BY_OUR_SERVER: &[&str] = &["content-length", "date", "server"];
    let name = name.to_ascii_lowercase();
    !HOP_BY_HOP.contains(&name.as_str()) && !SET_BY_OUR_SERVER.contains(&name.as_str())
}

/// Why a request did not get an answer from the Tenant API.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("the Fibre Cafe gateway did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the Fibre Cafe gateway could not be reached: {0}")]
    Unreachable(String),
    #[error("no access token from the token endpoint: {0}")]
    Token(String),
    /// The request would leave the Tenant API, or carries ids we cannot pass on: never sent.
    #[error("{0}")]
    Refused(String),
}

/// The correlation ids a caller gives must be what the gateway's own APIs take (and what we can
/// record): 1 to 255 printable ASCII characters.
fn valid_id(value: &str) -> bool {
    (1..=255).contains(&value.len())
        && value
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) || b == b' ')
}

/// The upstream URL of a request: `base` joined with `path_and_query`, refused unless it stays
/// under `base` (same scheme, host, port, and path prefix). The path must be plain: no dot
/// segments, no empty segments, no backslash, and no percent-escape of `/`, `\`, `.`, `%` or a
/// control character (decoded, any of them could step out of the base or be read so by the
/// server); nothing is ever normalised away.
pub fn confined_url(base: &str, path_and_query: &str) -> Result<reqwest::Url, String> {
    let refused = |why: &str| format!("The path cannot be forwarded to the Tenant API: {why}");
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    if !path.starts_with('/') {
        return Err(refused("it must start with /"));
    }
    let bytes = path.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        match byte {
            b'%' => {
                let decoded = bytes
                    .get(index + 1..index + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| refused("a broken percent-escape"))?;
                if matches!(decoded, b'/' | b'\\' | b'.' | b'%')
                    || decoded < 0x20
                    || decoded == 0x7f
                {
                    return Err(refused(
                        "an encoded slash, backslash, dot, percent or control character",
                    ));
                }
                index += 3;
            }
            b'\\' => return Err(refused("a backslash")),
            0x21..=0x7e => index += 1,
            _ => return Err(refused("a character that must be percent-encoded")),
        }
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (position, segment) in segments.iter().enumerate() {
        let last = position + 1 == segments.len();
        if *segment == "." || *segment == ".." {
            return Err(refused("a dot segment"));
        }
        if segment.is_empty() && !last {
            return Err(refused("an empty segment"));
        }
    }
    if query.is_some_and(|q| q.bytes().any(|b| b < 0x21 || b == 0x7f || b == b'#')) {
        return Err(refused(
            "a query string with characters that must be percent-encoded",
        ));
    }
    let base_url = reqwest::Url::parse(base).map_err(|e| refused(&format!("bad base URL: {e}")))?;
    let base_path = base_url.path().trim_end_matches('/').to_owned();
    let joined = format!("{}{path_and_query}", base.trim_end_matches('/'));
    let url = reqwest::Url::parse(&joined).map_err(|e| refused(&e.to_string()))?;
    let stays = url.scheme() == base_url.scheme()
        && url.host_str() == base_url.host_str()
        && url.port_or_known_default() == base_url.port_or_known_default()
        && url.path() == format!("{base_path}{path}");
    if !stays {
        return Err(refused("it leaves the Tenant API's base URL"));
    }
    Ok(url)
}

/// One request to send upstream.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub method: Method,
    /// Path under the Tenant API's base URL, with its query string: `/service-orders?x=1`.
    pub path_and_query: String,
    /// Headers from the caller (filtered before sending).
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: actix_web::web::Bytes,
}

impl Outbound {
    pub fn path(&self) -> &str {
        self.path_and_query
            .split('?')
            .next()
            .unwrap_or(&self.path_and_query)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    }
}

/// The Tenant API's answer, not yet read.
pub struct Upstream {
    pub request_id: String,
    pub conversation_id: String,
    pub response: reqwest::Response,
}

struct CachedToken {
    value: SecretString,
    renew_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<u64>,
}

pub struct EgressClient {
    settings: EgressSettings,
    http: reqwest::Client,
    token: Mutex<Option<CachedToken>>,
}

impl EgressClient {
    pub fn new(settings: &EgressSettings) -> anyhow::Result<EgressClient> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .build()?;
        Ok(EgressClient {
            settings: settings.clone(),
            http,
            token: Mutex::new(None),
        })
    }

    pub fn settings(&self) -> &EgressSettings {
        &self.settings
    }

    fn failure(&self, error: reqwest::Error) -> EgressError {
        if error.is_timeout() {
            EgressError::Timeout(Duration::from_millis(self.settings.timeout_ms))
        } else {
            let mut message = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
            EgressError::Unreachable(message)
        }
    }

    /// A valid access token: the cached one, or a new one when it is close to expiry or `renew`.
    async fn access_token(&self, renew: bool) -> Result<SecretString, EgressError> {
        let mut cached = self.token.lock().await;
        if !renew && let Some(token) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(token.value.clone());
        }
        let mut form = vec![("grant_type", "client_credentials".to_owned())];
        if let Some(scope) = self.settings.scope.as_ref().filter(|s| !s.is_empty()) {
            form.push(("scope", scope.clone()));
        }
        let secret = self
            .settings
            .client_secret
            .as_ref()
            .map(|s| s.expose_secret().to_owned());
        let response = self
            .http
            .post(&self.settings.token_url)
            .basic_auth(&self.settings.client_id, secret)
            .form(&form)
            .send()
            .await
            .map_err(|e| EgressError::Token(self.failure(e).to_string()))?;
        if !response.status().is_success() {
            return Err(EgressError::Token(format!(
                "the token endpoint answered {}",
                response.status()
            )));
        }
        let token: TokenResponse = response
            .json()
            .await
            .map_err(|e| EgressError::Token(format!("unreadable token response: {e}")))?;
        let lifetime = Duration::from_secs(token.expires_in.unwrap_or(300));
        let margin =
            Duration::from_secs(self.settings.token_refresh_margin_seconds).min(lifetime / 2);
        let value = SecretString::from(token.access_token);
        *cached = Some(CachedToken {
            value: value.clone(),
            renew_at: Instant::now() + lifetime - margin,
        });
        tracing::debug!(expires_in = ?lifetime, "egress access token obtained");
        Ok(value)
    }

    /// Sends `outbound` to the Tenant API. A 401 to an idempotent request renews the token and
    /// tries once more; POST and PATCH are never sent twice.
    pub async fn send(&self, outbound: &Outbound) -> Result<Upstream, EgressError> {
        let url = confined_url(&self.settings.upstream_base_url, &outbound.path_and_query)
            .map_err(EgressError::Refused)?;
        let id = |name: &str, display: &str| match outbound.header(name) {
            Some(value) if valid_id(&value) => Ok(value),
            Some(_) => Err(EgressError::Refused(format!(
                "The {display} header must be 1 to 255 printable ASCII characters"
            ))),
            None => Ok(Uuid::new_v4().to_string()),
        };
        let request_id = id("x-request-id", "X-Request-ID")?;
        let conversation_id = id("x-conversation-id", "X-Conversation-ID")?;
        let mut headers = HeaderMap::new();
        for (name, value) in &outbound.headers {
            if !is_forwarded(name) {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                headers.append(name, value);
            }
        }
        for (name, value) in [
            ("x-request-id", &request_id),
            ("x-conversation-id", &conversation_id),
        ] {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
        let method = reqwest::Method::from_bytes(outbound.method.as_str().as_bytes())
            .map_err(|e| EgressError::Unreachable(e.to_string()))?;
        let idempotent = matches!(
            outbound.method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
        );

        let mut renew = false;
        loop {
            let token = self.access_token(renew).await?;
            let mut request_headers = headers.clone();
            let bearer = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
                .map_err(|_| {
                    EgressError::Token("the token is not a valid header value".to_owned())
                })?;
            request_headers.insert(AUTHORIZATION, bearer);
            let response = self
                .http
                .request(method.clone(), url.clone())
                .headers(request_headers)
                .body(outbound.body.clone())
                .send()
                .await
                .map_err(|e| self.failure(e))?;
            if response.status() == reqwest::StatusCode::UNAUTHORIZED && idempotent && !renew {
                tracing::info!(
                    "the Tenant API refused the token; renewing it and trying once more"
                );
                renew = true;
                continue;
            }
            return Ok(Upstream {
                request_id,
                conversation_id,
                response,
            });
        }
    }
}

/// The Tenant API operations (1.17) that create something KCIs will refer to.
pub fn creates_something(method: &Method, path: &str) -> bool {
    let path = path.trim_end_matches('/');
    let creating_posts = [
        "/service-orders",
        "/ethernet/service-orders",
        "/service-order-amendments",
        "/service-order-cancellations",
        "/service-tests",
        "/service-problems",
        "/service-problem-amendments",
        "/service-problem-cancellations",
    ];
    (*method == Method::POST && creating_posts.contains(&path))
        || (*method == Method::PATCH && path.starts_with("/service-problem-resolutions/"))
}

/// Records a successful creating call as an original request (idempotent on the conversation id).
pub async fn record_original_request(
    db: &crate::store::Database,
    outbound: &Outbound,
    request_id: &str,
    conversation_id: &str,
    status: u16,
    response_body: &[u8],
) -> Result<Registration, StoreError> {
    let new = original_request(outbound, request_id, conversation_id, status, response_body);
    register(db, &new, ConversationSource::Egress).await
}

/// The original request a successful creating call makes, to be registered.
pub fn original_request(
    outbound: &Outbound,
    request_id: &str,
    conversation_id: &str,
    status: u16,
    response_body: &[u8],
) -> NewConversation {
    let gateway_id = serde_json::from_slice::<Value>(response_body)
        .ok()
        .and_then(|body| body.get("id").cloned())
        .filter(|id| id.is_number() || id.is_string());
    NewConversation {
        conversation_id: conversation_id.to_owned(),
        request_id: Some(request_id.to_owned()),
        operation: format!("{} {}", outbound.method, outbound.path()),
        request_body: serde_json::from_slice(&outbound.body).ok(),
        gateway_id,
        response_status: Some(Value::from(status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creating_calls_are_recognised() {
        assert!(creates_something(&Method::POST, "/service-orders"));
        assert!(creates_something(
            &Method::POST,
            "/service-problem-cancellations/"
        ));
        assert!(creates_something(
            &Method::PATCH,
            "/service-problem-resolutions/77"
        ));
        assert!(!creates_something(&Method::GET, "/service-orders"));
        assert!(!creates_something(&Method::POST, "/quote"));
    }

    #[test]
    fn the_proxy_never_leaves_the_tenant_api() {
        let base = "https://gateway.example/fibre-cafe/v1";
        for path in [
            "/service-orders",
            "/service-orders/123?expand=updates",
            "/service-orders/",
            "/service-orders/ORD%2D1",
        ] {
            let url = confined_url(base, path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(
                url.as_str()
                    .starts_with("https://gateway.example/fibre-cafe/v1/"),
                "{url}"
            );
        }
        for path in [
            "/../../oauth/token",
            "/%2e%2e/oauth/token",
            "/%2E%2E/oauth/token",
            "/x/../service-orders",
            "/./service-orders",
            "/service-orders%2f..%2f..%2foauth",
            "/service-orders%5c..",
            "/..\\oauth",
            "//evil.example/x",
            "/a//b",
            "/%252e%252e/oauth",
            "/%00",
            "/%zz",
            "/a b",
            "service-orders",
            "/x?y=1#frag",
        ] {
            assert!(confined_url(base, path).is_err(), "{path} must be refused");
        }
    }
}
