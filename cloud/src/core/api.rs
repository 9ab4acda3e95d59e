//! What every module's API routes share: the state they run with ([`ApiState`]), the error type
//! that maps to an HTTP status and a JSON body without leaking internals ([`ApiError`]), and
//! extractors whose rejections name the offending field ([`ApiJson`], [`ApiQuery`]).
//!
//! Error bodies are `{"error": "<code>", "field": "<field or null>", "message": "<reason>"}`.
//! Bad input is always a 4xx naming the field; a database failure is a 503 whose details go to
//! the log, never to the caller.

use crate::core::auth::{AuthMetrics, Permission, Role, TokenKeys};
use crate::core::db::Db;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// State of every `/api/v1` route.
#[derive(Clone, Debug)]
pub struct ApiState {
    pub db: Db,
    pub keys: Arc<TokenKeys>,
    pub auth_metrics: AuthMetrics,
}

/// An API failure, as the caller sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: a field of the body, query or path is wrong.
    #[error("{field}: {message}")]
    BadRequest { field: String, message: String },
    /// 401: no valid credentials (missing, expired or forged token; wrong password).
    #[error("{0}")]
    Unauthorized(String),
    /// 403: authenticated, but the role does not allow the action.
    #[error("role {role} may not {needed}")]
    Forbidden { role: Role, needed: Permission },
    /// 404: the named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// 409: the request conflicts with what is stored (duplicate, still referenced, last admin).
    #[error("{message}")]
    Conflict {
        field: Option<String>,
        message: String,
    },
    /// 503: the database failed; the cause was logged.
    #[error("the database is unavailable; try again")]
    Unavailable,
    /// 500: stored data could not be read back; the cause was logged.
    #[error("internal error; see the server log")]
    Internal,
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// `bad_request`, `unauthorized`, `forbidden`, `not_found`, `conflict`, `unavailable` or
    /// `internal`.
    #[schema(example = "bad_request")]
    pub error: String,
    /// The field, parameter or path segment at fault, when one is.
    #[schema(example = "from")]
    pub field: Option<String>,
    pub message: String,
}

impl ApiError {
    /// A 400 naming `field`.
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A 409 naming `field`.
    pub fn conflict(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::Conflict {
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    /// Logs a database failure and hides it behind a 503.
    pub fn database(what: &str, e: &dyn std::fmt::Display) -> ApiError {
        tracing::warn!(error = %e, "{what} failed");
        ApiError::Unavailable
    }

    /// Logs stored data that cannot be read back and hides it behind a 500.
    pub fn corrupt(what: &str, e: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "{what}: stored data is not valid");
        ApiError::Internal
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict { .. } => "conflict",
            ApiError::Unavailable => "unavailable",
            ApiError::Internal => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let field = match &self {
            ApiError::BadRequest { field, .. } => Some(field.clone()),
            ApiError::Conflict { field, .. } => field.clone(),
            _ => None,
        };
        let message = match &self {
            ApiError::BadRequest { message, .. } => message.clone(),
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: self.code().to_string(),
            field,
            message,
        };
        let mut resp = (self.status(), axum::Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// Splits a deserializer message into the field it names and the reason. Handles axum's
/// `path.to.field: reason` (serde_path_to_error) and serde's root-level "missing field `x`" /
/// "unknown field `x`".
fn field_of(text: &str) -> (String, String) {
    for prefix in ["missing field `", "unknown field `"] {
        if let Some(rest) = text.strip_prefix(prefix)
            && let Some((name, _)) = rest.split_once('`')
        {
            return (name.to_string(), text.to_string());
        }
    }
    match text.split_once(": ") {
        Some((path, reason)) if !path.is_empty() && !path.contains(' ') => {
            (path.to_string(), reason.to_string())
        }
        _ => ("body".to_string(), text.to_string()),
    }
}

/// A JSON body; a malformed one is a 400 naming the field.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::JsonDataError(e)) => {
                let text = e.body_text();
                let detail = text
                    .split_once("target type: ")
                    .map_or(text.as_str(), |x| x.1);
                let (field, message) = field_of(detail);
                Err(ApiError::bad(field, message))
            }
            Err(e) => Err(ApiError::bad("body", e.body_text())),
        }
    }
}

/// Query parameters; a malformed one is a 400 naming the parameter.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                let text = e.body_text();
                let detail = text
                    .split_once("query string: ")
                    .map_or(text.as_str(), |x| x.1);
                let (field, message) = field_of(detail);
                Err(ApiError::bad(field, message))
            }
            Err(e) => Err(ApiError::bad("query", e.body_text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_is_found_in_deserializer_messages() {
        assert_eq!(
            field_of("missing field `code` at line 1 column 2"),
            (
                "code".to_string(),
                "missing field `code` at line 1 column 2".to_string()
            )
        );
        assert_eq!(
            field_of("location.lat: invalid type: string \"x\", expected f64").0,
            "location.lat"
        );
        assert_eq!(field_of("expected value at line 1 column 1").0, "body");
    }
}
