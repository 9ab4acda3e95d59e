//! Users: accounts, their roles and sessions, and the access check every API route makes.
//!
//! A session is a token from `POST /api/v1/auth/login` (see `core::auth`). [`Caller`] is the
//! extractor every other `/api/v1` route takes: it checks the bearer token, then loads the
//! account, so a deactivated account, a changed role or a new password take effect at the next
//! request. Routes:
//!
//! | route | who |
//! |---|---|
//! | `POST /api/v1/auth/login` | anyone with an account |
//! | `GET /api/v1/auth/me` | any role |
//! | `GET, POST /api/v1/users`, `GET, PATCH, DELETE /api/v1/users/{id}` | admin |
//!
//! `DELETE` deactivates (accounts are never removed). The last active admin cannot be demoted
//! or deactivated, so the deployment never locks itself out.
//!
//! Anatomy (ARCHITECTURE.md, the cloud): this file holds the routes; the handlers are in
//! `api`, the access check in `caller`, signing in and tokens in [`session`] (shared with the
//! console), what a login may cost in [`throttle`], the accounts' SQL in [`account`].

pub mod account;
mod api;
mod caller;
pub mod session;
pub mod throttle;

pub use caller::Caller;

use crate::core::api::ApiState;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The users module's routes, with their OpenAPI paths.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(api::login))
        .routes(routes!(api::me))
        .routes(routes!(api::list_users, api::create_user))
        .routes(routes!(
            api::get_user,
            api::update_user,
            api::deactivate_user
        ))
}
