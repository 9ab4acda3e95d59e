//! Catchment: the places water is taken from and what measures it. For now, sites (one agent
//! each); catchment points (the regulator's "obras"), devices and MQTT credentials come next.

pub mod obra;
pub mod site;

use crate::core::api::{ApiError, ApiState};
use crate::core::auth::Permission;
use crate::users::Caller;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

/// The catchment module's routes: `GET /api/v1/sites`.
pub fn routes() -> Router<ApiState> {
    Router::new().route("/api/v1/sites", get(list_sites))
}

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
