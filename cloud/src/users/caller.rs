//! The access check every `/api/v1` route makes: [`Caller`], the account behind a request's
//! bearer token, loaded afresh for each request.

use super::account;
use crate::core::api::{ApiError, ApiState};
use crate::core::auth::{self, Permission};
use crate::core::metrics::ReasonLabels;
use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

/// The account making a request, authenticated by its bearer token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: account::User,
}

impl Caller {
    /// Refuses (403) when the caller's role does not allow `p`.
    pub fn require(&self, p: Permission) -> Result<(), ApiError> {
        if self.user.role.allows(p) {
            Ok(())
        } else {
            Err(ApiError::Forbidden {
                role: self.user.role,
                needed: p,
            })
        }
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let refuse = |reason: &str, message: &str| {
            state
                .auth_metrics
                .refused
                .get_or_create(&ReasonLabels::new(reason))
                .inc();
            ApiError::Unauthorized(message.to_string())
        };
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                refuse(
                    "missing",
                    "an Authorization: Bearer <token> header is required",
                )
            })?;
        let claims = state.keys.verify(token).map_err(|e| match e {
            auth::TokenError::Expired => refuse("expired", "token has expired; sign in again"),
            auth::TokenError::Invalid(_) => refuse("invalid", "token is not valid"),
        })?;
        let user = account::get(&state.db, claims.sub)
            .await
            .map_err(|e| ApiError::database("loading the caller's account", &e))?;
        match user {
            Some(u) if u.active && u.session_version == claims.sv => Ok(Caller { user: u }),
            Some(u) if !u.active => Err(refuse("revoked", "account is deactivated")),
            _ => Err(refuse("revoked", "session has ended; sign in again")),
        }
    }
}
