//! Who may use the operations API, as types: a handler that takes an [`Operator<Admin>`] cannot
//! run for anyone else. The extractor runs before the body is read (put it first among the
//! handler's arguments). The `/api/v1` scope is also guarded as a whole ([`require_operator`]),
//! so a route added without an extractor is still closed to anyone but the operations users.

use std::future::{Ready, ready};
use std::marker::PhantomData;

use actix_web::body::EitherBody;
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse};
use actix_web::{FromRequest, HttpRequest, web};

use super::AppState;
use crate::auth::OpsRole;
use crate::error::ApiError;

/// A role an [`Operator`] must hold.
pub trait Role {
    const ROLE: OpsRole;
}

/// May read.
pub struct Read;
/// May read and change.
pub struct Admin;

impl Role for Read {
    const ROLE: OpsRole = OpsRole::Read;
}

impl Role for Admin {
    const ROLE: OpsRole = OpsRole::Admin;
}

/// An operations user holding role `R` (401 without valid credentials, 403 without the role).
pub struct Operator<R: Role> {
    /// The user name, for the audit log and the records an operator leaves (a skip's `by`).
    pub name: String,
    role: PhantomData<R>,
}

impl<R: Role> FromRequest for Operator<R> {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(request, R::ROLE).map(|name| Operator {
            name,
            role: PhantomData,
        }))
    }
}

fn authenticate(request: &HttpRequest, role: OpsRole) -> Result<String, ApiError> {
    let state = request
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no application state")))?;
    state.auth.operations(request.headers(), role)
}

/// What [`require_operator`] returns: the route's answer, or the refusal.
pub type Guarded<F, B> = futures_util::future::Either<
    futures_util::future::MapOk<F, fn(ServiceResponse<B>) -> ServiceResponse<EitherBody<B>>>,
    Ready<Result<ServiceResponse<EitherBody<B>>, actix_web::Error>>,
>;

/// The `/api/v1` scope's guard: only the operations users with the read or admin role get
/// through to any of its routes (each route then asks for the role it needs).
pub fn require_operator<S, B>(request: ServiceRequest, service: &S) -> Guarded<S::Future, B>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
{
    use futures_util::TryFutureExt;
    match authenticate(request.request(), OpsRole::Read) {
        Ok(_) => futures_util::future::Either::Left(
            service
                .call(request)
                .map_ok(ServiceResponse::map_into_left_body as fn(_) -> _),
        ),
        // An answer, not an error: the guard outside then adds the 401's challenge.
        Err(error) => futures_util::future::Either::Right(ready(Ok(request
            .error_response(error)
            .map_into_right_body()))),
    }
}
