//! The alerts table as the API reads it: lists, one alert, a person closing one, and the open
//! counts the evaluator reports.

use super::{Alert, AlertError, AlertKind, AlertState, MAX_LIST};
use crate::core::db::{Db, each_db};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::collections::HashMap;

pub(super) async fn open_counts(db: &Db) -> Result<HashMap<AlertKind, i64>, sqlx::Error> {
    let sql = "SELECT kind, COUNT(*) AS n FROM alerts WHERE state = 'open' GROUP BY kind";
    let rows: Vec<(String, i64)> = each_db!(db, |pool, to_db, from_row| {
        sqlx::query_as(sql).fetch_all(pool).await?
    });
    Ok(rows
        .into_iter()
        .filter_map(|(k, n)| AlertKind::parse(&k).map(|k| (k, n)))
        .collect())
}

/// Which alerts a list shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub state: Option<AlertState>,
    pub kind: Option<AlertKind>,
    pub site: Option<String>,
    /// Only alerts with an id below this (the next page of a newest-first list).
    pub before: Option<i64>,
    pub limit: i64,
}

const COLUMNS: &str = "id, kind, subject, site, device, point_id, state, since, opened_at, \
                       updated_at, closed_at, closed_by, close_note, value, threshold, message";

/// An [`Alert`] from a row of [`COLUMNS`], reading times with the backend's `from_row`.
macro_rules! alert_from_row {
    ($r:expr, $from_row:ident) => {{
        let r = $r;
        let id: i64 = r.try_get("id")?;
        let (kind, state) = parse_row(id, r.try_get("kind")?, r.try_get("state")?)?;
        let closed_at = match sqlx::ValueRef::is_null(&r.try_get_raw("closed_at")?) {
            true => None,
            false => Some($from_row(r, "closed_at")?),
        };
        Ok::<Alert, AlertError>(Alert {
            id,
            kind,
            subject: r.try_get("subject")?,
            site: r.try_get("site")?,
            device: r.try_get("device")?,
            point_id: r.try_get("point_id")?,
            state,
            since: $from_row(r, "since")?,
            opened_at: $from_row(r, "opened_at")?,
            updated_at: $from_row(r, "updated_at")?,
            closed_at,
            closed_by: r.try_get("closed_by")?,
            close_note: r.try_get("close_note")?,
            value: r.try_get("value")?,
            threshold: r.try_get("threshold")?,
            message: r.try_get("message")?,
        })
    }};
}

/// Alerts matching `f`, newest first.
pub async fn list(db: &Db, f: &Filter) -> Result<Vec<Alert>, AlertError> {
    let state = f.state.map(|s| match s {
        AlertState::Open => "open",
        AlertState::Closed => "closed",
    });
    let kind = f.kind.map(AlertKind::as_str);
    let limit = f.limit.clamp(1, MAX_LIST);
    let sql = format!(
        "SELECT {COLUMNS} FROM alerts WHERE (CAST($1 AS TEXT) IS NULL OR state = $1) \
         AND (CAST($2 AS TEXT) IS NULL OR kind = $2) AND (CAST($3 AS TEXT) IS NULL OR site = $3) \
         AND (CAST($4 AS BIGINT) IS NULL OR id < $4) ORDER BY id DESC LIMIT $5"
    );
    each_db!(db, |pool, to_db, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(state)
            .bind(kind)
            .bind(&f.site)
            .bind(f.before)
            .bind(limit)
            .fetch_all(pool)
            .await?;
        rows.iter().map(|r| alert_from_row!(r, from_row)).collect()
    })
}

/// One alert.
pub async fn find(db: &Db, id: i64) -> Result<Alert, AlertError> {
    let sql = format!("SELECT {COLUMNS} FROM alerts WHERE id = $1");
    let alert = each_db!(db, |pool, to_db, from_row| {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(pool)
            .await?
            .as_ref()
            .map(|r| alert_from_row!(r, from_row))
            .transpose()?
    });
    alert.ok_or(AlertError::NotFound(id))
}

/// Closes an open alert on a person's word.
pub async fn close(
    db: &Db,
    id: i64,
    by: &str,
    note: &str,
    now: DateTime<Utc>,
) -> Result<Alert, AlertError> {
    let n = each_db!(db, |pool, to_db, from_row| {
        sqlx::query(
            "UPDATE alerts SET state = 'closed', closed_at = $1, updated_at = $1, \
             closed_by = $2, close_note = $3 WHERE id = $4 AND state = 'open'",
        )
        .bind(to_db(now))
        .bind(by)
        .bind(note)
        .bind(id)
        .execute(pool)
        .await?
        .rows_affected()
    });
    let alert = find(db, id).await?;
    if n == 0 {
        return Err(AlertError::Closed(id));
    }
    Ok(alert)
}

fn parse_row(id: i64, kind: String, state: String) -> Result<(AlertKind, AlertState), AlertError> {
    let kind = AlertKind::parse(&kind).ok_or_else(|| AlertError::Corrupt {
        id,
        reason: format!("unknown kind {kind:?}"),
    })?;
    let state = match state.as_str() {
        "open" => AlertState::Open,
        "closed" => AlertState::Closed,
        other => {
            return Err(AlertError::Corrupt {
                id,
                reason: format!("unknown state {other:?}"),
            });
        }
    };
    Ok((kind, state))
}
