//! Catchment: the places water is taken from and what measures it. Catchment points (the
//! regulator's "obras", [`point`]), sites (one agent each, with its MQTT credential: [`site`],
//! [`credentials`]) and the devices of each site, linked to points ([`device`]); the validated
//! identifiers the DGA uses ([`obra`], [`rut`]).
//!
//! Routes (every one takes a bearer token; see `users::Caller`):
//!
//! | route | who |
//! |---|---|
//! | `GET /api/v1/sites`, `GET /api/v1/sites/{site}` | any role |
//! | `POST /api/v1/sites`, `PATCH, DELETE /api/v1/sites/{site}`, `POST /api/v1/sites/{site}/credentials` | operator, technician, admin |
//! | `GET /api/v1/sites/{site}/devices`, `GET …/devices/{device}` | any role |
//! | `POST /api/v1/sites/{site}/devices`, `PATCH, DELETE …/devices/{device}` | operator, technician, admin |
//! | `GET /api/v1/points`, `GET /api/v1/points/{id}` | any role |
//! | `POST /api/v1/points`, `PATCH, DELETE /api/v1/points/{id}` | operator, technician, admin |
//!
//! `DELETE` deactivates: sites, points and devices are never removed, so their history stays.
//! Handlers take their JSON body as a `Result` and check the role first, so a role that may not
//! change anything gets 403 whatever body it sends.
//! Creating a site and rotating its credential answer the MQTT password, once; only its hash is
//! stored.

pub mod credentials;
pub mod device;
pub mod obra;
pub mod point;
pub mod rut;
pub mod site;

use crate::core::api::{ApiError, ApiJson, ApiState, ErrorBody};
use crate::core::auth::Permission;
use crate::users::Caller;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use caudal_common::{DeviceId, SiteId};
use device::{Device, DeviceError, DevicePatch, NewDevice};
use point::{NewPoint, Point, PointError, PointPatch};
use serde::{Deserialize, Deserializer, Serialize};
use site::{Site, SiteError};
use utoipa_axum::router::OpenApiRouter;

/// The catchment module's routes.
pub fn routes() -> OpenApiRouter<ApiState> {
    let router: Router<ApiState> = Router::new()
        .route("/api/v1/sites", get(list_sites).post(create_site))
        .route(
            "/api/v1/sites/{site}",
            get(get_site).patch(update_site).delete(deactivate_site),
        )
        .route("/api/v1/sites/{site}/credentials", post(rotate_credentials))
        .route(
            "/api/v1/sites/{site}/devices",
            get(list_devices).post(create_device),
        )
        .route(
            "/api/v1/sites/{site}/devices/{device}",
            get(get_device)
                .patch(update_device)
                .delete(deactivate_device),
        )
        .route("/api/v1/points", get(list_points).post(create_point))
        .route(
            "/api/v1/points/{id}",
            get(get_point).patch(update_point).delete(deactivate_point),
        );
    router.into()
}

/// For `Option<Option<T>>` fields with `#[serde(default)]`: a present field is `Some`, so an
/// explicit `null` (clear it) differs from an absent field (leave it).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSite {
    pub id: SiteId,
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_offline_after_s")]
    pub offline_after_s: u32,
}

fn default_offline_after_s() -> u32 {
    site::DEFAULT_OFFLINE_AFTER_S
}

/// A change to a site (the body of `PATCH /api/v1/sites/{site}`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SitePatch {
    pub name: Option<String>,
    pub active: Option<bool>,
    pub offline_after_s: Option<u32>,
}

/// An agent's MQTT login, answered once when it is issued.
#[derive(Debug, Clone, Serialize)]
pub struct MqttCredentials {
    /// The site id.
    pub mqtt_username: String,
    /// Shown only in this answer; only its hash is stored.
    pub mqtt_password: String,
}

/// The answer to `POST /api/v1/sites`: the site and its MQTT login.
#[derive(Debug, Clone, Serialize)]
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
        (status = 200, body = Vec<site::Site>),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    ),
)]
async fn list_sites(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<Site>>, ApiError> {
    caller.require(Permission::Read)?;
    Ok(Json(site::list(&state.db).await?))
}

async fn create_site(
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

async fn get_site(
    State(state): State<ApiState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<Site>, ApiError> {
    caller.require(Permission::Read)?;
    let id = site_id(&raw)?;
    site::get(&state.db, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("site {id}")))
}

async fn update_site(
    State(state): State<ApiState>,
    caller: Caller,
    Path(raw): Path<String>,
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

async fn deactivate_site(
    State(state): State<ApiState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let id = site_id(&raw)?;
    site::set_active(&state.db, &id, false).await?;
    tracing::info!(by = caller.user.id, site = %id, "site deactivated");
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate_credentials(
    State(state): State<ApiState>,
    caller: Caller,
    Path(raw): Path<String>,
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

async fn list_devices(
    State(state): State<ApiState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<Vec<Device>>, ApiError> {
    caller.require(Permission::Read)?;
    let site = site_id(&raw)?;
    Ok(Json(device::list(&state.db, &site).await?))
}

async fn create_device(
    State(state): State<ApiState>,
    caller: Caller,
    Path(raw): Path<String>,
    body: Result<ApiJson<NewDevice>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let ApiJson(req) = body?;
    let site = site_id(&raw)?;
    let d = device::create(&state.db, &site, &req).await?;
    tracing::info!(by = caller.user.id, site = %site, device = %d.id, "device registered");
    Ok((StatusCode::CREATED, Json(d)).into_response())
}

async fn get_device(
    State(state): State<ApiState>,
    caller: Caller,
    Path((raw_site, raw_device)): Path<(String, String)>,
) -> Result<Json<Device>, ApiError> {
    caller.require(Permission::Read)?;
    let site = site_id(&raw_site)?;
    let id = device_id(&raw_device)?;
    device::get(&state.db, &site, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("device {id} of site {site}")))
}

async fn update_device(
    State(state): State<ApiState>,
    caller: Caller,
    Path((raw_site, raw_device)): Path<(String, String)>,
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

async fn deactivate_device(
    State(state): State<ApiState>,
    caller: Caller,
    Path((raw_site, raw_device)): Path<(String, String)>,
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

async fn list_points(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<Point>>, ApiError> {
    caller.require(Permission::Read)?;
    Ok(Json(point::list(&state.db).await?))
}

async fn create_point(
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

async fn get_point(
    State(state): State<ApiState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Json<Point>, ApiError> {
    caller.require(Permission::Read)?;
    let id = point_id(&raw)?;
    point::get(&state.db, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("catchment point {id}")))
}

async fn update_point(
    State(state): State<ApiState>,
    caller: Caller,
    Path(raw): Path<String>,
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

async fn deactivate_point(
    State(state): State<ApiState>,
    caller: Caller,
    Path(raw): Path<String>,
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
