//! Changing what is reported, the same way from the API and the command line: the Centro de
//! Control's settings, a point's reporting settings, its informante password (sealed before it
//! is stored, `****` in the audit), a person's review of a held slot. Each change is checked
//! whole, then stored with its audit row. A change of a point's settings or password clears a
//! stop the DGA caused and puts the slots it refused for configuration back to pending: the DGA
//! stored none of them.

use super::dga::Endpoint;
use super::secret::{Password, REDACTED, Sealer, SecretError};
use super::slot::{self, Period};
use super::store::{self, Mode, PointConfig, SlotState, Source, StoreError};
use super::value::FlowMethod;
use crate::catchment::point::{self, PointError};
use crate::catchment::rut::Rut;
use crate::core::db::Db;
use caudal_common::{DeviceId, SiteId};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest informante password accepted, bytes.
pub const MAX_PASSWORD_BYTES: usize = 256;
/// Longest review note, characters.
pub const MAX_NOTE_CHARS: usize = 2000;

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("catchment point {0} does not exist")]
    NoPoint(i64),
    #[error("catchment point {0} has no reporting settings yet")]
    NotConfigured(i64),
    #[error("slot {1} of point {0} does not exist")]
    NoSlot(i64, DateTime<Utc>),
    #[error("slot {1} of point {0} is {2}, not held")]
    NotHeld(i64, DateTime<Utc>, &'static str),
    #[error(
        "slot {1} of point {0} has no values to send (it was held for missing data); discard it"
    )]
    NothingToSend(i64, DateTime<Utc>),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Point(#[from] PointError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        field,
        message: message.into(),
    }
}

/// Body of `PUT /api/v1/compliance/settings`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsBody {
    /// Base URL of the MEE API; absent: the manual's (`https://apimee.mop.gob.cl/api/v1`).
    #[serde(default)]
    #[schema(pattern = "^https?://[^/\\s]+\\S*$", max_length = 500)]
    pub dga_base_url: Option<String>,
    /// RUT of the Centro de Control (`rutEmpresa`).
    #[serde(default)]
    pub rut_empresa: Option<Rut>,
}

/// Stores the Centro de Control's settings.
pub async fn put_settings(
    db: &Db,
    body: &SettingsBody,
    by: &str,
    now: DateTime<Utc>,
) -> Result<store::Settings, SettingsError> {
    let url = body
        .dga_base_url
        .clone()
        .unwrap_or_else(|| super::dga::DEFAULT_BASE_URL.to_string());
    let host = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .map(|rest| rest.split('/').next().unwrap_or_default());
    if host.is_none_or(str::is_empty)
        || url.chars().any(char::is_whitespace)
        || url.chars().count() > 500
    {
        return Err(invalid(
            "dga_base_url",
            "must be an http(s):// URL with a host, without spaces, of at most 500 characters",
        ));
    }
    let url = url.trim_end_matches('/').to_string();
    store::put_settings(db, &url, body.rut_empresa.as_ref(), by, now).await?;
    store::audit(
        db,
        None,
        by,
        &serde_json::json!({"settings": {"dga_base_url": url, "rut_empresa": body.rut_empresa}}),
        now,
    )
    .await?;
    Ok(store::settings(db).await?)
}

/// Body of `PUT /api/v1/compliance/points/{id}`: a point's reporting settings, whole (the
/// password is set apart, `PUT …/password`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PointBody {
    /// Absent: from the point's kind (groundwater → subterranea, surface_flow →
    /// superficial_flujometro, surface_level → superficial).
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    /// The device whose flow is `caudal`.
    #[serde(default)]
    pub flow: Option<Source>,
    /// The device whose totalizer is `totalizador`.
    #[serde(default)]
    pub total: Option<Source>,
    /// The device whose level gives `nivelFreaticoDelPozo` or `alturaLimnimetrica`.
    #[serde(default)]
    pub level: Option<Source>,
    /// `off` (default), `shadow` (build and check, send nothing) or `on`.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// First day reported (`YYYY-MM-DD`, from 00:00 UTC-4); required unless `mode` is `off`.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Date)]
    pub start_date: Option<NaiveDate>,
    /// Absent: by the point's DGA standard.
    #[serde(default)]
    pub period: Option<Period>,
    /// Absent: `sample` for hourly slots, `mean` for longer ones.
    #[serde(default)]
    pub flow_method: Option<FlowMethod>,
    /// Low-flow cut-off, L/s (default 0.2).
    #[serde(default)]
    #[schema(minimum = 0)]
    pub low_flow_lps: Option<f64>,
}

/// A point's reporting settings as the API shows them: the password only as whether one is set.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PointView {
    pub point_id: i64,
    pub endpoint: Endpoint,
    pub password_set: bool,
    pub flow: Option<Source>,
    pub total: Option<Source>,
    pub level: Option<Source>,
    pub mode: Mode,
    #[schema(value_type = Option<String>, format = Date)]
    pub start_date: Option<NaiveDate>,
    pub period: Option<Period>,
    pub flow_method: Option<FlowMethod>,
    pub low_flow_lps: f64,
    /// Set when the DGA refused the configuration: nothing is sent until the settings change.
    pub stopped_reason: Option<String>,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

impl From<&PointConfig> for PointView {
    fn from(c: &PointConfig) -> PointView {
        PointView {
            point_id: c.point_id,
            endpoint: c.endpoint,
            password_set: c.password_enc.is_some(),
            flow: c.flow.clone(),
            total: c.total.clone(),
            level: c.level.clone(),
            mode: c.mode,
            start_date: c
                .start_at
                .map(|t| t.with_timezone(&slot::dga_zone()).date_naive()),
            period: c.period,
            flow_method: c.flow_method,
            low_flow_lps: c.low_flow_lps,
            stopped_reason: c.stopped_reason.clone(),
            updated_at: c.updated_at,
            updated_by: c.updated_by.clone(),
        }
    }
}

fn check_source(field: &'static str, s: &Option<Source>) -> Result<(), SettingsError> {
    if let Some(s) = s {
        SiteId::new(&s.site).map_err(|e| invalid(field, format!("site: {e}")))?;
        DeviceId::new(&s.device).map_err(|e| invalid(field, format!("device: {e}")))?;
    }
    Ok(())
}

/// Stores a point's reporting settings (the password is kept as it was).
pub async fn put_point(
    db: &Db,
    id: i64,
    body: &PointBody,
    by: &str,
    now: DateTime<Utc>,
) -> Result<PointView, SettingsError> {
    let p = point::get(db, id)
        .await?
        .ok_or(SettingsError::NoPoint(id))?;
    check_source("flow", &body.flow)?;
    check_source("total", &body.total)?;
    check_source("level", &body.level)?;
    let mode = body.mode.unwrap_or(Mode::Off);
    if mode != Mode::Off && body.start_date.is_none() {
        return Err(invalid("start_date", "is required unless mode is off"));
    }
    let low = body.low_flow_lps.unwrap_or(0.2);
    if !low.is_finite() || low < 0.0 {
        return Err(invalid("low_flow_lps", "must be a number ≥ 0"));
    }
    if body.period.is_none() && p.dga_standard.is_none() {
        return Err(invalid(
            "period",
            "is required: the point has no DGA standard to take it from",
        ));
    }
    let before = store::point_config(db, id).await?;
    let c = PointConfig {
        point_id: id,
        endpoint: body.endpoint.unwrap_or(Endpoint::of_kind(p.kind)),
        password_enc: before.and_then(|b| b.password_enc),
        flow: body.flow.clone(),
        total: body.total.clone(),
        level: body.level.clone(),
        mode,
        start_at: body.start_date.map(slot::start_of),
        period: body.period,
        flow_method: body.flow_method,
        low_flow_lps: low,
        stopped_reason: None,
        stopped_at: None,
        updated_at: now,
        updated_by: by.to_string(),
    };
    let change = serde_json::json!({ "settings": body });
    store::put_point_config(db, &c, &change).await?;
    store::reopen_rejected(db, id, now).await?;
    Ok(PointView::from(&c))
}

/// Seals and stores a point's informante password; the audit shows `****`.
pub async fn put_password(
    db: &Db,
    sealer: Option<&Sealer>,
    id: i64,
    password: &Password,
    by: &str,
    now: DateTime<Utc>,
) -> Result<(), SettingsError> {
    let sealer = sealer.ok_or(SecretError::NoKey)?;
    if password.expose().is_empty() || password.expose().len() > MAX_PASSWORD_BYTES {
        return Err(invalid(
            "password",
            format!("must be 1 to {MAX_PASSWORD_BYTES} bytes"),
        ));
    }
    let mut c = store::point_config(db, id)
        .await?
        .ok_or(SettingsError::NotConfigured(id))?;
    c.password_enc = Some(sealer.seal(id, password)?);
    c.stopped_reason = None;
    c.stopped_at = None;
    c.updated_at = now;
    c.updated_by = by.to_string();
    store::put_point_config(db, &c, &serde_json::json!({ "password": REDACTED })).await?;
    store::reopen_rejected(db, id, now).await?;
    Ok(())
}

/// Releases (→ pending, sent as built) or discards a held slot, with a person's note.
pub async fn review(
    db: &Db,
    id: i64,
    at: DateTime<Utc>,
    release: bool,
    by: &str,
    note: &str,
    now: DateTime<Utc>,
) -> Result<store::Slot, SettingsError> {
    if note.chars().count() > MAX_NOTE_CHARS {
        return Err(invalid(
            "note",
            format!("at most {MAX_NOTE_CHARS} characters"),
        ));
    }
    if release && note.trim().is_empty() {
        return Err(invalid(
            "note",
            "a release needs a note saying why the values stand",
        ));
    }
    let s = store::slot(db, id, at)
        .await?
        .ok_or(SettingsError::NoSlot(id, at))?;
    if s.state != SlotState::Held {
        return Err(SettingsError::NotHeld(id, at, s.state.as_str()));
    }
    if release && s.values.is_none() {
        return Err(SettingsError::NothingToSend(id, at));
    }
    let to = if release {
        SlotState::Pending
    } else {
        SlotState::Discarded
    };
    if !store::review(db, id, at, to, by, note.trim(), now).await? {
        return Err(SettingsError::NotHeld(id, at, "no longer held"));
    }
    store::slot(db, id, at)
        .await?
        .ok_or(SettingsError::NoSlot(id, at))
}
