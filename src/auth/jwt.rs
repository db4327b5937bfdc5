//! OAuth2 bearer tokens: JWTs checked for signature (configured keys or a JWK Set URL), issuer,
//! audience, expiry and the required scope.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use secrecy::ExposeSecret;
use serde::Deserialize;
use tokio::sync::RwLock;

use crate::config::JwtSettings;
use crate::error::ApiError;

struct StaticKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

#[derive(Default)]
struct JwksCache {
    keys: HashMap<String, (Option<Algorithm>, DecodingKey)>,
    /// The last fetch, successful or not: a token with an unknown `kid` triggers one only when
    /// this is older than `jwks_min_refresh_seconds`, so neither a flood of bad tokens nor an
    /// identity provider that fails can turn into a flood of fetches (its failure is kept until
    /// then, and such tokens are refused at once).
    attempted_at: Option<Instant>,
}

/// How long one fetch of the JWK Set may take (connect included).
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    settings: JwtSettings,
    algorithms: Vec<Algorithm>,
    static_keys: Vec<StaticKey>,
    jwks: RwLock<JwksCache>,
    /// Held while the JWK Set is fetched: one fetch at a time; whoever waited for it uses its
    /// result instead of fetching again.
    refreshing: tokio::sync::Mutex<()>,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    client_id: Option<String>,
    scope: Option<String>,
    scp: Option<ScopeList>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScopeList {
    Text(String),
    List(Vec<String>),
}

impl Claims {
    fn has_scope(&self, wanted: &str) -> bool {
        let in_text = |text: &str| text.split_whitespace().any(|s| s == wanted);
        self.scope.as_deref().is_some_and(in_text)
            || match &self.scp {
                Some(ScopeList::Text(text)) => in_text(text),
                Some(ScopeList::List(list)) => list.iter().any(|s| s == wanted),
                None => false,
            }
    }
}

fn parse_algorithm(name: &str) -> anyhow::Result<Algorithm> {
    Algorithm::from_str(name).map_err(|_| anyhow::anyhow!("unknown JWT algorithm {name:?}"))
}

impl JwtVerifier {
    pub fn new(settings: &JwtSettings) -> anyhow::Result<Self> {
        let algorithms = settings
            .algorithms
            .iter()
            .map(|name| parse_algorithm(name))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut static_keys = Vec::new();
        for key in &settings.keys {
            let algorithm = parse_algorithm(&key.algorithm)?;
            let decoding = match (algorithm, &key.pem, &key.secret) {
                (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, _, Some(secret)) => {
                    DecodingKey::from_secret(secret.expose_secret().as_bytes())
                }
                (Algorithm::ES256 | Algorithm::ES384, Some(pem), _) => {
                    DecodingKey::from_ec_pem(pem.as_bytes())?
                }
                (Algorithm::EdDSA, Some(pem), _) => DecodingKey::from_ed_pem(pem.as_bytes())?,
                (_, Some(pem), _) => DecodingKey::from_rsa_pem(pem.as_bytes())?,
                _ => anyhow::bail!(
                    "gateway_auth.jwt.keys: key {:?} needs `pem` (or `secret` for HS*)",
                    key.kid
                ),
            };
            static_keys.push(StaticKey {
                kid: key.kid.clone(),
                algorithm,
                key: decoding,
            });
        }
        let http = reqwest::Client::builder()
            .timeout(JWKS_FETCH_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        Ok(JwtVerifier {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                algorithms,
                static_keys,
                jwks: RwLock::new(JwksCache::default()),
                refreshing: tokio::sync::Mutex::new(()),
                http,
            }),
        })
    }

    /// Fetches the JWK Set once and keeps refreshing it in the background: every
    /// `jwks_refresh_seconds`, or, while fetching fails, sooner (from `jwks_min_refresh_seconds`,
    /// doubling up to the period).
    pub async fn start(&self) {
        let Some(url) = self.jwks_url() else { return };
        let mut failing = self.refresh(|_| true).await.is_err();
        if failing {
            tracing::warn!(jwks_url = url, "could not fetch the JWK Set; will retry");
        }
        let verifier = self.clone();
        let period = Duration::from_secs(self.inner.settings.jwks_refresh_seconds.max(1));
        let min_interval = self.min_refresh_interval().max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut retry_in = min_interval;
            loop {
                tokio::time::sleep(if failing {
                    retry_in.min(period)
                } else {
                    period
                })
                .await;
                failing = verifier.refresh(|_| true).await.is_err();
                retry_in = if failing {
                    retry_in.saturating_mul(2)
                } else {
                    min_interval
                };
            }
        });
    }

    fn jwks_url(&self) -> Option<&str> {
        self.inner
            .settings
            .jwks_url
            .as_deref()
            .filter(|url| !url.is_empty())
    }

    fn min_refresh_interval(&self) -> Duration {
        Duration::from_secs(self.inner.settings.jwks_min_refresh_seconds)
    }

    /// Fetches the JWK Set when `due` says so of the cache, once the fetch in flight (if any)
    /// is over: concurrent callers wait for one fetch instead of starting their own.
    async fn refresh(&self, due: impl Fn(&JwksCache) -> bool) -> Result<(), ()> {
        let Some(url) = self.jwks_url() else {
            return Ok(());
        };
        let _one_at_a_time = self.inner.refreshing.lock().await;
        if !due(&*self.inner.jwks.read().await) {
            return Ok(());
        }
        let fetched = self.fetch(url).await;
        let mut cache = self.inner.jwks.write().await;
        cache.attempted_at = Some(Instant::now());
        match fetched {
            Ok(keys) => {
                cache.keys = keys;
                tracing::debug!(keys = cache.keys.len(), "JWK Set refreshed");
                Ok(())
            }
            Err(error) => {
                // The keys fetched before stay: a failing identity provider does not turn
                // valid tokens away.
                tracing::warn!(jwks_url = url, error = %error, "could not fetch the JWK Set");
                Err(())
            }
        }
    }

    async fn fetch(
        &self,
        url: &str,
    ) -> anyhow::Result<HashMap<String, (Option<Algorithm>, DecodingKey)>> {
        let set: JwkSet = self
            .inner
            .http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let algorithm = jwk
                .common
                .key_algorithm
                .and_then(|alg| Algorithm::from_str(&alg.to_string()).ok());
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    keys.insert(kid, (algorithm, key));
                }
                Err(error) => tracing::warn!(kid, error = %error, "skipping an unusable JWK"),
            }
        }
        Ok(keys)
    }

    async fn jwks_key(&self, kid: &str, algorithm: Algorithm) -> Option<DecodingKey> {
        let lookup = |cache: &JwksCache| {
            cache
                .keys
                .get(kid)
                .filter(|(alg, _)| alg.is_none_or(|alg| alg == algorithm))
                .map(|(_, key)| key.clone())
        };
        if let Some(key) = lookup(&*self.inner.jwks.read().await) {
            return Some(key);
        }
        // An unknown kid may be a rotated key: refresh, unless a fetch was tried lately.
        let min_interval = self.min_refresh_interval();
        let _ = self
            .refresh(|cache| {
                cache
                    .attempted_at
                    .is_none_or(|at| at.elapsed() >= min_interval)
            })
            .await;
        lookup(&*self.inner.jwks.read().await)
    }

    /// Verifies a token; returns its subject (or client id) for the audit log.
    pub async fn verify(&self, token: &str) -> Result<String, ApiError> {
        let unauthenticated =
            |why: &str| ApiError::Unauthenticated(format!("Invalid bearer token: {why}"));
        let header = decode_header(token).map_err(|_| unauthenticated("not a JWT"))?;
        if !self.inner.algorithms.contains(&header.alg) {
            return Err(unauthenticated("signing algorithm not accepted"));
        }
        let mut candidates: Vec<DecodingKey> = self
            .inner
            .static_keys
            .iter()
            .filter(|key| key.algorithm == header.alg)
            .filter(|key| match (&key.kid, &header.kid) {
                (Some(kid), Some(token_kid)) => kid == token_kid,
                (Some(_), None) => false,
                (None, _) => true,
            })
            .map(|key| key.key.clone())
            .collect();
        if candidates.is_empty()
            && let Some(kid) = &header.kid
            && let Some(key) = self.jwks_key(kid, header.alg).await
        {
            candidates.push(key);
        }
        if candidates.is_empty() {
            return Err(unauthenticated("no key matches the token"));
        }

        let settings = &self.inner.settings;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[settings.issuer.as_str()]);
        validation.set_audience(&settings.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = settings.leeway_seconds;

        let mut last_error = None;
        for key in &candidates {
            match decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    let who = claims
                        .sub
                        .clone()
                        .or_else(|| claims.client_id.clone())
                        .unwrap_or_else(|| "bearer".to_owned());
                    if !claims.has_scope(&settings.required_scope) {
                        return Err(ApiError::Forbidden(format!(
                            "The token lacks the scope {}",
                            settings.required_scope
                        )));
                    }
                    return Ok(who);
                }
                Err(error) => last_error = Some(error),
            }
        }
        use jsonwebtoken::errors::ErrorKind;
        let why = match last_error.as_ref().map(|e| e.kind()) {
            Some(ErrorKind::ExpiredSignature) => "expired",
            Some(ErrorKind::ImmatureSignature) => "not valid yet",
            Some(ErrorKind::InvalidAudience) => "wrong audience",
            Some(ErrorKind::InvalidIssuer) => "wrong issuer",
            Some(ErrorKind::InvalidSignature) => "bad signature",
            Some(ErrorKind::MissingRequiredClaim(_)) => "a required claim is missing",
            _ => "rejected",
        };
        Err(unauthenticated(why))
    }
}
