//! Completeness: per epoch, the sequence numbers missing among a site's stored records (and how
//! many eviction gap records account for); per device, stretches without readings and every
//! failed poll (`poll_failed` events: a slot the meter was not read, however short the outage);
//! the gap records of the range.

use super::events::events;
use super::scan::{Scan, scan_readings};
use super::{LOOKBACK_DAYS, MAX_LISTED, QueryError, devices};
use crate::core::db::{Db, each_db};
use caudal_common::SiteId;
use chrono::{DateTime, Duration, Utc};
use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

/// Intervals sampled to find a device's usual reporting interval (completeness).
const MEDIAN_SAMPLE: i64 = 1_001;
/// A time gap is longer than this many usual intervals, unless the caller says otherwise.
pub const DEFAULT_GAP_FACTOR: f64 = 3.0;

/// Missing sequence numbers `[from, to]` of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Hole {
    pub from: i64,
    pub to: i64,
    pub count: u64,
    /// How many of them an eviction gap record accounts for.
    pub covered_by_gaps: u64,
}

/// Completeness of one epoch of the site's sequence.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct EpochCompleteness {
    #[schema(format = Int64, maximum = 4294967295_u32)]
    pub epoch: u32,
    /// The first sequence number expected: after the last one stored before the range's first
    /// (counter 1 when none is).
    pub first_seq: i64,
    /// The last stored sequence number of the range.
    pub last_seq: i64,
    pub expected: u64,
    pub stored: u64,
    pub missing: u64,
    /// Missing numbers an eviction gap record accounts for.
    pub covered_by_gaps: u64,
    pub holes: Vec<Hole>,
    /// More holes exist than are listed.
    pub holes_truncated: bool,
}

/// A stretch without readings of one device, longer than the threshold.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TimeGap {
    pub device: String,
    /// The last reading before the gap.
    pub from: DateTime<Utc>,
    /// The first reading after it.
    pub to: DateTime<Utc>,
    pub seconds: f64,
}

/// How one device's readings were judged.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DeviceCadence {
    pub device: String,
    pub readings: u64,
    /// Median interval between readings, s (from up to the first 1000 intervals).
    pub median_interval_s: Option<f64>,
    /// An interval longer than this is a time gap, s.
    pub threshold_s: Option<f64>,
}

/// A poll that failed: the device was not read in that slot.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FailedPoll {
    pub device: Option<String>,
    /// The poll's slot.
    pub ts: DateTime<Utc>,
    /// `timeout`, `exception`, `bad_frame` or `io`: the message's lead.
    pub cause: String,
    pub message: String,
}

/// A gap record as stored.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct GapView {
    pub seq: i64,
    pub device: Option<String>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub seq_from: Option<i64>,
    pub seq_to: Option<i64>,
    pub count: i64,
    /// `evicted`, `device_unreachable` or `outbox_lost`.
    pub cause: String,
}

/// Totals over every epoch.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, ToSchema)]
pub struct CompletenessSummary {
    pub expected: u64,
    pub stored: u64,
    pub missing: u64,
    pub covered_by_gaps: u64,
    /// Missing and accounted for by no gap record: lost or not arrived yet.
    pub unexplained: u64,
    pub time_gaps: u64,
    pub gap_records: u64,
    /// Polls that failed (`poll_failed` events) in the range.
    pub failed_polls: u64,
}

/// Completeness of a site over a time range.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Completeness {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub summary: CompletenessSummary,
    pub epochs: Vec<EpochCompleteness>,
    pub devices: Vec<DeviceCadence>,
    pub time_gaps: Vec<TimeGap>,
    pub time_gaps_truncated: bool,
    pub gap_records: Vec<GapView>,
    pub gap_records_truncated: bool,
    /// Every failed poll, oldest first (at most 1000 listed).
    pub failed_polls: Vec<FailedPoll>,
    pub failed_polls_truncated: bool,
}

const COUNTER_BITS: u32 = 32;

/// Completeness of `site` over `[from, to)`. `gap_after`: an interval longer than this is a time
/// gap; by default [`DEFAULT_GAP_FACTOR`] × the device's median interval.
pub async fn completeness(
    db: &Db,
    site: &SiteId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    gap_after: Option<f64>,
) -> Result<Completeness, QueryError> {
    let gap_records = gap_records(db, site, from, to).await?;
    let evicted = evicted_ranges(db, site, from, to).await?;
    let mut summary = CompletenessSummary::default();
    let mut epochs = Vec::new();
    for (epoch, min, max) in epoch_bounds(db, site, from, to).await? {
        let e = epoch_holes(db, site, epoch, min, max, &evicted).await?;
        summary.expected += e.expected;
        summary.stored += e.stored;
        summary.missing += e.missing;
        summary.covered_by_gaps += e.covered_by_gaps;
        epochs.push(e);
    }
    summary.unexplained = summary.missing - summary.covered_by_gaps;

    let mut devices_out = Vec::new();
    let mut time_gaps = Vec::new();
    let mut gaps_total = 0u64;
    for d in devices(db, site).await? {
        let median = median_interval(db, site, &d, from, to).await?;
        let threshold = gap_after.or(median.map(|m| m * DEFAULT_GAP_FACTOR));
        let mut readings = 0u64;
        let mut prev: Option<DateTime<Utc>> = None;
        let scan = Scan::device(site, &d, from, to);
        scan_readings(db, &scan, |r| {
            readings += 1;
            if let (Some(p), Some(t)) = (prev, threshold) {
                let secs = (r.ts - p).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
                if secs > t {
                    gaps_total += 1;
                    if time_gaps.len() < MAX_LISTED {
                        time_gaps.push(TimeGap {
                            device: d.clone(),
                            from: p,
                            to: r.ts,
                            seconds: secs,
                        });
                    }
                }
            }
            prev = Some(r.ts);
            Ok(true)
        })
        .await?;
        if readings > 0 {
            devices_out.push(DeviceCadence {
                device: d,
                readings,
                median_interval_s: median,
                threshold_s: threshold,
            });
        }
    }
    summary.time_gaps = gaps_total;
    summary.gap_records = gap_records.0;
    let (failed_total, failed_polls) = failed_polls(db, site, from, to).await?;
    summary.failed_polls = failed_total;
    Ok(Completeness {
        from,
        to,
        summary,
        epochs,
        devices: devices_out,
        time_gaps_truncated: gaps_total as usize > time_gaps.len(),
        time_gaps,
        gap_records_truncated: gap_records.0 as usize > gap_records.1.len(),
        gap_records: gap_records.1,
        failed_polls_truncated: failed_total as usize > failed_polls.len(),
        failed_polls,
    })
}

/// How many polls failed in `[from, to)`, and the first [`MAX_LISTED`] of them.
async fn failed_polls(
    db: &Db,
    site: &SiteId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<(u64, Vec<FailedPoll>), QueryError> {
    let count: i64 = each_db!(db, |pool, to_db, from_row| {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM events WHERE site = $1 AND kind = 'poll_failed' \
             AND ts >= $2 AND ts < $3",
        )
        .bind(site.as_str())
        .bind(to_db(from))
        .bind(to_db(to))
        .fetch_one(pool)
        .await?
    });
    let kinds = ["poll_failed".to_string()];
    let page = events(db, site, None, &kinds, from, to, None, MAX_LISTED as i64).await?;
    let listed = page
        .events
        .into_iter()
        .map(|e| FailedPoll {
            device: e.device,
            ts: e.ts,
            cause: e
                .message
                .split_once(": ")
                .map_or_else(String::new, |(c, _)| c.to_string()),
            message: e.message,
        })
        .collect();
    Ok((u64::try_from(count).unwrap_or(0), listed))
}

/// The union of the site's records (readings by `ts`, events by `ts`, gaps by `from_ts`) in
/// `[$2, $3)`, as `seq`. Readings are taken device by device (`$4`, `$5`, … name `devices`
/// of them), so the (site, device, ts) index finds them instead of a scan of the site's whole
/// history.
fn records_in_range(devices: usize) -> String {
    let mut sql = String::new();
    if devices > 0 {
        let list: Vec<String> = (0..devices).map(|i| format!("${}", i + 4)).collect();
        sql.push_str(&format!(
            "SELECT seq FROM readings WHERE site = $1 AND device IN ({}) AND ts >= $2 \
             AND ts < $3 UNION ALL ",
            list.join(", ")
        ));
    }
    sql.push_str(
        "SELECT seq FROM events WHERE site = $1 AND ts >= $2 AND ts < $3 \
         UNION ALL SELECT seq FROM gaps WHERE site = $1 AND from_ts >= $2 AND from_ts < $3",
    );
    sql
}

/// Each epoch with records in the range, and its smallest and largest seq there.
async fn epoch_bounds(
    db: &Db,
    site: &SiteId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<(u32, i64, i64)>, QueryError> {
    let devices = devices(db, site).await?;
    let sql = format!(
        "SELECT (seq >> 32) AS epoch, MIN(seq) AS lo, MAX(seq) AS hi FROM ({}) r \
         GROUP BY (seq >> 32) ORDER BY epoch LIMIT 1000",
        records_in_range(devices.len())
    );
    let rows: Vec<(i64, i64, i64)> = each_db!(db, |pool, to_db, from_row| {
        let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(site.as_str())
            .bind(to_db(from))
            .bind(to_db(to));
        for d in &devices {
            q = q.bind(d.as_str());
        }
        q.fetch_all(pool).await?
    });
    rows.into_iter()
        .map(|(e, lo, hi)| {
            u32::try_from(e)
                .map(|e| (e, lo, hi))
                .map_err(|_| QueryError::Corrupt(format!("{site}: epoch {e}")))
        })
        .collect()
}

/// Holes of one epoch between the last record stored before `min` (or counter 1) and `max`.
async fn epoch_holes(
    db: &Db,
    site: &SiteId,
    epoch: u32,
    min: i64,
    max: i64,
    evicted: &[(i64, i64)],
) -> Result<EpochCompleteness, QueryError> {
    let epoch_lo = i64::from(epoch) << COUNTER_BITS;
    let before = "SELECT MAX(seq) FROM (\
         SELECT MAX(seq) AS seq FROM readings WHERE site = $1 AND seq >= $2 AND seq < $3 \
         UNION ALL SELECT MAX(seq) FROM events WHERE site = $1 AND seq >= $2 AND seq < $3 \
         UNION ALL SELECT MAX(seq) FROM gaps WHERE site = $1 AND seq >= $2 AND seq < $3) m";
    let prev: Option<i64> = each_db!(db, |pool, to_db, from_row| {
        sqlx::query_scalar(before)
            .bind(site.as_str())
            .bind(epoch_lo)
            .bind(min)
            .fetch_one(pool)
            .await?
    });
    let first = prev.map_or(epoch_lo + 1, |p| p + 1);
    let all = "SELECT seq FROM readings WHERE site = $1 AND seq >= $2 AND seq <= $3 \
         UNION ALL SELECT seq FROM events WHERE site = $1 AND seq >= $2 AND seq <= $3 \
         UNION ALL SELECT seq FROM gaps WHERE site = $1 AND seq >= $2 AND seq <= $3 \
         ORDER BY seq";
    let mut holes = Vec::new();
    let mut truncated = false;
    let mut stored = 0u64;
    let mut covered_total = 0u64;
    let mut missing = 0u64;
    let mut next = first;
    let mut hole = |a: i64, b: i64| {
        let count = (b - a + 1) as u64;
        let covered = overlap(evicted, a, b);
        missing += count;
        covered_total += covered;
        if holes.len() < MAX_LISTED {
            holes.push(Hole {
                from: a,
                to: b,
                count,
                covered_by_gaps: covered,
            });
        } else {
            truncated = true;
        }
    };
    each_db!(db, |pool, to_db, from_row| {
        let mut rows = sqlx::query_scalar::<_, i64>(all)
            .bind(site.as_str())
            .bind(first)
            .bind(max)
            .fetch(pool);
        while let Some(seq) = rows.try_next().await? {
            stored += 1;
            if seq > next {
                hole(next, seq - 1);
            }
            next = next.max(seq + 1);
        }
    });
    Ok(EpochCompleteness {
        epoch,
        first_seq: first,
        last_seq: max,
        expected: (max - first + 1).max(0) as u64,
        stored,
        missing,
        covered_by_gaps: covered_total,
        holes,
        holes_truncated: truncated,
    })
}

/// How many of `[a, b]` the merged ranges cover.
fn overlap(ranges: &[(i64, i64)], a: i64, b: i64) -> u64 {
    ranges
        .iter()
        .map(|&(f, t)| {
            let (lo, hi) = (f.max(a), t.min(b));
            if hi >= lo { (hi - lo + 1) as u64 } else { 0 }
        })
        .sum()
}

/// Sequence ranges of eviction gap records that could touch the range's epochs, merged.
async fn evicted_ranges(
    db: &Db,
    site: &SiteId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<(i64, i64)>, QueryError> {
    // An eviction is reported after the records it dropped: look a lookback period either side.
    let sql = "SELECT seq_from, seq_to FROM gaps WHERE site = $1 AND seq_from IS NOT NULL \
               AND seq_to IS NOT NULL AND from_ts < $3 AND to_ts >= $2 ORDER BY seq_from LIMIT 100000";
    let (lo, hi) = (
        from - Duration::days(LOOKBACK_DAYS),
        to + Duration::days(LOOKBACK_DAYS),
    );
    let mut v: Vec<(i64, i64)> = each_db!(db, |pool, to_db, from_row| {
        sqlx::query_as(sql)
            .bind(site.as_str())
            .bind(to_db(lo))
            .bind(to_db(hi))
            .fetch_all(pool)
            .await?
    });
    v.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::with_capacity(v.len());
    for (f, t) in v {
        match merged.last_mut() {
            Some(last) if f <= last.1.saturating_add(1) => last.1 = last.1.max(t),
            _ => merged.push((f, t)),
        }
    }
    Ok(merged)
}

/// Gap records overlapping `[from, to)`: (how many, the first [`MAX_LISTED`]).
async fn gap_records(
    db: &Db,
    site: &SiteId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<(u64, Vec<GapView>), QueryError> {
    let sql = "SELECT seq, device, from_ts, to_ts, seq_from, seq_to, count, cause FROM gaps \
               WHERE site = $1 AND from_ts < $3 AND to_ts >= $2 ORDER BY from_ts, seq";
    let mut out = Vec::new();
    let mut n = 0u64;
    each_db!(db, |pool, to_db, from_row| {
        let mut rows = sqlx::query(sql)
            .bind(site.as_str())
            .bind(to_db(from))
            .bind(to_db(to))
            .fetch(pool);
        while let Some(r) = rows.try_next().await? {
            n += 1;
            if out.len() < MAX_LISTED {
                out.push(GapView {
                    seq: r.try_get("seq")?,
                    device: r.try_get("device")?,
                    from: from_row(&r, "from_ts")?,
                    to: from_row(&r, "to_ts")?,
                    seq_from: r.try_get("seq_from")?,
                    seq_to: r.try_get("seq_to")?,
                    count: r.try_get("count")?,
                    cause: r.try_get("cause")?,
                });
            }
        }
    });
    Ok((n, out))
}

/// The median interval between the device's first readings in the range, seconds.
async fn median_interval(
    db: &Db,
    site: &SiteId,
    device: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Option<f64>, QueryError> {
    let mut times = Vec::new();
    let scan = Scan {
        limit: Some(MEDIAN_SAMPLE),
        ..Scan::device(site, device, from, to)
    };
    scan_readings(db, &scan, |r| {
        times.push(r.ts);
        Ok(true)
    })
    .await?;
    let mut intervals: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6)
        .collect();
    if intervals.is_empty() {
        return Ok(None);
    }
    intervals.sort_by(f64::total_cmp);
    Ok(Some(intervals[intervals.len() / 2]))
}
