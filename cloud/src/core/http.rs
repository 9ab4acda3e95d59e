//! The HTTP server every process runs: `/healthz`, `/metrics`, and the routes of the modules it
//! runs, merged into one router.

use crate::core::Shutdown;
use crate::core::db::Db;
use crate::core::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use tokio::net::TcpListener;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// What `/healthz` and `/metrics` read.
#[derive(Clone, Debug)]
struct CoreState {
    db: Db,
    metrics: Arc<Metrics>,
}

/// Whether this process can serve: 200 when the database answers, 503 otherwise.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "core",
    responses(
        (status = 200, description = "The database answers", body = String, content_type = "text/plain"),
        (status = 503, description = "The database does not answer; the reason follows", body = String, content_type = "text/plain"),
    ),
)]
async fn healthz(State(s): State<CoreState>) -> Response {
    match s.db.ping().await {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}\n")).into_response(),
    }
}

/// Every metric of the process (names start with `caudal_cloud_`).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "core",
    responses(
        (status = 200, description = "Prometheus/OpenMetrics text exposition", body = String,
         content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
    ),
)]
async fn metrics(State(s): State<CoreState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// `/healthz` and `/metrics`, documented.
pub fn core_routes(db: Db, metrics_registry: Arc<Metrics>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .with_state(CoreState {
            db,
            metrics: metrics_registry,
        })
}

/// Serves `app` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}
