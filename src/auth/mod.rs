//! Who may call what.
//!
//! The gateway authenticates on `POST /kcis` with HTTP Basic or an OAuth2 bearer JWT, as
//! configured (design.md, "Authentication, configurable"). The operations API has its own HTTP
//! Basic credentials with a read and an admin role. Credentials that are valid but belong to the
//! other side are 403, not 401: the caller is known, just not allowed.

mod basic;
pub mod jwt;
pub mod mtls;

use actix_web::http::header::{AUTHORIZATION, HeaderMap};
use secrecy::SecretString;

use crate::config::{GatewayAuthMethod, GatewayAuthSettings, OperationsAuthSettings};
use crate::error::ApiError;
use basic::BasicCredential;
pub use jwt::JwtVerifier;

/// An operations API role. Admin may do everything; read may read; egress may only use the
/// egress proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsRole {
    Read,
    Admin,
    Egress,
}

impl OpsRole {
    fn allows(self, needed: OpsRole) -> bool {
        self == OpsRole::Admin || self == needed
    }
}

enum GatewayAuth {
    Basic(BasicCredential),
    Jwt(JwtVerifier),
    Mtls(mtls::MtlsAuthenticator),
}

pub struct Authenticator {
    gateway: GatewayAuth,
    operations: Vec<(BasicCredential, OpsRole)>,
}

/// The `WWW-Authenticate` challenge to send with a 401 on `POST /kcis`.
pub fn gateway_challenge(method: GatewayAuthMethod) -> &'static str {
    match method {
        GatewayAuthMethod::Basic => "Basic realm=\"kci-receiver\", charset=\"UTF-8\"",
        GatewayAuthMethod::Jwt => "Bearer realm=\"kci-receiver\"",
        // RFC 8120's scheme name for "use your client certificate" is not widely known; a
        // plain realm tells a person what is expected.
        GatewayAuthMethod::Mtls => "Mutual realm=\"kci-receiver\", client-certificate",
    }
}

impl Authenticator {
    pub fn new(
        gateway: &GatewayAuthSettings,
        operations: &OperationsAuthSettings,
    ) -> anyhow::Result<Self> {
        let gateway_auth = match gateway.method {
            GatewayAuthMethod::Basic => GatewayAuth::Basic(BasicCredential::new(
                &gateway.basic_username,
                gateway.basic_password.as_ref(),
            )),
            GatewayAuthMethod::Jwt => GatewayAuth::Jwt(JwtVerifier::new(&gateway.jwt)?),
            GatewayAuthMethod::Mtls => {
                GatewayAuth::Mtls(mtls::MtlsAuthenticator::new(&gateway.mtls))
            }
        };
        let mut users = Vec::new();
        let configured: [(&String, &Option<SecretString>, OpsRole); 3] = [
            (
                &operations.read_username,
                &operations.read_password,
                OpsRole::Read,
            ),
            (
                &operations.admin_username,
                &operations.admin_password,
                OpsRole::Admin,
            ),
            (
                &operations.egress_username,
                &operations.egress_password,
                OpsRole::Egress,
            ),
        ];
        for (username, password, role) in configured {
            if let Some(password) = password.as_ref().filter(|_| !username.is_empty()) {
                users.push((BasicCredential::new(username, Some(password)), role));
            }
        }
        Ok(Authenticator {
            gateway: gateway_auth,
            operations: users,
        })
    }

    /// Starts background work the verifier needs (JWKS refresh). Call inside a tokio runtime.
    pub async fn start(&self) {
        if let GatewayAuth::Jwt(verifier) = &self.gateway {
            verifier.start().await;
        }
    }

    /// Authenticates the gateway on `POST /kcis`; returns who it is (for the audit log), with
    /// the client certificate of its TLS connection when it presented one.
    pub async fn gateway(&self, request: &actix_web::HttpRequest) -> Result<String, ApiError> {
        let tls = request.conn_data::<crate::tls::TlsConnection>();
        let certificate = tls.and_then(|tls| tls.client.as_ref());
        if let GatewayAuth::Mtls(authenticator) = &self.gateway {
            return authenticator.authenticate(
                certificate,
                request.peer_addr().map(|a| a.ip()),
                request.headers(),
            );
        }
        let who = self.gateway_credentials(request.headers()).await?;
        Ok(match certificate {
            Some(certificate) => format!("{who} with {}", certificate.describe()),
            None => who,
        })
    }

    async fn gateway_credentials(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let authorization = authorization(headers)?;
        match &self.gateway {
            GatewayAuth::Mtls(_) => unreachable!("mutual TLS is decided before credentials"),
            GatewayAuth::Basic(expected) => {
                let (username, password) = basic::parse(authorization)?;
                if expected.matches(&username, &password) {
                    return Ok(username);
                }
                if self
                    .operations
                    .iter()
                    .any(|(user, _)| user.matches(&username, &password))
                {
                    return Err(ApiError::Forbidden(
                        "These credentials are not permitted to post KCIs".to_owned(),
                    ));
                }
                Err(ApiError::Unauthenticated("Invalid credentials".to_owned()))
            }
            GatewayAuth::Jwt(verifier) => {
                let token = scheme_value(authorization, "Bearer").ok_or_else(|| {
                    ApiError::Unauthenticated("A bearer token is required".to_owned())
                })?;
                verifier.verify(token.trim()).await
            }
        }
    }

    /// Authenticates an operations API caller holding at least `required`.
    pub fn operations(&self, headers: &HeaderMap, required: OpsRole) -> Result<String, ApiError> {
        self.operations_role(headers, required)
            .map(|(username, _)| username)
    }

    /// [`Authenticator::operations`], also telling the caller's own role (the dashboard shows
    /// the admin role's actions only to it).
    pub fn operations_role(
        &self,
        headers: &HeaderMap,
        required: OpsRole,
    ) -> Result<(String, OpsRole), ApiError> {
        let (username, password) = basic::parse(authorization(headers)?)?;
        let role = self
            .operations
            .iter()
            .find(|(user, _)| user.matches(&username, &password))
            .map(|(_, role)| *role);
        match role {
            Some(role) if role.allows(required) => Ok((username, role)),
            Some(_) => Err(ApiError::Forbidden(format!(
                "{username} may not do this: the {required:?} role is required"
            ))),
            None => {
                if let GatewayAuth::Basic(gateway) = &self.gateway
                    && gateway.matches(&username, &password)
                {
                    return Err(ApiError::Forbidden(
                        "The gateway's credentials are not permitted on the operations API"
                            .to_owned(),
                    ));
                }
                Err(ApiError::Unauthenticated("Invalid credentials".to_owned()))
            }
        }
    }
}

/// The credentials after an authentication scheme name, which is case-insensitive (RFC 9110,
/// section 11.1): `Basic`, `basic`, `BASIC` alike.
pub(crate) fn scheme_value<'a>(authorization: &'a str, scheme: &str) -> Option<&'a str> {
    let (name, value) = authorization.trim_start().split_once(' ')?;
    name.eq_ignore_ascii_case(scheme).then(|| value.trim())
}

fn authorization(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthenticated("The Authorization header is missing".to_owned()))?
        .to_str()
        .map_err(|_| {
            ApiError::Unauthenticated("The Authorization header is not readable".to_owned())
        })
}
