//! Errors as the gateway sees them: the Fibre Cafe error body `{uuid, code, messages}` (spec 1.3)
//! with the status codes of design.md's HTTP contract.
//!
//! The caller's faults carry messages meant for the caller. Ours (500, 503) carry a generic
//! message only; the cause is logged with the error uuid so that the two can be joined.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::StoreError;

/// The gateway's error code enum (Tenant Updates 1.14, spec 1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    GatewayFault,
    InvalidRequest,
    MalformedRequest,
    NotAuthorised,
    NotFound,
    NotImplemented,
    SupplierFault,
    SupplierTimedOut,
    TenantFault,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::GatewayFault => "GATEWAY_FAULT",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::MalformedRequest => "MALFORMED_REQUEST",
            ErrorCode::NotAuthorised => "NOT_AUTHORISED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::NotImplemented => "NOT_IMPLEMENTED",
            ErrorCode::SupplierFault => "SUPPLIER_FAULT",
            ErrorCode::SupplierTimedOut => "SUPPLIER_TIMED_OUT",
            ErrorCode::TenantFault => "TENANT_FAULT",
        }
    }
}

/// The error body shared by all Fibre Cafe APIs.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub uuid: Uuid,
    pub code: ErrorCode,
    pub messages: Vec<String>,
}

/// Everything a request can fail with, classified once.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("malformed request: {}", .0.join("; "))]
    Malformed(Vec<String>),
    #[error("body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body is not the media type the endpoint reads (415).
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    #[error("invalid request: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// The source failed authentication too often: it waits (429 + `Retry-After`).
    #[error("too many failed authentications from this source")]
    TooManyRequests { retry_after_seconds: u64 },
    /// A request we will not carry out as asked (the egress proxy's path leaves the Tenant API):
    /// 400 `INVALID_REQUEST`.
    #[error("refused: {}", .0.join("; "))]
    Refused(Vec<String>),
    #[error("not found: {0}")]
    NotFound(String),
    /// The request cannot be carried out in the current state (a reconciliation of the entity
    /// is under way, or reconciliation is not configured): 409 `INVALID_REQUEST`.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Our fault, and passing: the database is down, slow or overloaded, intake is full or
    /// shutting down. The caller should retry after `Retry-After`.
    #[error("temporarily unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The Fibre Cafe gateway did not answer the egress proxy (502) or not in time (504).
    #[error("upstream: {message}")]
    Upstream { status: StatusCode, message: String },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Refused(_) => StatusCode::BAD_REQUEST,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream { status, .. } => *status,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::Unauthenticated(_)
            | ApiError::Forbidden(_)
            | ApiError::TooManyRequests { .. } => ErrorCode::NotAuthorised,
            ApiError::Malformed(_)
            | ApiError::PayloadTooLarge { .. }
            | ApiError::UnsupportedMediaType(_) => ErrorCode::MalformedRequest,
            ApiError::Invalid(_) | ApiError::Refused(_) | ApiError::Conflict(_) => {
                ErrorCode::InvalidRequest
            }
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::Unavailable(_) | ApiError::Internal(_) => ErrorCode::TenantFault,
            ApiError::Upstream { .. } => ErrorCode::GatewayFault,
        }
    }

    /// What the caller is told: their own mistakes in full, never our internals.
    pub fn messages(&self) -> Vec<String> {
        match self {
            ApiError::Unauthenticated(message)
            | ApiError::Forbidden(message)
            | ApiError::NotFound(message)
            | ApiError::Conflict(message)
            | ApiError::UnsupportedMediaType(message)
            | ApiError::Upstream { message, .. } => vec![message.clone()],
            ApiError::Malformed(messages)
            | ApiError::Invalid(messages)
            | ApiError::Refused(messages) => messages.clone(),
            ApiError::PayloadTooLarge { limit } => {
                vec![format!("Request body is larger than the {limit} bytes accepted")]
            }
            ApiError::Unavailable(_) => vec![
                "Tenant Update API is temporarily unavailable - the update was not recorded, please retry".to_owned(),
            ],
            ApiError::Internal(_) => vec!["Unexpected system error".to_owned()],
            ApiError::TooManyRequests { retry_after_seconds } => vec![format!(
                "Too many failed authentications from this address: try again in {retry_after_seconds} s"
            )],
        }
    }

    /// Whether the fault is ours (logged at error level with its cause chain).
    pub fn is_server_fault(&self) -> bool {
        self.status().is_server_error()
    }

    /// Builds the body with a fresh uuid and logs the error under that uuid.
    pub fn to_body(&self) -> ErrorBody {
        let body = ErrorBody {
            uuid: Uuid::new_v4(),
            code: self.code(),
            messages: self.messages(),
        };
        if matches!(self, ApiError::Unavailable(_)) {
            // Ours, but passing and handled (the caller retries): not a page for a person.
            tracing::warn!(error.uuid = %body.uuid, error.code = body.code.as_str(), error = %self.cause_chain(), "request not served: temporarily unavailable");
        } else if self.is_server_fault() {
            tracing::error!(error.uuid = %body.uuid, error.code = body.code.as_str(), error = %self.cause_chain(), "request failed");
        } else {
            tracing::info!(error.uuid = %body.uuid, error.code = body.code.as_str(), error = %self, "request rejected");
        }
        body
    }

    /// The error and all its causes, `: `-separated, for the log.
    fn cause_chain(&self) -> String {
        let mut chain = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            chain.push_str(": ");
            chain.push_str(&cause.to_string());
            source = cause.source();
        }
        chain
    }

    /// The full response: status, error body and, for 503, `Retry-After`.
    pub fn response(&self, body: &ErrorBody, retry_after_seconds: u32) -> HttpResponse {
        let mut response = HttpResponse::build(self.status());
        match self {
            ApiError::Unavailable(_) => {
                response.insert_header(("Retry-After", retry_after_seconds.to_string()));
            }
            ApiError::TooManyRequests {
                retry_after_seconds,
            } => {
                response.insert_header(("Retry-After", retry_after_seconds.to_string()));
            }
            _ => {}
        }
        response.json(body)
    }
}

impl From<StoreError> for ApiError {
    /// Unavailable and lost races (a transaction that kept losing them is contention, which
    /// passes) are 503; anything else is a fault of ours (500).
    fn from(error: StoreError) -> Self {
        if error.is_unavailable() || error.is_retryable() {
            ApiError::Unavailable(Box::new(error))
        } else {
            ApiError::Internal(error.into())
        }
    }
}

impl From<crate::intake::IntakeError> for ApiError {
    fn from(error: crate::intake::IntakeError) -> Self {
        use crate::intake::IntakeError;
        match error {
            IntakeError::Store(store) if store.is_unavailable() || store.is_retryable() => {
                ApiError::Unavailable(Box::new(IntakeError::Store(store)))
            }
            IntakeError::Store(_) => ApiError::Internal(error.into()),
            IntakeError::Inconsistent(_) => ApiError::Internal(error.into()),
            IntakeError::Overloaded { .. }
            | IntakeError::DeadlineExceeded(_)
            | IntakeError::ShuttingDown => ApiError::Unavailable(Box::new(error)),
        }
    }
}

/// Endpoints other than `POST /kcis` answer errors through actix. `Retry-After` uses the
/// default of `config/default.toml`.
impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    fn error_response(&self) -> HttpResponse {
        self.response(&self.to_body(), 5)
    }
}
