//! HTTP Basic (RFC 7617), compared in constant time.

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

pub(super) struct BasicCredential {
    username: String,
    password: Option<SecretString>,
}

impl BasicCredential {
    pub(super) fn new(username: &str, password: Option<&SecretString>) -> Self {
        BasicCredential {
            username: username.to_owned(),
            password: password.cloned(),
        }
    }

    pub(super) fn matches(&self, username: &str, password: &str) -> bool {
        let Some(expected) = &self.password else {
            return false;
        };
        let user_ok = self.username.as_bytes().ct_eq(username.as_bytes());
        let password_ok = expected
            .expose_secret()
            .as_bytes()
            .ct_eq(password.as_bytes());
        (user_ok & password_ok).into()
    }
}

/// Splits `Basic <base64(user:password)>`.
pub(super) fn parse(authorization: &str) -> Result<(String, String), ApiError> {
    let encoded = authorization
        .strip_prefix("Basic ")
        .or_else(|| authorization.strip_prefix("basic "))
        .ok_or_else(|| {
            ApiError::Unauthenticated("HTTP Basic credentials are required".to_owned())
        })?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| {
            ApiError::Unauthenticated("The Basic credentials are not valid base64 UTF-8".to_owned())
        })?;
    let (username, password) = decoded.split_once(':').ok_or_else(|| {
        ApiError::Unauthenticated("The Basic credentials have no password".to_owned())
    })?;
    Ok((username.to_owned(), password.to_owned()))
}
