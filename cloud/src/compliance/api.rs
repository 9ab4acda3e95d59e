//! The compliance API: settings (Centro de Control, per point, passwords), the audit, slots with
//! their exchanges, and a person's review of a held slot. Any role reads; admins and operators
//! change; no route ever answers a password.

use super::Keyring;
use super::secret::Password;
use super::settings::{self, PointBody, PointView, SettingsBody, SettingsError};
use super::store::{self, AuditRow, Exchange, Settings, Slot, SlotState, StoreError};
use crate::core::api::{ApiError, ApiJson, ApiPath, ApiQuery, ApiState, ErrorBody};
use crate::core::auth::Permission;
use crate::core::openapi::{Forbidden, Unauthorized};
use crate::users::Caller;
use axum::extract::State;
use axum::http::StatusCode;
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
