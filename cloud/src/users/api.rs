//! The users API: signing in, the caller's own account, and the accounts an admin manages.

use super::Caller;
use super::account::{self, AccountError, Change, User};
use crate::core::api::{ApiError, ApiJson, ApiPath, ApiState, ErrorBody};
use crate::core::auth::{self, Permission, Role};
use crate::core::config::Secret;
use crate::core::openapi::{Forbidden, Unauthorized};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> ApiError {
        match e {
            AccountError::Email(m) => ApiError::bad("email", m),
            AccountError::Name => ApiError::bad("name", e.to_string()),
            AccountError::Exists(_) => ApiError::conflict("email", e.to_string()),
            AccountError::NotFound(id) => ApiError::NotFound(format!("account {id}")),
            AccountError::Corrupt { .. } => ApiError::corrupt("accounts", &e),
            AccountError::Database(_) => ApiError::database("accounts", &e),
        }
    }
}

fn password_error(e: auth::PasswordError) -> ApiError {
    match e {
        auth::PasswordError::Hash(_) => ApiError::corrupt("hashing a password", &e),
        other => ApiError::bad("password", other.to_string()),
    }
}

/// Hashes on a blocking thread: Argon2 takes tens of milliseconds of CPU by design.
async fn hash(password: Secret) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| ApiError::corrupt("hashing a password", &e))?
        .map_err(password_error)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginRequest {
    email: String,
    #[schema(value_type = String, format = Password)]
    password: Secret,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct LoginResponse {
    token: String,
    token_type: &'static str,
    expires_at: DateTime<Utc>,
    user: User,
}

/// Signs in: a bearer token for the other routes.
#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    tag = "users",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "A bearer token and the account", body = LoginResponse),
        (status = 400, description = "A field is missing or malformed", body = ErrorBody),
        (status = 401, description = "Wrong email or password, or a deactivated account", body = ErrorBody),
        (status = 429, description = "Too many logins from this address, or too many wrong passwords for this account; `Retry-After` says when to come back", body = ErrorBody),
        (status = 503, description = "Too many logins at once (`busy`, with `Retry-After`), or the database is unavailable", body = ErrorBody),
    ),
)]
pub(super) async fn login(
    State(state): State<ApiState>,
    from: super::throttle::ClientAddr,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    let (user, token, expires_at) =
        super::session::sign_in(&state, &req.email, req.password, &from).await?;
    Ok(Json(LoginResponse {
        token,
        token_type: "Bearer",
        expires_at,
        user,
    })
    .into_response())
}

/// The caller's account.
#[utoipa::path(
    get,
    path = "/api/v1/auth/me",
    tag = "users",
    security(("bearer" = [])),
    responses((status = 200, description = "The account", body = User), Unauthorized),
)]
pub(super) async fn me(caller: Caller) -> Json<User> {
    Json(caller.user)
}

fn user_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad("id", format!("{raw:?} is not an account id")))
}

/// Every account (admin).
#[utoipa::path(
    get,
    path = "/api/v1/users",
    tag = "users",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every account", body = Vec<User>),
        Unauthorized,
        Forbidden,
    ),
)]
pub(super) async fn list_users(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<User>>, ApiError> {
    caller.require(Permission::ManageUsers)?;
    Ok(Json(account::list(&state.db).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewUser {
    #[schema(format = Email, max_length = 254)]
    email: String,
    #[serde(default)]
    #[schema(max_length = 200)]
    name: String,
    role: Role,
    /// At least 10 characters, at most 1024 bytes.
    #[schema(value_type = String, format = Password, min_length = 10)]
    password: Secret,
}

/// Creates an account (admin).
#[utoipa::path(
    post,
    path = "/api/v1/users",
    tag = "users",
    security(("bearer" = [])),
    request_body = NewUser,
    responses(
        (status = 201, description = "Created: the account", body = User),
        (status = 400, description = "A field is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 409, description = "The email is taken", body = ErrorBody),
    ),
)]
pub(super) async fn create_user(
    State(state): State<ApiState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewUser>,
) -> Result<Response, ApiError> {
    caller.require(Permission::ManageUsers)?;
    account::normalize_email(&req.email)?;
    let hash = hash(req.password).await?;
    let u = account::create(&state.db, &req.email, &req.name, req.role, &hash).await?;
    tracing::info!(by = caller.user.id, user = u.id, role = %u.role, "account created");
    Ok((StatusCode::CREATED, Json(u)).into_response())
}

/// One account (admin).
#[utoipa::path(
    get,
    path = "/api/v1/users/{id}",
    tag = "users",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Account id")),
    responses(
        (status = 200, description = "The account", body = User),
        (status = 400, description = "A field, parameter or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such account", body = ErrorBody),
    ),
)]
pub(super) async fn get_user(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<User>, ApiError> {
    caller.require(Permission::ManageUsers)?;
    let id = user_id(&id)?;
    account::get(&state.db, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("account {id}")))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UserPatch {
    #[schema(max_length = 200)]
    name: Option<String>,
    role: Option<Role>,
    active: Option<bool>,
    /// At least 10 characters, at most 1024 bytes.
    #[schema(value_type = Option<String>, format = Password, min_length = 10)]
    password: Option<Secret>,
}

/// Refuses a change that would leave no active admin.
async fn keep_an_admin(state: &ApiState, id: i64, change: &Change) -> Result<(), ApiError> {
    let Some(before) = account::get(&state.db, id).await? else {
        return Err(ApiError::NotFound(format!("account {id}")));
    };
    let loses_admin = before.role == Role::Admin
        && before.active
        && (change.role.is_some_and(|r| r != Role::Admin) || change.active == Some(false));
    if loses_admin && account::active_admins(&state.db).await? <= 1 {
        let field = if change.active == Some(false) {
            "active"
        } else {
            "role"
        };
        return Err(ApiError::conflict(
            field,
            format!("account {id} is the last active admin"),
        ));
    }
    Ok(())
}

/// Changes an account (admin); a change of role, activity or password ends its sessions.
#[utoipa::path(
    patch,
    path = "/api/v1/users/{id}",
    tag = "users",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Account id")),
    request_body = UserPatch,
    responses(
        (status = 200, description = "The account", body = User),
        (status = 400, description = "A field, parameter or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "It would leave no active admin", body = ErrorBody),
    ),
)]
pub(super) async fn update_user(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UserPatch>,
) -> Result<Json<User>, ApiError> {
    caller.require(Permission::ManageUsers)?;
    let id = user_id(&id)?;
    let password_hash = match req.password {
        Some(p) => Some(hash(p).await?),
        None => None,
    };
    let change = Change {
        name: req.name,
        role: req.role,
        active: req.active,
        password_hash,
    };
    keep_an_admin(&state, id, &change).await?;
    let u = account::update(&state.db, id, &change).await?;
    tracing::info!(by = caller.user.id, user = id, role = %u.role, active = u.active, "account changed");
    Ok(Json(u))
}

/// Deactivates an account (admin); accounts are never removed.
#[utoipa::path(
    delete,
    path = "/api/v1/users/{id}",
    tag = "users",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Account id")),
    responses(
        (status = 204, description = "Deactivated"),
        (status = 400, description = "A field, parameter or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "It is the last active admin", body = ErrorBody),
    ),
)]
pub(super) async fn deactivate_user(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Permission::ManageUsers)?;
    let id = user_id(&id)?;
    let change = Change {
        active: Some(false),
        ..Change::default()
    };
    keep_an_admin(&state, id, &change).await?;
    account::update(&state.db, id, &change).await?;
    tracing::info!(by = caller.user.id, user = id, "account deactivated");
    Ok(StatusCode::NO_CONTENT)
}
