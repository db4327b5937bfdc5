//! What every request goes through before and after its handler, for access (OWASP API Security:
//! broken authentication, unrestricted resource consumption, cross-site requests):
//!
//! - [`guard`]: a source that keeps failing authentication is locked out for a while (429 with
//!   `Retry-After`, before any credential is even looked at): `server.auth_failures_per_minute`
//!   per source, counted with `governor`;
//! - failed authentication (401, 403) is audited aggregated: one record per source, method and
//!   path per minute, with the number of attempts, never a database write per attempt;
//! - what an operator changes (a non-GET under `/api/v1` that succeeded) is audited with who;
//! - [`refuse_cross_site`]: state-changing requests a browser could send from another site with
//!   its cached credentials are refused.
//!
//! The source of a request is its peer address, or, when the peer is one of
//! `server.trusted_proxies`, the last address of `X-Forwarded-For`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::body::EitherBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use actix_web::web;
use governor::{Quota, RateLimiter};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{AppState, PassOrRefuse, is_json, pass, refuse};
use crate::auth::mtls::Network;
use crate::error::ApiError;
use crate::store::audit::{AuditOutcome, AuditRecord, AuditSink};

/// Most (source, method, path) aggregates kept in a window; beyond, one catch-all per source.
const MAX_AGGREGATES: usize = 1000;
/// Most locked-out sources remembered.
const MAX_LOCKOUTS: usize = 100_000;

type Limiter = RateLimiter<
    IpAddr,
    governor::state::keyed::HashMapStateStore<IpAddr>,
    governor::clock::DefaultClock,
>;

struct Aggregate {
    sample: AuditRecord,
    attempts: u32,
}

/// Failed authentication: the limiter, who is locked out, and what waits to be audited.
pub struct AuthFailures {
    limiter: Limiter,
    lockouts: Mutex<HashMap<IpAddr, Instant>>,
    aggregates: Mutex<HashMap<(String, String, String), Aggregate>>,
    trusted_proxies: Vec<Network>,
    /// How long failed authentication is gathered before its aggregated records are written.
    window: Duration,
}

impl AuthFailures {
    pub fn new(per_minute: u32, trusted_proxies: &[String], window: Duration) -> Arc<AuthFailures> {
        let per_minute = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        Arc::new(AuthFailures {
            limiter: RateLimiter::hashmap(Quota::per_minute(per_minute)),
            lockouts: Mutex::new(HashMap::new()),
            aggregates: Mutex::new(HashMap::new()),
            trusted_proxies: trusted_proxies
                .iter()
                .filter_map(|p| Network::parse(p))
                .collect(),
            window: window.max(Duration::from_secs(1)),
        })
    }

    /// Writes the aggregated records every window, and forgets what the limiter no longer
    /// needs; until `shutdown` (then writes what it has).
    pub fn start(self: &Arc<Self>, audit: AuditSink, shutdown: CancellationToken) {
        let failures = self.clone();
        tokio::spawn(async move {
            loop {
                let stopping = tokio::select! {
                    _ = tokio::time::sleep(failures.window) => false,
                    _ = shutdown.cancelled() => true,
                };
                failures.flush(&audit);
                failures.limiter.retain_recent();
                if let Ok(mut lockouts) = failures.lockouts.lock() {
                    let now = Instant::now();
                    lockouts.retain(|_, until| *until > now);
                }
                if stopping {
                    return;
                }
            }
        });
    }

    fn flush(&self, audit: &AuditSink) {
        let aggregates = match self.aggregates.lock() {
            Ok(mut aggregates) => std::mem::take(&mut *aggregates),
            Err(_) => return,
        };
        for (_, aggregate) in aggregates {
            audit.record_aggregated(aggregate.sample, aggregate.attempts);
        }
    }

    /// The source of a request (see the module documentation).
    fn source(&self, request: &ServiceRequest) -> Option<IpAddr> {
        let peer = request.peer_addr()?.ip();
        if !self.trusted_proxies.iter().any(|n| n.contains(peer)) {
            return Some(peer);
        }
        request
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
            .or(Some(peer))
    }

    /// When the source may try again, if it is locked out.
    fn locked_out(&self, source: IpAddr) -> Option<Duration> {
        let until = *self.lockouts.lock().ok()?.get(&source)?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }

    /// Counts a failed authentication of `source`: aggregated for the audit log, and, when
    /// `unauthenticated` (401: a guess, not a valid user without the role), against the source's
    /// allowance. Over it, the source is locked out: how long, when this failure did that.
    fn failed(
        &self,
        source: Option<IpAddr>,
        mut record: AuditRecord,
        unauthenticated: bool,
    ) -> Option<Duration> {
        if let Some(source) = source {
            record.remote_addr = Some(source.to_string());
        }
        let mut locked_for = None;
        if let (Some(source), true) = (source, unauthenticated)
            && let Err(not_until) = self.limiter.check_key(&source)
        {
            let wait = not_until
                .wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ))
                .max(Duration::from_secs(1));
            if let Ok(mut lockouts) = self.lockouts.lock()
                && lockouts.len() < MAX_LOCKOUTS
            {
                lockouts.insert(source, Instant::now() + wait);
                tracing::warn!(%source, locked_for = ?wait, "too many failed authentications; source locked out");
                locked_for = Some(wait);
            }
        }
        let Ok(mut aggregates) = self.aggregates.lock() else {
            return locked_for;
        };
        let source = source.map_or_else(|| "unknown".to_owned(), |s| s.to_string());
        let mut key = (source.clone(), record.method.clone(), record.path.clone());
        if aggregates.len() >= MAX_AGGREGATES && !aggregates.contains_key(&key) {
            key = (source, "*".to_owned(), "*".to_owned());
        }
        aggregates
            .entry(key)
            .and_modify(|aggregate| aggregate.attempts = aggregate.attempts.saturating_add(1))
            .or_insert(Aggregate {
                sample: record,
                attempts: 1,
            });
        locked_for
    }
}

/// The middleware described in the module documentation. It also completes error answers the
/// way the HTTP contract wants them, whoever made them: a 503's `Retry-After` is
/// `server.retry_after_seconds`, and a 401 without a challenge gets the operations API's
/// (RFC 9110: a 401 carries `WWW-Authenticate`).
pub fn guard<S, B>(
    request: ServiceRequest,
    service: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse<EitherBody<B>>, actix_web::Error>>
+ use<S, B>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
{
    let state = request.app_data::<web::Data<AppState>>().cloned();
    let failures = state.as_ref().map(|state| state.auth_failures.clone());
    let source = failures.as_ref().and_then(|f| f.source(&request));
    // Probes carry no credentials: a locked-out address (a node shared with an attacker) still
    // learns whether the service is alive.
    let probe = matches!(request.path(), "/healthz" | "/readyz");
    let locked = match (&failures, source) {
        (Some(failures), Some(source)) if !probe => failures.locked_out(source),
        _ => None,
    };
    // What the audit needs of the request, should it fail authentication or change something.
    let method = request.method().clone();
    let operator_action =
        method != Method::GET && method != Method::HEAD && request.path().starts_with("/api/v1/");
    let head = request.head().clone();
    let peer = request.peer_addr();
    let authorization = request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let called = match locked {
        // Locked out: answered at once, nothing else looked at.
        Some(wait) => Err(request.error_response(ApiError::TooManyRequests {
            retry_after_seconds: wait.as_secs().max(1),
        })),
        None => Ok(service.call(request)),
    };
    async move {
        let record = |status: u16, outcome: AuditOutcome| AuditRecord {
            response_status: status,
            outcome,
            ..super::audit_record_of(&head, peer)
        };
        // A failed authentication (401, 403) is counted and audited aggregated; how long the
        // source is locked out, when this failure used up its allowance.
        let count_failure = |status: u16| {
            let failures = failures.as_ref()?;
            let failed = status == 401 || status == 403;
            failed
                .then(|| {
                    failures.failed(
                        source,
                        record(status, AuditOutcome::AuthFailed),
                        status == 401,
                    )
                })
                .flatten()
        };
        let mut response = match called {
            Err(locked_out) => return Ok(locked_out.map_into_right_body()),
            Ok(called) => match called.await {
                Ok(response) => response.map_into_left_body(),
                Err(error) => {
                    // An error a middleware returned (a handler's is already an answer): counted
                    // like the others, and passed on.
                    count_failure(error.as_response_error().status_code().as_u16());
                    return Err(error);
                }
            },
        };
        let status = response.status().as_u16();
        if let Some(state) = &state {
            if status == 401 || status == 403 {
                // The failure that uses up the allowance is answered as the lockout it starts.
                if let Some(wait) = count_failure(status) {
                    let (request, _) = response.into_parts();
                    let locked_out = ApiError::TooManyRequests {
                        retry_after_seconds: wait.as_secs().max(1),
                    };
                    response = ServiceResponse::new(
                        request,
                        actix_web::ResponseError::error_response(&locked_out),
                    )
                    .map_into_right_body();
                }
            } else if operator_action && (200..300).contains(&status) {
                state.audit.record(AuditRecord {
                    principal: basic_user(&authorization),
                    ..record(status, AuditOutcome::OperatorAction)
                });
            }
        }
        let final_status = response.status().as_u16();
        let headers = response.headers_mut();
        match final_status {
            503 => {
                if let Some(state) = &state {
                    headers.insert(
                        RETRY_AFTER,
                        HeaderValue::from(state.settings.server.retry_after_seconds),
                    );
                }
            }
            401 if !headers.contains_key(WWW_AUTHENTICATE) => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(OPERATIONS_CHALLENGE),
                );
            }
            _ => {}
        }
        Ok(response)
    }
}

/// The challenge of the operations API and the egress proxy (HTTP Basic).
pub const OPERATIONS_CHALLENGE: &str = "Basic realm=\"kci-receiver operations\", charset=\"UTF-8\"";

/// The user name of Basic credentials (never the password).
fn basic_user(authorization: &Option<String>) -> Option<String> {
    use base64::Engine;
    let value = crate::auth::scheme_value(authorization.as_deref()?, "Basic")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(user, _)| user.to_owned())
}

/// Refuses (403) a state-changing request that could come from another site with the browser's
/// cached credentials (the dashboard makes browsers cache the operations Basic credentials).
/// Any method but `GET`, `HEAD` and `OPTIONS`:
///
/// - with a body, it must be `application/json`, and a `Content-Type` it names must be JSON even
///   without a body: a cross-site form (or a `no-cors` fetch) can only send form, multipart,
///   `text/plain` or untyped bodies without a CORS preflight, which is never granted;
/// - `Sec-Fetch-Site` must say `same-origin` or `none`, and `Origin` must name the request's own
///   host or one of `server.allowed_origins` (the origins the service is reached under when a
///   reverse proxy rewrites `Host`; no CORS is ever granted, so another site cannot be allowed).
///
/// A request without a body, `Origin` or `Sec-Fetch-Site` (curl, scripts, servers) is no
/// browser's cross-site request and passes: `curl -X POST .../outbox/dead/retry` works.
pub fn refuse_cross_site<S, B>(request: ServiceRequest, service: &S) -> PassOrRefuse<S::Future, B>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
{
    match cross_site_refusal(&request) {
        None => pass(service.call(request)),
        Some(why) => refuse(ApiError::Forbidden(why.to_owned())),
    }
}

/// Why [`refuse_cross_site`] refuses `request`, if it does.
fn cross_site_refusal(request: &ServiceRequest) -> Option<&'static str> {
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return None;
    }
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let has_body = request.headers().contains_key("transfer-encoding")
        || header("content-length").is_some_and(|length| length.trim() != "0");
    let typed = request.headers().contains_key("content-type");
    if (typed || has_body) && !is_json(request.request()) {
        return Some("A request that changes something must send its body as application/json");
    }
    if header("sec-fetch-site").is_some_and(|site| site != "same-origin" && site != "none") {
        return Some("Cross-site requests may not change anything");
    }
    if let Some(origin) = header("origin") {
        let host = header("host")
            .or_else(|| request.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let origin_host = origin.split_once("://").map_or("", |(_, host)| host);
        let public = request
            .app_data::<web::Data<AppState>>()
            .is_some_and(|state| state.settings.server.allowed_origins.contains(&origin));
        if !origin_host.eq_ignore_ascii_case(&host) && !public {
            return Some("Cross-site requests may not change anything");
        }
    }
    None
}

/// Headers every answer carries unless its handler set them: nothing is sniffed into another
/// type, framed by another site (clickjacking the dashboard), cached by a shared cache or leaked
/// in a `Referer`.
pub fn security_headers() -> actix_web::middleware::DefaultHeaders {
    actix_web::middleware::DefaultHeaders::new()
        .add(("X-Content-Type-Options", "nosniff"))
        .add(("X-Frame-Options", "DENY"))
        .add(("Referrer-Policy", "no-referrer"))
        .add(("Cache-Control", "no-store"))
}
