//! Aggregates: a site's readings in minute, hour or day buckets per device, with flow and level
//! statistics and the volume extracted (totalizer steps across resets, replacements and
//! rollovers, see [`crate::telemetry::volume`]). Buckets align to UTC, or to a fixed offset's
//! wall clock (`-04:00` for DGA days, which never follow daylight saving).

use super::scan::{Scan, quality, scan_readings};
use super::{LOOKBACK_DAYS, MAX_BUCKETS, MAX_SCAN, QueryError, devices};
use crate::core::db::{Db, each_db};
use crate::telemetry::volume::{self, Step, Totalizer};
use caudal_common::SiteId;
use chrono::{DateTime, Duration, FixedOffset, Utc};
use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::Row;
use std::collections::HashMap;
use utoipa::ToSchema;

/// Aggregation width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    Minute,
    Hour,
    Day,
}

impl Bucket {
    pub fn micros(self) -> i64 {
        match self {
            Bucket::Minute => 60_000_000,
            Bucket::Hour => 3_600_000_000,
            Bucket::Day => 86_400_000_000,
        }
    }

    /// The start of the bucket holding `t` (UTC-aligned), µs since the epoch.
    pub fn start(self, t: DateTime<Utc>) -> i64 {
        self.start_at(t, utc())
    }

    /// The start of the bucket holding `t` on the wall clock of `offset` (a day bucket starts at
    /// that offset's midnight), µs since the epoch.
    pub fn start_at(self, t: DateTime<Utc>, offset: FixedOffset) -> i64 {
        let shift = i64::from(offset.local_minus_utc()) * 1_000_000;
        (t.timestamp_micros() + shift).div_euclid(self.micros()) * self.micros() - shift
    }
}

/// Count, mean, min and max of one channel within a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct Stats {
    pub count: u64,
    pub avg: f64,
    pub min: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Acc {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Acc {
    fn add(&mut self, v: Option<f64>) {
        let Some(v) = v.filter(|v| v.is_finite()) else {
            return;
        };
        if self.count == 0 {
            self.min = v;
            self.max = v;
        }
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    fn stats(&self) -> Option<Stats> {
        (self.count > 0).then(|| Stats {
            count: self.count,
            avg: self.sum / self.count as f64,
            min: self.min,
            max: self.max,
        })
    }
}

/// One device's bucket.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BucketView {
    pub device: String,
    /// Start of the bucket (aligned to UTC or to the requested offset, shown in UTC); it covers
    /// `[start, start + width)`.
    pub start: DateTime<Utc>,
    /// Readings in the bucket.
    pub readings: u64,
    /// Flow, L/s (mean of the samples, not time-weighted).
    pub flow_lps: Option<Stats>,
    /// Level, m.
    pub level_m: Option<Stats>,
    /// Extracted volume attributed to the bucket, m³: the totalizer steps ending in it; absent
    /// when no reading in the bucket has a totalizer.
    pub volume_m3: Option<f64>,
    /// Steps counted across a rollover.
    #[schema(format = Int64, maximum = 4294967295_u32)]
    pub rollovers: u32,
    /// Steps that counted nothing because the count started again (reset, replacement, a
    /// decrease, a rollover of unknown wrap).
    #[schema(format = Int64, maximum = 4294967295_u32)]
    pub totalizer_breaks: u32,
}

#[derive(Debug, Default)]
struct Building {
    start: i64,
    readings: u64,
    flow: Acc,
    level: Acc,
    volume: Option<f64>,
    rollovers: u32,
    breaks: u32,
}

impl Building {
    fn finish(self, device: &str) -> Result<BucketView, QueryError> {
        Ok(BucketView {
            device: device.to_string(),
            start: DateTime::from_timestamp_micros(self.start)
                .ok_or_else(|| QueryError::Corrupt(format!("bucket {}", self.start)))?,
            readings: self.readings,
            flow_lps: self.flow.stats(),
            level_m: self.level.stats(),
            volume_m3: self.volume,
            rollovers: self.rollovers,
            totalizer_breaks: self.breaks,
        })
    }
}

fn utc() -> FixedOffset {
    chrono::Offset::fix(&Utc)
}

/// Aggregates of `site` (one device or each) in `[from, to)` by `bucket`, UTC-aligned: only
/// buckets holding readings, by device then start.
pub async fn aggregate(
    db: &Db,
    site: &SiteId,
    device: Option<&str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: Bucket,
) -> Result<Vec<BucketView>, QueryError> {
    aggregate_at(db, site, device, from, to, bucket, utc()).await
}

/// Like [`aggregate`], with buckets aligned to the wall clock of `offset`.
pub async fn aggregate_at(
    db: &Db,
    site: &SiteId,
    device: Option<&str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: Bucket,
    offset: FixedOffset,
) -> Result<Vec<BucketView>, QueryError> {
    let span = (bucket.start_at(to, offset) - bucket.start_at(from, offset)) / bucket.micros() + 1;
    if span > MAX_BUCKETS {
        return Err(QueryError::TooLarge {
            field: "bucket",
            message: format!(
                "from..to spans {span} {bucket:?} buckets, more than {MAX_BUCKETS}: choose a \
                 wider bucket or a shorter range"
            )
            .to_lowercase(),
        });
    }
    let devices = match device {
        Some(d) => vec![d.to_string()],
        None => devices(db, site).await?,
    };
    let mut out = Vec::new();
    let mut scanned = 0u64;
    for d in devices {
        let base = last_total_before(db, site, &d, from).await?;
        let wraps = rollover_wraps(db, site, &d, from, to).await?;
        let mut totalizer = base.map_or_else(Totalizer::new, Totalizer::from_total);
        let mut cur: Option<Building> = None;
        let mut finished: Vec<Building> = Vec::new();
        let scan = Scan::device(site, &d, from, to);
        scan_readings(db, &scan, |r| {
            scanned += 1;
            if scanned > MAX_SCAN {
                return Err(QueryError::TooLarge {
                    field: "from",
                    message: format!(
                        "the range holds more than {MAX_SCAN} readings: query a shorter range"
                    ),
                });
            }
            let start = bucket.start_at(r.ts, offset);
            if cur.as_ref().is_none_or(|b| b.start != start) {
                finished.extend(cur.take());
                cur = Some(Building {
                    start,
                    ..Building::default()
                });
            }
            let Some(b) = cur.as_mut() else {
                return Ok(true);
            };
            b.readings += 1;
            b.flow.add(r.flow);
            b.level.add(r.level);
            if let Some(total) = r.total {
                let q = quality(site, r.seq, r.quality)?;
                let wrap = wraps.get(&r.ts.timestamp_micros()).copied();
                let step = totalizer.step(total, q, wrap);
                match step {
                    Step::Rollover(_) => b.rollovers += 1,
                    Step::Break(_) => b.breaks += 1,
                    _ => {}
                }
                b.volume = Some(b.volume.unwrap_or(0.0) + step.volume());
            }
            Ok(true)
        })
        .await?;
        finished.extend(cur.take());
        for b in finished {
            out.push(b.finish(&d)?);
        }
    }
    Ok(out)
}

/// The device's last totalizer before `before` (within [`LOOKBACK_DAYS`]).
async fn last_total_before(
    db: &Db,
    site: &SiteId,
    device: &str,
    before: DateTime<Utc>,
) -> Result<Option<f64>, QueryError> {
    let since = before - Duration::days(LOOKBACK_DAYS);
    let sql = "SELECT total_m3 FROM readings WHERE site = $1 AND device = $2 AND ts < $3 \
               AND ts >= $4 AND total_m3 IS NOT NULL ORDER BY ts DESC, seq DESC LIMIT 1";
    let v: Option<f64> = each_db!(db, |pool, to_db, from_row| {
        sqlx::query_scalar(sql)
            .bind(site.as_str())
            .bind(device)
            .bind(to_db(before))
            .bind(to_db(since))
            .fetch_optional(pool)
            .await?
    });
    Ok(v)
}

/// The wrap values of the device's rollover events in `[from, to)`, by event time (µs): the
/// event's `wrap` field, or for events from agents that sent none, the value its message names.
async fn rollover_wraps(
    db: &Db,
    site: &SiteId,
    device: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<HashMap<i64, f64>, QueryError> {
    let sql = "SELECT ts, wrap, message FROM events WHERE site = $1 AND ts >= $2 AND ts < $3 \
               AND device = $4 AND kind = 'totalizer_rollover' ORDER BY ts LIMIT $5";
    let mut out = HashMap::new();
    each_db!(db, |pool, to_db, from_row| {
        let mut rows = sqlx::query(sql)
            .bind(site.as_str())
            .bind(to_db(from))
            .bind(to_db(to))
            .bind(device)
            .bind(MAX_SCAN as i64)
            .fetch(pool);
        while let Some(row) = rows.try_next().await? {
            let ts = from_row(&row, "ts")?;
            let wrap: Option<f64> = row.try_get("wrap")?;
            let message: String = row.try_get("message")?;
            let wrap = wrap
                .filter(|w| w.is_finite() && *w > 0.0)
                .or_else(|| volume::wrap_from_message(&message));
            if let Some(w) = wrap {
                out.insert(ts.timestamp_micros(), w);
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_buckets_start_at_the_offsets_midnight() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).expect("valid").to_utc();
        let dga = FixedOffset::west_opt(4 * 3600).expect("valid");
        let start = |s: &str, o| DateTime::from_timestamp_micros(Bucket::Day.start_at(t(s), o));
        // 02:30 UTC on the 28th is 22:30 on the 27th in UTC-4.
        assert_eq!(
            start("2026-11-28T02:30:00Z", dga),
            Some(t("2026-11-27T04:00:00Z"))
        );
        assert_eq!(
            start("2026-11-28T04:00:00Z", dga),
            Some(t("2026-11-28T04:00:00Z"))
        );
        assert_eq!(
            start("2026-11-28T02:30:00Z", utc()),
            Some(t("2026-11-28T00:00:00Z"))
        );
        let plus = FixedOffset::east_opt(5 * 3600 + 1800).expect("valid");
        assert_eq!(
            start("2026-11-28T02:30:00Z", plus),
            Some(t("2026-11-27T18:30:00Z"))
        );
        // An hour bucket on a half-hour offset starts at the half hour.
        assert_eq!(
            DateTime::from_timestamp_micros(Bucket::Hour.start_at(t("2026-11-28T02:10:00Z"), plus)),
            Some(t("2026-11-28T01:30:00Z"))
        );
    }
}
