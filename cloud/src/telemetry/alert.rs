//! Alerts: conditions an operator must hear about, found in stored telemetry, kept as rows
//! with an open/closed state, and served under `/api/v1/alerts`.
//!
//! An [`Evaluator`] runs where telemetry runs. Every `alerts.interval_s` it asks each rule for
//! what fires *now* ([`Firing`]) and reconciles that with the open alerts of the rule's kind:
//!
//! - **condition** alerts (site offline, no data, flow above the authorized flow, annual volume
//!   heading past the allowance) open when their condition is first seen, are refreshed (value,
//!   message) while it holds, and close themselves (`closed_by = "cleared"`) when it ends;
//! - **event** alerts (a totalizer going backwards: reset, replacement, reverse flow) open for
//!   the latest such event of a device and stay open until a person closes them
//!   (`POST /api/v1/alerts/{id}/close`); a later event re-opens, an event already alerted on
//!   never does (the alert remembers the event's time in `since`).
//!
//! Invariant: at most one open alert per `(kind, subject)`, held by a unique partial index, so
//! several telemetry processes evaluating at once cannot double an alert; their reconciliations
//! are serialised (PostgreSQL advisory lock, SQLite's write lock) and each sees what the other
//! wrote. A rule that fails (database error) is counted and logged, and leaves its alerts as
//! they were: an alert is never closed because its rule could not be evaluated.

use crate::core::Shutdown;
use crate::core::api::ErrorBody;
use crate::core::api::{ApiError, ApiJson, ApiPath, ApiQuery, ApiState};
use crate::core::auth::Permission;
use crate::core::config::AlertsConfig;
use crate::core::db::{Db, each_db};
use crate::core::metrics::KindLabels;
use crate::telemetry::query::{self, Bucket, QueryError};
use crate::users::Caller;
use axum::Json;
use axum::extract::State;
use caudal_common::SiteId;
use chrono::{DateTime, Duration, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use std::collections::HashMap;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Key of the PostgreSQL advisory lock that serialises reconciliations ("caudal-alerts").
const PG_LOCK_KEY: i64 = 0x6361_7564_616c_6172;

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
}

impl AlertKind {
    pub const ALL: [AlertKind; 5] = [
        AlertKind::SiteOffline,
        AlertKind::NoData,
        AlertKind::FlowAboveAuthorized,
        AlertKind::AnnualVolume,
        AlertKind::TotalizerBackwards,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::SiteOffline => "site_offline",
            AlertKind::NoData => "no_data",
            AlertKind::FlowAboveAuthorized => "flow_above_authorized",
            AlertKind::AnnualVolume => "annual_volume",
            AlertKind::TotalizerBackwards => "totalizer_backwards",
        }
    }

    fn parse(s: &str) -> Option<AlertKind> {
        AlertKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Event alerts stay open until a person closes them; condition alerts close themselves.
    pub fn closes_itself(self) -> bool {
        !matches!(self, AlertKind::TotalizerBackwards)
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

/// Counters of the evaluator.
#[derive(Debug, Clone, Default)]
pub struct AlertMetrics {
    evaluations: Counter,
    rule_errors: Family<KindLabels, Counter>,
    opened: Family<KindLabels, Counter>,
    closed: Family<KindLabels, Counter>,
    open: Family<KindLabels, Gauge>,
}

impl AlertMetrics {
    pub fn register(r: &mut Registry) -> AlertMetrics {
        let m = AlertMetrics::default();
        r.register(
            "alert_evaluations",
            "Alert evaluation rounds run",
            m.evaluations.clone(),
        );
        r.register(
            "alert_rule_errors",
            "Alert rules that could not be evaluated, by alert kind",
            m.rule_errors.clone(),
        );
        r.register("alerts_opened", "Alerts opened, by kind", m.opened.clone());
        r.register(
            "alerts_closed",
            "Alerts closed (cleared or by a person), by kind",
            m.closed.clone(),
        );
        r.register(
            "alerts_open",
            "Alerts open after the last evaluation, by kind",
            m.open.clone(),
        );
        m
    }
}

/// Why a rule could not say what fires.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Query(#[from] QueryError),
}

/// What one reconciliation changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub opened: u64,
    pub refreshed: u64,
    pub closed: u64,
}

/// Runs the rules on a timer and keeps the alerts table in step with them.
#[derive(Debug)]
pub struct Evaluator {
    config: AlertsConfig,
    db: Db,
    metrics: AlertMetrics,
    /// When the annual-volume rule last ran: it reads the year's readings, so it runs every
    /// `volume_interval_s`, not every round.
    volume_ran: std::sync::Mutex<Option<DateTime<Utc>>>,
}

impl Evaluator {
    pub fn new(config: AlertsConfig, db: Db, metrics: AlertMetrics) -> Evaluator {
        Evaluator {
            config,
            db,
            metrics,
            volume_ran: std::sync::Mutex::new(None),
        }
    }

    /// Evaluates every `interval_s` until shutdown.
    pub async fn run(self, mut shutdown: Shutdown) {
        let period = std::time::Duration::from_secs(self.config.interval_s.max(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tick.tick() => {
                    self.evaluate(Utc::now()).await;
                }
            }
        }
    }

    /// One round: every rule, each reconciled on its own so one failing rule leaves the others
    /// working.
    pub async fn evaluate(&self, now: DateTime<Utc>) {
        self.metrics.evaluations.inc();
        for kind in AlertKind::ALL {
            let firing = match self.rule(kind, now).await {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => {
                    self.fail(kind, &e);
                    continue;
                }
            };
            match reconcile(&self.db, kind, &firing, now).await {
                Ok(r) => {
                    let labels = KindLabels::new(kind.as_str());
                    self.metrics.opened.get_or_create(&labels).inc_by(r.opened);
                    self.metrics.closed.get_or_create(&labels).inc_by(r.closed);
                    if r.opened + r.closed > 0 {
                        tracing::info!(
                            kind = kind.as_str(),
                            opened = r.opened,
                            closed = r.closed,
                            "alerts changed"
                        );
                    }
                }
                Err(e) => self.fail(kind, &e),
            }
        }
        match open_counts(&self.db).await {
            Ok(counts) => {
                for kind in AlertKind::ALL {
                    let n = counts.get(&kind).copied().unwrap_or(0);
                    self.metrics
                        .open
                        .get_or_create(&KindLabels::new(kind.as_str()))
                        .set(n);
                }
            }
            Err(e) => tracing::warn!(error = %e, "counting open alerts failed"),
        }
    }

    fn fail(&self, kind: AlertKind, e: &dyn std::fmt::Display) {
        self.metrics
            .rule_errors
            .get_or_create(&KindLabels::new(kind.as_str()))
            .inc();
        tracing::warn!(kind = kind.as_str(), error = %e, "alert rule failed");
    }

    /// What fires now for `kind`; `None` when the rule has nothing to judge by in this
    /// deployment (its alerts are then left as they are).
    async fn rule(
        &self,
        kind: AlertKind,
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<Firing>>, RuleError> {
        let c = &self.config;
        Ok(Some(match kind {
            AlertKind::SiteOffline => site_offline(&self.db, now).await?,
            AlertKind::NoData => {
                no_data(
                    &self.db,
                    now,
                    Duration::seconds(secs(c.no_data_after_s)),
                    Duration::days(i64::from(c.lookback_days)),
                )
                .await?
            }
            AlertKind::TotalizerBackwards => {
                totalizer_backwards(&self.db, now - Duration::days(i64::from(c.lookback_days)))
                    .await?
            }
            AlertKind::FlowAboveAuthorized => {
                flow_above_authorized(&self.db, now - Duration::seconds(secs(c.no_data_after_s)))
                    .await?
            }
            AlertKind::AnnualVolume => {
                let due = {
                    let last = self
                        .volume_ran
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    last.is_none_or(|t| now - t >= Duration::seconds(secs(c.volume_interval_s)))
                };
                if !due {
                    return Ok(None);
                }
                let firing = annual_volume(&self.db, now).await?;
                *self
                    .volume_ran
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(now);
                firing
            }
        }))
    }
}

fn secs(s: u64) -> i64 {
    i64::try_from(s).unwrap_or(i64::MAX / 1_000_000)
}

fn ago(d: Duration) -> String {
    let s = d.num_seconds();
    if s >= 2 * 86_400 {
        format!("{} d", s / 86_400)
    } else if s >= 2 * 3600 {
        format!("{} h", s / 3600)
    } else if s >= 120 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

// ---------------------------------------------------------------------------------------------
// Rules

/// Active sites whose agent was last heard (status or batch) longer ago than the site's
/// `offline_after_s`, or never heard and registered longer ago than that.
pub async fn site_offline(db: &Db, now: DateTime<Utc>) -> Result<Vec<Firing>, sqlx::Error> {
    let sql = "SELECT s.id, s.created_at, s.offline_after_s, st.last_seen FROM sites s \
               LEFT JOIN site_status st ON st.site = s.id WHERE s.active";
    // (site, last heard or registered, heard at all, threshold)
    let rows: Vec<(String, DateTime<Utc>, bool, Duration)> =
        each_db!(db, |pool, to_db, from_row| {
            let rows = sqlx::query(sql).fetch_all(pool).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let heard = !sqlx::ValueRef::is_null(&r.try_get_raw("last_seen")?);
                out.push((
                    r.try_get("id")?,
                    from_row(&r, if heard { "last_seen" } else { "created_at" })?,
                    heard,
                    Duration::seconds(r.try_get("offline_after_s")?),
                ));
            }
            out
        });
    Ok(rows
        .into_iter()
        .filter(|(_, t, _, after)| now - *t > *after)
        .map(|(site, t, heard, after)| Firing {
            subject: format!("site/{site}"),
            message: if heard {
                format!("site {site}: agent not heard from for {}", ago(now - t))
            } else {
                format!(
                    "site {site}: agent never heard from since the site was registered {} ago",
                    ago(now - t)
                )
            },
            site: Some(site),
            device: None,
            point_id: None,
            since: t,
            value: Some((now - t).num_seconds() as f64),
            threshold: Some(after.num_seconds() as f64),
        })
        .collect())
}

/// Devices of active sites that sent readings within the lookback and none for longer than
/// `after`. A site already offline still gets these: they say which devices are missing.
pub async fn no_data(
    db: &Db,
    now: DateTime<Utc>,
    after: Duration,
    lookback: Duration,
) -> Result<Vec<Firing>, sqlx::Error> {
    let from = now - lookback;
    // Each device's latest reading is one probe of the (site, device, ts) index; a filter on
    // `ts` alone would read the whole table, which no index leads with.
    let sites: Vec<String> = each_db!(db, |pool, to_db, from_row| {
        sqlx::query_scalar("SELECT id FROM sites WHERE active ORDER BY id")
            .fetch_all(pool)
            .await?
    });
    let mut last: Vec<(String, String, DateTime<Utc>)> = Vec::new();
    for site in sites {
        let Ok(id) = SiteId::new(&site) else {
            continue;
        };
        let devices = query::devices(db, &id).await.map_err(|e| match e {
            QueryError::Database(e) => e,
            other => sqlx::Error::Protocol(other.to_string()),
        })?;
        for device in devices {
            let t: Option<DateTime<Utc>> = each_db!(db, |pool, to_db, from_row| {
                let row = sqlx::query(
                    "SELECT ts FROM readings WHERE site = $1 AND device = $2 \
                     ORDER BY ts DESC LIMIT 1",
                )
                .bind(&site)
                .bind(&device)
                .fetch_optional(pool)
                .await?;
                row.map(|r| from_row(&r, "ts")).transpose()?
            });
            if let Some(t) = t.filter(|t| *t >= from) {
                last.push((site.clone(), device, t));
            }
        }
    }
    Ok(last
        .into_iter()
        .filter(|(_, _, t)| now - *t > after)
        .map(|(site, device, t)| Firing {
            subject: format!("device/{site}/{device}"),
            message: format!(
                "site {site}, device {device}: no reading for {} (last at {})",
                ago(now - t),
                t.format("%Y-%m-%dT%H:%M:%SZ")
            ),
            site: Some(site),
            device: Some(device),
            point_id: None,
            since: t,
            value: Some((now - t).num_seconds() as f64),
            threshold: Some(after.num_seconds() as f64),
        })
        .collect())
}

/// Event kinds that mean a totalizer went backwards. A rollover (the counter wrapping at its
/// maximum) is normal and not among them.
pub const BACKWARDS_EVENTS: [&str; 4] = [
    "totalizer_backwards",
    "totalizer_reset",
    "meter_replaced",
    "reverse_flow",
];

/// The latest backwards event of each device since `from`.
pub async fn totalizer_backwards(db: &Db, from: DateTime<Utc>) -> Result<Vec<Firing>, sqlx::Error> {
    type Row = (
        String,
        Option<String>,
        String,
        DateTime<Utc>,
        Option<f64>,
        Option<f64>,
        String,
    );
    let kinds = BACKWARDS_EVENTS.map(str::to_string).to_vec();
    let rows: Vec<Row> = each_db!(db, |pool, to_db, from_row| {
        let rows = sqlx::query(
            "SELECT site, device, kind, ts, previous, current, message FROM events \
             WHERE ts >= $1 AND kind IN ($2, $3, $4, $5) ORDER BY ts",
        )
        .bind(to_db(from))
        .bind(&kinds[0])
        .bind(&kinds[1])
        .bind(&kinds[2])
        .bind(&kinds[3])
        .fetch_all(pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push((
                r.try_get("site")?,
                r.try_get("device")?,
                r.try_get("kind")?,
                from_row(&r, "ts")?,
                r.try_get("previous")?,
                r.try_get("current")?,
                r.try_get("message")?,
            ));
        }
        out
    });
    // Ordered by time: the last row of each device wins.
    let mut latest: HashMap<String, Firing> = HashMap::new();
    for (site, device, kind, ts, previous, current, message) in rows {
        let dev = device.unwrap_or_default();
        let subject = format!("device/{site}/{dev}");
        let what = kind.replace('_', " ");
        let values = match (previous, current) {
            (Some(p), Some(c)) => format!(" ({p} → {c} m³)"),
            _ => String::new(),
        };
        let detail = if message.is_empty() {
            String::new()
        } else {
            format!(": {message}")
        };
        latest.insert(
            subject.clone(),
            Firing {
                subject,
                message: format!(
                    "site {site}, device {dev}: {what} at {}{values}{detail}",
                    ts.format("%Y-%m-%dT%H:%M:%SZ")
                ),
                site: Some(site),
                device: (!dev.is_empty()).then_some(dev),
                point_id: None,
                since: ts,
                value: current,
                threshold: previous,
            },
        );
    }
    let mut v: Vec<Firing> = latest.into_values().collect();
    v.sort_by(|a, b| a.subject.cmp(&b.subject));
    Ok(v)
}

/// A catchment point's right, with the devices that measure it.
#[derive(Debug, Clone)]
struct PointRight {
    id: i64,
    label: String,
    limit: f64,
    devices: Vec<(SiteId, String)>,
}

/// Active points with a right of `column` (`authorized_flow_lps` or `annual_volume_m3`) and
/// their active devices on active sites.
async fn point_rights(db: &Db, column: &str) -> Result<Vec<PointRight>, sqlx::Error> {
    let sql = format!(
        "SELECT p.id, p.name, p.obra_code, p.{column} AS limit_value, d.site, d.id AS device \
         FROM catchment_points p \
         JOIN devices d ON d.point_id = p.id AND d.active \
         JOIN sites s ON s.id = d.site AND s.active \
         WHERE p.active AND p.{column} IS NOT NULL ORDER BY p.id, d.site, d.id"
    );
    let rows: Vec<(i64, String, Option<String>, f64, String, String)> =
        each_db!(db, |pool, to_db, from_row| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_all(pool)
                .await?
        });
    let mut out: Vec<PointRight> = Vec::new();
    for (id, name, obra, limit, site, device) in rows {
        let Ok(site) = SiteId::new(&site) else {
            continue;
        };
        match out.last_mut() {
            Some(p) if p.id == id => p.devices.push((site, device)),
            _ => out.push(PointRight {
                id,
                label: match obra {
                    Some(code) => format!("point {id} ({name}, {code})"),
                    None => format!("point {id} ({name})"),
                },
                limit,
                devices: vec![(site, device)],
            }),
        }
    }
    Ok(out)
}

/// Points whose flow now — the sum of each of their devices' latest flow reading since
/// `fresh_from` — is above the authorized flow.
pub async fn flow_above_authorized(
    db: &Db,
    fresh_from: DateTime<Utc>,
) -> Result<Vec<Firing>, sqlx::Error> {
    let mut out = Vec::new();
    for point in point_rights(db, "authorized_flow_lps").await? {
        let mut total = 0.0;
        let mut latest: Option<DateTime<Utc>> = None;
        for (site, device) in &point.devices {
            let row: Option<(f64, DateTime<Utc>)> = each_db!(db, |pool, to_db, from_row| {
                let row = sqlx::query(
                    "SELECT flow_lps, ts FROM readings WHERE site = $1 AND device = $2 \
                     AND ts >= $3 AND flow_lps IS NOT NULL ORDER BY ts DESC LIMIT 1",
                )
                .bind(site.as_str())
                .bind(device)
                .bind(to_db(fresh_from))
                .fetch_optional(pool)
                .await?;
                match row {
                    Some(r) => Some((r.try_get("flow_lps")?, from_row(&r, "ts")?)),
                    None => None,
                }
            });
            if let Some((flow, ts)) = row.filter(|(f, _)| f.is_finite()) {
                total += flow;
                latest = latest.max(Some(ts));
            }
        }
        let Some(at) = latest else { continue };
        if total > point.limit {
            out.push(Firing {
                subject: format!("point/{}", point.id),
                site: point.devices.first().map(|(s, _)| s.to_string()),
                device: None,
                point_id: Some(point.id),
                since: at,
                value: Some(total),
                threshold: Some(point.limit),
                message: format!(
                    "{}: flow {total:.2} L/s at {}, above the authorized {:.2} L/s",
                    point.label,
                    at.format("%Y-%m-%dT%H:%M:%SZ"),
                    point.limit
                ),
            });
        }
    }
    Ok(out)
}

/// Offset of the time the DGA counts in (Chile, fixed UTC-4 all year): water years and the
/// annual allowance run on calendar years in that time.
const DGA_OFFSET_HOURS: i32 = -4;

/// Start of the calendar year (DGA time) that `now` falls in, and of the next one, in UTC.
pub fn dga_year(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    use chrono::{Datelike, FixedOffset, TimeZone};
    let tz = FixedOffset::east_opt(DGA_OFFSET_HOURS * 3600).expect("a constant offset under 24 h");
    let year = now.with_timezone(&tz).year();
    let start = |y: i32| {
        tz.with_ymd_and_hms(y, 1, 1, 0, 0, 0)
            .single()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(now)
    };
    (start(year), start(year + 1))
}

/// Days the pace of extraction is taken over.
const PACE_DAYS: i64 = 30;

/// What a point is on course to extract in the year: so far, and at the pace of the last
/// [`PACE_DAYS`] days until the year ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    pub so_far_m3: f64,
    pub year_end_m3: f64,
}

/// The forecast from the daily volumes of the year so far (`(day start, m³)`).
pub fn forecast(
    days: &[(DateTime<Utc>, f64)],
    year: (DateTime<Utc>, DateTime<Utc>),
    now: DateTime<Utc>,
) -> Forecast {
    let so_far: f64 = days.iter().map(|(_, v)| v).sum();
    let pace_from = (now - Duration::days(PACE_DAYS)).max(year.0);
    let recent: f64 = days
        .iter()
        .filter(|(t, _)| *t >= pace_from)
        .map(|(_, v)| v)
        .sum();
    let window = (now - pace_from).num_seconds().max(3600) as f64;
    let remaining = (year.1 - now).num_seconds().max(0) as f64;
    Forecast {
        so_far_m3: so_far,
        year_end_m3: so_far + recent / window * remaining,
    }
}

/// Points whose extracted volume this year, at the pace of the last 30 days, ends the year past
/// their annual allowance (or already is past it).
pub async fn annual_volume(db: &Db, now: DateTime<Utc>) -> Result<Vec<Firing>, RuleError> {
    let year = dga_year(now);
    let mut out = Vec::new();
    for point in point_rights(db, "annual_volume_m3").await? {
        let mut days: Vec<(DateTime<Utc>, f64)> = Vec::new();
        for (site, device) in &point.devices {
            let buckets =
                query::aggregate(db, site, Some(device), year.0, now, Bucket::Day).await?;
            days.extend(
                buckets
                    .into_iter()
                    .filter_map(|b| b.volume_m3.map(|v| (b.start, v))),
            );
        }
        if days.is_empty() {
            continue;
        }
        let f = forecast(&days, year, now);
        if f.year_end_m3 <= point.limit {
            continue;
        }
        let pct = |v: f64| v / point.limit * 100.0;
        let message = if f.so_far_m3 > point.limit {
            format!(
                "{}: {:.0} m³ extracted this year, past the annual allowance of {:.0} m³ ({:.0} %)",
                point.label,
                f.so_far_m3,
                point.limit,
                pct(f.so_far_m3)
            )
        } else {
            format!(
                "{}: {:.0} m³ extracted this year ({:.0} % of {:.0} m³); at the last {PACE_DAYS} \
                 days' pace the year ends at {:.0} m³ ({:.0} %)",
                point.label,
                f.so_far_m3,
                pct(f.so_far_m3),
                point.limit,
                f.year_end_m3,
                pct(f.year_end_m3)
            )
        };
        out.push(Firing {
            subject: format!("point/{}", point.id),
            site: point.devices.first().map(|(s, _)| s.to_string()),
            device: None,
            point_id: Some(point.id),
            since: now,
            value: Some(f.year_end_m3),
            threshold: Some(point.limit),
            message,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Storage

/// Brings the alerts of `kind` in step with what fires now. See the module doc for condition
/// and event alerts. Runs in one transaction that holds the write lock (SQLite `BEGIN
/// IMMEDIATE`, a PostgreSQL advisory lock), so replicas evaluating at once do not interleave.
pub async fn reconcile(
    db: &Db,
    kind: AlertKind,
    firing: &[Firing],
    now: DateTime<Utc>,
) -> Result<Reconciled, sqlx::Error> {
    each_db!(db, |pool, to_db, from_row| {
        let mut tx = pool.begin_reconcile().await?;
        let rows = sqlx::query(
            "SELECT id, subject, state, since FROM alerts WHERE kind = $1 \
             AND (state = 'open' OR since = (SELECT MAX(a.since) FROM alerts a \
                  WHERE a.kind = alerts.kind AND a.subject = alerts.subject))",
        )
        .bind(kind.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let mut known = Known {
            open: HashMap::new(),
            latest_since: HashMap::new(),
        };
        for r in rows {
            let subject: String = r.try_get("subject")?;
            let since = from_row(&r, "since")?;
            if r.try_get::<String, _>("state")? == "open" {
                known.open.insert(subject.clone(), r.try_get("id")?);
            }
            let e = known.latest_since.entry(subject).or_insert(since);
            *e = (*e).max(since);
        }
        let mut out = Reconciled::default();
        let mut seen = std::collections::HashSet::new();
        for f in firing {
            seen.insert(f.subject.as_str());
            match step(kind, f, &known) {
                Step::Skip => {}
                Step::Refresh(id) => {
                    sqlx::query(
                        "UPDATE alerts SET updated_at = $1, since = COALESCE($2, since), \
                         value = $3, threshold = $4, message = $5 WHERE id = $6",
                    )
                    .bind(to_db(now))
                    .bind((!kind.closes_itself()).then(|| to_db(f.since)))
                    .bind(f.value)
                    .bind(f.threshold)
                    .bind(&f.message)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    out.refreshed += 1;
                }
                Step::Insert => {
                    let n = sqlx::query(
                        "INSERT INTO alerts (kind, subject, site, device, point_id, state, since, \
                         opened_at, updated_at, value, threshold, message) \
                         VALUES ($1, $2, $3, $4, $5, 'open', $6, $7, $7, $8, $9, $10) \
                         ON CONFLICT (kind, subject) WHERE state = 'open' DO NOTHING",
                    )
                    .bind(kind.as_str())
                    .bind(&f.subject)
                    .bind(&f.site)
                    .bind(&f.device)
                    .bind(f.point_id)
                    .bind(to_db(f.since))
                    .bind(to_db(now))
                    .bind(f.value)
                    .bind(f.threshold)
                    .bind(&f.message)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    out.opened += n;
                }
            }
        }
        if kind.closes_itself() {
            for (subject, id) in &known.open {
                if !seen.contains(subject.as_str()) {
                    sqlx::query(
                        "UPDATE alerts SET state = 'closed', closed_at = $1, \
                         closed_by = 'cleared', updated_at = $1 WHERE id = $2 AND state = 'open'",
                    )
                    .bind(to_db(now))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    out.closed += 1;
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    })
}

/// A write transaction that serializes alert reconciles: SQLite takes its write lock up front,
/// PostgreSQL an advisory lock held until the transaction ends.
trait ReconcileTx: Sized {
    type Database: sqlx::Database;
    fn begin_reconcile(
        &self,
    ) -> impl std::future::Future<
        Output = Result<sqlx::Transaction<'static, Self::Database>, sqlx::Error>,
    > + Send;
}

impl ReconcileTx for sqlx::SqlitePool {
    type Database = sqlx::Sqlite;
    async fn begin_reconcile(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl ReconcileTx for sqlx::PgPool {
    type Database = sqlx::Postgres;
    async fn begin_reconcile(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PG_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}

/// For each subject of a kind: the open alert (id) if any, and the latest `since` of any alert.
struct Known {
    open: HashMap<String, i64>,
    latest_since: HashMap<String, DateTime<Utc>>,
}

/// What to do with one firing, given what is known.
enum Step {
    Insert,
    Refresh(i64),
    Skip,
}

fn step(kind: AlertKind, f: &Firing, known: &Known) -> Step {
    if !kind.closes_itself()
        && known
            .latest_since
            .get(&f.subject)
            .is_some_and(|s| *s >= f.since)
    {
        // This event (or a later one) was alerted on already, open or closed.
        return Step::Skip;
    }
    match known.open.get(&f.subject) {
        Some(id) => Step::Refresh(*id),
        None => Step::Insert,
    }
}

async fn open_counts(db: &Db) -> Result<HashMap<AlertKind, i64>, sqlx::Error> {
    let sql = "SELECT kind, COUNT(*) AS n FROM alerts WHERE state = 'open' GROUP BY kind";
    let rows: Vec<(String, i64)> = each_db!(db, |pool, to_db, from_row| {
        sqlx::query_as(sql).fetch_all(pool).await?
    });
    Ok(rows
        .into_iter()
        .filter_map(|(k, n)| AlertKind::parse(&k).map(|k| (k, n)))
        .collect())
}

/// Which alerts a list shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub state: Option<AlertState>,
    pub kind: Option<AlertKind>,
    pub site: Option<String>,
    /// Only alerts with an id below this (the next page of a newest-first list).
    pub before: Option<i64>,
    pub limit: i64,
}

const COLUMNS: &str = "id, kind, subject, site, device, point_id, state, since, opened_at, \
                       updated_at, closed_at, closed_by, close_note, value, threshold, message";

/// An [`Alert`] from a row of [`COLUMNS`], reading times with the backend's `from_row`.
macro_rules! alert_from_row {
    ($r:expr, $from_row:ident) => {{
        let r = $r;
        let id: i64 = r.try_get("id")?;
        let (kind, state) = parse_row(id, r.try_get("kind")?, r.try_get("state")?)?;
        let closed_at = match sqlx::ValueRef::is_null(&r.try_get_raw("closed_at")?) {
            true => None,
            false => Some($from_row(r, "closed_at")?),
        };
        Ok::<Alert, AlertError>(Alert {
            id,
            kind,
            subject: r.try_get("subject")?,
            site: r.try_get("site")?,
            device: r.try_get("device")?,
            point_id: r.try_get("point_id")?,
            state,
            since: $from_row(r, "since")?,
            opened_at: $from_row(r, "opened_at")?,
            updated_at: $from_row(r, "updated_at")?,
            closed_at,
            closed_by: r.try_get("closed_by")?,
            close_note: r.try_get("close_note")?,
            value: r.try_get("value")?,
            threshold: r.try_get("threshold")?,
            message: r.try_get("message")?,
        })
    }};
}

/// Alerts matching `f`, newest first.
pub async fn list(db: &Db, f: &Filter) -> Result<Vec<Alert>, AlertError> {
    let state = f.state.map(|s| match s {
        AlertState::Open => "open",
        AlertState::Closed => "closed",
    });
    let kind = f.kind.map(AlertKind::as_str);
    let limit = f.limit.clamp(1, MAX_LIST);
    let sql = format!(
        "SELECT {COLUMNS} FROM alerts WHERE (CAST($1 AS TEXT) IS NULL OR state = $1) \
         AND (CAST($2 AS TEXT) IS NULL OR kind = $2) AND (CAST($3 AS TEXT) IS NULL OR site = $3) \
         AND (CAST($4 AS BIGINT) IS NULL OR id < $4) ORDER BY id DESC LIMIT $5"
    );
    each_db!(db, |pool, to_db, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(state)
            .bind(kind)
            .bind(&f.site)
            .bind(f.before)
            .bind(limit)
            .fetch_all(pool)
            .await?;
        rows.iter().map(|r| alert_from_row!(r, from_row)).collect()
    })
}

/// One alert.
pub async fn find(db: &Db, id: i64) -> Result<Alert, AlertError> {
    let sql = format!("SELECT {COLUMNS} FROM alerts WHERE id = $1");
    let alert = each_db!(db, |pool, to_db, from_row| {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(pool)
            .await?
            .as_ref()
            .map(|r| alert_from_row!(r, from_row))
            .transpose()?
    });
    alert.ok_or(AlertError::NotFound(id))
}

/// Closes an open alert on a person's word.
pub async fn close(
    db: &Db,
    id: i64,
    by: &str,
    note: &str,
    now: DateTime<Utc>,
) -> Result<Alert, AlertError> {
    let n = each_db!(db, |pool, to_db, from_row| {
        sqlx::query(
            "UPDATE alerts SET state = 'closed', closed_at = $1, updated_at = $1, \
             closed_by = $2, close_note = $3 WHERE id = $4 AND state = 'open'",
        )
        .bind(to_db(now))
        .bind(by)
        .bind(note)
        .bind(id)
        .execute(pool)
        .await?
        .rows_affected()
    });
    let alert = find(db, id).await?;
    if n == 0 {
        return Err(AlertError::Closed(id));
    }
    Ok(alert)
}

fn parse_row(id: i64, kind: String, state: String) -> Result<(AlertKind, AlertState), AlertError> {
    let kind = AlertKind::parse(&kind).ok_or_else(|| AlertError::Corrupt {
        id,
        reason: format!("unknown kind {kind:?}"),
    })?;
    let state = match state.as_str() {
        "open" => AlertState::Open,
        "closed" => AlertState::Closed,
        other => {
            return Err(AlertError::Corrupt {
                id,
                reason: format!("unknown state {other:?}"),
            });
        }
    };
    Ok((kind, state))
}

// ---------------------------------------------------------------------------------------------
// API

/// `GET /api/v1/alerts`, `GET /api/v1/alerts/{id}` (any role), `POST /api/v1/alerts/{id}/close`
/// (operators, technicians, admins).
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_alerts))
        .routes(routes!(get_alert))
        .routes(routes!(close_alert))
}

impl From<AlertError> for ApiError {
    fn from(e: AlertError) -> ApiError {
        match e {
            AlertError::NotFound(id) => ApiError::NotFound(format!("alert {id}")),
            AlertError::Closed(_) => ApiError::conflict("state", e.to_string()),
            AlertError::Corrupt { .. } => ApiError::corrupt("alerts", &e),
            AlertError::Database(_) => ApiError::database("alerts", &e),
        }
    }
}

/// Query of `GET /api/v1/alerts`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `open` (default), `closed` or `all`.
    #[serde(default)]
    #[param(pattern = "^(open|closed|all)$")]
    pub state: Option<String>,
    /// Only alerts of this kind.
    #[serde(default)]
    #[param(value_type = Option<AlertKind>)]
    pub kind: Option<String>,
    /// Only alerts of this site.
    #[serde(default)]
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub site: Option<String>,
    /// Alerts with an id below this: the next page.
    #[serde(default)]
    pub before: Option<i64>,
    /// At most this many, 1..=1000 (default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

fn filter(q: ListQuery) -> Result<Filter, ApiError> {
    let state = match q.state.as_deref().unwrap_or("open") {
        "open" => Some(AlertState::Open),
        "closed" => Some(AlertState::Closed),
        "all" => None,
        other => {
            return Err(ApiError::bad(
                "state",
                format!("{other:?} is not one of open, closed, all"),
            ));
        }
    };
    let kind = match q.kind.as_deref() {
        None => None,
        Some(k) => Some(AlertKind::parse(k).ok_or_else(|| {
            let known: Vec<&str> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
            ApiError::bad(
                "kind",
                format!("{k:?} is not an alert kind; known: {}", known.join(", ")),
            )
        })?),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(ApiError::bad(
            "limit",
            format!("must be between 1 and {MAX_LIST}"),
        ));
    }
    Ok(Filter {
        state,
        kind,
        site: q
            .site
            .map(|s| {
                SiteId::new(s.as_str())
                    .map(|_| s)
                    .map_err(|e| ApiError::bad("site", e.to_string()))
            })
            .transpose()?,
        before: q.before,
        limit,
    })
}

/// Alerts, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/alerts",
    tag = "alerts",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "Alerts, newest first", body = Vec<Alert>),
        (status = 400, description = "A parameter is wrong; `field` names it", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
    ),
)]
async fn list_alerts(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<Alert>>, ApiError> {
    caller.require(Permission::Read)?;
    Ok(Json(list(&state.db, &filter(q)?).await?))
}

fn alert_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad("id", format!("{raw:?} is not an alert id")))
}

/// One alert.
#[utoipa::path(
    get,
    path = "/api/v1/alerts/{id}",
    tag = "alerts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Alert id")),
    responses(
        (status = 200, description = "The alert", body = Alert),
        (status = 400, description = "A field, parameter or the path is wrong; `field` names it", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 404, description = "No such alert", body = ErrorBody),
    ),
)]
async fn get_alert(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Alert>, ApiError> {
    caller.require(Permission::Read)?;
    Ok(Json(find(&state.db, alert_id(&id)?).await?))
}

/// Body of `POST /api/v1/alerts/{id}/close`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloseRequest {
    /// Why it is closed (what was found on site).
    #[serde(default)]
    pub note: String,
}

/// Closes an open alert (operator, technician, admin).
#[utoipa::path(
    post,
    path = "/api/v1/alerts/{id}/close",
    tag = "alerts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Alert id")),
    request_body = CloseRequest,
    responses(
        (status = 200, description = "The alert", body = Alert),
        (status = 400, description = "A field, parameter or the path is wrong; `field` names it", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The role may not do this", body = ErrorBody),
        (status = 404, description = "No such alert", body = ErrorBody),
        (status = 409, description = "Already closed", body = ErrorBody),
    ),
)]
async fn close_alert(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CloseRequest>,
) -> Result<Json<Alert>, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let id = alert_id(&id)?;
    if body.note.chars().count() > 2000 {
        return Err(ApiError::bad("note", "at most 2000 characters"));
    }
    let alert = close(
        &state.db,
        id,
        &caller.user.email,
        body.note.trim(),
        Utc::now(),
    )
    .await?;
    tracing::info!(alert = id, by = %caller.user.email, "alert closed");
    Ok(Json(alert))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn firing(subject: &str, since: i64) -> Firing {
        Firing {
            subject: subject.to_string(),
            site: None,
            device: None,
            point_id: None,
            since: DateTime::from_timestamp(since, 0).unwrap_or_default(),
            value: None,
            threshold: None,
            message: String::new(),
        }
    }

    #[test]
    fn an_event_already_alerted_on_is_not_raised_again() {
        let mut known = Known {
            open: HashMap::new(),
            latest_since: HashMap::new(),
        };
        let f = firing("device/s/d", 100);
        assert!(matches!(
            step(AlertKind::TotalizerBackwards, &f, &known),
            Step::Insert
        ));
        known.latest_since.insert("device/s/d".into(), f.since);
        assert!(matches!(
            step(AlertKind::TotalizerBackwards, &f, &known),
            Step::Skip
        ));
        // A later event re-opens (closed) or refreshes (open).
        let later = firing("device/s/d", 200);
        assert!(matches!(
            step(AlertKind::TotalizerBackwards, &later, &known),
            Step::Insert
        ));
        known.open.insert("device/s/d".into(), 7);
        assert!(matches!(
            step(AlertKind::TotalizerBackwards, &later, &known),
            Step::Refresh(7)
        ));
        // Condition alerts ignore `since` history: an open one is refreshed.
        assert!(matches!(
            step(AlertKind::NoData, &f, &known),
            Step::Refresh(7)
        ));
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn the_dga_year_runs_on_utc_minus_4() {
        // 2027-01-01T02:00Z is still 2026-12-31 22:00 in Chile's DGA time.
        let (start, end) = dga_year(at("2027-01-01T02:00:00Z"));
        assert_eq!(start, at("2026-01-01T04:00:00Z"));
        assert_eq!(end, at("2027-01-01T04:00:00Z"));
        assert_eq!(
            dga_year(at("2027-01-01T04:00:00Z")).0,
            at("2027-01-01T04:00:00Z")
        );
    }

    #[test]
    fn the_forecast_adds_the_recent_pace_for_the_rest_of_the_year() {
        let year = (at("2026-01-01T04:00:00Z"), at("2027-01-01T04:00:00Z"));
        let now = at("2026-07-02T16:00:00Z"); // half the year gone
        // 100 m³ long ago, then 3 m³ a day for the last 30 days.
        let mut days = vec![(at("2026-02-01T00:00:00Z"), 100.0)];
        for d in 1..=30 {
            days.push((now - Duration::days(d), 3.0));
        }
        let f = forecast(&days, year, now);
        assert!((f.so_far_m3 - 190.0).abs() < 1e-9);
        let expected = 190.0 + 3.0 * (year.1 - now).num_seconds() as f64 / 86_400.0;
        assert!(
            (f.year_end_m3 - expected).abs() < 1e-6,
            "{f:?} vs {expected}"
        );
        // Nothing recent: the year ends where it stands.
        let quiet = forecast(&days[..1], year, now);
        assert_eq!(quiet.year_end_m3, 100.0);
        // At the year's end nothing is left to add.
        assert_eq!(forecast(&days, year, year.1).year_end_m3, 190.0);
    }

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

    #[test]
    fn list_query_errors_name_the_parameter() {
        let q = |state: Option<&str>, kind: Option<&str>, limit: Option<i64>| ListQuery {
            state: state.map(String::from),
            kind: kind.map(String::from),
            site: None,
            before: None,
            limit,
        };
        let field = |r: Result<Filter, ApiError>| match r {
            Err(ApiError::BadRequest { field, .. }) => field,
            other => format!("{other:?}"),
        };
        assert_eq!(field(filter(q(Some("shut"), None, None))), "state");
        assert_eq!(field(filter(q(None, Some("flood"), None))), "kind");
        assert_eq!(field(filter(q(None, None, Some(0)))), "limit");
        assert!(filter(q(Some("all"), Some("no_data"), Some(5))).is_ok());
    }
}
