//! `POST /api/v1/{entity path}/{id}/reconcile` (admin): reconcile one entity with the Tenant API
//! now (gap repair, [`crate::reconcile`]), also one never seen here. Answers the reconciliation as
//! recorded: its outcome (RECOVERED, IN_SYNC, DIFFERS, NOT_FOUND, FAILED with the gateway's
//! answer), the KCIs recovered, the updates that could not be used.

use actix_web::{HttpResponse, web};
use entity::reconciliation::{self, ReconcileTrigger};

use super::AppState;
use super::operator::{Admin, Operator};
use crate::error::{ApiError, ErrorBody};
use crate::operations::queries::Family;
use crate::reconcile::{ReconcileError, Target};

async fn reconcile(
    state: &AppState,
    operator: &Operator<Admin>,
    family: Family,
    gateway_id: String,
) -> Result<HttpResponse, ApiError> {
    // What the OpenAPI document's pattern says, exactly.
    if !(1..=255).contains(&gateway_id.chars().count())
        || gateway_id.chars().any(|c| c.is_ascii_control())
    {
        return Err(ApiError::Malformed(vec![
            "id: 1 to 255 characters, no control characters".to_owned(),
        ]));
    }
    let Some(reconciler) = &state.reconciler else {
        return Err(ApiError::Conflict(
            "Reconciliation needs the Tenant API client: configure [egress] (enabled, upstream_base_url, token_url, client credentials)".to_owned(),
        ));
    };
    let target = Target { family, gateway_id };
    match reconciler
        .reconcile(&target, ReconcileTrigger::OnDemand, Some(&operator.name))
        .await
    {
        Ok(done) => Ok(HttpResponse::Ok().json(done)),
        Err(ReconcileError::Busy) => Err(ApiError::Conflict(format!(
            "{} {} is being reconciled right now; try again when it is done",
            family.resource(),
            target.gateway_id
        ))),
        Err(ReconcileError::Store(error)) => Err(error.into()),
        Err(ReconcileError::Intake(error)) => Err(error.into()),
    }
}

macro_rules! reconcile_endpoint {
    ($family:expr, $path:literal, $tag:literal, $name:ident) => {
        #[utoipa::path(post, path = concat!("/api/v1", $path, "/{id}/reconcile"), tag = $tag,
            description = "Reconciles the entity with the Tenant API's GET of it now (admin): every KCI in its updates[] \
that is not recorded here is recorded and published as recovered. Needs egress configured.",
            params(("id" = String, Path, description = "The gateway id (`entity.id`): 1 to 255 characters, no control character",
                pattern = "^[^\\u0000-\\u001f\\u007f]{1,255}$")),
            responses((status = 200, description = "The reconciliation as recorded, whatever its outcome", body = reconciliation::Model),
                      (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
                      (status = 409, description = "Being reconciled already, or egress not configured", body = ErrorBody),
                      (status = 503, body = ErrorBody)),
            security(("operations_basic" = [])))]
        pub async fn $name(operator: Operator<Admin>, path: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
            reconcile(&state, &operator, $family, path.into_inner()).await
        }
    };
}

reconcile_endpoint!(
    Family::ServiceOrders,
    "/service-orders",
    "service orders",
    reconcile_service_order
);
reconcile_endpoint!(
    Family::EthernetServiceOrders,
    "/ethernet/service-orders",
    "ethernet service orders",
    reconcile_ethernet_service_order
);
reconcile_endpoint!(
    Family::ServiceTests,
    "/service-tests",
    "service tests",
    reconcile_service_test
);
reconcile_endpoint!(
    Family::ServiceProblems,
    "/service-problems",
    "service problems",
    reconcile_service_problem
);
