//! The OpenAPI document of the HTTP API, served at `GET /api/v1/openapi.json` without a token.
//!
//! Routes are registered with `utoipa_axum::routes!`, which adds the handler's
//! `#[utoipa::path]` to the document as it adds the route to the router, so a route served
//! through it is documented by construction. Each module returns an `OpenApiRouter` from its
//! `routes()`; [`document`] completes the merged document with what every route shares (title,
//! the bearer scheme, the error body). What the routes' annotations would otherwise repeat is
//! defined once here: the [`Unauthorized`], [`Forbidden`] and [`SiteNotFound`] answers and the
//! [`SitePath`] and [`DevicePath`] parameters.

use crate::core::api::ErrorBody;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// Where the document is served.
pub const PATH: &str = "/api/v1/openapi.json";

/// The name of the bearer-token scheme routes refer to in `security(("bearer" = []))`.
pub const BEARER: &str = "bearer";

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "The token from POST /api/v1/auth/login, as `Authorization: Bearer <token>`",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Caudal cloud API",
        description = "Sites, accounts and water-extraction telemetry. Every /api/v1 route except \
                       login and this document needs a bearer token. Errors are JSON \
                       (`ErrorBody`): bad input is a 400 naming the field.",
    ),
    paths(openapi_json),
    components(schemas(ErrorBody)),
    modifiers(&BearerScheme),
)]
struct Base;

/// The 401 of every route behind a bearer token (`responses(Unauthorized, …)`).
#[derive(utoipa::IntoResponses)]
#[response(status = 401, description = "No valid bearer token")]
pub struct Unauthorized(pub ErrorBody);

/// The 403 of every route a role may be refused.
#[derive(utoipa::IntoResponses)]
#[response(status = 403, description = "The role may not do this")]
pub struct Forbidden(pub ErrorBody);

/// The 404 of a route under `/api/v1/sites/{site}` when the site is not registered.
#[derive(utoipa::IntoResponses)]
#[response(status = 404, description = "No such site")]
pub struct SiteNotFound(pub ErrorBody);

/// The `{site}` segment of a route's path (`params(SitePath, …)`).
#[derive(utoipa::IntoParams)]
#[into_params(names("site"), parameter_in = Path)]
pub struct SitePath(
    /// Site id
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub String,
);

/// The `{site}` and `{device}` segments of a route's path.
#[derive(utoipa::IntoParams)]
#[into_params(names("site", "device"), parameter_in = Path)]
pub struct DevicePath(
    /// Site id
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub String,
    /// Device id
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub String,
);

/// The full document: the routes' paths merged into the shared parts.
pub fn document(paths: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    let mut doc = Base::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.merge(paths);
    doc
}

/// The document itself.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "core",
    responses((status = 200, description = "This OpenAPI document", content_type = "application/json")),
)]
async fn openapi_json(State(doc): State<Arc<String>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.as_str().to_owned(),
    )
        .into_response()
}

/// `GET /api/v1/openapi.json`, serving `doc` (serialized once).
pub fn routes(doc: &utoipa::openapi::OpenApi) -> Router {
    // The document is plain data (strings, maps, numbers): it always serializes.
    let json = serde_json::to_string(doc).unwrap_or_default();
    Router::new()
        .route(PATH, get(openapi_json))
        .with_state(Arc::new(json))
}
