//! Alerts: conditions an operator must hear about, found in stored telemetry, kept as rows
//! with an open/closed state, and served under `/api/v1/alerts`.
//!
//! An [`Evaluator`] runs where telemetry runs. Every `alerts.interval_s` it asks each rule for
//! what fires *now* ([`Firing`]) and reconciles that with the open alerts of the rule's kind:
//!
//! - **condition** alerts (site offline, no data, flow above the authorized flow, annual volume
//!   heading past the allowance, a point whose DGA reporting stopped) open when their condition is first seen, are refreshed (value,
//!   message) while it holds, and close themselves (`closed_by = "cleared"`) when it ends;
//! - **event** alerts (a totalizer going backwards: reset, replacement, reverse flow; a
//!   `(site, seq)` conflict refused by the ingest; a receipt the DGA holds with other values
//!   than were declared) open for the latest such event of a device (of a site, for a
//!   conflict; of a point, for a receipt mismatch) and stay open until a person closes them
//!   (`POST /api/v1/alerts/{id}/close`); a later event re-opens, an event already alerted on
//!   never does (the alert remembers the event's time in `since`).
//!
//! Invariant: at most one open alert per `(kind, subject)`, held by a unique partial index, so
//! several telemetry processes evaluating at once cannot double an alert; their reconciliations
//! are serialised (PostgreSQL advisory lock, SQLite's write lock) and each sees what the other
//! wrote. A rule that fails (database error) is counted and logged, and leaves its alerts as
//! they were: an alert is never closed because its rule could not be evaluated.
//!
//! The module's parts: [`rules`] (what fires now, one function per kind), [`reconcile`] (what
//! that does to the open alerts: the one-open-per-subject rule), [`evaluator`] (the background
//! task that runs both on a timer), [`store`] (reading and closing alerts), [`api`] (the
//! routes).

mod api;
mod evaluator;
mod reconcile;
mod rules;
mod store;

pub use api::{CloseRequest, ListQuery};
pub use evaluator::{AlertMetrics, Evaluator};
pub use reconcile::{Reconciled, reconcile};
pub use rules::{
    BACKWARDS_EVENTS, Forecast, RuleError, annual_volume, compliance_stopped,
    flow_above_authorized, forecast, no_data, receipt_mismatch, seq_conflict, site_offline,
    totalizer_backwards,
};
pub use store::{Filter, close, find, list};

use crate::core::api::ApiState;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Most alerts one list request returns.
pub const MAX_LIST: i64 = 1000;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The agent has not been heard from for longer than the site's threshold.
    SiteOffline,
    /// A device that reported before has sent no reading for longer than the threshold.
    NoData,
    /// Flow at a catchment point above its authorized flow.
    FlowAboveAuthorized,
    /// The year's extracted volume, at its current pace, ends past the annual allowance.
    AnnualVolume,
    /// A totalizer went backwards (reset, meter replaced, reverse flow).
    TotalizerBackwards,
    /// The DGA refused a point's configuration (informante, password): its reporting stopped
    /// until its compliance settings change.
    ComplianceStopped,
    /// A record arrived under a stored record's `(site, seq)` with other content (refused).
    SeqConflict,
    /// The DGA's GET answered other values under a slot's receipt than were declared: a
    /// rectification to ask the DGA for (`compliance::verify`).
    ReceiptMismatch,
}

impl AlertKind {
    pub const ALL: [AlertKind; 8] = [
        AlertKind::SiteOffline,
        AlertKind::NoData,
        AlertKind::FlowAboveAuthorized,
        AlertKind::AnnualVolume,
        AlertKind::TotalizerBackwards,
        AlertKind::ComplianceStopped,
        AlertKind::SeqConflict,
        AlertKind::ReceiptMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::SiteOffline => "site_offline",
            AlertKind::NoData => "no_data",
            AlertKind::FlowAboveAuthorized => "flow_above_authorized",
            AlertKind::AnnualVolume => "annual_volume",
            AlertKind::TotalizerBackwards => "totalizer_backwards",
            AlertKind::ComplianceStopped => "compliance_stopped",
            AlertKind::SeqConflict => "seq_conflict",
            AlertKind::ReceiptMismatch => "receipt_mismatch",
        }
    }

    fn parse(s: &str) -> Option<AlertKind> {
        AlertKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Event alerts stay open until a person closes them; condition alerts close themselves.
    pub fn closes_itself(self) -> bool {
        !matches!(
            self,
            AlertKind::TotalizerBackwards | AlertKind::SeqConflict | AlertKind::ReceiptMismatch
        )
    }
}

/// Open or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Open,
    Closed,
}

/// An alert as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Alert {
    pub id: i64,
    pub kind: AlertKind,
    pub subject: String,
    pub site: Option<String>,
    pub device: Option<String>,
    pub point_id: Option<i64>,
    pub state: AlertState,
    pub since: DateTime<Utc>,
    pub opened_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub closed_at: Option<DateTime<Utc>>,
    pub closed_by: Option<String>,
    pub close_note: String,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub message: String,
}

/// A condition a rule sees now.
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    pub subject: String,
    pub site: Option<String>,
    pub device: Option<String>,
    pub point_id: Option<i64>,
    pub since: DateTime<Utc>,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub message: String,
}

/// Why alerts could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("alert {0} not found")]
    NotFound(i64),
    #[error("alert {0} is already closed")]
    Closed(i64),
    #[error("stored alert {id}: {reason}")]
    Corrupt { id: i64, reason: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// `GET /api/v1/alerts`, `GET /api/v1/alerts/{id}` (any role), `POST /api/v1/alerts/{id}/close`
/// (operators, technicians, admins).
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(api::list_alerts))
        .routes(routes!(api::get_alert))
        .routes(routes!(api::close_alert))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in AlertKind::ALL {
            assert_eq!(AlertKind::parse(k.as_str()), Some(k));
            assert_eq!(
                serde_json::to_value(k)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from)),
                Some(k.as_str().to_string())
            );
        }
    }
}
