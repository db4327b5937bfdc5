//! `GET /dashboard`: one self-contained page (no CDN, works offline) over the operations API:
//! search by any id, one entity's timeline, what needs attention, outbox health. It asks for the
//! operations credentials with the browser's own Basic prompt; its API calls then reuse them.

use actix_web::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, WWW_AUTHENTICATE};
use actix_web::{HttpRequest, HttpResponse, web};

use super::AppState;
use crate::auth::OpsRole;
use crate::error::ApiError;

const PAGE: &str = include_str!("dashboard.html");

#[utoipa::path(get, path = "/dashboard", tag = "operations",
    responses((status = 200, description = "The dashboard page (HTML)", content_type = "text/html"),
              (status = 401, description = "Asks for the operations credentials")),
    security(("operations_basic" = [])))]
pub async fn dashboard(request: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    match state.auth.operations(request.headers(), OpsRole::Read) {
        Ok(_) => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header((CACHE_CONTROL, "no-store"))
            .insert_header((
                CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
            ))
            .body(PAGE),
        Err(error @ ApiError::Unauthenticated(_)) => {
            let mut response = actix_web::ResponseError::error_response(&error);
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                actix_web::http::header::HeaderValue::from_static("Basic realm=\"kci-receiver operations\""),
            );
            response
        }
        Err(error) => actix_web::ResponseError::error_response(&error),
    }
}
