//! HTTP Basic (RFC 7617), compared in constant time: the SHA-256 digests of the expected and the
//! given user and password are compared, so that neither the content nor the length of a
//! credential shows in the time an answer takes.

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
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
        let digest = |text: &str| Sha256::digest(text.as_bytes());
        let user_ok = digest(&self.username).ct_eq(&digest(username));
        let password_ok = digest(expected.expose_secret()).ct_eq(&digest(password));
        (user_ok & password_ok).into()
    }
}

/// Splits `Basic <base64(user:password)>`.
pub(super) fn parse(authorization: &str) -> Result<(String, String), ApiError> {
    let encoded = super::scheme_value(authorization, "Basic").ok_or_else(|| {
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
