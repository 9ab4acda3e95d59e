//! The HTTP server every process runs: `/healthz`, `/metrics`, and the routes of the modules it
//! runs, merged into one router; the request id every request carries into its log lines; and
//! the limits every request meets (body size, time).
//!
//! Each request gets an id: the caller's `x-request-id` when it sends a usable one (a proxy's,
//! so one id follows the request across machines), else a fresh one. It is echoed in the
//! response's `x-request-id` and is a field of the `request` span, so every log line written
//! while serving the request names it, and one line at the end gives status and duration.

use crate::core::Shutdown;
use crate::core::config::HttpConfig;
use crate::core::db::Db;
use crate::core::metrics::Metrics;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tracing::Instrument;
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

/// The header carrying a request's id, in both directions.
pub const REQUEST_ID: &str = "x-request-id";

/// The caller's id when it is short and plain (it goes into logs and a header), else a new one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", fastrand::u64(..)))
}

/// Runs a request inside its `request` span and logs how it ended.
async fn traced(req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let span = tracing::info_span!(
        "request",
        id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    // Probes and scrapes arrive every few seconds: their lines are debug, the API's info.
    let quiet = matches!(req.uri().path(), "/healthz" | "/metrics");
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(status, ms, "request failed");
        } else if quiet {
            tracing::debug!(status, ms, "request served");
        } else {
            tracing::info!(status, ms, "request served");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Serves `app` on `listener` until `shutdown`, every request with its id, its client's address
/// (the login limits count by it), a body limit (`http.body_limit_bytes`, `413` beyond) and a
/// time limit (`http.request_timeout_s`, `408` after it, the handler's work dropped).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    http: &HttpConfig,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    let app = limited(app, http).layer(axum::middleware::from_fn(traced));
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.wait().await })
    .await
}

/// `app` with the body and time limits of `http`.
pub fn limited(app: Router, http: &HttpConfig) -> Router {
    app.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        std::time::Duration::from_secs(http.request_timeout_s),
    ))
    .layer(axum::extract::DefaultBodyLimit::max(http.body_limit_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};

    /// A handler slower than `http.request_timeout_s` is answered `408`; a body over
    /// `http.body_limit_bytes` `413`; the rest as usual.
    #[tokio::test]
    async fn slow_requests_and_big_bodies_meet_their_limits() {
        let http = HttpConfig {
            request_timeout_s: 1,
            body_limit_bytes: 1024,
            ..HttpConfig::default()
        };
        let app = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    "late"
                }),
            )
            .route("/echo", post(|body: String| async move { body }));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (trigger, shutdown) = Shutdown::new();
        let server = tokio::spawn(async move { serve(listener, app, &http, shutdown).await });
        let client = reqwest::Client::new();
        let started = std::time::Instant::now();
        let slow = client
            .get(format!("http://{addr}/slow"))
            .send()
            .await
            .expect("answered");
        assert_eq!(slow.status().as_u16(), 408);
        assert!(started.elapsed() < std::time::Duration::from_secs(4));
        let echo = |n: usize| {
            client
                .post(format!("http://{addr}/echo"))
                .body("x".repeat(n))
                .send()
        };
        assert_eq!(echo(1000).await.expect("answered").status().as_u16(), 200);
        assert_eq!(echo(2000).await.expect("answered").status().as_u16(), 413);
        trigger.trigger();
        server.await.expect("joined").expect("served");
    }
}
