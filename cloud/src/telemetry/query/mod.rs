//! Telemetry reads for the API: raw readings with keyset pagination, bucketed aggregates with
//! reset-aware extracted volume, the latest value of each device, completeness (sequence holes,
//! time gaps, gap records) and events. The same statements run on SQLite and PostgreSQL.
//!
//! Bounded work: every answer is built from rows streamed in order (never a whole table in
//! memory), and what an answer may hold is capped: [`MAX_LIMIT`] rows per page,
//! [`MAX_BUCKETS`] buckets per device, [`MAX_SCAN`] readings per aggregate, [`MAX_LISTED`]
//! holes, time gaps and gap records per completeness answer (the counts stay exact; the list says
//! it was truncated).
//!
//! One file per answer family: [`readings`] (raw readings, keyset pages), [`aggregate`]
//! (minute/hour/day buckets), [`latest`], [`completeness`], [`events`]; what they share is here
//! (limits, errors, cursors, the devices of a site) and in [`scan`] (reading rows streamed in
//! order).

mod aggregate;
mod completeness;
mod events;
mod latest;
mod readings;
mod scan;

pub use aggregate::{Bucket, BucketView, Stats, aggregate, aggregate_at};
pub use completeness::{
    Completeness, CompletenessSummary, DEFAULT_GAP_FACTOR, DeviceCadence, EpochCompleteness,
    FailedPoll, GapView, Hole, TimeGap, completeness,
};
pub use events::{EventPage, EventView, events, events_since};
pub use latest::{
    Channel, DeviceLatest, Latest, last_reading_at, latest, latest_value, received_since,
};
pub use readings::{ReadingPage, ReadingView, quality_filter, raw_readings};
pub use scan::flag_names;

use crate::core::db::{Db, each_db};
use caudal_common::SiteId;
use chrono::{DateTime, Utc};

/// Most rows in one page of raw readings or events.
pub const MAX_LIMIT: i64 = 10_000;
/// Most buckets one aggregate spans (per device).
pub const MAX_BUCKETS: i64 = 10_000;
/// Most readings one aggregate reads.
pub const MAX_SCAN: u64 = 5_000_000;
/// Most holes, time gaps or gap records listed in one completeness answer.
pub const MAX_LISTED: usize = 1_000;
/// Most devices of one site an answer covers.
pub const MAX_DEVICES: i64 = 1_000;
/// How far before a range the last totalizer is looked for, so the first step into the range
/// is counted (and how far back the latest value of a quantity is looked for).
pub const LOOKBACK_DAYS: i64 = 31;

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request asks for more than an answer may hold; `field` is the parameter to change.
    #[error("{field}: {message}")]
    TooLarge {
        field: &'static str,
        message: String,
    },
    #[error("stored telemetry is not valid: {0}")]
    Corrupt(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Where a page of readings or events continues: after `(ts, seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub ts: DateTime<Utc>,
    pub seq: i64,
}

impl Cursor {
    /// The cursor as the API hands it out: `<ts in µs since the epoch>_<seq>`.
    pub fn encode(&self) -> String {
        format!("{}_{}", self.ts.timestamp_micros(), self.seq)
    }

    pub fn decode(s: &str) -> Option<Cursor> {
        let (t, q) = s.split_once('_')?;
        Some(Cursor {
            ts: DateTime::from_timestamp_micros(t.parse().ok()?)?,
            seq: q.parse().ok()?,
        })
    }
}

/// The devices that have readings at `site`, by id (a loose index scan: one index probe per
/// device, however many readings each has).
pub async fn devices(db: &Db, site: &SiteId) -> Result<Vec<String>, QueryError> {
    let sql = "WITH RECURSIVE d(device) AS ( \
                 SELECT MIN(device) FROM readings WHERE site = $1 \
                 UNION ALL \
                 SELECT (SELECT MIN(r.device) FROM readings r WHERE r.site = $1 AND r.device > d.device) \
                 FROM d WHERE d.device IS NOT NULL) \
               SELECT device FROM d WHERE device IS NOT NULL LIMIT $2";
    let rows: Vec<String> = each_db!(db, |pool, to_db, from_row| {
        sqlx::query_scalar(sql)
            .bind(site.as_str())
            .bind(MAX_DEVICES)
            .fetch_all(pool)
            .await?
    });
    Ok(rows)
}

/// Keeps the first `limit` of `rows` (ordered by `(ts, seq)`, read with one more than `limit`
/// to learn whether more follow) and returns the cursor of the next page, if there is one.
fn take_page<T>(
    rows: &mut Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> (DateTime<Utc>, i64),
) -> Option<String> {
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    let (ts, seq) = rows.last().filter(|_| more).map(key)?;
    Some(Cursor { ts, seq }.encode())
}
