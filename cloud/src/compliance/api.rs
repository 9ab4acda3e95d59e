//! The compliance API: settings (Centro de Control, per point, passwords), the audit, slots with
//! their exchanges, a person's review of a held slot, the month reports, the log and the
//! rectification dossier (JSON or CSV), and a receipt check on demand. Any role reads; admins
//! and operators change; no route ever answers a password.

use super::report::{self, Dossier, Filter, Log, Month, PointMonth, PointReport, ReportError};
use super::secret::Password;
use super::settings::{self, PointBody, PointView, SettingsBody, SettingsError};
use super::store::{self, AuditRow, Exchange, Settings, Slot, SlotState, StoreError};
use super::verify::{self, Verification, VerifyError};
use super::{DgaHandle, Keyring};
use crate::core::api::{ApiError, ApiJson, ApiPath, ApiQuery, ApiState, ErrorBody};
use crate::core::auth::Permission;
use crate::core::openapi::{Forbidden, Unauthorized};
use crate::users::Caller;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Most slots one list answers.
pub const MAX_SLOTS: i64 = 10_000;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Corrupt(_) => ApiError::corrupt("compliance", &e),
            StoreError::Database(_) => ApiError::database("compliance", &e),
        }
    }
}

impl From<SettingsError> for ApiError {
    fn from(e: SettingsError) -> ApiError {
        match e {
            SettingsError::Invalid { field, message } => ApiError::bad(field, message),
            SettingsError::NoPoint(id) => ApiError::NotFound(format!("catchment point {id}")),
            SettingsError::NotConfigured(_) => ApiError::conflict("id", e.to_string()),
            SettingsError::NoSlot(id, at) => ApiError::NotFound(format!("slot {at} of point {id}")),
            SettingsError::NotHeld(..) | SettingsError::NothingToSend(..) => {
                ApiError::conflict("state", e.to_string())
            }
            SettingsError::Secret(_) => ApiError::conflict("password", e.to_string()),
            SettingsError::Store(e) => e.into(),
            SettingsError::Point(e) => ApiError::database("catchment points", &e),
        }
    }
}

fn point_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad("id", format!("{raw:?} is not a catchment point id")))
}

fn slot_at(raw: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| ApiError::bad("slot", format!("{raw:?} is not an RFC 3339 time: {e}")))
}

/// The Centro de Control's settings.
#[utoipa::path(
    get,
    path = "/api/v1/compliance/settings",
    tag = "compliance",
    security(("bearer" = [])),
    responses((status = 200, description = "The settings", body = Settings), Unauthorized),
)]
pub(super) async fn get_compliance_settings(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Settings>, ApiError> {
    caller.require(Permission::Read)?;
    Ok(Json(store::settings(&state.db).await?))
}

/// Changes the Centro de Control's settings (admin, operator).
#[utoipa::path(
    put,
    path = "/api/v1/compliance/settings",
    tag = "compliance",
    security(("bearer" = [])),
    request_body = SettingsBody,
    responses(
        (status = 200, description = "The settings", body = Settings),
        (status = 400, description = "A field is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
    ),
)]
pub(super) async fn put_compliance_settings(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<ApiJson<SettingsBody>, ApiError>,
) -> Result<Json<Settings>, ApiError> {
    caller.require(Permission::ManageCompliance)?;
    let ApiJson(body) = body?;
    let s = settings::put_settings(&state.db, &body, &caller.user.email, Utc::now()).await?;
    tracing::info!(by = %caller.user.email, "compliance settings changed");
    Ok(Json(s))
}

/// Every point's reporting settings.
#[utoipa::path(
    get,
    path = "/api/v1/compliance/points",
    tag = "compliance",
    security(("bearer" = [])),
    responses((status = 200, description = "Reporting settings, by point", body = Vec<PointView>), Unauthorized),
)]
pub(super) async fn list_reported_points(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<PointView>>, ApiError> {
    caller.require(Permission::Read)?;
    let all = store::point_configs(&state.db).await?;
    Ok(Json(all.iter().map(PointView::from).collect()))
}

/// One point's reporting settings.
#[utoipa::path(
    get,
    path = "/api/v1/compliance/points/{id}",
    tag = "compliance",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Catchment point id")),
    responses(
        (status = 200, description = "The point's reporting settings", body = PointView),
        (status = 400, description = "The path is wrong", body = ErrorBody),
        Unauthorized,
        (status = 404, description = "The point has no reporting settings", body = ErrorBody),
    ),
)]
pub(super) async fn get_reported_point(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<PointView>, ApiError> {
    caller.require(Permission::Read)?;
    let id = point_id(&id)?;
    let c = store::point_config(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("reporting settings of point {id}")))?;
    Ok(Json(PointView::from(&c)))
}

/// Sets a point's reporting settings, whole (admin, operator). Clears a stop the DGA caused.
#[utoipa::path(
    put,
    path = "/api/v1/compliance/points/{id}",
    tag = "compliance",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Catchment point id")),
    request_body = PointBody,
    responses(
        (status = 200, description = "The point's reporting settings", body = PointView),
        (status = 400, description = "A field or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such catchment point", body = ErrorBody),
    ),
)]
pub(super) async fn put_reported_point(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    body: Result<ApiJson<PointBody>, ApiError>,
) -> Result<Json<PointView>, ApiError> {
    caller.require(Permission::ManageCompliance)?;
    let id = point_id(&id)?;
    let ApiJson(body) = body?;
    let v = settings::put_point(&state.db, id, &body, &caller.user.email, Utc::now()).await?;
    tracing::info!(point = id, by = %caller.user.email, mode = v.mode.as_str(), "compliance point settings changed");
    Ok(Json(v))
}

/// Body of `PUT /api/v1/compliance/points/{id}/password`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordBody {
    /// The informante's MEE password; stored encrypted, never answered.
    #[schema(min_length = 1, max_length = 256)]
    pub password: String,
}

impl std::fmt::Debug for PasswordBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordBody(****)")
    }
}

/// Sets a point's informante password (admin, operator); it is never answered back.
#[utoipa::path(
    put,
    path = "/api/v1/compliance/points/{id}/password",
    tag = "compliance",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Catchment point id")),
    request_body = PasswordBody,
    responses(
        (status = 204, description = "Stored, encrypted"),
        (status = 400, description = "A field or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 409, description = "The point has no reporting settings, or no compliance key is configured", body = ErrorBody),
    ),
)]
pub(super) async fn put_informant_password(
    State(state): State<ApiState>,
    Extension(keys): Extension<Keyring>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    body: Result<ApiJson<PasswordBody>, ApiError>,
) -> Result<StatusCode, ApiError> {
    caller.require(Permission::ManageCompliance)?;
    let id = point_id(&id)?;
    let ApiJson(body) = body?;
    settings::put_password(
        &state.db,
        keys.0.as_deref(),
        id,
        &Password::new(body.password),
        &caller.user.email,
        Utc::now(),
    )
    .await?;
    tracing::info!(point = id, by = %caller.user.email, "informante password changed");
    Ok(StatusCode::NO_CONTENT)
}

/// Who changed a point's reporting settings, newest first (passwords as `****`).
#[utoipa::path(
    get,
    path = "/api/v1/compliance/points/{id}/audit",
    tag = "compliance",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Catchment point id")),
    responses(
        (status = 200, description = "Changes, newest first", body = Vec<AuditRow>),
        (status = 400, description = "The path is wrong", body = ErrorBody),
        Unauthorized,
    ),
)]
pub(super) async fn point_audit(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Vec<AuditRow>>, ApiError> {
    caller.require(Permission::Read)?;
    Ok(Json(
        store::audit_rows(&state.db, Some(point_id(&id)?), 1000).await?,
    ))
}

/// Query of `GET /api/v1/compliance/points/{id}/slots`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SlotQuery {
    /// Default: 7 days before `to`.
    #[serde(default)]
    pub from: Option<DateTime<Utc>>,
    /// Default: now.
    #[serde(default)]
    pub to: Option<DateTime<Utc>>,
    /// Only slots in this state.
    #[serde(default)]
    #[param(value_type = Option<SlotState>)]
    pub state: Option<String>,
    /// At most this many, 1..=10000 (default 1000).
    #[serde(default)]
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<i64>,
}

/// A point's slots, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/compliance/points/{id}/slots",
    tag = "compliance",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Catchment point id"), SlotQuery),
    responses(
        (status = 200, description = "Slots, oldest first", body = Vec<Slot>),
        (status = 400, description = "A parameter is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
    ),
)]
pub(super) async fn list_compliance_slots(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<SlotQuery>,
) -> Result<Json<Vec<Slot>>, ApiError> {
    caller.require(Permission::Read)?;
    let id = point_id(&id)?;
    let to = q.to.unwrap_or_else(Utc::now);
    let from = q.from.unwrap_or(to - Duration::days(7));
    if from > to {
        return Err(ApiError::bad("from", "must not be after to"));
    }
    let st = q
        .state
        .map(|s| {
            s.parse::<SlotState>()
                .map_err(|e| ApiError::bad("state", e))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(1000);
    if !(1..=MAX_SLOTS).contains(&limit) {
        return Err(ApiError::bad(
            "limit",
            format!("must be between 1 and {MAX_SLOTS}"),
        ));
    }
    Ok(Json(
        store::slots(&state.db, id, from, to, st, limit).await?,
    ))
}

/// A slot with every exchange with the regulator about it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SlotDetail {
    pub slot: Slot,
    pub exchanges: Vec<Exchange>,
}

/// One slot and its exchanges (requests redacted).
#[utoipa::path(
    get,
    path = "/api/v1/compliance/points/{id}/slots/{slot}",
    tag = "compliance",
    security(("bearer" = [])),
    params(
        ("id" = i64, Path, description = "Catchment point id"),
        ("slot" = DateTime<Utc>, Path, description = "The slot instant, RFC 3339 (`2026-04-05T03:00:00Z`)"),
    ),
    responses(
        (status = 200, description = "The slot and its exchanges", body = SlotDetail),
        (status = 400, description = "The path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        (status = 404, description = "No such slot", body = ErrorBody),
    ),
)]
pub(super) async fn get_compliance_slot(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((id, at)): ApiPath<(String, String)>,
) -> Result<Json<SlotDetail>, ApiError> {
    caller.require(Permission::Read)?;
    let (id, at) = (point_id(&id)?, slot_at(&at)?);
    let slot = store::slot(&state.db, id, at)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("slot {at} of point {id}")))?;
    let exchanges = store::exchanges(&state.db, id, at).await?;
    Ok(Json(SlotDetail { slot, exchanges }))
}

/// Body of a review.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewBody {
    /// Why (required to release: what makes the values stand).
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub note: String,
}

async fn review(
    state: ApiState,
    caller: Caller,
    id: String,
    at: String,
    body: Result<ApiJson<ReviewBody>, ApiError>,
    release: bool,
) -> Result<Json<Slot>, ApiError> {
    caller.require(Permission::ManageCompliance)?;
    let (id, at) = (point_id(&id)?, slot_at(&at)?);
    let ApiJson(body) = body?;
    let s = settings::review(
        &state.db,
        id,
        at,
        release,
        &caller.user.email,
        &body.note,
        Utc::now(),
    )
    .await?;
    tracing::info!(point = id, slot = %at, by = %caller.user.email, release, "held slot reviewed");
    Ok(Json(s))
}

/// Releases a held slot: it is sent as built (admin, operator; a note is required).
#[utoipa::path(
    post,
    path = "/api/v1/compliance/points/{id}/slots/{slot}/release",
    tag = "compliance",
    security(("bearer" = [])),
    params(
        ("id" = i64, Path, description = "Catchment point id"),
        ("slot" = DateTime<Utc>, Path, description = "The slot instant, RFC 3339"),
    ),
    request_body = ReviewBody,
    responses(
        (status = 200, description = "The slot, now pending", body = Slot),
        (status = 400, description = "A field or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such slot", body = ErrorBody),
        (status = 409, description = "Not held, or nothing to send", body = ErrorBody),
    ),
)]
pub(super) async fn release_slot(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((id, at)): ApiPath<(String, String)>,
    body: Result<ApiJson<ReviewBody>, ApiError>,
) -> Result<Json<Slot>, ApiError> {
    review(state, caller, id, at, body, true).await
}

/// Discards a held slot: it is never sent (admin, operator).
#[utoipa::path(
    post,
    path = "/api/v1/compliance/points/{id}/slots/{slot}/discard",
    tag = "compliance",
    security(("bearer" = [])),
    params(
        ("id" = i64, Path, description = "Catchment point id"),
        ("slot" = DateTime<Utc>, Path, description = "The slot instant, RFC 3339"),
    ),
    request_body = ReviewBody,
    responses(
        (status = 200, description = "The slot, now discarded", body = Slot),
        (status = 400, description = "A field or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such slot", body = ErrorBody),
        (status = 409, description = "Not held", body = ErrorBody),
    ),
)]
pub(super) async fn discard_slot(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((id, at)): ApiPath<(String, String)>,
    body: Result<ApiJson<ReviewBody>, ApiError>,
) -> Result<Json<Slot>, ApiError> {
    review(state, caller, id, at, body, false).await
}

impl From<ReportError> for ApiError {
    fn from(e: ReportError) -> ApiError {
        match e {
            ReportError::Store(e) => e.into(),
            ReportError::Point(e) => ApiError::database("catchment points", &e),
            ReportError::Query(e) => ApiError::database("telemetry", &e),
        }
    }
}

impl From<VerifyError> for ApiError {
    fn from(e: VerifyError) -> ApiError {
        match e {
            VerifyError::NoSlot(id, at) => ApiError::NotFound(format!("slot {at} of point {id}")),
            VerifyError::NotVerifiable(..) => ApiError::conflict("state", e.to_string()),
            VerifyError::NoObra(_) => ApiError::conflict("id", e.to_string()),
            VerifyError::Store(e) => e.into(),
            VerifyError::Point(e) => ApiError::database("catchment points", &e),
        }
    }
}

fn month_of(raw: Option<&str>) -> Result<Month, ApiError> {
    match raw {
        None => Ok(Month::of(Utc::now())),
        Some(m) => Month::parse(m).map_err(|e| ApiError::bad("month", e)),
    }
}

/// Whether the caller asked for CSV: `format=csv`, or no `format` and `Accept: text/csv`.
fn wants_csv(format: Option<&str>, headers: &HeaderMap) -> Result<bool, ApiError> {
    match format {
        Some("csv") => Ok(true),
        Some("json") => Ok(false),
        Some(other) => Err(ApiError::bad(
            "format",
            format!("{other:?} is neither json nor csv"),
        )),
        None => Ok(headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/csv"))),
    }
}

fn csv(body: String, name: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response()
}

fn range(
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let to = to.unwrap_or_else(Utc::now);
    let from = from.unwrap_or(to - Duration::days(7));
    if from > to {
        return Err(ApiError::bad("from", "must not be after to"));
    }
    Ok((from, to))
}

/// Query of `GET /api/v1/compliance/report`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MonthQuery {
    /// `YYYY-MM`, a calendar month in UTC-4 (default: the current one).
    #[serde(default)]
    #[param(pattern = "^[0-9]{4}-[0-9]{2}$")]
    pub month: Option<String>,
    /// Only this catchment point.
    #[serde(default)]
    pub point: Option<i64>,
    /// Only points with a flow, totalizer or level source on this site.
    #[serde(default)]
    pub site: Option<String>,
    /// `json` (default) or `csv`; without it, `Accept: text/csv` asks for CSV.
    #[serde(default)]
    #[param(pattern = "^(json|csv)$")]
    pub format: Option<String>,
}

/// Every reported obra's month: expected slots, accepted (and late), held, failed, pending,
/// not yet due, overdue, verified. CSV header: `report::MONTH_CSV_HEADER`.
#[utoipa::path(
    get,
    path = "/api/v1/compliance/report",
    tag = "compliance",
    security(("bearer" = [])),
    params(MonthQuery),
    responses(
        (status = 200, description = "One row per obra, by point id", content(
            (Vec<PointReport> = "application/json"),
            (String = "text/csv"),
        )),
        (status = 400, description = "A parameter is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
    ),
)]
pub(super) async fn compliance_report(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<MonthQuery>,
) -> Result<Response, ApiError> {
    caller.require(Permission::Read)?;
    let month = month_of(q.month.as_deref())?;
    let csv_out = wants_csv(q.format.as_deref(), &headers)?;
    let filter = Filter {
        point: q.point,
        site: q.site,
    };
    let r = report::month_report(&state.db, month, &filter, Utc::now()).await?;
    Ok(if csv_out {
        csv(report::month_csv(&r), &format!("compliance-{month}.csv"))
    } else {
        Json(r).into_response()
    })
}

/// Query of `GET /api/v1/compliance/points/{id}/report`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PointMonthQuery {
    /// `YYYY-MM`, a calendar month in UTC-4 (default: the current one).
    #[serde(default)]
    #[param(pattern = "^[0-9]{4}-[0-9]{2}$")]
    pub month: Option<String>,
    /// `json` (default) or `csv`; without it, `Accept: text/csv` asks for CSV.
    #[serde(default)]
    #[param(pattern = "^(json|csv)$")]
    pub format: Option<String>,
}

/// One obra's month: its figures and every slot with its state, values, receipt, late flag.
/// CSV (one line per slot) header: `report::SLOTS_CSV_HEADER`.
#[utoipa::path(
    get,
    path = "/api/v1/compliance/points/{id}/report",
    tag = "compliance",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Catchment point id"), PointMonthQuery),
    responses(
        (status = 200, description = "The obra's month", content(
            (PointMonth = "application/json"),
            (String = "text/csv"),
        )),
        (status = 400, description = "A parameter or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        (status = 404, description = "The point has no reporting settings", body = ErrorBody),
    ),
)]
pub(super) async fn point_report(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PointMonthQuery>,
) -> Result<Response, ApiError> {
    caller.require(Permission::Read)?;
    let id = point_id(&id)?;
    let month = month_of(q.month.as_deref())?;
    let csv_out = wants_csv(q.format.as_deref(), &headers)?;
    let m = report::point_month(&state.db, id, month, Utc::now())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("reporting settings of point {id}")))?;
    Ok(if csv_out {
        csv(
            report::slots_csv(&m),
            &format!("compliance-{id}-{month}.csv"),
        )
    } else {
        Json(m).into_response()
    })
}

/// Query of the log and the dossier.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    /// RFC 3339; default 7 days before `to`.
    #[serde(default)]
    pub from: Option<DateTime<Utc>>,
    /// RFC 3339; default now.
    #[serde(default)]
    pub to: Option<DateTime<Utc>>,
    /// `json` (default) or `csv` (the dossier only); without it, `Accept: text/csv` asks for
    /// CSV.
    #[serde(default)]
    #[param(pattern = "^(json|csv)$")]
    pub format: Option<String>,
}

/// A point's submission log: every POST sent in `[from, to)` (password as `****`) with its
/// answer and the receipt it got, and every receipt check made then.
#[utoipa::path(
    get,
    path = "/api/v1/compliance/points/{id}/log",
    tag = "compliance",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Catchment point id"), RangeQuery),
    responses(
        (status = 200, description = "The log, oldest first", body = Log),
        (status = 400, description = "A parameter or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
    ),
)]
pub(super) async fn point_log(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> Result<Json<Log>, ApiError> {
    caller.require(Permission::Read)?;
    let id = point_id(&id)?;
    if q.format.as_deref().is_some_and(|f| f != "json") {
        return Err(ApiError::bad("format", "the log is JSON only"));
    }
    let (from, to) = range(q.from, q.to)?;
    Ok(Json(report::log(&state.db, id, from, to).await?))
}

/// The rectification dossier of the slots in `[from, to)`: for each, the values exactly as
/// sent, the receipt, when and how it was accepted, every exchange and receipt check, the
/// stored telemetry it was built from, and the point's settings at the time. What to hand the
/// DGA when asking for a correction. CSV header: `report::DOSSIER_CSV_HEADER`.
#[utoipa::path(
    get,
    path = "/api/v1/compliance/points/{id}/dossier",
    tag = "compliance",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Catchment point id"), RangeQuery),
    responses(
        (status = 200, description = "The dossier, oldest slot first", content(
            (Dossier = "application/json"),
            (String = "text/csv"),
        )),
        (status = 400, description = "A parameter or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        (status = 404, description = "The point has no reporting settings", body = ErrorBody),
    ),
)]
pub(super) async fn point_dossier(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> Result<Response, ApiError> {
    caller.require(Permission::Read)?;
    let id = point_id(&id)?;
    let csv_out = wants_csv(q.format.as_deref(), &headers)?;
    let (from, to) = range(q.from, q.to)?;
    let d = report::dossier(&state.db, id, from, to)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("reporting settings of point {id}")))?;
    Ok(if csv_out {
        csv(report::dossier_csv(&d), &format!("dossier-{id}.csv"))
    } else {
        Json(d).into_response()
    })
}

/// Checks an accepted slot's receipt with the DGA's GET endpoint now and stores the outcome
/// (admin, operator): `ok`, `mismatch` (what differs; the `receipt_mismatch` alert opens) or
/// `unverified` (why the GET gave nothing usable).
#[utoipa::path(
    post,
    path = "/api/v1/compliance/points/{id}/slots/{slot}/verify",
    tag = "compliance",
    security(("bearer" = [])),
    params(
        ("id" = i64, Path, description = "Catchment point id"),
        ("slot" = DateTime<Utc>, Path, description = "The slot instant, RFC 3339"),
    ),
    responses(
        (status = 200, description = "The check, as stored", body = Verification),
        (status = 400, description = "The path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such slot", body = ErrorBody),
        (status = 409, description = "Not accepted with a receipt, or the point has no código de obra", body = ErrorBody),
        (status = 503, description = "No HTTPS client to reach the DGA", body = ErrorBody),
    ),
)]
pub(super) async fn verify_slot(
    State(state): State<ApiState>,
    Extension(dga): Extension<DgaHandle>,
    caller: Caller,
    ApiPath((id, at)): ApiPath<(String, String)>,
) -> Result<Json<Verification>, ApiError> {
    caller.require(Permission::ManageCompliance)?;
    let (id, at) = (point_id(&id)?, slot_at(&at)?);
    let Some(client) = dga.0 else {
        return Err(ApiError::Unavailable);
    };
    let v = verify::verify_slot(
        &state.db,
        client.as_ref(),
        id,
        at,
        &caller.user.email,
        Utc::now(),
    )
    .await?;
    tracing::info!(point = id, slot = %at, by = %caller.user.email, outcome = v.outcome.as_str(), "receipt checked");
    Ok(Json(v))
}
