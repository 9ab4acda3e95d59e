//! `(site, seq)` conflicts: a record arriving under the identity of a stored record with other
//! content. Owns the comparison, its SQL (reading back the stored records of a batch's seqs) and
//! the `seq_conflicts` table the alert rule reads.
//!
//! **Safety rule** (enforced by `store::store_batches`, inside the transaction that writes the
//! batch, before it commits): an arriving record whose `(site, seq)` is
//! stored is a duplicate only when what is stored is the same record: same kind and same
//! content, column by column as stored (times to the microsecond the columns hold, extra channels
//! as JSON values). Anything else refuses the whole batch: it is dead-lettered, counted and
//! alerted, and never acknowledged, so the agent keeps its records. Such a conflict means the
//! site reused a seq (an outbox rolled back before agents opened an epoch per start, a
//! restored image) or someone else published in its name; either way the stored record stays
//! as it is.

use crate::core::db::{Db, each_db};
use caudal_common::{Batch, Event, Gap, Reading, Seq, SiteId};
use chrono::{DateTime, Utc};
use sqlx::{Postgres, Row, Sqlite, Transaction};
use std::collections::HashMap;

/// A stored record's content as its columns hold it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Content {
    Reading {
        device: String,
        ts_us: i64,
        quality: i32,
        flow: Option<f64>,
        total: Option<f64>,
        level: Option<f64>,
        extra: Option<serde_json::Value>,
    },
    Event {
        ts_us: i64,
        device: Option<String>,
        kind: String,
        message: String,
        previous: Option<f64>,
        current: Option<f64>,
        wrap: Option<f64>,
    },
    Gap {
        device: Option<String>,
        from_us: i64,
        to_us: i64,
        seq_from: Option<i64>,
        seq_to: Option<i64>,
        count: i64,
        cause: String,
    },
}

impl Content {
    fn kind(&self) -> &'static str {
        match self {
            Content::Reading { .. } => "reading",
            Content::Event { .. } => "event",
            Content::Gap { .. } => "gap",
        }
    }

    fn of_reading(r: &Reading) -> Content {
        Content::Reading {
            device: r.device.as_str().to_string(),
            ts_us: r.ts.timestamp_micros(),
            quality: i32::from(r.q.bits()),
            flow: r.flow_lps,
            total: r.total_m3,
            level: r.level_m,
            extra: super::store::extra_json(r).and_then(|s| serde_json::from_str(&s).ok()),
        }
    }

    fn of_event(e: &Event) -> Content {
        Content::Event {
            ts_us: e.ts.timestamp_micros(),
            device: e.device.as_ref().map(|d| d.as_str().to_string()),
            kind: super::store::event_kind(e),
            message: e.message.clone(),
            previous: e.previous,
            current: e.current,
            wrap: e.wrap,
        }
    }

    fn of_gap(g: &Gap) -> Content {
        Content::Gap {
            device: g.device.as_ref().map(|d| d.as_str().to_string()),
            from_us: g.from.timestamp_micros(),
            to_us: g.to.timestamp_micros(),
            seq_from: g.seqs.map(|r| super::store::seq_col(r.from)),
            seq_to: g.seqs.map(|r| super::store::seq_col(r.to)),
            count: super::store::clamp_i64(g.count),
            cause: super::store::gap_cause(g.cause).to_string(),
        }
    }
}

/// A record that arrived under a stored record's `(site, seq)` with other content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqConflict {
    pub site: SiteId,
    pub seq: Seq,
    /// The kind stored under the seq.
    pub stored: &'static str,
    /// The kind that arrived.
    pub arrived: &'static str,
}

impl std::fmt::Display for SeqConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "site {} seq {}: the arriving {} differs from the {} stored under the same seq \
             (the seq was reused or the batch is not the site's)",
            self.site, self.seq, self.arrived, self.stored
        )
    }
}

/// The batch's records, by seq column, with their content.
fn arriving(batch: &Batch) -> Vec<(i64, Content)> {
    let mut v = Vec::with_capacity(batch.len());
    v.extend(
        batch
            .readings
            .iter()
            .map(|r| (super::store::seq_col(r.seq), Content::of_reading(r))),
    );
    v.extend(
        batch
            .events
            .iter()
            .map(|e| (super::store::seq_col(e.seq), Content::of_event(e))),
    );
    v.extend(
        batch
            .gaps
            .iter()
            .map(|g| (super::store::seq_col(g.seq), Content::of_gap(g))),
    );
    v
}

/// What is stored under the seqs read: `(site, seq column)` → content.
pub(super) type StoredUnder = HashMap<(String, i64), Content>;

/// Adds `batch`'s records to `under`, as if stored: a later batch of the same group is compared
/// with them too.
pub(super) fn remember(under: &mut StoredUnder, batch: &Batch) {
    let site = batch.site.as_str();
    for (seq, content) in arriving(batch) {
        under.entry((site.to_string(), seq)).or_insert(content);
    }
}

/// The first record of `batch` whose `(site, seq)` holds a different stored record, if any.
pub(super) fn compare(batch: &Batch, stored: &StoredUnder) -> Option<SeqConflict> {
    if stored.is_empty() {
        return None;
    }
    let mut arriving = arriving(batch);
    arriving.sort_by_key(|(seq, _)| *seq);
    let site = batch.site.as_str().to_string();
    arriving.into_iter().find_map(|(seq, new)| {
        let old = stored.get(&(site.clone(), seq))?;
        (*old != new).then(|| SeqConflict {
            site: batch.site.clone(),
            seq: Seq(seq as u64),
            stored: old.kind(),
            arrived: new.kind(),
        })
    })
}

/// Reads the stored records under some `(site, seq)`s: one statement per table, each selecting
/// through the primary key. `$filter` selects them from the values bound as `$1` and `$2`,
/// `$extra` reads the extra channels as text, `$micros` turns a time column of a row into
/// microseconds.
macro_rules! stored_under {
    ($tx:expr, $site:expr, $seqs:expr, $filter:expr, $extra:expr, $micros:expr) => {{
        let mut out: StoredUnder = HashMap::new();
        let sql = format!(
            "SELECT site, seq, device, ts, quality, flow_lps, total_m3, level_m, {} AS extra \
             FROM readings WHERE {}",
            $extra, $filter
        );
        for r in sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind($site.clone())
            .bind($seqs.clone())
            .fetch_all(&mut **$tx)
            .await?
        {
            let extra: Option<String> = r.try_get("extra")?;
            out.insert(
                (r.try_get("site")?, r.try_get("seq")?),
                Content::Reading {
                    device: r.try_get("device")?,
                    ts_us: $micros(&r, "ts")?,
                    quality: r.try_get("quality")?,
                    flow: r.try_get("flow_lps")?,
                    total: r.try_get("total_m3")?,
                    level: r.try_get("level_m")?,
                    extra: extra.and_then(|s| serde_json::from_str(&s).ok()),
                },
            );
        }
        let sql = format!(
            "SELECT site, seq, ts, device, kind, message, previous, current, wrap \
             FROM events WHERE {}",
            $filter
        );
        for r in sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind($site.clone())
            .bind($seqs.clone())
            .fetch_all(&mut **$tx)
            .await?
        {
            out.insert(
                (r.try_get("site")?, r.try_get("seq")?),
                Content::Event {
                    ts_us: $micros(&r, "ts")?,
                    device: r.try_get("device")?,
                    kind: r.try_get("kind")?,
                    message: r.try_get("message")?,
                    previous: r.try_get("previous")?,
                    current: r.try_get("current")?,
                    wrap: r.try_get("wrap")?,
                },
            );
        }
        let sql = format!(
            "SELECT site, seq, device, from_ts, to_ts, seq_from, seq_to, count, cause \
             FROM gaps WHERE {}",
            $filter
        );
        for r in sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind($site)
            .bind($seqs)
            .fetch_all(&mut **$tx)
            .await?
        {
            out.insert(
                (r.try_get("site")?, r.try_get("seq")?),
                Content::Gap {
                    device: r.try_get("device")?,
                    from_us: $micros(&r, "from_ts")?,
                    to_us: $micros(&r, "to_ts")?,
                    seq_from: r.try_get("seq_from")?,
                    seq_to: r.try_get("seq_to")?,
                    count: r.try_get("count")?,
                    cause: r.try_get("cause")?,
                },
            );
        }
        out
    }};
}

fn seq_cols(batch: &Batch) -> Vec<i64> {
    arriving(batch).into_iter().map(|(s, _)| s).collect()
}

fn sqlite_micros(r: &sqlx::sqlite::SqliteRow, col: &str) -> Result<i64, sqlx::Error> {
    r.try_get(col)
}

fn pg_micros(r: &sqlx::postgres::PgRow, col: &str) -> Result<i64, sqlx::Error> {
    Ok(r.try_get::<DateTime<Utc>, _>(col)?.timestamp_micros())
}

/// The first record of `batch` that conflicts with a stored one (SQLite, in the batch's
/// transaction, after the group's earlier batches were written: in-process statements cost no
/// round trip, so one batch at a time).
pub(super) async fn find_sqlite(
    tx: &mut Transaction<'static, Sqlite>,
    batch: &Batch,
) -> Result<Option<SeqConflict>, sqlx::Error> {
    let seqs = serde_json::to_string(&seq_cols(batch)).unwrap_or_else(|_| "[]".into());
    let site = batch.site.as_str().to_string();
    let stored = stored_under!(
        tx,
        site,
        seqs,
        "site = $1 AND seq IN (SELECT value FROM json_each($2))",
        "extra",
        sqlite_micros
    );
    Ok(compare(batch, &stored))
}

/// What is stored under every `(site, seq)` of `batches` (PostgreSQL, in the group's
/// transaction): three statements for the whole group, whatever its size, like its insert.
pub(super) async fn stored_pg(
    tx: &mut Transaction<'static, Postgres>,
    batches: &[&Batch],
) -> Result<StoredUnder, sqlx::Error> {
    let mut sites = Vec::new();
    let mut seqs = Vec::new();
    for b in batches {
        for s in seq_cols(b) {
            sites.push(b.site.as_str().to_string());
            seqs.push(s);
        }
    }
    if seqs.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(stored_under!(
        tx,
        sites,
        seqs,
        "(site, seq) IN (SELECT * FROM UNNEST($1::text[], $2::int8[]))",
        "extra::text",
        pg_micros
    ))
}

/// Whether a record of `batches`, all just inserted in `tx` (every one new in its own table),
/// took a seq that another table holds for the same site: a reading's seq stored as an event,
/// say. The tables are keyed apart, so the insert alone cannot see it. Three index lookups for
/// the whole group: the readings table by the (few) event and gap seqs; the events and gaps
/// tables by each batch's seq range, whose rows (few: events and gaps are rare) are checked
/// against the kinds that arrived.
pub(super) async fn crosses_kinds_pg(
    tx: &mut Transaction<'static, Postgres>,
    batches: &[&Batch],
) -> Result<bool, sqlx::Error> {
    let (mut rare_sites, mut rare_seqs) = (Vec::new(), Vec::new());
    let (mut range_sites, mut lows, mut highs) = (Vec::new(), Vec::new(), Vec::new());
    let mut kinds: HashMap<(&str, i64), &'static str> = HashMap::new();
    for b in batches {
        let site = b.site.as_str();
        let arriving = arriving(b);
        for (seq, content) in &arriving {
            kinds.insert((site, *seq), content.kind());
            if !matches!(content, Content::Reading { .. }) {
                rare_sites.push(site);
                rare_seqs.push(*seq);
            }
        }
        if let (Some(lo), Some(hi)) = (
            arriving.iter().map(|(s, _)| *s).min(),
            arriving.iter().map(|(s, _)| *s).max(),
        ) {
            range_sites.push(site);
            lows.push(lo);
            highs.push(hi);
        }
    }
    if !rare_seqs.is_empty() {
        let taken: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM readings \
             WHERE (site, seq) IN (SELECT * FROM UNNEST($1::text[], $2::int8[])) LIMIT 1",
        )
        .bind(&rare_sites)
        .bind(&rare_seqs)
        .fetch_optional(&mut **tx)
        .await?;
        if taken.is_some() {
            return Ok(true);
        }
    }
    if range_sites.is_empty() {
        return Ok(false);
    }
    for (table, kind) in [("events", "event"), ("gaps", "gap")] {
        let sql = format!(
            "SELECT t.site, t.seq FROM {table} t \
             JOIN UNNEST($1::text[], $2::int8[], $3::int8[]) AS r(site, lo, hi) \
               ON t.site = r.site AND t.seq BETWEEN r.lo AND r.hi"
        );
        let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&range_sites)
            .bind(&lows)
            .bind(&highs)
            .fetch_all(&mut **tx)
            .await?;
        if rows.iter().any(|(site, seq)| {
            kinds
                .get(&(site.as_str(), *seq))
                .is_some_and(|k| *k != kind)
        }) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Records a conflict for the alert rule, in the transaction that refused the batch.
macro_rules! record {
    ($tx:expr, $c:expr, $batch:expr, $at:expr) => {
        sqlx::query(
            "INSERT INTO seq_conflicts (site, seq, batch, detail, received_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind($c.site.as_str())
        .bind(super::store::seq_col($c.seq))
        .bind($batch)
        .bind($c.to_string())
        .bind($at)
        .execute(&mut **$tx)
        .await
        .map(|_| ())
    };
}

pub(super) async fn record_sqlite(
    tx: &mut Transaction<'static, Sqlite>,
    c: &SeqConflict,
    batch: &str,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    record!(tx, c, batch, crate::core::db::sqlite_time(at))
}

pub(super) async fn record_pg(
    tx: &mut Transaction<'static, Postgres>,
    c: &SeqConflict,
    batch: &str,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    record!(tx, c, batch, at)
}

/// The latest conflict of each site recorded at or after `from`.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub site: String,
    pub seq: Seq,
    pub batch: String,
    pub detail: String,
    pub received_at: DateTime<Utc>,
    /// Conflicts of the site since `from`.
    pub count: i64,
}

/// The latest conflict of each site since `from`, and how many there were.
pub async fn latest_since(db: &Db, from: DateTime<Utc>) -> Result<Vec<Recorded>, sqlx::Error> {
    Ok(each_db!(db, |pool, to_db, from_row| {
        let rows = sqlx::query(
            "SELECT c.site, c.seq, c.batch, c.detail, c.received_at, n.count \
             FROM seq_conflicts c \
             JOIN (SELECT site, MAX(id) AS id, COUNT(*) AS count FROM seq_conflicts \
                   WHERE received_at >= $1 GROUP BY site) n ON n.id = c.id \
             ORDER BY c.site",
        )
        .bind(to_db(from))
        .fetch_all(pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(Recorded {
                site: r.try_get("site")?,
                seq: Seq(r.try_get::<i64, _>("seq")?.max(0) as u64),
                batch: r.try_get("batch")?,
                detail: r.try_get("detail")?,
                received_at: from_row(r, "received_at")?,
                count: r.try_get("count")?,
            });
        }
        out
    }))
}
