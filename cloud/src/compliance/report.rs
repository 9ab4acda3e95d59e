//! Reports: what each obra owed the DGA in a month and where every slot stands, the submission
//! log, and the rectification dossier — what an operator hands the DGA when asking for a
//! correction, since the MEE channel has none (research notes §5.8). Read-only; the queue
//! gauges ([`QueueGauges`]) are refreshed by a small task of their own.
//!
//! A month is a calendar month in the DGA's fixed UTC-4 (`2026-04` runs from 2026-04-01T04:00Z
//! to 2026-05-01T04:00Z). Its slots are the point's grid from its start date (`slot::grid`),
//! together with any slot stored in the month off that grid (built under earlier settings). Each
//! slot stands as exactly one of:
//!
//! | standing | slot state |
//! |---|---|
//! | `accepted` | accepted, accepted as a duplicate, accepted without a receipt |
//! | `held` | held for review |
//! | `failed` | failed (to be sent again), transmission failure, refused for configuration |
//! | `pending` | pending, in flight, or due and not built yet (`not_built`) |
//! | `not_yet_due` | its instant is still ahead |
//! | `discarded` | a person decided it is not sent |
//!
//! so `expected` is the sum of those six. An accepted slot is **late** when the exchange that
//! got it accepted was sent after the slot's deadline (`slot::deadline`: the standard's allowed
//! lag). For a duplicate that is the send that recovered the receipt, a bound on the time the
//! DGA stored it: the flag may call a duplicate late that landed in time, never the reverse.
//! A slot neither accepted nor discarded past its deadline is **overdue**: a falla de
//! transmisión to report in the MEE software.
//!
//! CSV (`format=csv` or `Accept: text/csv`) has one header line ([`MONTH_CSV_HEADER`],
//! [`SLOTS_CSV_HEADER`], [`DOSSIER_CSV_HEADER`]), comma-separated, RFC 4180 quoting, values
//! exactly as declared (strings, never reformatted), times RFC 3339 UTC; a point's name that a
//! spreadsheet would run as a formula is prefixed with `'`.

use super::slot::{self, Period};
use super::store::{self, AuditRow, Exchange, Mode, PointConfig, SlotState, Source, StoreError};
use super::submitter::{SAMPLE_WINDOW_S, rules_of};
use super::value::Values;
use super::verify::{self, Verification, VerifyOutcome};
use crate::catchment::point::{self, DgaStandard, Point};
use crate::core::Shutdown;
use crate::core::db::{Db, each_db};
use crate::telemetry::query::{self, ReadingView};
use caudal_common::SiteId;
use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use sqlx::Row;
use std::collections::{BTreeMap, HashMap};
use utoipa::ToSchema;

/// Most slots one dossier or log covers.
pub const MAX_DOSSIER_SLOTS: usize = 2000;
/// Most exchanges one log answers.
pub const MAX_LOG: i64 = 10_000;

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("catchment points: {0}")]
    Point(#[from] point::PointError),
    #[error("telemetry: {0}")]
    Query(#[from] query::QueryError),
}

impl From<sqlx::Error> for ReportError {
    fn from(e: sqlx::Error) -> ReportError {
        ReportError::Store(StoreError::Database(e))
    }
}

/// A calendar month in UTC-4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Month {
    first: NaiveDate,
}

impl Month {
    /// `YYYY-MM`.
    pub fn parse(raw: &str) -> Result<Month, String> {
        let bad = || format!("{raw:?} is not a month (YYYY-MM)");
        let (y, m) = raw.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        let (y, m): (i32, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        NaiveDate::from_ymd_opt(y, m, 1)
            .filter(|_| y >= 1970)
            .map(|first| Month { first })
            .ok_or_else(bad)
    }

    /// The month that holds `t` in UTC-4.
    pub fn of(t: DateTime<Utc>) -> Month {
        let d = t.with_timezone(&slot::dga_zone()).date_naive();
        Month {
            first: d.with_day(1).unwrap_or(d),
        }
    }

    /// Its first instant.
    pub fn start(&self) -> DateTime<Utc> {
        slot::start_of(self.first)
    }

    /// The first instant of the next month.
    pub fn end(&self) -> DateTime<Utc> {
        let next = self
            .first
            .checked_add_months(chrono::Months::new(1))
            .unwrap_or(self.first);
        slot::start_of(next)
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.first.format("%Y-%m"))
    }
}

/// Where a slot stands in a report (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    Accepted,
    Held,
    Failed,
    Pending,
    NotYetDue,
    Discarded,
}

impl Standing {
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Accepted => "accepted",
            Standing::Held => "held",
            Standing::Failed => "failed",
            Standing::Pending => "pending",
            Standing::NotYetDue => "not_yet_due",
            Standing::Discarded => "discarded",
        }
    }

    fn of(state: SlotState) -> Standing {
        match state {
            SlotState::Accepted | SlotState::AcceptedDuplicate | SlotState::AcceptedNoReceipt => {
                Standing::Accepted
            }
            SlotState::Held => Standing::Held,
            SlotState::Failed | SlotState::TransmissionFailure | SlotState::RejectedConfig => {
                Standing::Failed
            }
            SlotState::Pending | SlotState::InFlight => Standing::Pending,
            SlotState::Discarded => Standing::Discarded,
        }
    }
}

/// A month's figures for one obra. `expected` = `accepted` + `held` + `failed` + `pending` +
/// `not_yet_due` + `discarded`; the others are parts of those.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Counts {
    /// Slots the obra owes in the month (its grid from its start date, and any slot stored
    /// off it).
    pub expected: u64,
    pub accepted: u64,
    /// Accepted after the standard's allowed lag (part of `accepted`).
    pub accepted_late: u64,
    pub held: u64,
    /// Failed, transmission failures, refused for configuration.
    pub failed: u64,
    /// Transmission failures (part of `failed`): report them in the MEE software.
    pub transmission_failures: u64,
    /// Pending, in flight, or due and not built yet.
    pub pending: u64,
    /// Due and not built yet (part of `pending`): the point is off, or building lags.
    pub not_built: u64,
    pub not_yet_due: u64,
    pub discarded: u64,
    /// Neither accepted nor discarded, past the allowed lag.
    pub overdue: u64,
    /// Whose receipt the DGA's GET confirmed (latest check `ok`).
    pub verified: u64,
    /// Whose receipt's latest check found other values at the DGA.
    pub mismatched: u64,
}

/// One slot in a report.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ReportSlot {
    pub slot_at: DateTime<Utc>,
    /// `fechaMedicion` / `horaMedicion` in UTC-4.
    pub fecha: String,
    pub hora: String,
    pub standing: Standing,
    /// The stored state; absent when the slot was not built.
    pub state: Option<SlotState>,
    /// As declared (or to be declared).
    pub values: Option<Values>,
    pub receipt: Option<String>,
    /// When the exchange that got it accepted was sent.
    pub accepted_at: Option<DateTime<Utc>>,
    /// The last instant it may reach the DGA.
    pub deadline: DateTime<Utc>,
    pub late: bool,
    pub overdue: bool,
    /// The latest receipt check.
    pub verification: Option<VerifyOutcome>,
}

/// One obra's month.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PointReport {
    pub point_id: i64,
    pub name: String,
    pub obra_code: Option<String>,
    pub dga_standard: Option<DgaStandard>,
    /// The grid its slots follow; absent when neither a period nor a standard is set.
    pub period: Option<Period>,
    pub mode: Mode,
    /// `YYYY-MM`, UTC-4.
    pub month: String,
    pub counts: Counts,
}

/// One obra's month with every slot.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PointMonth {
    pub report: PointReport,
    pub slots: Vec<ReportSlot>,
}

/// Which obras a month report covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub point: Option<i64>,
    /// Points with a flow, totalizer or level source on this site.
    pub site: Option<String>,
}

/// A slot row with what the report needs of its exchanges and checks.
struct Row_ {
    point_id: i64,
    slot_at: DateTime<Utc>,
    state: SlotState,
    values: Option<Values>,
    receipt: Option<String>,
    accepted_at: Option<DateTime<Utc>>,
    verification: Option<VerifyOutcome>,
}

macro_rules! opt_time {
    ($r:expr, $col:literal, $from_row:ident) => {
        match sqlx::ValueRef::is_null(&$r.try_get_raw($col)?) {
            true => None,
            false => Some($from_row($r, $col)?),
        }
    };
}

async fn rows(
    db: &Db,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    point: Option<i64>,
    with_values: bool,
) -> Result<Vec<Row_>, ReportError> {
    // Three range scans joined here rather than two correlated subqueries per slot: a month of
    // 1 000 hourly obras is 720 000 slots.
    let values = if with_values {
        "s.caudal, s.totalizador, s.nivel, s.altura"
    } else {
        "NULL AS caudal, NULL AS totalizador, NULL AS nivel, NULL AS altura"
    };
    let slots = format!(
        "SELECT s.point_id, s.slot_at, s.state, {values}, s.receipt FROM compliance_slots s \
         WHERE s.slot_at >= $1 AND s.slot_at < $2 AND (CAST($3 AS BIGINT) IS NULL OR \
         s.point_id = $3) ORDER BY s.point_id, s.slot_at"
    );
    let accepted = "SELECT point_id, slot_at, MIN(sent_at) AS accepted_at FROM \
                    compliance_exchanges WHERE slot_at >= $1 AND slot_at < $2 AND \
                    (CAST($3 AS BIGINT) IS NULL OR point_id = $3) AND outcome IN ('accepted', \
                    'duplicate', 'accepted_no_receipt') GROUP BY point_id, slot_at";
    let checks = "SELECT point_id, slot_at, outcome FROM compliance_verifications WHERE \
                  slot_at >= $1 AND slot_at < $2 AND (CAST($3 AS BIGINT) IS NULL OR \
                  point_id = $3) ORDER BY id";
    type Key = (i64, DateTime<Utc>);
    each_db!(db, |p, to_db, from_row| {
        let mut accepted_at: HashMap<Key, DateTime<Utc>> = HashMap::new();
        for r in sqlx::query(accepted)
            .bind(to_db(from))
            .bind(to_db(to))
            .bind(point)
            .fetch_all(p)
            .await?
        {
            accepted_at.insert(
                (r.try_get("point_id")?, from_row(&r, "slot_at")?),
                from_row(&r, "accepted_at")?,
            );
        }
        // Oldest first: the latest check of a slot is the one kept.
        let mut checked: HashMap<Key, VerifyOutcome> = HashMap::new();
        for r in sqlx::query(checks)
            .bind(to_db(from))
            .bind(to_db(to))
            .bind(point)
            .fetch_all(p)
            .await?
        {
            let outcome: String = r.try_get("outcome")?;
            let o = match outcome.as_str() {
                "ok" => VerifyOutcome::Ok,
                "mismatch" => VerifyOutcome::Mismatch,
                _ => VerifyOutcome::Unverified,
            };
            checked.insert((r.try_get("point_id")?, from_row(&r, "slot_at")?), o);
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(slots))
            .bind(to_db(from))
            .bind(to_db(to))
            .bind(point)
            .fetch_all(p)
            .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                let caudal: Option<String> = r.try_get("caudal")?;
                let key: Key = (r.try_get("point_id")?, from_row(r, "slot_at")?);
                Ok(Row_ {
                    point_id: key.0,
                    slot_at: key.1,
                    state: state.parse().map_err(StoreError::Corrupt)?,
                    values: match caudal {
                        None => None,
                        Some(caudal) => Some(Values {
                            caudal,
                            totalizador: r.try_get("totalizador")?,
                            nivel: r.try_get("nivel")?,
                            altura: r.try_get("altura")?,
                        }),
                    },
                    receipt: r.try_get("receipt")?,
                    accepted_at: accepted_at.get(&key).copied(),
                    verification: checked.get(&key).copied(),
                })
            })
            .collect()
    })
}

/// The period and standard a point's slots follow, when it has them.
fn grid_of(p: &Point, c: &PointConfig) -> Option<(Period, DgaStandard)> {
    let period = rules_of(p, c).ok()?.period;
    Some((period, slot::standard_for(p.dga_standard, period)))
}

fn assemble(
    p: &Point,
    c: &PointConfig,
    month: Month,
    stored: Vec<Row_>,
    now: DateTime<Utc>,
    keep_slots: bool,
) -> PointMonth {
    let grid = grid_of(p, c);
    let standard = grid.map(|(_, s)| s).or(p.dga_standard);
    let mut at: BTreeMap<DateTime<Utc>, Option<Row_>> = BTreeMap::new();
    if let (Some((period, _)), Some(start)) = (grid, c.start_at) {
        for t in slot::grid(period, month.start().max(start), month.end(), 100_000) {
            at.insert(t, None);
        }
    }
    for r in stored {
        at.insert(r.slot_at, Some(r));
    }
    let mut counts = Counts::default();
    let mut slots = Vec::new();
    for (t, r) in at {
        let deadline = standard.map_or(DateTime::<Utc>::MAX_UTC, |s| slot::deadline(s, t));
        let (standing, state) = match &r {
            Some(r) => (Standing::of(r.state), Some(r.state)),
            None if t > now => (Standing::NotYetDue, None),
            None => (Standing::Pending, None),
        };
        let accepted_at = r.as_ref().and_then(|r| r.accepted_at);
        let late = standing == Standing::Accepted && accepted_at.is_some_and(|a| a > deadline);
        let overdue = matches!(
            standing,
            Standing::Held | Standing::Failed | Standing::Pending
        ) && now > deadline;
        let verification = r.as_ref().and_then(|r| r.verification);
        counts.expected += 1;
        match standing {
            Standing::Accepted => counts.accepted += 1,
            Standing::Held => counts.held += 1,
            Standing::Failed => counts.failed += 1,
            Standing::Pending => counts.pending += 1,
            Standing::NotYetDue => counts.not_yet_due += 1,
            Standing::Discarded => counts.discarded += 1,
        }
        counts.accepted_late += u64::from(late);
        counts.overdue += u64::from(overdue);
        counts.not_built += u64::from(r.is_none() && standing == Standing::Pending);
        counts.transmission_failures += u64::from(state == Some(SlotState::TransmissionFailure));
        counts.verified += u64::from(verification == Some(VerifyOutcome::Ok));
        counts.mismatched += u64::from(verification == Some(VerifyOutcome::Mismatch));
        if keep_slots {
            let (fecha, hora) = slot::fecha_hora(t);
            let (values, receipt) = match r {
                Some(r) => (r.values, r.receipt),
                None => (None, None),
            };
            slots.push(ReportSlot {
                slot_at: t,
                fecha,
                hora,
                standing,
                state,
                values,
                receipt,
                accepted_at,
                deadline,
                late,
                overdue,
                verification,
            });
        }
    }
    PointMonth {
        report: PointReport {
            point_id: p.id,
            name: p.name.clone(),
            obra_code: p.obra_code.as_ref().map(|o| o.to_string()),
            dga_standard: p.dga_standard,
            period: grid.map(|(period, _)| period),
            mode: c.mode,
            month: month.to_string(),
            counts,
        },
        slots,
    }
}

fn on_site(c: &PointConfig, site: &str) -> bool {
    [&c.flow, &c.total, &c.level]
        .into_iter()
        .flatten()
        .any(|s| s.site == site)
}

/// Every reported obra's month (those with reporting settings), by point id.
pub async fn month_report(
    db: &Db,
    month: Month,
    filter: &Filter,
    now: DateTime<Utc>,
) -> Result<Vec<PointReport>, ReportError> {
    let points: HashMap<i64, Point> = point::list(db)
        .await?
        .into_iter()
        .map(|p| (p.id, p))
        .collect();
    let configs: Vec<PointConfig> = store::point_configs(db)
        .await?
        .into_iter()
        .filter(|c| filter.point.is_none_or(|id| id == c.point_id))
        .filter(|c| filter.site.as_deref().is_none_or(|s| on_site(c, s)))
        .collect();
    let single = match configs.as_slice() {
        [one] => Some(one.point_id),
        _ => filter.point,
    };
    let mut by_point: HashMap<i64, Vec<Row_>> = HashMap::new();
    for r in rows(db, month.start(), month.end(), single, false).await? {
        by_point.entry(r.point_id).or_default().push(r);
    }
    Ok(configs
        .iter()
        .filter_map(|c| {
            let p = points.get(&c.point_id)?;
            let stored = by_point.remove(&c.point_id).unwrap_or_default();
            Some(assemble(p, c, month, stored, now, false).report)
        })
        .collect())
}

/// One obra's month with every slot; `None` when it has no reporting settings.
pub async fn point_month(
    db: &Db,
    point_id: i64,
    month: Month,
    now: DateTime<Utc>,
) -> Result<Option<PointMonth>, ReportError> {
    let (Some(p), Some(c)) = (
        point::get(db, point_id).await?,
        store::point_config(db, point_id).await?,
    ) else {
        return Ok(None);
    };
    let stored = rows(db, month.start(), month.end(), Some(point_id), true).await?;
    Ok(Some(assemble(&p, &c, month, stored, now, true)))
}

/// One exchange in a point's log, with the slot it was about.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LogEntry {
    pub slot_at: DateTime<Utc>,
    pub fecha: String,
    pub hora: String,
    #[serde(flatten)]
    pub exchange: Exchange,
    /// The slot's receipt, on the exchange that got it accepted.
    pub receipt: Option<String>,
}

/// A point's exchanges with the DGA in a time range.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Log {
    pub point_id: i64,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Every POST sent in the range (password as `****`), oldest first.
    pub exchanges: Vec<LogEntry>,
    /// Every receipt check made in the range, oldest first.
    pub verifications: Vec<Verification>,
}

/// The submission log of a point: its POSTs sent in `[from, to)` and its receipt checks made
/// then, as stored (redacted when sent).
pub async fn log(
    db: &Db,
    point_id: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Log, ReportError> {
    let sql = "SELECT e.id, e.slot_at, e.attempt, e.sent_at, e.request, e.http_status, \
               e.response, e.outcome, e.answered_at, s.receipt FROM compliance_exchanges e \
               LEFT JOIN compliance_slots s ON s.point_id = e.point_id AND s.slot_at = e.slot_at \
               WHERE e.point_id = $1 AND e.sent_at >= $2 AND e.sent_at < $3 ORDER BY e.id \
               LIMIT $4";
    let exchanges = each_db!(db, |p, to_db, from_row| {
        let rows = sqlx::query(sql)
            .bind(point_id)
            .bind(to_db(from))
            .bind(to_db(to))
            .bind(MAX_LOG)
            .fetch_all(p)
            .await?;
        rows.iter()
            .map(|r| {
                let request: String = r.try_get("request")?;
                let slot_at = from_row(r, "slot_at")?;
                let (fecha, hora) = slot::fecha_hora(slot_at);
                let outcome: Option<String> = r.try_get("outcome")?;
                let accepting = matches!(
                    outcome.as_deref(),
                    Some("accepted" | "duplicate" | "accepted_no_receipt")
                );
                let receipt: Option<String> = r.try_get("receipt")?;
                Ok(LogEntry {
                    slot_at,
                    fecha,
                    hora,
                    receipt: receipt.filter(|_| accepting),
                    exchange: Exchange {
                        id: r.try_get("id")?,
                        attempt: r.try_get("attempt")?,
                        sent_at: from_row(r, "sent_at")?,
                        request: serde_json::from_str(&request)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                        http_status: r.try_get("http_status")?,
                        response: r.try_get("response")?,
                        outcome,
                        answered_at: opt_time!(r, "answered_at", from_row),
                    },
                })
            })
            .collect::<Result<Vec<_>, ReportError>>()
    })?;
    let verifications = verify::checked_between(db, point_id, from, to).await?;
    Ok(Log {
        point_id,
        from,
        to,
        exchanges,
        verifications,
    })
}

/// Where a value of a slot was read from: the source and the window searched, and the
/// readings stored in it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TelemetryRef {
    /// `caudal`, `totalizador`, `totalizador_previous` (the previous slot's, for a mean) or
    /// `nivel`.
    pub value: String,
    pub site: String,
    pub device: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The readings stored in the window (the nearest good one was taken).
    pub readings: Vec<ReadingView>,
}

/// One slot of a rectification dossier.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DossierEntry {
    pub point_id: i64,
    pub obra_code: Option<String>,
    pub slot_at: DateTime<Utc>,
    pub fecha: String,
    pub hora: String,
    pub state: SlotState,
    /// The measurement object exactly as sent in the exchange the DGA accepted; absent when
    /// it was not accepted.
    #[schema(value_type = Option<Object>)]
    pub declared: Option<serde_json::Map<String, serde_json::Value>>,
    /// The values as built (what is or would be declared).
    pub values: Option<Values>,
    pub receipt: Option<String>,
    /// When the accepting exchange was sent, and how it was accepted (`accepted`,
    /// `duplicate`, `accepted_no_receipt`).
    pub accepted_at: Option<DateTime<Utc>>,
    pub accepted_as: Option<String>,
    pub attempts: i64,
    /// Why it was held, failed or refused, and a person's review.
    pub reason: Option<String>,
    pub reviewed_by: Option<String>,
    pub note: String,
    /// Every exchange about the slot (password as `****`).
    pub exchanges: Vec<Exchange>,
    /// Every receipt check of the slot, oldest first.
    pub verifications: Vec<Verification>,
    /// The stored telemetry the values were built from.
    pub telemetry: Vec<TelemetryRef>,
    /// The point's reporting settings in force when it was sent (the latest change of
    /// settings at or before the first send, or before it was built).
    pub settings: Option<AuditRow>,
}

/// A dossier: every slot of a point in `[from, to)` with what backs it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Dossier {
    pub point_id: i64,
    pub name: String,
    pub obra_code: Option<String>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub slots: Vec<DossierEntry>,
}

async fn window(
    db: &Db,
    value: &str,
    src: &Source,
    at: DateTime<Utc>,
) -> Result<TelemetryRef, ReportError> {
    let w = Duration::seconds(SAMPLE_WINDOW_S);
    let (from, to) = (at - w, at + w + Duration::seconds(1));
    let readings = match SiteId::new(&src.site) {
        Ok(site) => {
            query::raw_readings(db, &site, Some(&src.device), from, to, None, None, 100)
                .await?
                .readings
        }
        Err(_) => Vec::new(),
    };
    Ok(TelemetryRef {
        value: value.to_string(),
        site: src.site.clone(),
        device: src.device.clone(),
        from,
        to,
        readings,
    })
}

/// The rectification dossier of a point over the slots in `[from, to)`; `None` when the
/// point has no reporting settings.
pub async fn dossier(
    db: &Db,
    point_id: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Option<Dossier>, ReportError> {
    let (Some(p), Some(c)) = (
        point::get(db, point_id).await?,
        store::point_config(db, point_id).await?,
    ) else {
        return Ok(None);
    };
    let period = grid_of(&p, &c).map(|(period, _)| period);
    let audit = store::audit_rows(db, Some(point_id), 10_000).await?;
    let obra_code = p.obra_code.as_ref().map(|o| o.to_string());
    let mut slots = Vec::new();
    for s in store::slots(db, point_id, from, to, None, MAX_DOSSIER_SLOTS as i64).await? {
        let exchanges = store::exchanges(db, point_id, s.slot_at).await?;
        let accepting = exchanges.iter().rev().find(|x| {
            matches!(
                x.outcome.as_deref(),
                Some("accepted" | "duplicate" | "accepted_no_receipt")
            )
        });
        let declared = accepting
            .and_then(|x| x.request["body"].as_object())
            .and_then(|b| {
                b.iter()
                    .find(|(k, _)| k.starts_with("medicion"))
                    .and_then(|(_, v)| v.as_object().cloned())
            });
        let mut telemetry = Vec::new();
        if let Some(src) = &c.flow {
            telemetry.push(window(db, "caudal", src, s.slot_at).await?);
        }
        if let Some(src) = &c.total {
            telemetry.push(window(db, "totalizador", src, s.slot_at).await?);
            if let Some(period) = period {
                let prev = slot::previous(period, s.slot_at);
                telemetry.push(window(db, "totalizador_previous", src, prev).await?);
            }
        }
        if let Some(src) = &c.level {
            telemetry.push(window(db, "nivel", src, s.slot_at).await?);
        }
        let sent = exchanges.first().map_or(s.created_at, |x| x.sent_at);
        let settings = audit
            .iter()
            .find(|a| a.at <= sent && a.change.get("settings").is_some())
            .cloned();
        slots.push(DossierEntry {
            point_id,
            obra_code: obra_code.clone(),
            slot_at: s.slot_at,
            fecha: s.fecha.clone(),
            hora: s.hora.clone(),
            state: s.state,
            declared,
            values: s.values.clone(),
            receipt: s.receipt.clone(),
            accepted_at: accepting.map(|x| x.sent_at),
            accepted_as: accepting.and_then(|x| x.outcome.clone()),
            attempts: s.attempts,
            reason: s.reason.clone(),
            reviewed_by: s.reviewed_by.clone(),
            note: s.note.clone(),
            verifications: verify::history(db, point_id, s.slot_at).await?,
            exchanges,
            telemetry,
            settings,
        });
    }
    Ok(Some(Dossier {
        point_id,
        name: p.name,
        obra_code,
        from,
        to,
        slots,
    }))
}

/// One CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A free-text field (a point's name) that a spreadsheet would run as a formula is prefixed
/// with `'`; declared values are never touched.
fn text(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    }
}

fn line(out: &mut String, fields: &[String]) {
    let f: Vec<String> = fields.iter().map(|s| field(s)).collect();
    out.push_str(&f.join(","));
    out.push_str("\r\n");
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// The month report's CSV header.
pub const MONTH_CSV_HEADER: &str = "month,point_id,obra_code,name,dga_standard,period,mode,\
    expected,accepted,accepted_late,held,failed,transmission_failures,pending,not_built,\
    not_yet_due,discarded,overdue,verified,mismatched";

/// The month report as CSV, one line per obra.
pub fn month_csv(reports: &[PointReport]) -> String {
    let mut out = String::new();
    out.push_str(MONTH_CSV_HEADER);
    out.push_str("\r\n");
    for r in reports {
        let c = &r.counts;
        let mut f = vec![
            r.month.clone(),
            r.point_id.to_string(),
            r.obra_code.clone().unwrap_or_default(),
            text(&r.name),
            r.dga_standard
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            r.period.map(|p| p.as_str().to_string()).unwrap_or_default(),
            r.mode.as_str().to_string(),
        ];
        f.extend(
            [
                c.expected,
                c.accepted,
                c.accepted_late,
                c.held,
                c.failed,
                c.transmission_failures,
                c.pending,
                c.not_built,
                c.not_yet_due,
                c.discarded,
                c.overdue,
                c.verified,
                c.mismatched,
            ]
            .map(|n| n.to_string()),
        );
        line(&mut out, &f);
    }
    out
}

/// One obra's month as CSV's header: one line per slot.
pub const SLOTS_CSV_HEADER: &str = "point_id,obra_code,slot_at,fecha,hora,standing,state,caudal,\
    totalizador,nivel,altura,receipt,accepted_at,deadline,late,overdue,verification";

/// One obra's month as CSV, one line per slot.
pub fn slots_csv(m: &PointMonth) -> String {
    let mut out = String::new();
    out.push_str(SLOTS_CSV_HEADER);
    out.push_str("\r\n");
    for s in &m.slots {
        let v = s.values.clone().unwrap_or_default();
        line(
            &mut out,
            &[
                m.report.point_id.to_string(),
                m.report.obra_code.clone().unwrap_or_default(),
                time(Some(s.slot_at)),
                s.fecha.clone(),
                s.hora.clone(),
                s.standing.as_str().to_string(),
                s.state.map(|s| s.as_str().to_string()).unwrap_or_default(),
                v.caudal,
                v.totalizador.unwrap_or_default(),
                v.nivel.unwrap_or_default(),
                v.altura.unwrap_or_default(),
                s.receipt.clone().unwrap_or_default(),
                time(s.accepted_at),
                time(Some(s.deadline).filter(|d| *d < DateTime::<Utc>::MAX_UTC)),
                s.late.to_string(),
                s.overdue.to_string(),
                s.verification
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default(),
            ],
        );
    }
    out
}

/// The dossier's CSV header: one line per slot; the declared values exactly as sent.
pub const DOSSIER_CSV_HEADER: &str = "point_id,obra_code,slot_at,fecha,hora,state,caudal,\
    totalizador,nivelFreaticoDelPozo,alturaLimnimetrica,receipt,accepted_at,accepted_as,\
    attempts,verification,verification_detail,telemetry,settings_at,settings_by";

/// The dossier as CSV. `caudal` … `alturaLimnimetrica` are the accepted request's fields as
/// sent (empty when not accepted); `telemetry` references the stored readings
/// (`value=site/device@from/to`, `;`-separated).
pub fn dossier_csv(d: &Dossier) -> String {
    let mut out = String::new();
    out.push_str(DOSSIER_CSV_HEADER);
    out.push_str("\r\n");
    for s in &d.slots {
        let sent = |k: &str| {
            s.declared
                .as_ref()
                .and_then(|m| m.get(k))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let last = s.verifications.last();
        let telemetry: Vec<String> = s
            .telemetry
            .iter()
            .map(|t| {
                format!(
                    "{}={}/{}@{}/{}",
                    t.value,
                    t.site,
                    t.device,
                    time(Some(t.from)),
                    time(Some(t.to))
                )
            })
            .collect();
        line(
            &mut out,
            &[
                s.point_id.to_string(),
                s.obra_code.clone().unwrap_or_default(),
                time(Some(s.slot_at)),
                s.fecha.clone(),
                s.hora.clone(),
                s.state.as_str().to_string(),
                sent("caudal"),
                sent("totalizador"),
                sent("nivelFreaticoDelPozo"),
                sent("alturaLimnimetrica"),
                s.receipt.clone().unwrap_or_default(),
                time(s.accepted_at),
                s.accepted_as.clone().unwrap_or_default(),
                s.attempts.to_string(),
                last.map(|v| v.outcome.as_str().to_string())
                    .unwrap_or_default(),
                last.map(|v| v.detail.clone()).unwrap_or_default(),
                telemetry.join(";"),
                time(s.settings.as_ref().map(|a| a.at)),
                s.settings
                    .as_ref()
                    .map(|a| a.actor.clone())
                    .unwrap_or_default(),
            ],
        );
    }
    out
}

/// The month report as a fixed-width table, one line per obra (`caudal-cloud compliance
/// status`).
pub fn status_table(reports: &[PointReport], month: Month) -> String {
    let head = [
        "point",
        "obra",
        "mode",
        "expected",
        "accepted",
        "late",
        "held",
        "failed",
        "pending",
        "not_due",
        "discarded",
        "overdue",
        "verified",
        "mismatch",
    ];
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|h| h.to_string()).collect()];
    for r in reports {
        let c = &r.counts;
        let mut row = vec![
            r.point_id.to_string(),
            r.obra_code.clone().unwrap_or_else(|| "-".into()),
            r.mode.as_str().to_string(),
        ];
        row.extend(
            [
                c.expected,
                c.accepted,
                c.accepted_late,
                c.held,
                c.failed,
                c.pending,
                c.not_yet_due,
                c.discarded,
                c.overdue,
                c.verified,
                c.mismatched,
            ]
            .map(|n| n.to_string()),
        );
        rows.push(row);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = format!("compliance report {month} (UTC-4)\n");
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i < 3 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if reports.is_empty() {
        out.push_str("(no point has reporting settings)\n");
    }
    out
}

/// The send queue now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Queue {
    /// Pending slots and failed ones due to be sent again.
    pub depth: i64,
    /// The oldest slot pending, in flight or failed (not yet accepted, to be sent).
    pub oldest_unsent: Option<DateTime<Utc>>,
    pub held: i64,
}

/// The queue over every point.
pub async fn queue(db: &Db, now: DateTime<Utc>) -> Result<Queue, ReportError> {
    let counts = "SELECT COALESCE(SUM(CASE WHEN state = 'pending' OR (state = 'failed' AND \
                  next_attempt_at <= $1) THEN 1 ELSE 0 END), 0) AS depth, COALESCE(SUM(CASE \
                  WHEN state = 'held' THEN 1 ELSE 0 END), 0) AS held FROM compliance_slots";
    let oldest = "SELECT MIN(slot_at) AS oldest FROM compliance_slots WHERE state IN \
                  ('pending', 'in_flight', 'failed')";
    each_db!(db, |p, to_db, from_row| {
        let r = sqlx::query(counts).bind(to_db(now)).fetch_one(p).await?;
        let o = sqlx::query(oldest).fetch_one(p).await?;
        Ok(Queue {
            depth: r.try_get("depth")?,
            held: r.try_get("held")?,
            oldest_unsent: opt_time!(&o, "oldest", from_row),
        })
    })
}

/// The queue's gauges.
#[derive(Debug, Clone, Default)]
pub struct QueueMetrics {
    depth: Gauge,
    oldest_age_s: Gauge,
    held: Gauge,
}

impl QueueMetrics {
    pub fn register(r: &mut Registry) -> QueueMetrics {
        let m = QueueMetrics::default();
        r.register(
            "compliance_queue_depth",
            "Slots waiting to be sent: pending, and failed ones due again",
            m.depth.clone(),
        );
        r.register(
            "compliance_oldest_unsent_age_seconds",
            "Age of the oldest slot pending, in flight or failed (0 when none)",
            m.oldest_age_s.clone(),
        );
        r.register(
            "compliance_held_slots",
            "Slots held for a person's review",
            m.held.clone(),
        );
        m
    }

    /// Sets the gauges from the queue now.
    pub async fn refresh(&self, db: &Db, now: DateTime<Utc>) -> Result<Queue, ReportError> {
        let q = queue(db, now).await?;
        self.depth.set(q.depth);
        self.held.set(q.held);
        self.oldest_age_s.set(
            q.oldest_unsent
                .map_or(0, |t| (now - t).num_seconds().max(0)),
        );
        Ok(q)
    }
}

/// The task that refreshes the queue gauges every `every` until shutdown.
#[derive(Debug)]
pub struct QueueGauges {
    pub db: Db,
    pub metrics: QueueMetrics,
    pub every: std::time::Duration,
}

impl QueueGauges {
    pub async fn run(self, mut shutdown: Shutdown) {
        loop {
            if let Err(e) = self.metrics.refresh(&self.db, Utc::now()).await {
                tracing::warn!(error = %e, "compliance: reading the queue for its gauges failed");
            }
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(self.every) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_month_is_a_utc4_calendar_month() {
        let m = Month::parse("2026-04").expect("month");
        assert_eq!(m.start().to_rfc3339(), "2026-04-01T04:00:00+00:00");
        assert_eq!(m.end().to_rfc3339(), "2026-05-01T04:00:00+00:00");
        assert_eq!(m.to_string(), "2026-04");
        let dec = Month::parse("2026-12").expect("month");
        assert_eq!(dec.end().to_rfc3339(), "2027-01-01T04:00:00+00:00");
        for bad in [
            "2026-13", "2026-4", "26-04", "2026/04", "", "2026-00", "abcd-ef",
        ] {
            assert!(Month::parse(bad).is_err(), "{bad}");
        }
        // 03:00Z on 1 May is still 30 April in UTC-4.
        let t = DateTime::parse_from_rfc3339("2026-05-01T03:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .expect("t");
        assert_eq!(Month::of(t), m);
    }

    #[test]
    fn the_status_table_has_one_aligned_line_per_obra() {
        let month = Month::parse("2026-04").expect("month");
        let r = PointReport {
            point_id: 7,
            name: "Pozo".into(),
            obra_code: Some("OB-0101-114".into()),
            dga_standard: Some(DgaStandard::Mayor),
            period: Some(Period::Hourly),
            mode: Mode::On,
            month: month.to_string(),
            counts: Counts {
                expected: 720,
                accepted: 700,
                accepted_late: 3,
                held: 20,
                ..Counts::default()
            },
        };
        let t = status_table(&[r], month);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "compliance report 2026-04 (UTC-4)");
        assert!(lines[1].starts_with("point  obra         mode  expected  accepted  late"));
        assert!(
            lines[2].starts_with("7      OB-0101-114  on         720       700     3"),
            "{t}"
        );
        assert_eq!(lines.len(), 3);
        assert!(status_table(&[], month).contains("no point has reporting settings"));
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        let mut out = String::new();
        line(
            &mut out,
            &["1.00".into(), "Pozo, Norte".into(), "a \"b\"".into()],
        );
        assert_eq!(out, "1.00,\"Pozo, Norte\",\"a \"\"b\"\"\"\r\n");
        assert_eq!(text("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(text("Pozo 1"), "Pozo 1");
        assert_eq!(MONTH_CSV_HEADER.split(',').count(), 20);
        assert_eq!(SLOTS_CSV_HEADER.split(',').count(), 17);
        assert_eq!(DOSSIER_CSV_HEADER.split(',').count(), 19);
    }
}
