//! The egress proxy's client to the Fibre Cafe Tenant API (design.md, "Egress proxy").
//!
//! Every request gets an OAuth2 client-credentials token (cached, renewed before it expires, and
//! renewed once more when the Tenant API answers 401 to an idempotent request), and
//! `X-Request-ID` / `X-Conversation-ID` (passed through, or generated when absent). Calls that
//! create something KCIs will refer to are recorded as original requests, so that their KCIs are
//! matched without any extra call (and entities that arrived earlier are matched at once).

use std::time::{Duration, Instant};

use actix_web::http::Method;
use entity::conversation::ConversationSource;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use sea_orm::DatabaseConnection;
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
        let request_id = outbound
            .header("x-request-id")
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let conversation_id = outbound
            .header("x-conversation-id")
            .unwrap_or_else(|| Uuid::new_v4().to_string());
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
        let url = format!(
            "{}{}",
            self.settings.upstream_base_url.trim_end_matches('/'),
            outbound.path_and_query
        );
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
                .request(method.clone(), &url)
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
    db: &DatabaseConnection,
    outbound: &Outbound,
    request_id: &str,
    conversation_id: &str,
    status: u16,
    response_body: &[u8],
) -> Result<Registration, StoreError> {
    let gateway_id = serde_json::from_slice::<Value>(response_body)
        .ok()
        .and_then(|body| body.get("id").cloned())
        .filter(|id| id.is_number() || id.is_string());
    let new = NewConversation {
        conversation_id: conversation_id.to_owned(),
        request_id: Some(request_id.to_owned()),
        operation: format!("{} {}", outbound.method, outbound.path()),
        request_body: serde_json::from_slice(&outbound.body).ok(),
        gateway_id,
        response_status: Some(Value::from(status)),
    };
    register(db, &new, ConversationSource::Egress).await
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
}
