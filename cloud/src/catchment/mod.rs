//! Catchment: the places water is taken from and what measures it. For now, sites (one agent
//! each); catchment points (the regulator's "obras"), devices and MQTT credentials come next.

pub mod site;

use crate::core::db::Db;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The catchment module's routes: `GET /api/v1/sites`.
pub fn routes(db: Db) -> Router {
    Router::new()
        .route("/api/v1/sites", get(list_sites))
        .with_state(db)
}

async fn list_sites(State(db): State<Db>) -> Response {
    match site::list(&db).await {
        Ok(sites) => axum::Json(sites).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "listing sites failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response()
        }
    }
}
