//! The compliance tables' SQL (SQLite and PostgreSQL, `$n` parameters on both): the Centro de
//! Control's settings, each point's reporting settings and their audit, the slots with their
//! submission state, and the exchange log. Other modules reach these tables only through these
//! functions.
//!
//! The two transitions around a POST are transactions of their own: [`claim`] (pending or due
//! failed → in flight, with the exchange row holding the redacted request) commits before the
//! request leaves; [`record`] (in flight → what the answer means, with the answer on the
//! exchange row) commits after it came back. Both only move a slot from the state they expect,
//! so a slot that left `in_flight` another way is never overwritten.

use super::dga::Endpoint;
use super::slot::Period;
use super::value::{FlowMethod, Values};
use crate::catchment::rut::Rut;
use crate::core::db::{Db, each_db};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use std::str::FromStr;
use utoipa::ToSchema;

/// Why a compliance table could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("compliance: stored row is not valid: {0}")]
    Corrupt(String),
    #[error("compliance: {0}")]
    Database(#[from] sqlx::Error),
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn parse<T: FromStr>(raw: Option<String>) -> Result<Option<T>, StoreError>
where
    T::Err: std::fmt::Display,
{
    raw.map(|s| s.parse::<T>().map_err(corrupt)).transpose()
}

/// An optional time column, read with the backend's `from_row`.
macro_rules! opt_time {
    ($r:expr, $col:literal, $from_row:ident) => {
        match sqlx::ValueRef::is_null(&$r.try_get_raw($col)?) {
            true => None,
            false => Some($from_row($r, $col)?),
        }
    };
}

/// The Centro de Control's settings.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Settings {
    /// Base URL of the MEE API.
    pub dga_base_url: String,
    /// RUT of the Centro de Control (`rutEmpresa`).
    pub rut_empresa: Option<Rut>,
    pub updated_at: Option<DateTime<Utc>>,
    pub updated_by: Option<String>,
}

/// The settings, or their defaults when none were stored.
pub async fn settings(db: &Db) -> Result<Settings, StoreError> {
    let sql = "SELECT dga_base_url, rut_empresa, updated_at, updated_by FROM compliance_settings \
               WHERE id = 1";
    each_db!(db, |p, _to, from_row| {
        match sqlx::query(sql).fetch_optional(p).await? {
            None => Ok(Settings {
                dga_base_url: super::dga::DEFAULT_BASE_URL.to_string(),
                rut_empresa: None,
                updated_at: None,
                updated_by: None,
            }),
            Some(r) => Ok(Settings {
                dga_base_url: r.try_get("dga_base_url")?,
                rut_empresa: parse(r.try_get("rut_empresa")?)?,
                updated_at: Some(from_row(&r, "updated_at")?),
                updated_by: r.try_get("updated_by")?,
            }),
        }
    })
}

/// Stores the settings.
pub async fn put_settings(
    db: &Db,
    base_url: &str,
    rut: Option<&Rut>,
    by: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    each_db!(db, |p, to_db, _from| {
        sqlx::query(
            "INSERT INTO compliance_settings (id, dga_base_url, rut_empresa, updated_at, updated_by) \
             VALUES (1, $1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET \
             dga_base_url = excluded.dga_base_url, rut_empresa = excluded.rut_empresa, \
             updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(base_url)
        .bind(rut.map(Rut::as_str))
        .bind(to_db(now))
        .bind(by)
        .execute(p)
        .await?;
    });
    Ok(())
}

/// Whether and how a point is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Nothing is built or sent.
    Off,
    /// Slots are built and checked; nothing is sent.
    Shadow,
    /// Slots are built, checked and sent.
    On,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Shadow => "shadow",
            Mode::On => "on",
        }
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "off" => Ok(Mode::Off),
            "shadow" => Ok(Mode::Shadow),
            "on" => Ok(Mode::On),
            other => Err(format!("unknown mode {other:?}")),
        }
    }
}

/// Which device of which site gives a value (its flow, totalizer or level channel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Source {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub site: String,
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub device: String,
}

/// A point's reporting settings as stored (the password only as ciphertext).
#[derive(Debug, Clone, PartialEq)]
pub struct PointConfig {
    pub point_id: i64,
    pub endpoint: Endpoint,
    pub password_enc: Option<Vec<u8>>,
    pub flow: Option<Source>,
    pub total: Option<Source>,
    pub level: Option<Source>,
    pub mode: Mode,
    pub start_at: Option<DateTime<Utc>>,
    pub period: Option<Period>,
    pub flow_method: Option<FlowMethod>,
    pub low_flow_lps: f64,
    pub stopped_reason: Option<String>,
    pub stopped_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

const POINT_COLUMNS: &str = "point_id, endpoint, password_enc, flow_site, flow_device, \
    total_site, total_device, level_site, level_device, mode, start_at, period, flow_method, \
    low_flow_lps, stopped_reason, stopped_at, updated_at, updated_by";

fn source(site: Option<String>, device: Option<String>) -> Option<Source> {
    Some(Source {
        site: site?,
        device: device?,
    })
}

macro_rules! point_config {
    ($r:expr, $from_row:ident) => {{
        let r = $r;
        let endpoint: String = r.try_get("endpoint")?;
        let mode: String = r.try_get("mode")?;
        Ok::<PointConfig, StoreError>(PointConfig {
            point_id: r.try_get("point_id")?,
            endpoint: endpoint.parse().map_err(corrupt)?,
            password_enc: r.try_get("password_enc")?,
            flow: source(r.try_get("flow_site")?, r.try_get("flow_device")?),
            total: source(r.try_get("total_site")?, r.try_get("total_device")?),
            level: source(r.try_get("level_site")?, r.try_get("level_device")?),
            mode: mode.parse().map_err(corrupt)?,
            start_at: opt_time!(r, "start_at", $from_row),
            period: parse(r.try_get("period")?)?,
            flow_method: parse(r.try_get("flow_method")?)?,
            low_flow_lps: r.try_get("low_flow_lps")?,
            stopped_reason: r.try_get("stopped_reason")?,
            stopped_at: opt_time!(r, "stopped_at", $from_row),
            updated_at: $from_row(r, "updated_at")?,
            updated_by: r.try_get("updated_by")?,
        })
    }};
}

/// One point's reporting settings.
pub async fn point_config(db: &Db, point: i64) -> Result<Option<PointConfig>, StoreError> {
    let sql = format!("SELECT {POINT_COLUMNS} FROM compliance_points WHERE point_id = $1");
    each_db!(db, |p, _to, from_row| {
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(point)
            .fetch_optional(p)
            .await?;
        row.as_ref().map(|r| point_config!(r, from_row)).transpose()
    })
}

/// Every point's reporting settings, by point.
pub async fn point_configs(db: &Db) -> Result<Vec<PointConfig>, StoreError> {
    let sql = format!("SELECT {POINT_COLUMNS} FROM compliance_points ORDER BY point_id");
    each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(p).await?;
        rows.iter().map(|r| point_config!(r, from_row)).collect()
    })
}

/// Stores a point's settings whole, with the audit row of the change, in one transaction. A
/// change of settings clears `stopped_reason`: the person fixed what the DGA refused.
pub async fn put_point_config(
    db: &Db,
    c: &PointConfig,
    change: &serde_json::Value,
) -> Result<(), StoreError> {
    let sql = "INSERT INTO compliance_points (point_id, endpoint, password_enc, flow_site, \
         flow_device, total_site, total_device, level_site, level_device, mode, start_at, period, \
         flow_method, low_flow_lps, stopped_reason, stopped_at, updated_at, updated_by) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
         ON CONFLICT (point_id) DO UPDATE SET endpoint = excluded.endpoint, \
         password_enc = excluded.password_enc, flow_site = excluded.flow_site, \
         flow_device = excluded.flow_device, total_site = excluded.total_site, \
         total_device = excluded.total_device, level_site = excluded.level_site, \
         level_device = excluded.level_device, mode = excluded.mode, \
         start_at = excluded.start_at, period = excluded.period, \
         flow_method = excluded.flow_method, low_flow_lps = excluded.low_flow_lps, \
         stopped_reason = excluded.stopped_reason, stopped_at = excluded.stopped_at, \
         updated_at = excluded.updated_at, \
         updated_by = excluded.updated_by";
    let part = |s: &Option<Source>| {
        (
            s.as_ref().map(|s| s.site.clone()),
            s.as_ref().map(|s| s.device.clone()),
        )
    };
    let (fs, fd) = part(&c.flow);
    let (ts, td) = part(&c.total);
    let (ls, ld) = part(&c.level);
    each_db!(db, |p, to_db, _from| {
        let mut tx = p.begin().await?;
        sqlx::query(sql)
            .bind(c.point_id)
            .bind(c.endpoint.as_str())
            .bind(c.password_enc.clone())
            .bind(fs)
            .bind(fd)
            .bind(ts)
            .bind(td)
            .bind(ls)
            .bind(ld)
            .bind(c.mode.as_str())
            .bind(c.start_at.map(to_db))
            .bind(c.period.map(Period::as_str))
            .bind(c.flow_method.map(FlowMethod::as_str))
            .bind(c.low_flow_lps)
            .bind(c.stopped_reason.clone())
            .bind(c.stopped_at.map(to_db))
            .bind(to_db(c.updated_at))
            .bind(&c.updated_by)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO compliance_audit (point_id, at, actor, change) VALUES ($1, $2, $3, $4)",
        )
        .bind(c.point_id)
        .bind(to_db(c.updated_at))
        .bind(&c.updated_by)
        .bind(change.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    });
    Ok(())
}

/// An audit row for a change that is not a point's (the Centro de Control's settings).
pub async fn audit(
    db: &Db,
    point: Option<i64>,
    by: &str,
    change: &serde_json::Value,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    each_db!(db, |p, to_db, _from| {
        sqlx::query(
            "INSERT INTO compliance_audit (point_id, at, actor, change) VALUES ($1, $2, $3, $4)",
        )
        .bind(point)
        .bind(to_db(now))
        .bind(by)
        .bind(change.to_string())
        .execute(p)
        .await?;
    });
    Ok(())
}

/// One change of settings.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AuditRow {
    pub id: i64,
    pub point_id: Option<i64>,
    pub at: DateTime<Utc>,
    pub actor: String,
    /// What changed; a password shows as `****`.
    #[schema(value_type = Object)]
    pub change: serde_json::Value,
}

/// The audit of a point (or of the Centro de Control's settings, `None`), newest first.
pub async fn audit_rows(
    db: &Db,
    point: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditRow>, StoreError> {
    let sql = "SELECT id, point_id, at, actor, change FROM compliance_audit \
               WHERE (CAST($1 AS BIGINT) IS NULL AND point_id IS NULL) OR point_id = $1 \
               ORDER BY id DESC LIMIT $2";
    each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sql)
            .bind(point)
            .bind(limit)
            .fetch_all(p)
            .await?;
        rows.iter()
            .map(|r| {
                let change: String = r.try_get("change")?;
                Ok(AuditRow {
                    id: r.try_get("id")?,
                    point_id: r.try_get("point_id")?,
                    at: from_row(r, "at")?,
                    actor: r.try_get("actor")?,
                    change: serde_json::from_str(&change).map_err(corrupt)?,
                })
            })
            .collect()
    })
}

/// Stops a point after the DGA refused its configuration.
pub async fn stop_point(
    db: &Db,
    point: i64,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    each_db!(db, |p, to_db, _from| {
        sqlx::query(
            "UPDATE compliance_points SET stopped_reason = $2, stopped_at = $3 WHERE point_id = $1",
        )
        .bind(point)
        .bind(reason)
        .bind(to_db(now))
        .execute(p)
        .await?;
    });
    Ok(())
}

/// After a point's configuration changed, its slots the DGA refused for configuration go back
/// to pending: the DGA did not store them, so sending them again repeats nothing.
pub async fn reopen_rejected(db: &Db, point: i64, now: DateTime<Utc>) -> Result<u64, StoreError> {
    each_db!(db, |p, to_db, _from| {
        Ok(sqlx::query(
            "UPDATE compliance_slots SET state = 'pending', detail = 'refused for configuration \
             before: ' || COALESCE(reason, ''), updated_at = $2 WHERE point_id = $1 \
             AND state = 'rejected_config'",
        )
        .bind(point)
        .bind(to_db(now))
        .execute(p)
        .await?
        .rows_affected())
    })
}

/// A point whose reporting the DGA stopped, for the alert rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Stopped {
    pub point_id: i64,
    pub reason: String,
    pub since: DateTime<Utc>,
}

/// Every point whose reporting is stopped (mode not `off`).
pub async fn stopped(db: &Db) -> Result<Vec<Stopped>, StoreError> {
    Ok(point_configs(db)
        .await?
        .into_iter()
        .filter(|c| c.mode != Mode::Off)
        .filter_map(|c| {
            Some(Stopped {
                point_id: c.point_id,
                reason: c.stopped_reason?,
                since: c.stopped_at.unwrap_or(c.updated_at),
            })
        })
        .collect())
}

/// Where a slot is in its life; see the module doc of `submitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Suspicious or incomplete: waits for a person (release or discard).
    Held,
    /// Checked; sent when the point's mode is `on`.
    Pending,
    /// Committed as sent before the POST left; its answer is not recorded yet.
    InFlight,
    /// `00` with a receipt.
    Accepted,
    /// The duplicate-400: stored by an earlier send, its receipt parsed from the message.
    AcceptedDuplicate,
    /// Stored without a receipt: never sent again, to be followed up.
    AcceptedNoReceipt,
    /// The DGA refused the informante or password: the point stopped.
    RejectedConfig,
    /// Not stored as far as is known: sent again the next day.
    Failed,
    /// Sent `max_attempts` times without a `00`: a "falla de transmisión" to report.
    TransmissionFailure,
    /// A person decided it is not to be sent.
    Discarded,
}

impl SlotState {
    pub const ALL: [SlotState; 10] = [
        SlotState::Held,
        SlotState::Pending,
        SlotState::InFlight,
        SlotState::Accepted,
        SlotState::AcceptedDuplicate,
        SlotState::AcceptedNoReceipt,
        SlotState::RejectedConfig,
        SlotState::Failed,
        SlotState::TransmissionFailure,
        SlotState::Discarded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Held => "held",
            SlotState::Pending => "pending",
            SlotState::InFlight => "in_flight",
            SlotState::Accepted => "accepted",
            SlotState::AcceptedDuplicate => "accepted_duplicate",
            SlotState::AcceptedNoReceipt => "accepted_no_receipt",
            SlotState::RejectedConfig => "rejected_config",
            SlotState::Failed => "failed",
            SlotState::TransmissionFailure => "transmission_failure",
            SlotState::Discarded => "discarded",
        }
    }

    /// The DGA holds this slot's measurement: it is never POSTed again.
    pub fn is_accepted(self) -> bool {
        matches!(
            self,
            SlotState::Accepted | SlotState::AcceptedDuplicate | SlotState::AcceptedNoReceipt
        )
    }
}

impl FromStr for SlotState {
    type Err = String;
    fn from_str(s: &str) -> Result<SlotState, String> {
        SlotState::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown slot state {s:?}"))
    }
}

/// A slot as stored.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Slot {
    pub point_id: i64,
    /// The slot instant (UTC); `fecha`/`hora` are the same instant in UTC-4.
    pub slot_at: DateTime<Utc>,
    pub fecha: String,
    pub hora: String,
    pub state: SlotState,
    /// What is (or would be) declared; absent when it could not be built.
    pub values: Option<Values>,
    /// Why it is held, failed or refused.
    pub reason: Option<String>,
    pub detail: String,
    pub attempts: i64,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub receipt: Option<String>,
    pub reviewed_by: Option<String>,
    pub note: String,
    /// The process that holds it in flight, and until when (its lease); absent otherwise.
    pub claimed_by: Option<String>,
    pub claimed_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const SLOT_COLUMNS: &str = "point_id, slot_at, state, caudal, totalizador, nivel, altura, \
    reason, detail, attempts, next_attempt_at, receipt, reviewed_by, note, claimed_by, \
    claimed_until, created_at, updated_at";

macro_rules! slot_row {
    ($r:expr, $from_row:ident) => {{
        let r = $r;
        let state: String = r.try_get("state")?;
        let slot_at = $from_row(r, "slot_at")?;
        let (fecha, hora) = super::slot::fecha_hora(slot_at);
        let caudal: Option<String> = r.try_get("caudal")?;
        Ok::<Slot, StoreError>(Slot {
            point_id: r.try_get("point_id")?,
            slot_at,
            fecha,
            hora,
            state: state.parse().map_err(corrupt)?,
            values: match caudal {
                None => None,
                Some(caudal) => Some(Values {
                    caudal,
                    totalizador: r.try_get("totalizador")?,
                    nivel: r.try_get("nivel")?,
                    altura: r.try_get("altura")?,
                }),
            },
            reason: r.try_get("reason")?,
            detail: r.try_get("detail")?,
            attempts: r.try_get("attempts")?,
            next_attempt_at: opt_time!(r, "next_attempt_at", $from_row),
            receipt: r.try_get("receipt")?,
            reviewed_by: r.try_get("reviewed_by")?,
            note: r.try_get("note")?,
            claimed_by: r.try_get("claimed_by")?,
            claimed_until: opt_time!(r, "claimed_until", $from_row),
            created_at: $from_row(r, "created_at")?,
            updated_at: $from_row(r, "updated_at")?,
        })
    }};
}

/// A slot built by the submitter.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSlot {
    pub point_id: i64,
    pub slot_at: DateTime<Utc>,
    pub state: SlotState,
    pub values: Option<Values>,
    pub reason: Option<String>,
    pub detail: String,
}

/// The latest slot built for a point.
pub async fn last_slot_at(db: &Db, point: i64) -> Result<Option<DateTime<Utc>>, StoreError> {
    let sql =
        "SELECT slot_at FROM compliance_slots WHERE point_id = $1 ORDER BY slot_at DESC LIMIT 1";
    each_db!(db, |p, _to, from_row| {
        match sqlx::query(sql).bind(point).fetch_optional(p).await? {
            Some(r) => Ok(Some(from_row(&r, "slot_at")?)),
            None => Ok(None),
        }
    })
}

/// Inserts built slots; a slot that exists already is left as it is (a slot is built once).
pub async fn insert_slots(
    db: &Db,
    slots: &[NewSlot],
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let sql = "INSERT INTO compliance_slots (point_id, slot_at, state, caudal, totalizador, \
               nivel, altura, reason, detail, attempts, created_at, updated_at) VALUES \
               ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $10) \
               ON CONFLICT (point_id, slot_at) DO NOTHING";
    let mut n = 0;
    each_db!(db, |p, to_db, _from| {
        let mut tx = p.begin().await?;
        for s in slots {
            let v = s.values.clone().unwrap_or_default();
            let has = s.values.is_some();
            n += sqlx::query(sql)
                .bind(s.point_id)
                .bind(to_db(s.slot_at))
                .bind(s.state.as_str())
                .bind(has.then_some(v.caudal))
                .bind(v.totalizador)
                .bind(v.nivel)
                .bind(v.altura)
                .bind(s.reason.clone())
                .bind(&s.detail)
                .bind(to_db(now))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
    });
    Ok(n)
}

/// A point's slots held for missing data that no person reviewed, after `after` (slot
/// instant), oldest first, at most `limit`: the ones late telemetry may re-open.
pub async fn held_for_missing_data(
    db: &Db,
    point: i64,
    after: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<Slot>, StoreError> {
    let sql = format!(
        "SELECT {SLOT_COLUMNS} FROM compliance_slots WHERE point_id = $1 AND state = 'held' \
         AND reason = 'no_data' AND reviewed_by IS NULL AND slot_at > $2 ORDER BY slot_at LIMIT $3"
    );
    let after = after.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    each_db!(db, |p, to_db, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(point)
            .bind(to_db(after))
            .bind(limit)
            .fetch_all(p)
            .await?;
        rows.iter().map(|r| slot_row!(r, from_row)).collect()
    })
}

/// A slot held for missing data, built again from the telemetry that arrived since: it takes
/// the new state (pending when its values now pass the checks, held with the new reason
/// otherwise) and values. Only a slot still held for missing data and never reviewed moves: a
/// slot a person decided on, or held for a suspicious value, is never rebuilt. Returns whether
/// it moved.
pub async fn rebuild_held(db: &Db, s: &NewSlot, now: DateTime<Utc>) -> Result<bool, StoreError> {
    let v = s.values.clone().unwrap_or_default();
    let has = s.values.is_some();
    each_db!(db, |p, to_db, _from| {
        let n = sqlx::query(
            "UPDATE compliance_slots SET state = $3, caudal = $4, totalizador = $5, nivel = $6, \
             altura = $7, reason = $8, detail = $9, updated_at = $10 WHERE point_id = $1 \
             AND slot_at = $2 AND state = 'held' AND reason = 'no_data' AND reviewed_by IS NULL",
        )
        .bind(s.point_id)
        .bind(to_db(s.slot_at))
        .bind(s.state.as_str())
        .bind(has.then_some(v.caudal))
        .bind(v.totalizador)
        .bind(v.nivel)
        .bind(v.altura)
        .bind(s.reason.clone())
        .bind(&s.detail)
        .bind(to_db(now))
        .execute(p)
        .await?
        .rows_affected();
        Ok(n == 1)
    })
}

/// One slot.
pub async fn slot(db: &Db, point: i64, at: DateTime<Utc>) -> Result<Option<Slot>, StoreError> {
    let sql =
        format!("SELECT {SLOT_COLUMNS} FROM compliance_slots WHERE point_id = $1 AND slot_at = $2");
    each_db!(db, |p, to_db, from_row| {
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(point)
            .bind(to_db(at))
            .fetch_optional(p)
            .await?;
        row.as_ref().map(|r| slot_row!(r, from_row)).transpose()
    })
}

/// A point's slots in `[from, to)`, optionally in one state, oldest first, at most `limit`.
pub async fn slots(
    db: &Db,
    point: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    state: Option<SlotState>,
    limit: i64,
) -> Result<Vec<Slot>, StoreError> {
    let sql = format!(
        "SELECT {SLOT_COLUMNS} FROM compliance_slots WHERE point_id = $1 AND slot_at >= $2 \
         AND slot_at < $3 AND (CAST($4 AS TEXT) IS NULL OR state = $4) ORDER BY slot_at LIMIT $5"
    );
    each_db!(db, |p, to_db, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(point)
            .bind(to_db(from))
            .bind(to_db(to))
            .bind(state.map(SlotState::as_str))
            .bind(limit)
            .fetch_all(p)
            .await?;
        rows.iter().map(|r| slot_row!(r, from_row)).collect()
    })
}

/// How long after its instant a slot still counts as live: the DGA wants it within the hour of
/// its measurement (Res. 2.170 §3).
pub const LIVE_S: i64 = 3600;

/// For each point whose mode is `on` and that is not stopped, the slot to send next: its
/// oldest slot due (pending, or failed with its next attempt due), unless the backlog ahead of
/// its oldest live slot (pending, instant within [`LIVE_S`] of `now`) would make that one late
/// at one POST per `spacing` (plus `margin`, a round): then the live slot goes first and the
/// backlog after it. One slot per point, however long its backlog: each question is a probe or
/// a range of the `(state, point_id, slot_at)` index, never a scan of a point's history.
pub async fn due(
    db: &Db,
    now: DateTime<Utc>,
    spacing: Duration,
    margin: Duration,
) -> Result<Vec<Slot>, StoreError> {
    let points = "SELECT point_id FROM compliance_points WHERE mode = 'on' \
                  AND stopped_reason IS NULL ORDER BY point_id";
    // Each condition names `state`, `point_id` and a range of `slot_at`, so SQLite's planner
    // takes the state index rather than the point's whole history by primary key. The backlog
    // ahead of a live slot is counted over pending slots only: failed ones due (a day old at
    // least, a few a day) go before it too, one each, within the round's margin.
    let pending = "SELECT MIN(slot_at) AS at FROM compliance_slots WHERE state = 'pending' \
                   AND point_id = $1 AND slot_at >= $2";
    // Without statistics SQLite reads a point's failed slots through the primary key (its
    // whole history, in slot order, for the MIN); it is told the state index. PostgreSQL plans
    // with its statistics.
    let failed = match db {
        Db::Sqlite(_) => {
            "SELECT MIN(slot_at) AS at FROM compliance_slots INDEXED BY compliance_slots_state \
             WHERE state = 'failed' AND point_id = $1 AND slot_at >= $3 AND next_attempt_at <= $2"
        }
        Db::Postgres(_) => {
            "SELECT MIN(slot_at) AS at FROM compliance_slots WHERE state = 'failed' \
             AND point_id = $1 AND slot_at >= $3 AND next_attempt_at <= $2"
        }
    };
    let ahead = "SELECT COUNT(*) FROM compliance_slots WHERE state = 'pending' \
                 AND point_id = $1 AND slot_at >= $3 AND slot_at < $2";
    let mut chosen = Vec::new();
    each_db!(db, |p, to_db, from_row| {
        let ids: Vec<i64> = sqlx::query_scalar(points).fetch_all(p).await?;
        for id in ids {
            let epoch = DateTime::<Utc>::UNIX_EPOCH;
            let min = |sql: &'static str, at: DateTime<Utc>| async move {
                let r = sqlx::query(sql)
                    .bind(id)
                    .bind(to_db(at))
                    .bind(to_db(epoch))
                    .fetch_one(p)
                    .await?;
                let r = &r;
                Ok::<_, StoreError>(opt_time!(r, "at", from_row))
            };
            let oldest = match (min(pending, epoch).await?, min(failed, now).await?) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let Some(oldest) = oldest else { continue };
            let mut next = oldest;
            if let Some(live) = min(pending, now - Duration::seconds(LIVE_S)).await?
                && live > oldest
            {
                let n: i64 = sqlx::query_scalar(ahead)
                    .bind(id)
                    .bind(to_db(live))
                    .bind(to_db(epoch))
                    .fetch_one(p)
                    .await?;
                let done = now + spacing * (n.clamp(0, i32::MAX as i64) as i32) + margin;
                if done > live + Duration::seconds(LIVE_S) {
                    next = live;
                }
            }
            chosen.push((id, next));
        }
    });
    let mut out = Vec::with_capacity(chosen.len());
    for (id, at) in chosen {
        if let Some(s) = slot(db, id, at).await? {
            out.push(s);
        }
    }
    Ok(out)
}

/// The last POST for the código de obra of `point`, if any: a read-only look before a claim, so
/// a round does not build a request (nor take the claim lock) for an obra still paced. The
/// claim checks again under its lock.
pub async fn obra_last_post(db: &Db, point: i64) -> Result<Option<DateTime<Utc>>, StoreError> {
    let sql = "SELECT o.last_post_at FROM compliance_obras o JOIN catchment_points p \
               ON p.obra_code = o.obra_code WHERE p.id = $1";
    each_db!(db, |p, _to, from_row| {
        match sqlx::query(sql).bind(point).fetch_optional(p).await? {
            Some(r) => Ok(Some(from_row(&r, "last_post_at")?)),
            None => Ok(None),
        }
    })
}

/// How a claim paces: the obra's spacing, the global token bucket, the owner and its lease.
#[derive(Debug, Clone)]
pub struct Pacing {
    /// The process claiming (see [`Slot::claimed_by`]).
    pub owner: String,
    /// How long the claim is the owner's before another process may treat it as unanswered.
    pub lease: Duration,
    /// Least time between two POSTs for one obra.
    pub obra_spacing: Duration,
    /// Tokens added per second to the global bucket.
    pub tokens_per_s: f64,
    /// Most tokens the bucket holds.
    pub burst: f64,
}

/// What a claim did.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// Committed in flight: the exchange row and the attempt number.
    Claimed { exchange: i64, attempt: i64 },
    /// Not in a state to send (taken by another process, accepted, held meanwhile).
    NotDue,
    /// The obra's last POST is too recent: not before `until`.
    ObraPaced { until: DateTime<Utc> },
    /// The global bucket is empty: a token comes at `until`.
    RateLimited { until: DateTime<Utc> },
}

/// The bucket's tokens at `now`, refilled since `at` (a clock that went back adds none).
pub fn refill(tokens: f64, at: DateTime<Utc>, now: DateTime<Utc>, p: &Pacing) -> f64 {
    let elapsed = ((now - at).num_milliseconds().max(0) as f64) / 1000.0;
    (tokens + elapsed * p.tokens_per_s).min(p.burst)
}

/// pending (or failed and due) → in flight, committed with the exchange row holding the
/// redacted request, before anything is sent, if the obra's spacing and the global bucket let
/// it go. Its next attempt is set to a day later, so a slot whose answer is never recorded
/// (its process died) is sent again the next day; `claimed_by`/`claimed_until` say whose it is
/// until when.
///
/// Several processes may claim on one database: the transaction first updates the one
/// `compliance_budget` row (a row lock on PostgreSQL, the write lock on SQLite, held to
/// commit), so claims are serialised and the spacing and bucket read are the latest; the slot
/// moves only from a sendable state, so exactly one claim of a slot wins.
pub async fn claim(
    db: &Db,
    point: i64,
    at: DateTime<Utc>,
    obra: &str,
    request: &serde_json::Value,
    pacing: &Pacing,
    now: DateTime<Utc>,
) -> Result<Claim, StoreError> {
    let next = now + Duration::days(1);
    each_db!(db, |p, to_db, from_row| {
        let mut tx = p.begin().await?;
        let bucket = sqlx::query(
            "UPDATE compliance_budget SET tokens = tokens WHERE id = 1 RETURNING tokens, tokens_at",
        )
        .fetch_one(&mut *tx)
        .await?;
        let tokens: f64 = bucket.try_get("tokens")?;
        let tokens_at = from_row(&bucket, "tokens_at")?;
        let last = sqlx::query("SELECT last_post_at FROM compliance_obras WHERE obra_code = $1")
            .bind(obra)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(r) = last {
            let until = from_row(&r, "last_post_at")? + pacing.obra_spacing;
            if now < until {
                tx.rollback().await?;
                return Ok(Claim::ObraPaced { until });
            }
        }
        let tokens = refill(tokens, tokens_at, now, pacing);
        if tokens < 1.0 {
            let wait = ((1.0 - tokens) / pacing.tokens_per_s * 1000.0).ceil() as i64;
            tx.rollback().await?;
            return Ok(Claim::RateLimited {
                until: now + Duration::milliseconds(wait),
            });
        }
        let attempts: Option<i64> = sqlx::query_scalar(
            "UPDATE compliance_slots SET state = 'in_flight', attempts = attempts + 1, \
             next_attempt_at = $3, updated_at = $4, claimed_by = $5, claimed_until = $6 \
             WHERE point_id = $1 AND slot_at = $2 AND \
             (state = 'pending' OR (state = 'failed' AND next_attempt_at <= $4)) \
             RETURNING attempts",
        )
        .bind(point)
        .bind(to_db(at))
        .bind(to_db(next))
        .bind(to_db(now))
        .bind(&pacing.owner)
        .bind(to_db(now + pacing.lease))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(attempt) = attempts else {
            // Rolled back now, not when the connection is next used: the budget row's lock
            // must not outlive the claim.
            tx.rollback().await?;
            return Ok(Claim::NotDue);
        };
        sqlx::query("UPDATE compliance_budget SET tokens = $1, tokens_at = $2 WHERE id = 1")
            .bind(tokens - 1.0)
            .bind(to_db(now))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO compliance_obras (obra_code, last_post_at) VALUES ($1, $2) \
             ON CONFLICT (obra_code) DO UPDATE SET last_post_at = excluded.last_post_at",
        )
        .bind(obra)
        .bind(to_db(now))
        .execute(&mut *tx)
        .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO compliance_exchanges (point_id, slot_at, attempt, sent_at, request) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(point)
        .bind(to_db(at))
        .bind(attempt)
        .bind(to_db(now))
        .bind(request.to_string())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Claim::Claimed {
            exchange: id,
            attempt,
        })
    })
}

/// What an answer does to an in-flight slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    pub exchange: i64,
    pub http_status: Option<u16>,
    pub response: String,
    pub outcome: String,
    pub state: SlotState,
    pub receipt: Option<String>,
    pub reason: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Why a slot recovered from an expired claim is failed.
pub const UNANSWERED: &str = "unanswered: the process stopped while the measurement was in flight";

/// in flight → what the answer means, with the answer on its exchange row, in one
/// transaction. Only the claim that sent it (`attempt`) moves the slot: from `in_flight`, or
/// from the `failed` a lease expiry made of it (the answer came after all, and is the truth);
/// a slot claimed again since, or accepted another way, is left as it is. Returns whether the
/// slot moved.
pub async fn record(
    db: &Db,
    point: i64,
    at: DateTime<Utc>,
    attempt: i64,
    a: &Answered,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let kept: String = a.response.chars().take(super::dga::MAX_KEPT_BODY).collect();
    each_db!(db, |p, to_db, _from| {
        let mut tx = p.begin().await?;
        sqlx::query(
            "UPDATE compliance_exchanges SET http_status = $2, response = $3, outcome = $4, \
             answered_at = $5 WHERE id = $1",
        )
        .bind(a.exchange)
        .bind(a.http_status.map(i64::from))
        .bind(kept)
        .bind(&a.outcome)
        .bind(to_db(now))
        .execute(&mut *tx)
        .await?;
        let n = sqlx::query(
            "UPDATE compliance_slots SET state = $3, receipt = $4, reason = $5, \
             next_attempt_at = $6, updated_at = $7, claimed_by = NULL, claimed_until = NULL \
             WHERE point_id = $1 AND slot_at = $2 AND attempts = $8 \
             AND (state = 'in_flight' OR (state = 'failed' AND reason = $9))",
        )
        .bind(point)
        .bind(to_db(at))
        .bind(a.state.as_str())
        .bind(a.receipt.clone())
        .bind(a.reason.clone())
        .bind(a.next_attempt_at.map(to_db))
        .bind(to_db(now))
        .bind(attempt)
        .bind(UNANSWERED)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    })
}

/// Slots left in flight whose claim's lease has passed (`claimed_until <= now`, or no lease:
/// claimed before leases existed): their process stopped, or lost its answer, before it was
/// recorded. Treated as unanswered: failed, sent again at the next attempt `claim` set, a day
/// after the send. A slot another live process holds (lease not passed) is left to it, so any
/// number of processes may run this at any time.
pub async fn recover_in_flight(db: &Db, now: DateTime<Utc>) -> Result<u64, StoreError> {
    let expired = "s.state = 'in_flight' AND (s.claimed_until IS NULL OR s.claimed_until <= $1)";
    let exchanges = format!(
        "UPDATE compliance_exchanges SET outcome = 'unanswered' WHERE outcome IS NULL \
         AND answered_at IS NULL AND EXISTS (SELECT 1 FROM compliance_slots s \
         WHERE s.point_id = compliance_exchanges.point_id \
         AND s.slot_at = compliance_exchanges.slot_at \
         AND s.attempts = compliance_exchanges.attempt AND {expired})"
    );
    let slots = "UPDATE compliance_slots SET state = 'failed', reason = $2, updated_at = $1, \
         claimed_by = NULL, claimed_until = NULL WHERE state = 'in_flight' \
         AND (claimed_until IS NULL OR claimed_until <= $1)";
    each_db!(db, |p, to_db, _from| {
        let mut tx = p.begin().await?;
        sqlx::query(sqlx::AssertSqlSafe(exchanges))
            .bind(to_db(now))
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query(slots)
            .bind(to_db(now))
            .bind(UNANSWERED)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n)
    })
}

/// A person's decision on a held slot: released (→ pending, checks waived) or discarded.
pub async fn review(
    db: &Db,
    point: i64,
    at: DateTime<Utc>,
    to: SlotState,
    by: &str,
    note: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let require_values = if to == SlotState::Pending {
        " AND caudal IS NOT NULL"
    } else {
        ""
    };
    let sql = format!(
        "UPDATE compliance_slots SET state = $3, reviewed_by = $4, note = $5, updated_at = $6 \
         WHERE point_id = $1 AND slot_at = $2 AND state = 'held'{require_values}"
    );
    each_db!(db, |p, to_db, _from| {
        let n = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(point)
            .bind(to_db(at))
            .bind(to.as_str())
            .bind(by)
            .bind(note)
            .bind(to_db(now))
            .execute(p)
            .await?
            .rows_affected();
        Ok(n == 1)
    })
}

/// One request to the regulator and its answer.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Exchange {
    pub id: i64,
    pub attempt: i64,
    pub sent_at: DateTime<Utc>,
    /// The request body, password as `****`.
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
    pub http_status: Option<i64>,
    pub response: Option<String>,
    /// `accepted`, `duplicate`, `accepted_no_receipt`, `rejected_config`, `failed`,
    /// `unanswered`; absent while in flight.
    pub outcome: Option<String>,
    pub answered_at: Option<DateTime<Utc>>,
}

/// The exchanges of one slot, oldest first.
pub async fn exchanges(
    db: &Db,
    point: i64,
    at: DateTime<Utc>,
) -> Result<Vec<Exchange>, StoreError> {
    let sql = "SELECT id, attempt, sent_at, request, http_status, response, outcome, answered_at \
               FROM compliance_exchanges WHERE point_id = $1 AND slot_at = $2 ORDER BY id";
    each_db!(db, |p, to_db, from_row| {
        let rows = sqlx::query(sql)
            .bind(point)
            .bind(to_db(at))
            .fetch_all(p)
            .await?;
        rows.iter()
            .map(|r| {
                let request: String = r.try_get("request")?;
                Ok(Exchange {
                    id: r.try_get("id")?,
                    attempt: r.try_get("attempt")?,
                    sent_at: from_row(r, "sent_at")?,
                    request: serde_json::from_str(&request).map_err(corrupt)?,
                    http_status: r.try_get("http_status")?,
                    response: r.try_get("response")?,
                    outcome: r.try_get("outcome")?,
                    answered_at: opt_time!(r, "answered_at", from_row),
                })
            })
            .collect()
    })
}

/// Slots per state over every point (the metrics' gauges).
pub async fn state_counts(db: &Db) -> Result<Vec<(String, i64)>, StoreError> {
    let sql = "SELECT state, COUNT(*) FROM compliance_slots GROUP BY state";
    Ok(each_db!(db, |p, _to, _from| {
        sqlx::query_as(sql).fetch_all(p).await?
    }))
}

/// A failed slot that reached its cap: a transmission failure to report.
pub async fn give_up(
    db: &Db,
    point: i64,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    each_db!(db, |p, to_db, _from| {
        sqlx::query(
            "UPDATE compliance_slots SET state = 'transmission_failure', next_attempt_at = NULL, \
             updated_at = $3 WHERE point_id = $1 AND slot_at = $2 AND state = 'failed'",
        )
        .bind(point)
        .bind(to_db(at))
        .bind(to_db(now))
        .execute(p)
        .await?;
    });
    Ok(())
}

/// Why a due slot cannot be sent now (its point's configuration), kept on the slot.
pub async fn set_reason(
    db: &Db,
    point: i64,
    at: DateTime<Utc>,
    reason: &str,
) -> Result<(), StoreError> {
    each_db!(db, |p, to_db, _from| {
        sqlx::query("UPDATE compliance_slots SET reason = $3 WHERE point_id = $1 AND slot_at = $2")
            .bind(point)
            .bind(to_db(at))
            .bind(reason)
            .execute(p)
            .await?;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacing(per_minute: f64, burst: f64) -> Pacing {
        Pacing {
            owner: "t".into(),
            lease: Duration::seconds(120),
            obra_spacing: Duration::seconds(300),
            tokens_per_s: per_minute / 60.0,
            burst,
        }
    }

    #[test]
    fn the_bucket_refills_at_its_rate_up_to_its_burst_and_never_from_a_clock_gone_back() {
        let p = pacing(20.0, 10.0);
        let t = DateTime::<Utc>::UNIX_EPOCH + Duration::days(20_000);
        assert!((refill(0.0, t, t + Duration::seconds(3), &p) - 1.0).abs() < 1e-9);
        assert!((refill(2.5, t, t + Duration::seconds(6), &p) - 4.5).abs() < 1e-9);
        assert_eq!(refill(0.0, t, t + Duration::hours(1), &p), 10.0);
        assert_eq!(refill(0.5, t, t - Duration::hours(1), &p), 0.5);
        // The row as the migration leaves it (no tokens, at the epoch) starts full.
        assert_eq!(refill(0.0, DateTime::<Utc>::UNIX_EPOCH, t, &p), 10.0);
    }
}
