//! What every module's API routes share: the state they run with ([`ApiState`]), the error type
//! that maps to an HTTP status and a JSON body without leaking internals ([`ApiError`]), and
//! extractors whose rejections name the offending field ([`ApiJson`], [`ApiQuery`],
//! [`ApiPath`]).
//!
//! Error bodies are `{"error": "<code>", "field": "<field or null>", "message": "<reason>"}`.
//! Bad input is always a 4xx naming the field; a database failure is a 503 whose details go to
//! the log, never to the caller.

use crate::core::auth::{AuthMetrics, Permission, Role, TokenKeys};
use crate::core::db::Db;
use axum::body::{Body, Bytes};
use axum::extract::path::ErrorKind;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
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
    /// The login bounds (hash slots, per address, per account).
    pub logins: Arc<crate::users::throttle::LoginGuard>,
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
    /// 413: the body is over `http.body_limit_bytes`.
    #[error("body: {0}")]
    TooLarge(String),
    /// 429 (too many attempts) or 503 (too many at once), with `Retry-After`.
    #[error("{0}")]
    Throttled(crate::users::throttle::Throttled),
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
    /// `bad_request`, `unauthorized`, `forbidden`, `not_found`, `conflict`,
    /// `payload_too_large`, `too_many_requests`, `busy`, `unavailable` or
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
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Throttled(crate::users::throttle::Throttled::Busy { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
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
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::Throttled(crate::users::throttle::Throttled::Busy { .. }) => "busy",
            ApiError::Throttled(_) => "too_many_requests",
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
        if let ApiError::Throttled(t) = &self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(t.retry_after_s()));
        }
        resp
    }
}

/// Splits a deserializer message into the field it names and the reason, `whole` (`body`,
/// `query`) when it names none. Handles axum's `path.to.field: reason` (serde_path_to_error) and
/// serde's root-level "missing field `x`" / "unknown field `x`" / "duplicate field `x`".
fn field_of(text: &str, whole: &str) -> (String, String) {
    for prefix in ["missing field `", "unknown field `", "duplicate field `"] {
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
        _ => (whole.to_string(), text.to_string()),
    }
}

/// Where a JSON value holds a NUL character (in a string or a key): `body`, `name`,
/// `extras[1]`, `a.b`.
fn nul_in(v: &serde_json::Value, at: &str) -> Option<String> {
    let join = |key: &str| {
        if at == "body" {
            key.to_string()
        } else {
            format!("{at}.{key}")
        }
    };
    match v {
        serde_json::Value::String(s) if s.contains('\0') => Some(at.to_string()),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_in(item, &format!("{at}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(k, item)| {
            if k.contains('\0') {
                Some(join(k))
            } else {
                nul_in(item, &join(k))
            }
        }),
        _ => None,
    }
}

/// A JSON body; a malformed one is a 400 naming the field. Every body of the API is a JSON
/// object: anything else is refused as such, also where serde would take a struct from an
/// array (`[null, null]` for a body whose fields are all optional).
///
/// A string holding a NUL character (`\u0000`) is refused too, naming its field: PostgreSQL
/// cannot store one (it would fail the statement, a 503), so no backend takes it.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(e.body_text())
            } else {
                ApiError::bad("body", e.body_text())
            }
        })?;
        if bytes
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b != b'{')
        {
            return Err(ApiError::bad("body", "must be a JSON object"));
        }
        let mut again = Request::new(Body::from(bytes.clone()));
        if let Some(ct) = content_type {
            again.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        let v = match axum::Json::<T>::from_request(again, state).await {
            Ok(axum::Json(v)) => v,
            Err(JsonRejection::JsonDataError(e)) => {
                let text = e.body_text();
                let detail = text
                    .split_once("target type: ")
                    .map_or(text.as_str(), |x| x.1);
                let (field, message) = field_of(detail, "body");
                return Err(ApiError::bad(field, message));
            }
            Err(e) => return Err(ApiError::bad("body", e.body_text())),
        };
        // JSON spells NUL only as the escape `\u0000`; look closer only when the text has one.
        if bytes.windows(6).any(|w| w == b"\\u0000")
            && let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && let Some(field) = nul_in(&value, "body")
        {
            return Err(ApiError::bad(
                field,
                "must not contain a NUL character (\\u0000)",
            ));
        }
        Ok(ApiJson(v))
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
                let (field, message) = field_of(detail, "query");
                Err(ApiError::bad(field, message))
            }
            Err(e) => Err(ApiError::bad("query", e.body_text())),
        }
    }
}

/// Path parameters; one that cannot be read (not UTF-8 once percent-decoded) is a 400 naming
/// it, with the same JSON body as every other error.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            // A route whose handler does not fit its path: the server's fault, not the caller's.
            Err(e) if e.status().is_server_error() => Err(ApiError::corrupt("path parameters", &e)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                let field = match e.kind() {
                    ErrorKind::InvalidUtf8InPathParam { key }
                    | ErrorKind::ParseErrorAtKey { key, .. }
                    | ErrorKind::DeserializeError { key, .. } => key.clone(),
                    _ => "path".to_string(),
                };
                let message = match e.kind() {
                    ErrorKind::InvalidUtf8InPathParam { .. } => {
                        "is not valid UTF-8 once percent-decoded".to_string()
                    }
                    other => other.to_string(),
                };
                Err(ApiError::bad(field, message))
            }
            Err(e) => Err(ApiError::bad("path", e.body_text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct AllOptional {
        #[serde(default)]
        a: Option<String>,
        #[serde(default)]
        b: Option<String>,
    }

    async fn body(text: &'static str) -> Result<ApiJson<AllOptional>, ApiError> {
        let req = Request::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(text))
            .expect("request");
        ApiJson::<AllOptional>::from_request(req, &()).await
    }

    #[tokio::test]
    async fn a_body_is_a_json_object() {
        assert!(body(r#"{"a":"x"}"#).await.is_ok());
        assert!(body(" {}").await.is_ok());
        for bad in ["[null, null]", "[]", "null", "\"x\"", "1"] {
            match body(bad).await {
                Err(ApiError::BadRequest { field, .. }) => assert_eq!(field, "body", "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn field_is_found_in_deserializer_messages() {
        assert_eq!(
            field_of("missing field `code` at line 1 column 2", "body"),
            (
                "code".to_string(),
                "missing field `code` at line 1 column 2".to_string()
            )
        );
        assert_eq!(
            field_of(
                "location.lat: invalid type: string \"x\", expected f64",
                "body"
            )
            .0,
            "location.lat"
        );
        assert_eq!(
            field_of("expected value at line 1 column 1", "body").0,
            "body"
        );
        assert_eq!(field_of("duplicate field `limit`", "query").0, "limit");
    }

    #[test]
    fn a_nul_character_is_found_with_its_field() {
        let at = |text: &str| {
            let v: serde_json::Value = serde_json::from_str(text).expect("json");
            nul_in(&v, "body")
        };
        assert_eq!(at(r#"{"name":"a\u0000b"}"#).as_deref(), Some("name"));
        assert_eq!(
            at(r#"{"extras":["x","\u0000"]}"#).as_deref(),
            Some("extras[1]")
        );
        assert_eq!(at(r#"{"a":{"b":"\u0000"}}"#).as_deref(), Some("a.b"));
        assert_eq!(at(r#"{"k\u0000":1}"#).as_deref(), Some("k\u{0}"));
        assert_eq!(at(r#""\u0000""#).as_deref(), Some("body"));
        // An escaped backslash followed by the text u0000 is no NUL.
        assert_eq!(at(r#"{"name":"\\u0000"}"#), None);
        assert_eq!(
            field_of("invalid digit found in string", "query").0,
            "query"
        );
    }
}
