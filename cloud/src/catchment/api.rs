//! The catchment API: handlers for sites (and their MQTT credentials), devices and catchment
//! points, their bodies, and how the stores' errors become HTTP answers.

use super::credentials;
use super::device::{self, Device, DeviceError, DevicePatch, NewDevice};
use super::point::{self, NewPoint, Point, PointError, PointPatch};
use super::site::{self, Site, SiteError};
use super::site_key::{self, SiteKey, SiteKeyError};
use crate::core::api::{ApiError, ApiJson, ApiPath, ApiState, ErrorBody};
use crate::core::auth::Permission;
use crate::core::openapi::{DevicePath, Forbidden, SiteNotFound, SitePath, Unauthorized};
use crate::users::Caller;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use caudal_common::signed::PublicKey;
use caudal_common::{DeviceId, SiteId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

impl From<SiteError> for ApiError {
    fn from(e: SiteError) -> ApiError {
        match e {
            SiteError::Exists(_) => ApiError::conflict("id", e.to_string()),
            SiteError::NotFound(id) => ApiError::NotFound(format!("site {id}")),
            SiteError::Name => ApiError::bad("name", e.to_string()),
            SiteError::OfflineAfter => ApiError::bad("offline_after_s", "must be at least 1"),
            SiteError::Corrupt { .. } => ApiError::corrupt("sites", &e),
            SiteError::Database(_) => ApiError::database("sites", &e),
        }
    }
}

impl From<PointError> for ApiError {
    fn from(e: PointError) -> ApiError {
        match e {
            PointError::Invalid { field, message } => ApiError::bad(field, message),
            PointError::ObraExists(_) => ApiError::conflict("obra_code", e.to_string()),
            PointError::NotFound(id) => ApiError::NotFound(format!("catchment point {id}")),
            PointError::Corrupt { .. } => ApiError::corrupt("catchment points", &e),
            PointError::Database(_) => ApiError::database("catchment points", &e),
        }
    }
}

impl From<DeviceError> for ApiError {
    fn from(e: DeviceError) -> ApiError {
        match e {
            DeviceError::Invalid { field, message } => ApiError::bad(field, message),
            DeviceError::SiteNotFound(site) => ApiError::NotFound(format!("site {site}")),
            DeviceError::PointNotFound(_) => ApiError::bad("point_id", e.to_string()),
            DeviceError::PointInactive(_) => ApiError::conflict("point_id", e.to_string()),
            DeviceError::Exists { .. } => ApiError::conflict("id", e.to_string()),
            DeviceError::NotFound { site, device } => {
                ApiError::NotFound(format!("device {device} of site {site}"))
            }
            DeviceError::Corrupt { .. } => ApiError::corrupt("devices", &e),
            DeviceError::Database(_) => ApiError::database("devices", &e),
        }
    }
}

fn site_id(raw: &str) -> Result<SiteId, ApiError> {
    SiteId::new(raw).map_err(|e| ApiError::bad("site", e.to_string()))
}

fn device_id(raw: &str) -> Result<DeviceId, ApiError> {
    DeviceId::new(raw).map_err(|e| ApiError::bad("device", e.to_string()))
}

fn point_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad("id", format!("{raw:?} is not a catchment point id")))
}

/// A site to register (the body of `POST /api/v1/sites`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSite {
    /// The agent's site id, which is also its MQTT username.
    #[schema(value_type = String, pattern = "^[A-Za-z0-9._-]{1,64}$", example = "pozo-norte")]
    pub id: SiteId,
    /// At most 200 characters.
    #[serde(default)]
    #[schema(max_length = 200)]
    pub name: String,
    /// Seconds without news after which the site counts as offline; at least 1.
    #[serde(default = "default_offline_after_s")]
    #[schema(default = 900, format = Int64, minimum = 1, maximum = 4294967295_u32)]
    pub offline_after_s: u32,
}

fn default_offline_after_s() -> u32 {
    site::DEFAULT_OFFLINE_AFTER_S
}

/// A change to a site (the body of `PATCH /api/v1/sites/{site}`): an absent or `null` field stays
/// as it is.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SitePatch {
    #[schema(max_length = 200)]
    pub name: Option<String>,
    pub active: Option<bool>,
    #[schema(format = Int64, minimum = 1, maximum = 4294967295_u32)]
    pub offline_after_s: Option<u32>,
}

/// An agent's MQTT login, answered once when it is issued.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MqttCredentials {
    /// The site id.
    pub mqtt_username: String,
    /// Shown only in this answer; only its hash is stored.
    pub mqtt_password: String,
}

/// The answer to `POST /api/v1/sites`: the site and its MQTT login.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreatedSite {
    #[serde(flatten)]
    pub site: Site,
    #[serde(flatten)]
    pub credentials: MqttCredentials,
}

/// A response carrying a secret: caches must not keep it.
fn secret_response(status: StatusCode, body: impl Serialize) -> Response {
    let mut r = (status, Json(body)).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Every registered site.
#[utoipa::path(
    get,
    path = "/api/v1/sites",
    tag = "catchment",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every site", body = Vec<site::Site>),
        Unauthorized,
    ),
)]
pub(super) async fn list_sites(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<Site>>, ApiError> {
    caller.require(Permission::Read)?;
    Ok(Json(site::list(&state.db).await?))
}

/// Registers a site and issues its agent's MQTT login; the password is in this answer
/// only (operator, technician, admin).
#[utoipa::path(
    post,
    path = "/api/v1/sites",
    tag = "catchment",
    security(("bearer" = [])),
    request_body = NewSite,
    responses(
        (status = 201, description = "Registered: the site and its agent's MQTT login", body = CreatedSite, headers(("Cache-Control" = String, description = "`no-store`: the answer carries a secret"))),
        (status = 400, description = "A field or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 409, description = "The site id is taken", body = ErrorBody),
    ),
)]
pub(super) async fn create_site(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<ApiJson<NewSite>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let ApiJson(req) = body?;
    let issued = credentials::issue();
    let s = site::create(
        &state.db,
        &req.id,
        &req.name,
        req.offline_after_s,
        Some(&issued.hash),
    )
    .await?;
    tracing::info!(by = caller.user.id, site = %s.id, "site registered");
    let credentials = MqttCredentials {
        mqtt_username: s.id.to_string(),
        mqtt_password: issued.password.expose().to_string(),
    };
    Ok(secret_response(
        StatusCode::CREATED,
        CreatedSite {
            site: s,
            credentials,
        },
    ))
}

/// One site.
#[utoipa::path(
    get,
    path = "/api/v1/sites/{site}",
    tag = "catchment",
    security(("bearer" = [])),
    params(SitePath),
    responses(
        (status = 200, description = "The site", body = Site),
        (status = 400, description = "The path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        SiteNotFound,
    ),
)]
pub(super) async fn get_site(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Site>, ApiError> {
    caller.require(Permission::Read)?;
    let id = site_id(&raw)?;
    site::get(&state.db, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("site {id}")))
}

/// Changes a site; an absent field stays as it is (operator, technician, admin).
#[utoipa::path(
    patch,
    path = "/api/v1/sites/{site}",
    tag = "catchment",
    security(("bearer" = [])),
    params(SitePath),
    request_body = SitePatch,
    responses(
        (status = 200, description = "The site", body = Site),
        (status = 400, description = "A field or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        SiteNotFound,
    ),
)]
pub(super) async fn update_site(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
    body: Result<ApiJson<SitePatch>, ApiError>,
) -> Result<Json<Site>, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let ApiJson(req) = body?;
    let id = site_id(&raw)?;
    let change = site::Change {
        name: req.name,
        active: req.active,
        offline_after_s: req.offline_after_s,
    };
    let s = site::update(&state.db, &id, &change).await?;
    tracing::info!(by = caller.user.id, site = %id, active = s.active, "site changed");
    Ok(Json(s))
}

/// Deactivates a site: its batches are refused and its agent can no longer log in; sites are
/// never removed (operator, technician, admin).
#[utoipa::path(
    delete,
    path = "/api/v1/sites/{site}",
    tag = "catchment",
    security(("bearer" = [])),
    params(SitePath),
    responses(
        (status = 204, description = "Deactivated"),
        (status = 400, description = "The path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        SiteNotFound,
    ),
)]
pub(super) async fn deactivate_site(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let id = site_id(&raw)?;
    site::set_active(&state.db, &id, false).await?;
    tracing::info!(by = caller.user.id, site = %id, "site deactivated");
    Ok(StatusCode::NO_CONTENT)
}

/// Issues a new MQTT password for the site's agent, replacing the old one; the password is in
/// this answer only (operator, technician, admin).
#[utoipa::path(
    post,
    path = "/api/v1/sites/{site}/credentials",
    tag = "catchment",
    security(("bearer" = [])),
    params(SitePath),
    responses(
        (status = 200, description = "The site's new MQTT login", body = MqttCredentials, headers(("Cache-Control" = String, description = "`no-store`: the answer carries a secret"))),
        (status = 400, description = "The path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        SiteNotFound,
    ),
)]
pub(super) async fn rotate_credentials(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
) -> Result<Response, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let id = site_id(&raw)?;
    let issued = credentials::issue();
    site::set_password_hash(&state.db, &id, &issued.hash).await?;
    tracing::info!(by = caller.user.id, site = %id, "site MQTT credential issued");
    Ok(secret_response(
        StatusCode::OK,
        MqttCredentials {
            mqtt_username: id.to_string(),
            mqtt_password: issued.password.expose().to_string(),
        },
    ))
}

/// A site's new public key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPublicKey {
    /// Base64 of the agent's 32-byte Ed25519 public key (`caudal-agent identity`).
    pub public_key: String,
}

/// Every key a site has had, oldest first; the one without `valid_to` is current.
#[derive(Debug, Serialize, ToSchema)]
pub struct SiteKeys {
    pub keys: Vec<SiteKey>,
}

impl From<SiteKeyError> for ApiError {
    fn from(e: SiteKeyError) -> Self {
        match &e {
            SiteKeyError::NotFound(id) => ApiError::NotFound(format!("site {id}")),
            SiteKeyError::Reused { .. } => ApiError::conflict("public_key", e.to_string()),
            SiteKeyError::Database(_) => ApiError::database("site keys", &e),
        }
    }
}

/// Enrolls the site's public key, or rotates it: from now on its batches are accepted only
/// signed with this key; batches stored before keep verifying with the previous one (admin).
#[utoipa::path(
    put,
    path = "/api/v1/sites/{site}/public-key",
    tag = "catchment",
    security(("bearer" = [])),
    params(SitePath),
    request_body = NewPublicKey,
    responses(
        (status = 200, description = "The site's keys after the change", body = SiteKeys),
        (status = 400, description = "The key is not a base64 Ed25519 public key", body = ErrorBody),
        (status = 409, description = "The key was the site's before and was rotated away", body = ErrorBody),
        Unauthorized,
        Forbidden,
        SiteNotFound,
    ),
)]
pub(super) async fn put_public_key(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
    body: Result<ApiJson<NewPublicKey>, ApiError>,
) -> Result<Json<SiteKeys>, ApiError> {
    caller.require(Permission::ManageKeys)?;
    let id = site_id(&raw)?;
    let ApiJson(body) = body?;
    let key: PublicKey =
        body.public_key
            .parse()
            .map_err(|e: caudal_common::signed::SignedError| {
                ApiError::bad("public_key", e.to_string())
            })?;
    if site_key::enroll(&state.db, &id, &key, chrono::Utc::now()).await? {
        tracing::warn!(by = caller.user.id, site = %id, public_key = %key, "site public key enrolled");
    }
    Ok(Json(SiteKeys {
        keys: site_key::keys(&state.db, &id).await?,
    }))
}

/// Every public key the site has had (any role).
#[utoipa::path(
    get,
    path = "/api/v1/sites/{site}/public-key",
    tag = "catchment",
    security(("bearer" = [])),
    params(SitePath),
    responses(
        (status = 200, description = "The site's keys", body = SiteKeys),
        (status = 400, description = "The path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        SiteNotFound,
    ),
)]
pub(super) async fn get_public_keys(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<SiteKeys>, ApiError> {
    caller.require(Permission::Read)?;
    let id = site_id(&raw)?;
    if site::get(&state.db, &id).await?.is_none() {
        return Err(ApiError::NotFound(format!("site {id}")));
    }
    Ok(Json(SiteKeys {
        keys: site_key::keys(&state.db, &id).await?,
    }))
}

/// The devices of a site.
#[utoipa::path(
    get,
    path = "/api/v1/sites/{site}/devices",
    tag = "catchment",
    security(("bearer" = [])),
    params(SitePath),
    responses(
        (status = 200, description = "The site's devices", body = Vec<Device>),
        (status = 400, description = "The path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        SiteNotFound,
    ),
)]
pub(super) async fn list_devices(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Vec<Device>>, ApiError> {
    caller.require(Permission::Read)?;
    let site = site_id(&raw)?;
    Ok(Json(device::list(&state.db, &site).await?))
}

/// Registers a device of a site (operator, technician, admin).
#[utoipa::path(
    post,
    path = "/api/v1/sites/{site}/devices",
    tag = "catchment",
    security(("bearer" = [])),
    params(SitePath),
    request_body = NewDevice,
    responses(
        (status = 201, description = "Registered: the device", body = Device),
        (status = 400, description = "A field or the path is wrong, or `point_id` names no point; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        SiteNotFound,
        (status = 409, description = "The device id is taken on this site, or the point is inactive", body = ErrorBody),
    ),
)]
pub(super) async fn create_device(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
    body: Result<ApiJson<NewDevice>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let ApiJson(req) = body?;
    let site = site_id(&raw)?;
    let d = device::create(&state.db, &site, &req).await?;
    tracing::info!(by = caller.user.id, site = %site, device = %d.id, "device registered");
    Ok((StatusCode::CREATED, Json(d)).into_response())
}

/// One device of a site.
#[utoipa::path(
    get,
    path = "/api/v1/sites/{site}/devices/{device}",
    tag = "catchment",
    security(("bearer" = [])),
    params(DevicePath),
    responses(
        (status = 200, description = "The device", body = Device),
        (status = 400, description = "The path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        (status = 404, description = "No such device on this site", body = ErrorBody),
    ),
)]
pub(super) async fn get_device(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((raw_site, raw_device)): ApiPath<(String, String)>,
) -> Result<Json<Device>, ApiError> {
    caller.require(Permission::Read)?;
    let site = site_id(&raw_site)?;
    let id = device_id(&raw_device)?;
    device::get(&state.db, &site, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("device {id} of site {site}")))
}

/// Changes a device; an absent field stays as it is, `"point_id": null` unlinks it from its
/// point (operator, technician, admin).
#[utoipa::path(
    patch,
    path = "/api/v1/sites/{site}/devices/{device}",
    tag = "catchment",
    security(("bearer" = [])),
    params(DevicePath),
    request_body = DevicePatch,
    responses(
        (status = 200, description = "The device", body = Device),
        (status = 400, description = "A field or the path is wrong, or `point_id` names no point; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such device on this site", body = ErrorBody),
        (status = 409, description = "The point is inactive", body = ErrorBody),
    ),
)]
pub(super) async fn update_device(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((raw_site, raw_device)): ApiPath<(String, String)>,
    body: Result<ApiJson<DevicePatch>, ApiError>,
) -> Result<Json<Device>, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let ApiJson(req) = body?;
    let site = site_id(&raw_site)?;
    let id = device_id(&raw_device)?;
    let d = device::update(&state.db, &site, &id, &req).await?;
    tracing::info!(by = caller.user.id, site = %site, device = %id, "device changed");
    Ok(Json(d))
}

/// Deactivates a device; devices are never removed (operator, technician, admin).
#[utoipa::path(
    delete,
    path = "/api/v1/sites/{site}/devices/{device}",
    tag = "catchment",
    security(("bearer" = [])),
    params(DevicePath),
    responses(
        (status = 204, description = "Deactivated"),
        (status = 400, description = "The path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such device on this site", body = ErrorBody),
    ),
)]
pub(super) async fn deactivate_device(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((raw_site, raw_device)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let site = site_id(&raw_site)?;
    let id = device_id(&raw_device)?;
    let patch = DevicePatch {
        active: Some(false),
        ..DevicePatch::default()
    };
    device::update(&state.db, &site, &id, &patch).await?;
    tracing::info!(by = caller.user.id, site = %site, device = %id, "device deactivated");
    Ok(StatusCode::NO_CONTENT)
}

/// Every catchment point.
#[utoipa::path(
    get,
    path = "/api/v1/points",
    tag = "catchment",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every catchment point", body = Vec<Point>),
        Unauthorized,
    ),
)]
pub(super) async fn list_points(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<Point>>, ApiError> {
    caller.require(Permission::Read)?;
    Ok(Json(point::list(&state.db).await?))
}

/// Creates a catchment point (operator, technician, admin).
#[utoipa::path(
    post,
    path = "/api/v1/points",
    tag = "catchment",
    security(("bearer" = [])),
    request_body = NewPoint,
    responses(
        (status = 201, description = "Created: the catchment point", body = Point),
        (status = 400, description = "A field or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 409, description = "The obra code belongs to another point", body = ErrorBody),
    ),
)]
pub(super) async fn create_point(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<ApiJson<NewPoint>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let ApiJson(req) = body?;
    let p = point::create(&state.db, &req).await?;
    tracing::info!(by = caller.user.id, point = p.id, obra = ?p.obra_code, "catchment point created");
    Ok((StatusCode::CREATED, Json(p)).into_response())
}

/// One catchment point.
#[utoipa::path(
    get,
    path = "/api/v1/points/{id}",
    tag = "catchment",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Catchment point id")),
    responses(
        (status = 200, description = "The catchment point", body = Point),
        (status = 400, description = "The path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        (status = 404, description = "No such catchment point", body = ErrorBody),
    ),
)]
pub(super) async fn get_point(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
) -> Result<Json<Point>, ApiError> {
    caller.require(Permission::Read)?;
    let id = point_id(&raw)?;
    point::get(&state.db, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("catchment point {id}")))
}

/// Changes a catchment point; an absent field stays as it is, `null` clears an optional one
/// (operator, technician, admin).
#[utoipa::path(
    patch,
    path = "/api/v1/points/{id}",
    tag = "catchment",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Catchment point id")),
    request_body = PointPatch,
    responses(
        (status = 200, description = "The catchment point", body = Point),
        (status = 400, description = "A field or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such catchment point", body = ErrorBody),
        (status = 409, description = "The obra code belongs to another point", body = ErrorBody),
    ),
)]
pub(super) async fn update_point(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
    body: Result<ApiJson<PointPatch>, ApiError>,
) -> Result<Json<Point>, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let ApiJson(req) = body?;
    let id = point_id(&raw)?;
    let p = point::update(&state.db, id, req).await?;
    tracing::info!(
        by = caller.user.id,
        point = id,
        active = p.active,
        "catchment point changed"
    );
    Ok(Json(p))
}

/// Deactivates a catchment point; points are never removed, so measurements declared against
/// it stay attributable (operator, technician, admin).
#[utoipa::path(
    delete,
    path = "/api/v1/points/{id}",
    tag = "catchment",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Catchment point id")),
    responses(
        (status = 204, description = "Deactivated"),
        (status = 400, description = "The path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such catchment point", body = ErrorBody),
    ),
)]
pub(super) async fn deactivate_point(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(raw): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let id = point_id(&raw)?;
    let patch = PointPatch {
        active: Some(false),
        ..PointPatch::default()
    };
    point::update(&state.db, id, patch).await?;
    tracing::info!(
        by = caller.user.id,
        point = id,
        "catchment point deactivated"
    );
    Ok(StatusCode::NO_CONTENT)
}
