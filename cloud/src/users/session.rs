//! Sessions: checking an email and password and issuing the session token, and turning a token
//! back into its account. The API (bearer token) and the console (session cookie) share both,
//! so a login is judged, counted and revoked the same way wherever it comes from.
//!
//! **Rule**: a token names an account and its session version; it is honoured only while the
//! account is active and its session version unchanged (a new password, a role change or a
//! deactivation ends every session at the next request).

use super::account::{self, User};
use super::throttle::ClientAddr;
use crate::core::api::{ApiError, ApiState};
use crate::core::auth;
use crate::core::config::Secret;
use crate::core::metrics::{KindLabels, ReasonLabels};
use chrono::{DateTime, Utc};

/// A hash that matches no password, checked when the email is unknown so that an unknown
/// account costs the same time as a wrong password.
fn dummy_hash() -> String {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY
        .get_or_init(|| {
            let mut pw = [0u8; 24];
            argon2::password_hash::rand_core::RngCore::fill_bytes(
                &mut argon2::password_hash::rand_core::OsRng,
                &mut pw,
            );
            let pw: String = pw.iter().map(|b| format!("{b:02x}")).collect();
            auth::hash_password(&Secret::new(pw)).unwrap_or_default()
        })
        .clone()
}

/// Checks `email` and `password`; on success returns the account and a session token with its
/// expiry. Every attempt is counted by outcome (`caudal_cloud_auth_logins_total{kind}`).
///
/// The limits of [`throttle`](super::throttle) come first, before anything is hashed: the
/// attempt counts against `from`, a closed account or address answers `429`, and no free
/// password check within `auth.login_wait_s` answers `503`, all with `Retry-After`.
pub async fn sign_in(
    state: &ApiState,
    email: &str,
    password: Secret,
    from: &ClientAddr,
) -> Result<(User, String, DateTime<Utc>), ApiError> {
    let count = |kind: &str| {
        state
            .auth_metrics
            .logins
            .get_or_create(&KindLabels::new(kind))
            .inc();
    };
    let throttled = |t: super::throttle::Throttled| {
        count(t.kind());
        tracing::info!(reason = %t, "login not tried");
        ApiError::Throttled(t)
    };
    let guard = &state.logins;
    guard
        .admit(guard.address_of(from), email)
        .map_err(throttled)?;
    let found = account::by_email(&state.db, email).await?;
    let stored = found.as_ref().map(|(_, h)| h.clone());
    let matches = guard
        .check(move || {
            let hash = stored.unwrap_or_else(dummy_hash);
            auth::verify_password_reusing(&password, &hash)
        })
        .await
        .map_err(throttled)?
        .ok_or_else(|| ApiError::corrupt("checking a password", &"the check's thread ended"))?;
    guard.checked(email, matches);
    let user = match found {
        Some((u, _)) if matches && u.active => u,
        Some((u, _)) if matches && !u.active => {
            count("inactive");
            return Err(ApiError::Unauthorized("account is deactivated".into()));
        }
        _ => {
            count("wrong_credentials");
            return Err(ApiError::Unauthorized("email or password is wrong".into()));
        }
    };
    let (token, expires_at) = state
        .keys
        .issue(user.id, user.session_version, user.role, Utc::now())
        .map_err(|e| ApiError::corrupt("signing a token", &e))?;
    count("ok");
    tracing::info!(user = user.id, role = %user.role, "signed in");
    Ok((user, token, expires_at))
}

/// The active account a session token stands for; refusals are counted by reason
/// (`caudal_cloud_auth_refused_total{reason}`: `missing`, `expired`, `invalid`, `revoked`).
pub async fn account_of(state: &ApiState, token: Option<&str>) -> Result<User, ApiError> {
    let refuse = |reason: &str, message: &str| {
        state
            .auth_metrics
            .refused
            .get_or_create(&ReasonLabels::new(reason))
            .inc();
        ApiError::Unauthorized(message.to_string())
    };
    let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
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
        Some(u) if u.active && u.session_version == claims.sv => Ok(u),
        Some(u) if !u.active => Err(refuse("revoked", "account is deactivated")),
        _ => Err(refuse("revoked", "session has ended; sign in again")),
    }
}
