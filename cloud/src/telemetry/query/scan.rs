//! Reading rows as every reading answer reads them: streamed in `(ts, seq)` order from the
//! (site, device, ts) index, one device at a time, never a whole range in memory.

use super::{Cursor, QueryError};
use crate::core::db::{Db, each_db};
use caudal_common::{Quality, SiteId};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use sqlx::Row;

/// Quality flags as names, for answers.
pub fn flag_names(q: Quality) -> Vec<String> {
    q.iter().map(|f| f.name().to_string()).collect()
}

pub(super) fn quality(site: &SiteId, seq: i64, bits: i32) -> Result<Quality, QueryError> {
    u16::try_from(bits)
        .map(Quality::from_bits)
        .map_err(|_| QueryError::Corrupt(format!("{site} seq {seq}: quality {bits}")))
}

/// One reading row as read back.
#[derive(Debug, Clone)]
pub(super) struct ReadingRow {
    pub seq: i64,
    pub device: String,
    pub ts: DateTime<Utc>,
    pub quality: i32,
    pub flow: Option<f64>,
    pub total: Option<f64>,
    pub level: Option<f64>,
    pub extra: Option<String>,
}

/// The columns a [`ReadingRow`] is read from.
pub(super) const READING_COLUMNS: &str =
    "seq, device, ts, quality, flow_lps, total_m3, level_m, CAST(extra AS TEXT) AS extra";

/// A [`ReadingRow`] from a row of [`READING_COLUMNS`], reading `ts` with the backend's
/// `from_row` (a macro: the row type differs per backend).
macro_rules! reading_row {
    ($row:expr, $from_row:ident) => {{
        let row = $row;
        $crate::telemetry::query::scan::ReadingRow {
            seq: row.try_get("seq")?,
            device: row.try_get("device")?,
            ts: $from_row(row, "ts")?,
            quality: row.try_get("quality")?,
            flow: row.try_get("flow_lps")?,
            total: row.try_get("total_m3")?,
            level: row.try_get("level_m")?,
            extra: row.try_get("extra")?,
        }
    }};
}
pub(super) use reading_row;

/// What a streamed reading scan selects: one device's readings (the (site, device, ts) index
/// finds them; a site's readings are read device by device and merged).
pub(super) struct Scan<'a> {
    pub site: &'a SiteId,
    pub device: &'a str,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub after: Option<Cursor>,
    /// Only readings with any of these quality bits.
    pub quality: Option<u16>,
    pub limit: Option<i64>,
}

impl<'a> Scan<'a> {
    /// Every reading of `device` in `[from, to)`.
    pub(super) fn device(
        site: &'a SiteId,
        device: &'a str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Scan<'a> {
        Scan {
            site,
            device,
            from,
            to,
            after: None,
            quality: None,
            limit: None,
        }
    }
}

/// Streams the readings a [`Scan`] selects, ordered by `(ts, seq)`, to `visit` until it returns
/// `false`.
pub(super) async fn scan_readings(
    db: &Db,
    scan: &Scan<'_>,
    mut visit: impl FnMut(ReadingRow) -> Result<bool, QueryError>,
) -> Result<(), QueryError> {
    let mut sql = format!(
        "SELECT {READING_COLUMNS} FROM readings WHERE site = $1 AND ts >= $2 AND ts < $3 \
         AND device = $4"
    );
    let mut n = 4;
    let mut next = || {
        n += 1;
        n
    };
    let after_p = scan.after.map(|_| (next(), next()));
    let quality_p = scan.quality.map(|_| next());
    let limit_p = scan.limit.map(|_| next());
    if let Some((t, s)) = after_p {
        sql.push_str(&format!(" AND (ts > ${t} OR (ts = ${t} AND seq > ${s}))"));
    }
    if let Some(p) = quality_p {
        sql.push_str(&format!(" AND (quality & ${p}) <> 0"));
    }
    sql.push_str(" ORDER BY ts, seq");
    if let Some(p) = limit_p {
        sql.push_str(&format!(" LIMIT ${p}"));
    }
    each_db!(db, |pool, to_db, from_row| {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(scan.site.as_str())
            .bind(to_db(scan.from))
            .bind(to_db(scan.to))
            .bind(scan.device);
        if let Some(c) = scan.after {
            q = q.bind(to_db(c.ts)).bind(c.seq);
        }
        if let Some(bits) = scan.quality {
            q = q.bind(i32::from(bits));
        }
        if let Some(l) = scan.limit {
            q = q.bind(l);
        }
        let mut rows = q.fetch(pool);
        while let Some(row) = rows.try_next().await? {
            if !visit(reading_row!(&row, from_row))? {
                break;
            }
        }
        Ok(())
    })
}
