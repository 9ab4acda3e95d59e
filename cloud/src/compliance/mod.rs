//! Compliance: what Caudal declares to the regulator for each catchment point, and the proof it
//! did. Today the DGA's online channel, "Monitoreo de Extracciones Efectivas" (Res. DGA Ex.
//! 2.170/2025, Manual Técnico N° 1/2025; `docs/compliance.md`).
//!
//! What it owns: the Centro de Control's settings and each point's reporting settings (endpoint,
//! which device gives caudal, totalizador and nivel, mode `off`/`shadow`/`on`, start date, the
//! informante password sealed at rest: [`secret`]); the slot grid in fixed UTC-4 ([`slot`]); the
//! values a slot declares and the checks that hold it ([`value`]); the regulator behind a trait
//! ([`dga`]); the submitter, the background task that builds, checks and sends
//! ([`submitter`]); the SQL ([`store`]); the changes people make ([`settings`], from the API
//! and the CLI); the month reports, the log and the rectification dossier ([`report`]); the
//! receipt check against the DGA's GET endpoint ([`verify`]).
//!
//! **Durability rule: an accepted slot is never POSTed again.** A slot's in-flight state, its
//! owner and lease, and its redacted request are committed **before** the POST leaves
//! (`store::claim`), the answer after (`store::record`); only pending and due failed slots are
//! ever claimed. A crash between the two leaves the slot in flight; once its lease has passed,
//! any process treats it as unanswered and it is sent again the next day, where a measurement
//! that did land answers as the duplicate-400 carrying its receipt. Every request (password as
//! `****`) and every answer is kept with its slot.
//!
//! **Several processes per database.** Any number of processes may run the compliance preset on
//! one database: a claim moves a slot only from a sendable state, so one process wins it; a
//! slot in flight is its owner's until `claimed_until`; the obras' spacing and the global rate
//! are rows every claim reads and writes under one lock (`compliance_budget`), so they hold
//! across processes and restarts (ADR 011).
//!
//! Routes (every one needs a token; any role reads; admin and operator change):
//!
//! | route | what |
//! |---|---|
//! | `GET, PUT /api/v1/compliance/settings` | DGA base URL, Centro de Control RUT |
//! | `GET /api/v1/compliance/points`, `GET, PUT /api/v1/compliance/points/{id}` | a point's reporting settings |
//! | `PUT /api/v1/compliance/points/{id}/password` | the informante password (never read back) |
//! | `GET /api/v1/compliance/points/{id}/audit` | who changed what (passwords as `****`) |
//! | `GET /api/v1/compliance/points/{id}/slots`, `GET …/slots/{slot}` | slots, with their exchanges |
//! | `POST …/slots/{slot}/release`, `POST …/slots/{slot}/discard` | a person's review of a held slot |
//! | `POST …/slots/{slot}/verify` | check the slot's receipt with the DGA now (admin, operator) |
//! | `GET /api/v1/compliance/report?month=YYYY-MM` | every obra's month: expected, accepted (late), held, failed, pending, not yet due (JSON or CSV) |
//! | `GET /api/v1/compliance/points/{id}/report?month=YYYY-MM` | one obra's month with every slot (JSON or CSV) |
//! | `GET /api/v1/compliance/points/{id}/log?from=&to=` | the POSTs sent and receipt checks made in a range |
//! | `GET /api/v1/compliance/points/{id}/dossier?from=&to=` | the rectification dossier of a range of slots (JSON or CSV) |
//!
//! Anatomy (ARCHITECTURE.md): this file holds the routes and [`start`]; handlers are in `api`;
//! the SQL in [`store`] (and, for what only they read, in [`report`] and [`verify`]); the
//! background tasks in [`submitter`], [`verify`] (the sampled receipt check) and [`report`]
//! (the queue gauges).

mod api;
pub mod dga;
pub mod report;
pub mod secret;
pub mod settings;
pub mod slot;
pub mod store;
pub mod submitter;
pub mod value;
pub mod verify;

use crate::core::Shutdown;
use crate::core::api::ApiState;
use crate::core::config::CloudConfig;
use crate::core::db::Db;
use prometheus_client::registry::Registry;
use secret::Sealer;
use std::sync::Arc;
use std::time::Duration;
use submitter::{ComplianceMetrics, Submitter, SystemClock};
use tokio::task::JoinSet;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use api::{
    MonthQuery, PasswordBody, PointMonthQuery, RangeQuery, ReviewBody, SlotDetail, SlotQuery,
};

/// The HTTPS client the receipt check on demand uses; `None` when it could not be built.
#[derive(Debug, Clone)]
pub struct DgaHandle(pub Option<Arc<dga::HttpDga>>);

/// The client of `config`, or `None` (logged) when it cannot be built.
pub fn dga_handle(config: &CloudConfig) -> DgaHandle {
    let c = &config.compliance;
    match dga::HttpDga::new(
        Duration::from_secs(c.post_timeout_s),
        Duration::from_secs(c.get_timeout_s),
    ) {
        Ok(d) => DgaHandle(Some(Arc::new(d))),
        Err(e) => {
            tracing::error!(error = %e, "compliance: no HTTPS client; receipts cannot be checked");
            DgaHandle(None)
        }
    }
}

/// The compliance key, when one is configured (the password route needs it).
#[derive(Debug, Clone)]
pub struct Keyring(pub Option<Arc<Sealer>>);

/// The key of `config`, or `None` (logged) when none is configured or it cannot be read: the
/// module runs, and points without a usable password are blocked with that reason.
pub fn keyring(config: &CloudConfig) -> Keyring {
    match Sealer::from_config(&config.compliance) {
        Ok(s) => Keyring(Some(Arc::new(s))),
        Err(secret::SecretError::NoKey) => Keyring(None),
        Err(e) => {
            tracing::error!(error = %e, "compliance key unusable: informante passwords cannot be stored or used");
            Keyring(None)
        }
    }
}

/// The compliance module's routes, with their OpenAPI paths.
pub fn routes(keys: Keyring, dga: DgaHandle) -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(
            api::get_compliance_settings,
            api::put_compliance_settings
        ))
        .routes(routes!(api::list_reported_points))
        .routes(routes!(api::get_reported_point, api::put_reported_point))
        .routes(routes!(api::put_informant_password))
        .routes(routes!(api::point_audit))
        .routes(routes!(api::list_compliance_slots))
        .routes(routes!(api::get_compliance_slot))
        .routes(routes!(api::release_slot))
        .routes(routes!(api::discard_slot))
        .routes(routes!(api::verify_slot))
        .routes(routes!(api::compliance_report))
        .routes(routes!(api::point_report))
        .routes(routes!(api::point_log))
        .routes(routes!(api::point_dossier))
        .layer(axum::Extension(keys))
        .layer(axum::Extension(dga))
}

/// Starts the submitter, the sampled receipt check and the queue gauges against the DGA over
/// HTTPS; they stop at `shutdown`.
pub fn start(
    config: &CloudConfig,
    keys: &Keyring,
    db: &Db,
    registry: &mut Registry,
    shutdown: &Shutdown,
    tasks: &mut JoinSet<Result<(), String>>,
) -> Result<(), String> {
    let c = &config.compliance;
    let client = dga::HttpDga::new(
        Duration::from_secs(c.post_timeout_s),
        Duration::from_secs(c.get_timeout_s),
    )?;
    let client = Arc::new(client);
    let metrics = ComplianceMetrics::register(registry);
    let verifier = verify::Verifier::new(
        db.clone(),
        client.clone(),
        c.clone(),
        verify::VerifyMetrics::register(registry),
    );
    let gauges = report::QueueGauges {
        db: db.clone(),
        metrics: report::QueueMetrics::register(registry),
        every: Duration::from_secs(c.interval_s.max(1)),
    };
    let submitter = Submitter::new(
        db.clone(),
        client,
        Arc::new(SystemClock),
        keys.0.clone(),
        c.clone(),
        metrics,
    );
    let sd = shutdown.clone();
    tasks.spawn(async move {
        submitter.run(sd).await;
        Ok(())
    });
    let sd = shutdown.clone();
    tasks.spawn(async move {
        verifier.run(sd).await;
        Ok(())
    });
    let sd = shutdown.clone();
    tasks.spawn(async move {
        gauges.run(sd).await;
        Ok(())
    });
    Ok(())
}
