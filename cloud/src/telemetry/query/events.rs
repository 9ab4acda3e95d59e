//! Events: a site's events in `(ts, seq)` order, by kind and device, in keyset pages.

use super::{Cursor, QueryError, take_page};
use crate::core::db::{Db, each_db};
use caudal_common::SiteId;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

/// One stored event.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct EventView {
    pub seq: i64,
    pub ts: DateTime<Utc>,
    pub device: Option<String>,
    /// `totalizer_reset`, `device_unreachable`, … (the protocol's event kinds).
    pub kind: String,
    pub message: String,
    /// The value before the event, canonical units.
    pub previous: Option<f64>,
    /// The value that triggered it.
    pub current: Option<f64>,
    /// For `totalizer_rollover`: the total at which the register wraps, when the agent sent it.
    pub wrap: Option<f64>,
}

/// The columns an [`EventView`] is read from.
const EVENT_COLUMNS: &str = "seq, ts, device, kind, message, previous, current, wrap";

/// An [`EventView`] from a row of [`EVENT_COLUMNS`], reading `ts` with the backend's
/// `from_row`.
macro_rules! event_view {
    ($row:expr, $from_row:ident) => {{
        let r = $row;
        EventView {
            seq: r.try_get("seq")?,
            ts: $from_row(r, "ts")?,
            device: r.try_get("device")?,
            kind: r.try_get("kind")?,
            message: r.try_get("message")?,
            previous: r.try_get("previous")?,
            current: r.try_get("current")?,
            wrap: r.try_get("wrap")?,
        }
    }};
}

/// A page of events and where the next one starts.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Events of `site` in `[from, to)` ordered by `(ts, seq)`, optionally of some kinds and one
/// device.
#[allow(clippy::too_many_arguments)]
pub async fn events(
    db: &Db,
    site: &SiteId,
    device: Option<&str>,
    kinds: &[String],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    after: Option<Cursor>,
    limit: i64,
) -> Result<EventPage, QueryError> {
    let mut sql =
        format!("SELECT {EVENT_COLUMNS} FROM events WHERE site = $1 AND ts >= $2 AND ts < $3");
    let mut n = 3;
    if device.is_some() {
        n += 1;
        sql.push_str(&format!(" AND device = ${n}"));
    }
    if after.is_some() {
        sql.push_str(&format!(
            " AND (ts > ${a} OR (ts = ${a} AND seq > ${b}))",
            a = n + 1,
            b = n + 2
        ));
        n += 2;
    }
    if !kinds.is_empty() {
        let list: Vec<String> = (0..kinds.len())
            .map(|i| format!("${}", n + 1 + i))
            .collect();
        n += kinds.len();
        sql.push_str(&format!(" AND kind IN ({})", list.join(", ")));
    }
    sql.push_str(&format!(" ORDER BY ts, seq LIMIT ${}", n + 1));
    let mut rows: Vec<EventView> = Vec::new();
    each_db!(db, |pool, to_db, from_row| {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(site.as_str())
            .bind(to_db(from))
            .bind(to_db(to));
        if let Some(d) = device {
            q = q.bind(d);
        }
        if let Some(c) = after {
            q = q.bind(to_db(c.ts)).bind(c.seq);
        }
        for k in kinds {
            q = q.bind(k.as_str());
        }
        let mut stream = q.bind(limit + 1).fetch(pool);
        while let Some(r) = stream.try_next().await? {
            rows.push(event_view!(&r, from_row));
        }
    });
    let next_cursor = take_page(&mut rows, limit, |e| (e.ts, e.seq));
    Ok(EventPage {
        events: rows,
        next_cursor,
    })
}

/// The events of every site with one of `kinds` since `from`, oldest first, each with its site.
pub async fn events_since(
    db: &Db,
    kinds: &[&str],
    from: DateTime<Utc>,
) -> Result<Vec<(String, EventView)>, QueryError> {
    if kinds.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<String> = (0..kinds.len()).map(|i| format!("${}", i + 2)).collect();
    let sql = format!(
        "SELECT site, {EVENT_COLUMNS} FROM events WHERE ts >= $1 AND kind IN ({}) ORDER BY ts",
        list.join(", ")
    );
    Ok(each_db!(db, |pool, to_db, from_row| {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(to_db(from));
        for k in kinds {
            q = q.bind(*k);
        }
        let rows = q.fetch_all(pool).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push((r.try_get("site")?, event_view!(r, from_row)));
        }
        out
    }))
}
