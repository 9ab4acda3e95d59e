//! The access check every `/api/v1` route makes: [`Caller`], the account behind a request's
//! bearer token, loaded afresh for each request.

use super::account;
use crate::core::api::{ApiError, ApiState};
use crate::core::auth::Permission;
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
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let user = super::session::account_of(state, token).await?;
        Ok(Caller { user })
    }
}
