//! The alerts API: `GET /api/v1/alerts`, `GET /api/v1/alerts/{id}` (any role), `POST
//! /api/v1/alerts/{id}/close` (operators, technicians, admins).

use super::store::{self, Filter};
use super::{Alert, AlertError, AlertKind, AlertState, MAX_LIST};
use crate::core::api::{ApiError, ApiJson, ApiPath, ApiQuery, ApiState, ErrorBody};
use crate::core::auth::Permission;
use crate::core::openapi::{Forbidden, Unauthorized};
use crate::users::Caller;
use axum::Json;
use axum::extract::State;
use caudal_common::SiteId;
use chrono::Utc;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

impl From<AlertError> for ApiError {
    fn from(e: AlertError) -> ApiError {
        match e {
            AlertError::NotFound(id) => ApiError::NotFound(format!("alert {id}")),
            AlertError::Closed(_) => ApiError::conflict("state", e.to_string()),
            AlertError::Corrupt { .. } => ApiError::corrupt("alerts", &e),
            AlertError::Database(_) => ApiError::database("alerts", &e),
        }
    }
}

/// Query of `GET /api/v1/alerts`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `open` (default), `closed` or `all`.
    #[serde(default)]
    #[param(pattern = "^(open|closed|all)$")]
    pub state: Option<String>,
    /// Only alerts of this kind.
    #[serde(default)]
    #[param(value_type = Option<AlertKind>)]
    pub kind: Option<String>,
    /// Only alerts of this site.
    #[serde(default)]
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub site: Option<String>,
    /// Alerts with an id below this: the next page.
    #[serde(default)]
    pub before: Option<i64>,
    /// At most this many, 1..=1000 (default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

fn filter(q: ListQuery) -> Result<Filter, ApiError> {
    let state = match q.state.as_deref().unwrap_or("open") {
        "open" => Some(AlertState::Open),
        "closed" => Some(AlertState::Closed),
        "all" => None,
        other => {
            return Err(ApiError::bad(
                "state",
                format!("{other:?} is not one of open, closed, all"),
            ));
        }
    };
    let kind = match q.kind.as_deref() {
        None => None,
        Some(k) => Some(AlertKind::parse(k).ok_or_else(|| {
            let known: Vec<&str> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
            ApiError::bad(
                "kind",
                format!("{k:?} is not an alert kind; known: {}", known.join(", ")),
            )
        })?),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(ApiError::bad(
            "limit",
            format!("must be between 1 and {MAX_LIST}"),
        ));
    }
    Ok(Filter {
        state,
        kind,
        site: q
            .site
            .map(|s| {
                SiteId::new(s.as_str())
                    .map(|_| s)
                    .map_err(|e| ApiError::bad("site", e.to_string()))
            })
            .transpose()?,
        before: q.before,
        limit,
    })
}

/// Alerts, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/alerts",
    tag = "alerts",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "Alerts, newest first", body = Vec<Alert>),
        (status = 400, description = "A parameter is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
    ),
)]
pub(super) async fn list_alerts(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<Alert>>, ApiError> {
    caller.require(Permission::Read)?;
    Ok(Json(store::list(&state.db, &filter(q)?).await?))
}

fn alert_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad("id", format!("{raw:?} is not an alert id")))
}

/// One alert.
#[utoipa::path(
    get,
    path = "/api/v1/alerts/{id}",
    tag = "alerts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Alert id")),
    responses(
        (status = 200, description = "The alert", body = Alert),
        (status = 400, description = "A field, parameter or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        (status = 404, description = "No such alert", body = ErrorBody),
    ),
)]
pub(super) async fn get_alert(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Alert>, ApiError> {
    caller.require(Permission::Read)?;
    Ok(Json(store::find(&state.db, alert_id(&id)?).await?))
}

/// Body of `POST /api/v1/alerts/{id}/close`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloseRequest {
    /// Why it is closed (what was found on site).
    #[serde(default)]
    pub note: String,
}

/// Closes an open alert (operator, technician, admin).
#[utoipa::path(
    post,
    path = "/api/v1/alerts/{id}/close",
    tag = "alerts",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Alert id")),
    request_body = CloseRequest,
    responses(
        (status = 200, description = "The alert", body = Alert),
        (status = 400, description = "A field, parameter or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        Forbidden,
        (status = 404, description = "No such alert", body = ErrorBody),
        (status = 409, description = "Already closed", body = ErrorBody),
    ),
)]
pub(super) async fn close_alert(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CloseRequest>,
) -> Result<Json<Alert>, ApiError> {
    caller.require(Permission::ManageCatchment)?;
    let id = alert_id(&id)?;
    if body.note.chars().count() > 2000 {
        return Err(ApiError::bad("note", "at most 2000 characters"));
    }
    let alert = store::close(
        &state.db,
        id,
        &caller.user.email,
        body.note.trim(),
        Utc::now(),
    )
    .await?;
    tracing::info!(alert = id, by = %caller.user.email, "alert closed");
    Ok(Json(alert))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_errors_name_the_parameter() {
        let q = |state: Option<&str>, kind: Option<&str>, limit: Option<i64>| ListQuery {
            state: state.map(String::from),
            kind: kind.map(String::from),
            site: None,
            before: None,
            limit,
        };
        let field = |r: Result<Filter, ApiError>| match r {
            Err(ApiError::BadRequest { field, .. }) => field,
            other => format!("{other:?}"),
        };
        assert_eq!(field(filter(q(Some("shut"), None, None))), "state");
        assert_eq!(field(filter(q(None, Some("flood"), None))), "kind");
        assert_eq!(field(filter(q(None, None, Some(0)))), "limit");
        assert!(filter(q(Some("all"), Some("no_data"), Some(5))).is_ok());
    }
}
