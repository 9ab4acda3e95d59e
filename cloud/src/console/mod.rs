//! Console: the operators' web pages, served by the cloud itself under `/` (the API stays under
//! `/api/v1`) wherever the `users` service runs (the `core` preset), so one machine needs
//! nothing else. Pages are rendered on the server (askama templates in `cloud/templates/console`)
//! and kept live with htmx; the scripts are vendored in `static/vendor` with their versions and
//! licences and served from the binary: no CDN, it works with no internet.
//!
//! Pages read through the same module functions the API uses, never through HTTP to itself,
//! and enforce the same roles. Signing in, the session cookie and CSRF are in [`session`];
//! the languages (Spanish by default, English) in [`i18n`].
//!
//! | page | what |
//! |---|---|
//! | `GET /login`, `POST /login`, `POST /logout` | signing in and out |
//! | `POST /lang` | the language switch |
//! | `GET /` | the fleet overview: every site, filtered and sorted, its rows live |
//! | `GET /fleet/rows` | the overview's rows (what the page fetches every 5 s) |
//! | `GET /sites/{site}?range=hour\|day\|week\|month\|year` | one site: status, devices, charts, events, completeness |
//! | `GET /alerts?state=open\|closed\|all&site=…`, `POST /alerts/{id}/close` | alerts; closing one with a note (the roles that manage catchment, as in the API) |
//! | `GET /compliance?month=YYYY-MM` | every reported obra's month: expected, accepted (late), held, failed, pending, not yet due |
//! | `GET /compliance/points/{id}?month=…`, `POST …/slots/{slot}/review` | one obra's slot grid by state, its held slots released or discarded with a note (admin, operator) |
//! | `GET /static/{file}` | the console's own stylesheet and the vendored scripts |
//!
//! Anatomy (ARCHITECTURE.md, the cloud): this file holds the routes and the static files; the
//! handlers are in `pages` (the compliance pages' in `compliance_page`), what the overview
//! reads in `fleet`, what a site page reads in `site_page`.

mod compliance_page;
pub mod fleet;
pub mod i18n;
mod pages;
pub mod session;
mod site_page;

use crate::core::api::ApiState;
use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

/// What every console handler has: the API's state (database, token keys, auth metrics) and
/// the cookie policy.
#[derive(Clone, Debug)]
pub struct Console {
    pub api: ApiState,
    /// `http.secure_cookies`: `Some(true)` always marks cookies `Secure`, `Some(false)` never
    /// (plain HTTP on a trusted network), `None` when the request came over HTTPS as a proxy
    /// says (`X-Forwarded-Proto: https`).
    pub secure_cookies: Option<bool>,
    /// The overview's DGA figures, shared by every request of this process.
    pub dga: std::sync::Arc<fleet::DgaFigures>,
}

impl Console {
    /// Whether the cookies set in answer to this request are `Secure`.
    pub fn secure(&self, headers: &HeaderMap) -> bool {
        self.secure_cookies.unwrap_or_else(|| {
            headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|p| p.eq_ignore_ascii_case("https"))
        })
    }
}

/// The console's routes.
pub fn routes(console: Console) -> Router {
    Router::new()
        .route("/", get(pages::fleet))
        .route("/fleet/rows", get(pages::fleet_live))
        .route("/sites/{site}", get(pages::site))
        .route("/alerts", get(pages::alerts))
        .route("/alerts/{id}/close", post(pages::close_alert))
        .route("/compliance", get(compliance_page::month))
        .route("/compliance/points/{id}", get(compliance_page::point))
        .route(
            "/compliance/points/{id}/slots/{slot}/review",
            post(compliance_page::review),
        )
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/lang", post(pages::set_lang))
        .route("/static/{file}", get(static_file))
        .with_state(console)
}

/// A file the console serves, built into the binary.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("static/console.css"),
    },
    Asset {
        name: "console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("static/console.js"),
    },
    Asset {
        name: "htmx-2.0.11.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("static/vendor/htmx-2.0.11.min.js"),
    },
    Asset {
        name: "uplot-1.6.32.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("static/vendor/uplot-1.6.32.min.js"),
    },
    Asset {
        name: "uplot-1.6.32.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("static/vendor/uplot-1.6.32.min.css"),
    },
];

async fn static_file(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == file) {
        Some(a) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(a.content_type),
                ),
                // Versioned names: a new version is a new name, so caching for a day is safe.
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=86400"),
                ),
            ],
            a.body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}
