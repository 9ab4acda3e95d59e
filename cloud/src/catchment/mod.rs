//! Catchment: the places water is taken from and what measures it. For now, sites (one agent
//! each); catchment points (the regulator's "obras"), devices and MQTT credentials come next.

pub mod obra;
pub mod site;

use crate::core::api::ErrorBody;
use crate::core::api::{ApiError, ApiState};
use crate::core::auth::Permission;
use crate::users::Caller;
use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The catchment module's routes, with their OpenAPI paths: `GET /api/v1/sites`.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(list_sites))
}

/// Every registered site.
#[utoipa::path(
    get,
    path = "/api/v1/sites",
    tag = "catchment",
    security(("bearer" = [])),
    responses(
        (status = 200, body = Vec<site::Site>),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    ),
)]
async fn list_sites(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<site::Site>>, ApiError> {
    caller.require(Permission::Read)?;
    site::list(&state.db)
        .await
        .map(Json)
        .map_err(|e| ApiError::database("listing sites", &e))
}
