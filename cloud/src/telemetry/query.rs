//! Telemetry reads for the API: raw readings with keyset pagination, bucketed aggregates with
//! reset-aware extracted volume, the latest value of each device, completeness (sequence holes,
//! time gaps, gap records) and events. The same statements run on SQLite and PostgreSQL.
//!
//! Bounded work: every answer is built from rows streamed in order (never a whole table in
//! memory), and what an answer may hold is capped: [`MAX_LIMIT`] rows per page,
//! [`MAX_BUCKETS`] buckets per device, [`MAX_SCAN`] readings per aggregate, [`MAX_LISTED`]
//! holes, time gaps and gap records per completeness answer (the counts stay exact; the list says
//! it was truncated).

use crate::core::db::{Db, each_db};
use crate::telemetry::volume::{self, Step, Totalizer};
use caudal_common::{Flag, Quality, SiteId};
use chrono::{DateTime, Duration, Utc};
use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::Row;
use std::collections::{BTreeMap, HashMap};
use utoipa::ToSchema;

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
/// Intervals sampled to find a device's usual reporting interval (completeness).
const MEDIAN_SAMPLE: i64 = 1_001;
/// A time gap is longer than this many usual intervals, unless the caller says otherwise.
pub const DEFAULT_GAP_FACTOR: f64 = 3.0;

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

    /// The start of the bucket holding `t` (UTC-aligned).
    pub fn start(self, t: DateTime<Utc>) -> i64 {
        t.timestamp_micros().div_euclid(self.micros()) * self.micros()
    }
}

/// Quality flags as names, for answers.
pub fn flag_names(q: Quality) -> Vec<String> {
    q.iter().map(|f| f.name().to_string()).collect()
}

fn quality(site: &SiteId, seq: i64, bits: i32) -> Result<Quality, QueryError> {
    u16::try_from(bits)
        .map(Quality::from_bits)
        .map_err(|_| QueryError::Corrupt(format!("{site} seq {seq}: quality {bits}")))
}

/// One reading row as read back.
#[derive(Debug, Clone)]
struct Row_ {
    seq: i64,
    device: String,
    ts: DateTime<Utc>,
    quality: i32,
    flow: Option<f64>,
    total: Option<f64>,
    level: Option<f64>,
    extra: Option<String>,
}

const READING_COLUMNS: &str =
    "seq, device, ts, quality, flow_lps, total_m3, level_m, CAST(extra AS TEXT) AS extra";

/// What a streamed reading scan selects.
struct Scan<'a> {
    site: &'a SiteId,
    device: Option<&'a str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    after: Option<Cursor>,
    /// Only readings with any of these quality bits.
    quality: Option<u16>,
    limit: Option<i64>,
}

/// Streams the readings a [`Scan`] selects, ordered by `(ts, seq)`, to `visit` until it returns
/// `false`.
async fn scan_readings(
    db: &Db,
    scan: &Scan<'_>,
    mut visit: impl FnMut(Row_) -> Result<bool, QueryError>,
) -> Result<(), QueryError> {
    let mut sql =
        format!("SELECT {READING_COLUMNS} FROM readings WHERE site = $1 AND ts >= $2 AND ts < $3");
    let mut n = 3;
    let mut next = || {
        n += 1;
        n
    };
    let device_p = scan.device.map(|_| next());
    let after_p = scan.after.map(|_| (next(), next()));
    let quality_p = scan.quality.map(|_| next());
    let limit_p = scan.limit.map(|_| next());
    if let Some(p) = device_p {
        sql.push_str(&format!(" AND device = ${p}"));
    }
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
            .bind(to_db(scan.to));
        if let Some(d) = scan.device {
            q = q.bind(d);
        }
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
            let r = Row_ {
                seq: row.try_get("seq")?,
                device: row.try_get("device")?,
                ts: from_row(&row, "ts")?,
                quality: row.try_get("quality")?,
                flow: row.try_get("flow_lps")?,
                total: row.try_get("total_m3")?,
                level: row.try_get("level_m")?,
                extra: row.try_get("extra")?,
            };
            if !visit(r)? {
                break;
            }
        }
        Ok(())
    })
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

/// One stored reading, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ReadingView {
    pub seq: i64,
    pub device: String,
    pub ts: DateTime<Utc>,
    /// Quality flag names; empty is good.
    pub quality: Vec<String>,
    /// L/s.
    pub flow_lps: Option<f64>,
    /// Totalizer, m³.
    pub total_m3: Option<f64>,
    /// m.
    pub level_m: Option<f64>,
    /// Extra channels, in the unit the meter profile names.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

fn view(site: &SiteId, r: Row_) -> Result<ReadingView, QueryError> {
    let extra = match &r.extra {
        Some(e) => serde_json::from_str(e)
            .map_err(|e| QueryError::Corrupt(format!("{site} seq {}: extra: {e}", r.seq)))?,
        None => BTreeMap::new(),
    };
    Ok(ReadingView {
        seq: r.seq,
        quality: flag_names(quality(site, r.seq, r.quality)?),
        device: r.device,
        ts: r.ts,
        flow_lps: r.flow,
        total_m3: r.total,
        level_m: r.level,
        extra,
    })
}

/// A page of raw readings and where the next one starts.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReadingPage {
    pub readings: Vec<ReadingView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Raw readings of `site` in `[from, to)`, ordered by `(ts, seq)`, at most `limit`, after
/// `after`, optionally one device and only readings with any of the `quality` bits.
#[allow(clippy::too_many_arguments)]
pub async fn raw_readings(
    db: &Db,
    site: &SiteId,
    device: Option<&str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    after: Option<Cursor>,
    quality: Option<u16>,
    limit: i64,
) -> Result<ReadingPage, QueryError> {
    // Without a device, each device's readings are read through the (site, device, ts) index
    // and merged: the first `limit + 1` of the site are among the first `limit + 1` of each
    // device, and no query has to go through the site's whole history to sort it by time.
    let one;
    let all;
    let devices: &[String] = match device {
        Some(d) => {
            one = [d.to_string()];
            &one
        }
        None => {
            all = devices(db, site).await?;
            &all
        }
    };
    let mut rows = Vec::new();
    for d in devices {
        let scan = Scan {
            site,
            device: Some(d),
            from,
            to,
            after,
            quality,
            limit: Some(limit + 1),
        };
        scan_readings(db, &scan, |r| {
            rows.push(r);
            Ok(true)
        })
        .await?;
    }
    if devices.len() > 1 {
        rows.sort_unstable_by_key(|r| (r.ts, r.seq));
    }
    let next_cursor = take_page(&mut rows, limit, |r| (r.ts, r.seq));
    let readings = rows
        .into_iter()
        .map(|r| view(site, r))
        .collect::<Result<_, _>>()?;
    Ok(ReadingPage {
        readings,
        next_cursor,
    })
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
    /// Start of the bucket (UTC-aligned); it covers `[start, start + width)`.
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

/// Aggregates of `site` (one device or each) in `[from, to)` by `bucket`: only buckets holding
/// readings, by device then start.
pub async fn aggregate(
    db: &Db,
    site: &SiteId,
    device: Option<&str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: Bucket,
) -> Result<Vec<BucketView>, QueryError> {
    let span = (bucket.start(to) - bucket.start(from)) / bucket.micros() + 1;
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
        let scan = Scan {
            site,
            device: Some(&d),
            from,
            to,
            after: None,
            quality: None,
            limit: None,
        };
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
            let start = bucket.start(r.ts);
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

/// A quantity's latest value.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Latest {
    pub value: f64,
    pub ts: DateTime<Utc>,
    pub seq: i64,
    /// Quality flag names of the reading it comes from; empty is good.
    pub quality: Vec<String>,
}

/// The latest values of one device.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DeviceLatest {
    pub device: String,
    /// The device's most recent reading, whatever it holds.
    pub last_reading: ReadingView,
    /// The latest flow, L/s (looked for within [`LOOKBACK_DAYS`] of the last reading).
    pub flow_lps: Option<Latest>,
    /// The latest totalizer, m³.
    pub total_m3: Option<Latest>,
    /// The latest level, m.
    pub level_m: Option<Latest>,
}

/// The latest reading and the latest value of each quantity, per device of `site`.
pub async fn latest(db: &Db, site: &SiteId) -> Result<Vec<DeviceLatest>, QueryError> {
    let mut out = Vec::new();
    for d in devices(db, site).await? {
        let sql = "SELECT seq, device, ts, quality, flow_lps, total_m3, level_m, \
                   CAST(extra AS TEXT) AS extra FROM readings WHERE site = $1 AND device = $2 \
                   ORDER BY ts DESC, seq DESC LIMIT 1";
        let row: Option<Row_> = each_db!(db, |pool, to_db, from_row| {
            match sqlx::query(sql)
                .bind(site.as_str())
                .bind(&d)
                .fetch_optional(pool)
                .await?
            {
                Some(row) => Some(Row_ {
                    seq: row.try_get("seq")?,
                    device: row.try_get("device")?,
                    ts: from_row(&row, "ts")?,
                    quality: row.try_get("quality")?,
                    flow: row.try_get("flow_lps")?,
                    total: row.try_get("total_m3")?,
                    level: row.try_get("level_m")?,
                    extra: row.try_get("extra")?,
                }),
                None => None,
            }
        });
        let Some(row) = row else { continue };
        let since = row.ts - Duration::days(LOOKBACK_DAYS);
        let q = quality(site, row.seq, row.quality)?;
        let here = |v: Option<f64>| {
            v.map(|value| Latest {
                value,
                ts: row.ts,
                seq: row.seq,
                quality: flag_names(q),
            })
        };
        let mut values = [here(row.flow), here(row.total), here(row.level)];
        for (slot, column) in values.iter_mut().zip(["flow_lps", "total_m3", "level_m"]) {
            if slot.is_none() {
                *slot = latest_of(db, site, &d, column, since).await?;
            }
        }
        let [flow_lps, total_m3, level_m] = values;
        out.push(DeviceLatest {
            device: d,
            last_reading: view(site, row)?,
            flow_lps,
            total_m3,
            level_m,
        });
    }
    Ok(out)
}

async fn latest_of(
    db: &Db,
    site: &SiteId,
    device: &str,
    column: &'static str,
    since: DateTime<Utc>,
) -> Result<Option<Latest>, QueryError> {
    let sql = format!(
        "SELECT seq, ts, quality, {column} AS value FROM readings WHERE site = $1 AND device = $2 \
         AND ts >= $3 AND {column} IS NOT NULL ORDER BY ts DESC, seq DESC LIMIT 1"
    );
    let found: Option<(i64, DateTime<Utc>, i32, f64)> = each_db!(db, |pool, to_db, from_row| {
        match sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(site.as_str())
            .bind(device)
            .bind(to_db(since))
            .fetch_optional(pool)
            .await?
        {
            Some(r) => Some((
                r.try_get("seq")?,
                from_row(&r, "ts")?,
                r.try_get("quality")?,
                r.try_get("value")?,
            )),
            None => None,
        }
    });
    found
        .map(|(seq, ts, bits, value)| {
            Ok(Latest {
                value,
                ts,
                seq,
                quality: flag_names(quality(site, seq, bits)?),
            })
        })
        .transpose()
}

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
    let mut sql = String::from(
        "SELECT seq, ts, device, kind, message, previous, current, wrap FROM events \
         WHERE site = $1 AND ts >= $2 AND ts < $3",
    );
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
            rows.push(EventView {
                seq: r.try_get("seq")?,
                ts: from_row(&r, "ts")?,
                device: r.try_get("device")?,
                kind: r.try_get("kind")?,
                message: r.try_get("message")?,
                previous: r.try_get("previous")?,
                current: r.try_get("current")?,
                wrap: r.try_get("wrap")?,
            });
        }
    });
    let next_cursor = take_page(&mut rows, limit, |e| (e.ts, e.seq));
    Ok(EventPage {
        events: rows,
        next_cursor,
    })
}

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
    /// `evicted` or `device_unreachable`.
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
        let scan = Scan {
            site,
            device: Some(&d),
            from,
            to,
            after: None,
            quality: None,
            limit: None,
        };
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
    })
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
        site,
        device: Some(device),
        from,
        to,
        after: None,
        quality: None,
        limit: Some(MEDIAN_SAMPLE),
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

/// Quality bits for a filter: every flag named, or any flag for `flagged`.
pub fn quality_filter(names: &str) -> Result<u16, String> {
    let mut bits = 0u16;
    for n in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if n == "flagged" {
            bits |= Flag::ALL.iter().fold(0, |b, f| b | *f as u16);
            continue;
        }
        let f = Flag::from_name(n).ok_or_else(|| {
            let known: Vec<&str> = Flag::ALL.iter().map(|f| f.name()).collect();
            format!(
                "unknown quality flag {n:?}; known: flagged, {}",
                known.join(", ")
            )
        })?;
        bits |= f as u16;
    }
    if bits == 0 {
        return Err("name at least one quality flag".into());
    }
    Ok(bits)
}
