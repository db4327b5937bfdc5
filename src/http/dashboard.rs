//! `GET /dashboard`: one self-contained page (no CDN, works offline) over the operations API:
//! the overview (funnels, KCIs per minute, backlog and publish lag, attention counts, refreshed
//! on their own), filtered lists, one entity's timeline with its raw KCIs, outbox events and
//! deliveries, what needs attention, dead events, and the admin role's actions. It asks for the
//! operations credentials with the browser's own Basic prompt; its API calls then reuse them.

use actix_web::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, WWW_AUTHENTICATE};
use actix_web::{HttpRequest, HttpResponse, web};

use super::AppState;
use crate::auth::OpsRole;
use crate::error::ApiError;

const PAGE: &str = include_str!("dashboard.html");

/// The page, told whether to show the admin role's actions (the API refuses them to other roles
/// anyway; hiding them only spares a read-only user buttons that cannot work).
fn page_for(admin: bool) -> String {
    if admin {
        PAGE.replacen(
            r#"<body data-role="read">"#,
            r#"<body data-role="admin">"#,
            1,
        )
    } else {
        PAGE.to_owned()
    }
}

#[utoipa::path(get, path = "/dashboard", tag = "operations",
    responses((status = 200, description = "The dashboard page (HTML)", content_type = "text/html"),
              (status = 401, description = "Asks for the operations credentials")),
    security(("operations_basic" = [])))]
pub async fn dashboard(request: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    match state.auth.operations_role(request.headers(), OpsRole::Read) {
        Ok((_, role)) => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header((CACHE_CONTROL, "no-store"))
            .insert_header((
                CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
            ))
            .body(page_for(role == OpsRole::Admin)),
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
