//! Telemetry: what agents send (batches of readings, events and gaps; their status), received
//! over MQTT ([`ingest`]), stored once per record ([`store`]), read back through the API
//! ([`query`], with the totalizer arithmetic in [`volume`]), and watched by the alert rules
//! ([`alert`], whose routes are `/api/v1/alerts`). What the ingest refuses is kept, bounded, in
//! [`dead_letter`].
//!
//! The module's anatomy, which every cloud module follows: this file holds the routes and the
//! wiring of the background tasks ([`start`]); the handlers are in `api`; the SQL is in
//! [`store`] (writes, status) and [`query`] (the API's reads); each background task has its
//! own home ([`ingest`], the alert [`alert::Evaluator`], the dead letters' sweeper in
//! [`dead_letter`]).
//!
//! Routes (every one needs a token; any role may read):
//!
//! | route | answers |
//! |---|---|
//! | `GET /api/v1/sites/{site}/readings` | raw readings (paged) or minute/hour/day aggregates with extracted volume |
//! | `GET /api/v1/sites/{site}/latest` | the latest value of each device and quantity, and the agent's status |
//! | `GET /api/v1/sites/{site}/completeness` | sequence holes per epoch, time gaps per device, gap records |
//! | `GET /api/v1/sites/{site}/events` | events (paged), by kind and device |
//! | `GET /api/v1/alerts`, `GET /api/v1/alerts/{id}`, `POST /api/v1/alerts/{id}/close` | alerts (closing one: operator, technician, admin) |
//!
//! Times are RFC 3339 (`2026-11-28T00:00:00Z`); ranges are `[from, to)`, by default the 24 hours
//! before now.

pub mod alert;
mod api;
pub mod conflict;
pub mod dead_letter;
pub mod ingest;
pub mod query;
pub mod store;
pub mod volume;

pub use api::{DEFAULT_LIMIT, MAX_COMPLETENESS_DAYS};

use crate::core::Shutdown;
use crate::core::api::ApiState;
use crate::core::config::CloudConfig;
use crate::core::db::Db;
use alert::{AlertMetrics, Evaluator};
use ingest::{Ingest, IngestError, IngestMetrics};
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The telemetry module's routes, alerts' included, with their OpenAPI paths.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(api::readings))
        .routes(routes!(api::latest))
        .routes(routes!(api::completeness))
        .routes(routes!(api::events))
        .merge(alert::routes())
}

/// Starts the module's background tasks in `tasks`: the ingest from the broker at
/// `broker_url` and, when `alerts.enabled`, the alert evaluator. Each stops at `shutdown`.
pub fn start(
    config: &CloudConfig,
    broker_url: &str,
    db: &Db,
    registry: &mut Registry,
    shutdown: &Shutdown,
    tasks: &mut JoinSet<Result<(), String>>,
) -> Result<(), IngestError> {
    let options = ingest::mqtt_options(broker_url, &config.mqtt)?;
    let metrics = IngestMetrics::register(registry);
    let ingest = Ingest::new(options, config.ingest.clone(), db.clone(), metrics);
    let sd = shutdown.clone();
    tasks.spawn(async move {
        ingest.run(sd).await;
        Ok(())
    });
    let (sweep_db, sweep_cfg, sd) = (db.clone(), config.ingest.clone(), shutdown.clone());
    tasks.spawn(async move {
        dead_letter::run_sweeper(sweep_db, sweep_cfg, sd).await;
        Ok(())
    });
    if config.alerts.enabled {
        let metrics = AlertMetrics::register(registry);
        let evaluator = Evaluator::new(config.alerts.clone(), db.clone(), metrics);
        let sd = shutdown.clone();
        tasks.spawn(async move {
            evaluator.run(sd).await;
            Ok(())
        });
    }
    Ok(())
}
