//! `GET /openapi.json`: the whole HTTP surface as OpenAPI 3.1, generated from the handlers'
//! annotations and the types they return, so that it cannot drift from the code.

use actix_web::HttpResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{conversations, kcis, operations, outbox};
use crate::error::{ErrorBody, ErrorCode};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kci-receiver",
        description = "Receives the Fibre Cafe gateway's KCIs (Tenant Updates API 1.14, `POST /kcis`) and serves operations staff and dashboards (`/api/v1`). Every error has the gateway's error body.",
    ),
    paths(
        kcis::post_kci,
        conversations::register,
        operations::list_service_orders, operations::get_service_order, operations::service_order_history,
        operations::list_ethernet_service_orders, operations::get_ethernet_service_order, operations::ethernet_service_order_history,
        operations::list_service_tests, operations::get_service_test, operations::service_test_history,
        operations::list_service_problems, operations::get_service_problem, operations::service_problem_history,
        operations::list_all_entities,
        operations::get_conversation, operations::get_kci, operations::get_audit,
        operations::get_attention, operations::search,
        outbox::list_dead, outbox::retry_one, outbox::skip_one, outbox::retry_all, outbox::replay,
        super::egress::proxy,
        super::health::healthz, super::health::readyz, super::metrics_doc, super::openapi_doc, super::dashboard::dashboard,
    ),
    components(schemas(ErrorBody, ErrorCode, kcis::KciBody, outbox::ReplayRequest, outbox::SkipRequest)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "tenant updates", description = "The Fibre Cafe Tenant Updates API 1.14: called by the gateway"),
        (name = "operations", description = "For operations staff and dashboards (own credentials)"),
        (name = "egress", description = "The proxy to the Fibre Cafe Tenant API (optional)"),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let basic =
            || SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build());
        components.add_security_scheme("gateway_basic", basic());
        components.add_security_scheme(
            "gateway_bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme("operations_basic", basic());
    }
}

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(document())
}
