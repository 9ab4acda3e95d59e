//! Catchment: the places water is taken from and what measures it. Catchment points (the
//! regulator's "obras", [`point`]), sites (one agent each, with its MQTT credential: [`site`],
//! [`credentials`]) and the devices of each site, linked to points ([`device`]); the validated
//! identifiers the DGA uses ([`obra`], [`rut`]) and the time it counts in ([`dga_time`]).
//!
//! Routes (every one takes a bearer token; see `users::Caller`):
//!
//! | route | who |
//! |---|---|
//! | `GET /api/v1/sites`, `GET /api/v1/sites/{site}` | any role |
//! | `POST /api/v1/sites`, `PATCH, DELETE /api/v1/sites/{site}`, `POST /api/v1/sites/{site}/credentials` | operator, technician, admin |
//! | `GET /api/v1/sites/{site}/public-key` | any role |
//! | `PUT /api/v1/sites/{site}/public-key` (enroll or rotate the site's key, [`site_key`]) | admin |
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
//!
//! Anatomy (ARCHITECTURE.md, the cloud): this file holds the routes; the handlers and their bodies
//! are in `api`; each store file ([`site`], [`point`], [`device`]) holds its table's SQL, and
//! other modules reach these tables only through its functions (the ingest's store reads a
//! site's `active` flag and current key inside its own transaction); [`credentials`] holds the
//! broker's login check, the module's background task.

mod api;
pub mod credentials;
pub mod device;
pub mod dga_time;
pub mod obra;
pub mod point;
pub mod rut;
pub mod site;
pub mod site_key;

use crate::core::api::ApiState;
use serde::{Deserialize, Deserializer};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use api::{CreatedSite, MqttCredentials, NewSite, SitePatch};

/// The catchment module's routes, with their OpenAPI paths.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(api::list_sites, api::create_site))
        .routes(routes!(
            api::get_site,
            api::update_site,
            api::deactivate_site
        ))
        .routes(routes!(api::rotate_credentials))
        .routes(routes!(api::get_public_keys, api::put_public_key))
        .routes(routes!(api::list_devices, api::create_device))
        .routes(routes!(
            api::get_device,
            api::update_device,
            api::deactivate_device
        ))
        .routes(routes!(api::list_points, api::create_point))
        .routes(routes!(
            api::get_point,
            api::update_point,
            api::deactivate_point
        ))
}

/// For `Option<Option<T>>` fields with `#[serde(default)]`: a present field is `Some`, so an
/// explicit `null` (clear it) differs from an absent field (leave it).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}
