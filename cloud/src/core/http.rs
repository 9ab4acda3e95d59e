//! The HTTP server every process runs: `/healthz`, `/metrics`, and the routes of the modules it
//! runs, merged into one router.

use crate::core::Shutdown;
use crate::core::db::Db;
use crate::core::metrics::Metrics;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;
use tokio::net::TcpListener;

/// `/healthz` and `/metrics`. `/healthz` answers 200 when the database answers, 503 otherwise.
pub fn core_routes(db: Db, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }),
        )
        .route(
            "/healthz",
            get(move || async move {
                match db.ping().await {
                    Ok(()) => (StatusCode::OK, "ok\n".to_string()).into_response(),
                    Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}\n"))
                        .into_response(),
                }
            }),
        )
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
