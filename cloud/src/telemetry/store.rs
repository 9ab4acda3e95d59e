//! Telemetry storage: batches (readings, events, gaps), agent status and dead letters, written
//! for each backend.
//!
//! Invariant: [`store_batches`] writes a group of batches in one transaction that first checks
//! each batch's site is registered and active; every batch that passes is written whole, a
//! refused batch writes nothing, and the call returns only after the commit, so an
//! acknowledgement sent after it never names a record that a crash could lose. A database error
//! rolls the whole group back. Records are keyed by `(site, seq)` and inserted with
//! `ON CONFLICT DO NOTHING`: a batch that arrives again (the agent re-sends until it sees the
//! ack), even twice in one group, stores nothing new and succeeds. Before a batch is written,
//! the records already stored under its seqs are compared with it (`conflict`): a different
//! record under the same `(site, seq)` refuses the batch ([`StoreError::SeqConflict`]), writes
//! nothing of it and records the conflict for the alert; the stored record stays. Within a
//! group, a batch is also compared with the group's earlier batches (SQLite: written before it
//! in the same transaction; PostgreSQL: remembered, as the group is written in one insert).
//! [`store_batch`] is the group of one.
//!
//! Bulk inserts: PostgreSQL receives each column of the whole group's readings as one array and
//! inserts with `UNNEST`, one statement per group whatever its size, so a group pays one round
//! trip, one plan and one commit (one WAL flush) however many batches it holds; SQLite receives
//! multi-row `INSERT`s of [`SQLITE_ROWS_PER_INSERT`] rows, inside one `BEGIN IMMEDIATE`
//! transaction (taking the write lock up front, so concurrent writers wait on the busy timeout
//! instead of failing to upgrade).

use super::conflict::{self, SeqConflict};
use crate::core::db::{Backend, Db, each_db, from_sqlite_time, pg_time, sqlite_time};
use caudal_common::{Batch, BatchError, Event, Gap, GapCause, Reading, Seq, SiteId, Status};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{Postgres, QueryBuilder, Row, Sqlite, Transaction};
use std::collections::HashMap;

/// Readings per SQLite `INSERT` statement: 10 columns each, well under SQLite's 32766 bound
/// parameters.
pub const SQLITE_ROWS_PER_INSERT: usize = 500;

/// Why a batch or status was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("site {0} is not registered")]
    UnknownSite(SiteId),
    #[error("site {0} is not active")]
    InactiveSite(SiteId),
    /// The batch breaks a rule of the contract (`Batch::check`); nothing of it was written.
    #[error("{0}")]
    Batch(#[from] BatchError),
    /// A record arrived under a stored record's `(site, seq)` with other content; nothing of
    /// the batch was written.
    #[error("{0}")]
    SeqConflict(SeqConflict),
    /// What is stored cannot be read back.
    #[error("{0}")]
    Invalid(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Records newly stored by one batch (duplicates not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    pub readings: u64,
    pub events: u64,
    pub gaps: u64,
}

/// A seq as the database column holds it; [`Batch::check`] has refused any that does not fit.
pub(super) fn seq_col(s: Seq) -> i64 {
    i64::try_from(s.0).unwrap_or(i64::MAX)
}

/// A gap's seq range end, checked by [`Batch::check`].
fn gap_col(g: &Gap, end: impl Fn(&caudal_common::SeqRange) -> Seq) -> Option<i64> {
    g.seqs.as_ref().map(|r| seq_col(end(r)))
}

pub(super) fn extra_json(r: &Reading) -> Option<String> {
    // A map of strings to finite f64 always serializes.
    (!r.extra.is_empty()).then(|| serde_json::to_string(&r.extra).unwrap_or_default())
}

pub(super) fn event_kind(e: &Event) -> String {
    serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub(super) fn gap_cause(c: GapCause) -> &'static str {
    match c {
        GapCause::Evicted => "evicted",
        GapCause::DeviceUnreachable => "device_unreachable",
    }
}

pub(super) fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Stores a decoded batch for its site (the caller has checked that the topic names the same
/// site). Returns after the commit.
pub async fn store_batch(
    db: &Db,
    batch: &Batch,
    received_at: DateTime<Utc>,
) -> Result<Stored, StoreError> {
    let mut group = store_batches(db, &[(batch, received_at)]).await?;
    match group.outcomes.pop() {
        Some(Err(refused)) => Err(refused),
        Some(Ok(())) | None => Ok(group.stored),
    }
}

/// What storing a group of batches did.
#[derive(Debug, Default)]
pub struct GroupStored {
    /// Records newly stored by the group's accepted batches together (duplicates not counted).
    pub stored: Stored,
    /// One outcome per batch, in the group's order: stored and committed, or refused (unknown or
    /// inactive site, a broken rule of the contract, a `(site, seq)` conflict) with nothing of it
    /// written.
    pub outcomes: Vec<Result<(), StoreError>>,
}

/// Stores a group of decoded batches, each with the time its message arrived, in one
/// transaction (the caller has checked that each topic names its batch's site). Returns after
/// the commit. `Err` is a database error: nothing of the group was stored.
pub async fn store_batches(
    db: &Db,
    group: &[(&Batch, DateTime<Utc>)],
) -> Result<GroupStored, sqlx::Error> {
    // The ingest decoded each batch with these rules already; checked again here because the
    // columns depend on them whoever calls.
    let mut outcomes: Vec<Result<(), StoreError>> = group
        .iter()
        .map(|(b, _)| b.check().map_err(StoreError::from))
        .collect();
    let sites: Vec<&str> = {
        let mut v: Vec<&str> = group.iter().map(|(b, _)| b.site.as_str()).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    match db {
        Db::Sqlite(p) => {
            let mut tx = p.begin_write().await?;
            let mut active = std::collections::HashMap::with_capacity(sites.len());
            for site in sites {
                let a: Option<bool> = sqlx::query_scalar("SELECT active FROM sites WHERE id = ?")
                    .bind(site)
                    .fetch_optional(&mut *tx)
                    .await?;
                active.insert(site, a);
            }
            let mut stored = Stored::default();
            for ((batch, at), outcome) in group.iter().zip(outcomes.iter_mut()) {
                if outcome.is_ok() {
                    let a = active.get(batch.site.as_str()).copied().flatten();
                    *outcome = check_site(&batch.site, a);
                }
                if outcome.is_ok()
                    && let Some(c) = conflict::find_sqlite(&mut tx, batch).await?
                {
                    conflict::record_sqlite(&mut tx, &c, &batch.batch, *at).await?;
                    *outcome = Err(StoreError::SeqConflict(c));
                }
                if outcome.is_ok() {
                    stored.add(sqlite_batch(&mut tx, batch, *at).await?);
                }
            }
            tx.commit().await?;
            Ok(GroupStored { stored, outcomes })
        }
        Db::Postgres(p) => {
            let active = pg_active(p, &sites).await?;
            for ((batch, _), outcome) in group.iter().zip(outcomes.iter_mut()) {
                if outcome.is_ok() {
                    *outcome = check_site(&batch.site, active.get(batch.site.as_str()).copied());
                }
            }
            let checked: Vec<(&Batch, DateTime<Utc>)> = group
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| o.is_ok())
                .map(|((b, at), _)| (*b, *at))
                .collect();
            // Optimistic first: insert everything. When every record was new and none took a
            // seq another kind holds (the tables are keyed apart), the group commits with
            // nothing read back: the common case. Otherwise the attempt is rolled back and the
            // group is stored the careful way, comparing before writing, with the conflicting
            // batches refused: a redelivered duplicate pays that, the hot path does not.
            let mut tx = p.begin_write().await?;
            let stored = pg_batches(&mut tx, &checked).await?;
            let records: u64 = checked.iter().map(|(b, _)| b.len() as u64).sum();
            let batches: Vec<&Batch> = checked.iter().map(|(b, _)| *b).collect();
            if stored.readings + stored.events + stored.gaps == records
                && !conflict::crosses_kinds_pg(&mut tx, &batches).await?
            {
                tx.commit().await?;
                return Ok(GroupStored { stored, outcomes });
            }
            tx.rollback().await?;
            pg_refusing_conflicts(p, group, outcomes).await
        }
    }
}

/// Whether each of `sites` is active (absent: unknown).
async fn pg_active(
    p: &sqlx::PgPool,
    sites: &[&str],
) -> Result<std::collections::HashMap<String, bool>, sqlx::Error> {
    let rows: Vec<(String, bool)> =
        sqlx::query_as("SELECT id, active FROM sites WHERE id = ANY($1)")
            .bind(sites)
            .fetch_all(p)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Stores a group of which some record's seq was stored already: reads what is stored under
/// every seq first, refuses (and records) each conflicting batch, stores the rest. Taken only
/// after the optimistic insert met a stored seq, so its read costs nothing on the common path.
async fn pg_refusing_conflicts(
    p: &sqlx::PgPool,
    group: &[(&Batch, DateTime<Utc>)],
    mut outcomes: Vec<Result<(), StoreError>>,
) -> Result<GroupStored, sqlx::Error> {
    let mut tx = p.begin_write().await?;
    let checked: Vec<&Batch> = group
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| o.is_ok())
        .map(|((b, _), _)| *b)
        .collect();
    let mut under = conflict::stored_pg(&mut tx, &checked).await?;
    let mut accepted = Vec::with_capacity(group.len());
    for ((batch, at), outcome) in group.iter().zip(outcomes.iter_mut()) {
        if outcome.is_ok()
            && let Some(c) = conflict::compare(batch, &under)
        {
            conflict::record_pg(&mut tx, &c, &batch.batch, *at).await?;
            *outcome = Err(StoreError::SeqConflict(c));
        }
        if outcome.is_ok() {
            conflict::remember(&mut under, batch);
            accepted.push((*batch, *at));
        }
    }
    let stored = pg_batches(&mut tx, &accepted).await?;
    tx.commit().await?;
    Ok(GroupStored { stored, outcomes })
}

impl Stored {
    fn add(&mut self, o: Stored) {
        self.readings += o.readings;
        self.events += o.events;
        self.gaps += o.gaps;
    }
}

/// A write transaction as every write here opens it: SQLite takes its write lock up front
/// (`BEGIN IMMEDIATE`), so concurrent writers wait on the busy timeout instead of failing to
/// upgrade; PostgreSQL's plain `BEGIN` suffices.
trait BeginWrite {
    type Database: sqlx::Database;
    fn begin_write(
        &self,
    ) -> impl std::future::Future<Output = Result<Transaction<'static, Self::Database>, sqlx::Error>>
    + Send;
}

impl BeginWrite for sqlx::SqlitePool {
    type Database = Sqlite;
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl BeginWrite for sqlx::PgPool {
    type Database = Postgres;
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.begin().await
    }
}

fn check_site(site: &SiteId, active: Option<bool>) -> Result<(), StoreError> {
    match active {
        None => Err(StoreError::UnknownSite(site.clone())),
        Some(false) => Err(StoreError::InactiveSite(site.clone())),
        Some(true) => Ok(()),
    }
}

/// Inserts a batch's events and gaps row by row (they are few), each once on `(site, seq)`,
/// adding what was new to `$stored`; `$received` is the arrival time as the column holds it and
/// `$to_db` converts the records' times likewise (a macro: the transaction type differs per
/// backend, the statements do not).
macro_rules! insert_events_and_gaps {
    ($tx:expr, $batch:expr, $received:expr, $to_db:path, $stored:expr) => {{
        let site = $batch.site.as_str();
        for e in &$batch.events {
            $stored.events += sqlx::query(
                "INSERT INTO events (site, seq, ts, device, kind, message, previous, current, \
                 wrap, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (site, seq) DO NOTHING",
            )
            .bind(site)
            .bind(seq_col(e.seq))
            .bind($to_db(e.ts))
            .bind(e.device.as_ref().map(|d| d.as_str()))
            .bind(event_kind(e))
            .bind(&e.message)
            .bind(e.previous)
            .bind(e.current)
            .bind(e.wrap)
            .bind($received)
            .execute(&mut **$tx)
            .await?
            .rows_affected();
        }
        for g in &$batch.gaps {
            $stored.gaps += sqlx::query(
                "INSERT INTO gaps (site, seq, device, from_ts, to_ts, seq_from, seq_to, count, \
                 cause, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (site, seq) DO NOTHING",
            )
            .bind(site)
            .bind(seq_col(g.seq))
            .bind(g.device.as_ref().map(|d| d.as_str()))
            .bind($to_db(g.from))
            .bind($to_db(g.to))
            .bind(gap_col(g, |r| r.from))
            .bind(gap_col(g, |r| r.to))
            .bind(clamp_i64(g.count))
            .bind(gap_cause(g.cause))
            .bind($received)
            .execute(&mut **$tx)
            .await?
            .rows_affected();
        }
    }};
}

/// Writes one batch whose site and rules were checked ([`check_site`], [`Batch::check`]).
async fn sqlite_batch(
    tx: &mut Transaction<'static, Sqlite>,
    batch: &Batch,
    received_at: DateTime<Utc>,
) -> Result<Stored, sqlx::Error> {
    let site = batch.site.as_str();
    let now = sqlite_time(received_at);
    let mut stored = Stored::default();

    for chunk in batch.readings.chunks(SQLITE_ROWS_PER_INSERT) {
        let mut rows = Vec::with_capacity(chunk.len());
        for r in chunk {
            rows.push((seq_col(r.seq), r, extra_json(r)));
        }
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO readings (site, seq, device, ts, quality, flow_lps, total_m3, level_m, \
             extra, received_at) ",
        );
        qb.push_values(rows, |mut b, (seq, r, extra)| {
            b.push_bind(site)
                .push_bind(seq)
                .push_bind(r.device.as_str())
                .push_bind(sqlite_time(r.ts))
                .push_bind(i32::from(r.q.bits()))
                .push_bind(r.flow_lps)
                .push_bind(r.total_m3)
                .push_bind(r.level_m)
                .push_bind(extra)
                .push_bind(now);
        });
        qb.push(" ON CONFLICT (site, seq) DO NOTHING");
        stored.readings += qb.build().execute(&mut **tx).await?.rows_affected();
    }

    insert_events_and_gaps!(tx, batch, now, sqlite_time, stored);

    sqlx::query(
        "INSERT INTO site_status (site, online, last_seen, updated_at) VALUES (?, 1, ?, ?) \
         ON CONFLICT (site) DO UPDATE SET last_seen = excluded.last_seen, \
         updated_at = excluded.updated_at",
    )
    .bind(site)
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(stored)
}

/// Writes the accepted batches of a group (sites and seqs checked): all their readings in one
/// `INSERT ... SELECT FROM UNNEST`, events and gaps row by row (they are few), and one
/// `site_status` upsert for the group's sites.
async fn pg_batches(
    tx: &mut Transaction<'static, Postgres>,
    group: &[(&Batch, DateTime<Utc>)],
) -> Result<Stored, sqlx::Error> {
    let mut stored = Stored::default();
    let n: usize = group.iter().map(|(b, _)| b.readings.len()).sum();
    if n > 0 {
        let mut site = Vec::with_capacity(n);
        let mut seq = Vec::with_capacity(n);
        let mut device = Vec::with_capacity(n);
        let mut ts = Vec::with_capacity(n);
        let mut quality = Vec::with_capacity(n);
        let mut flow = Vec::with_capacity(n);
        let mut total = Vec::with_capacity(n);
        let mut level = Vec::with_capacity(n);
        let mut extra = Vec::with_capacity(n);
        let mut received = Vec::with_capacity(n);
        for (batch, at) in group {
            for r in &batch.readings {
                site.push(batch.site.as_str());
                seq.push(seq_col(r.seq));
                device.push(r.device.as_str());
                ts.push(r.ts);
                quality.push(i32::from(r.q.bits()));
                flow.push(r.flow_lps);
                total.push(r.total_m3);
                level.push(r.level_m);
                extra.push(extra_json(r));
                received.push(*at);
            }
        }
        stored.readings = sqlx::query(
            "INSERT INTO readings (site, seq, device, ts, quality, flow_lps, total_m3, level_m, \
             extra, received_at) \
             SELECT t.site, t.seq, t.device, t.ts, t.quality, t.flow, t.total, t.level, \
                    t.extra::jsonb, t.received \
             FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::timestamptz[], $5::int4[], \
                         $6::float8[], $7::float8[], $8::float8[], $9::text[], \
                         $10::timestamptz[]) \
                  AS t(site, seq, device, ts, quality, flow, total, level, extra, received) \
             ON CONFLICT (site, seq) DO NOTHING",
        )
        .bind(site)
        .bind(seq)
        .bind(device)
        .bind(ts)
        .bind(quality)
        .bind(flow)
        .bind(total)
        .bind(level)
        .bind(extra)
        .bind(received)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }

    for (batch, at) in group {
        insert_events_and_gaps!(tx, batch, *at, pg_time, stored);
    }

    // One row per site (an upsert may not touch a row twice), seen at its latest batch.
    let mut seen: Vec<(&str, DateTime<Utc>)> =
        group.iter().map(|(b, at)| (b.site.as_str(), *at)).collect();
    seen.sort_unstable_by(|a, b| a.0.cmp(b.0).then(b.1.cmp(&a.1)));
    seen.dedup_by(|a, b| a.0 == b.0);
    if !seen.is_empty() {
        let (sites, times): (Vec<&str>, Vec<DateTime<Utc>>) = seen.into_iter().unzip();
        sqlx::query(
            "INSERT INTO site_status (site, online, last_seen, updated_at) \
             SELECT t.site, TRUE, t.at, t.at FROM UNNEST($1::text[], $2::timestamptz[]) \
                  AS t(site, at) \
             ON CONFLICT (site) DO UPDATE SET last_seen = excluded.last_seen, \
             updated_at = excluded.updated_at",
        )
        .bind(sites)
        .bind(times)
        .execute(&mut **tx)
        .await?;
    }
    Ok(stored)
}

/// Records an agent's status (or its last will). Fields the message leaves out keep their last
/// known value; `last_seen` moves only for messages from the agent itself (`online: true`), not
/// for the will the broker publishes on its behalf.
pub async fn store_status(
    db: &Db,
    status: &Status,
    received_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let site = status.site.as_str();
    let last_seen = status.online.then_some(received_at);
    // An empty device map from a will means "unknown", not "no devices".
    let devices = (status.online || !status.devices.is_empty())
        .then(|| serde_json::to_string(&status.devices).unwrap_or_default());
    let backlog = status.backlog.map(clamp_i64);
    let age = status.oldest_unsent_age_s.map(clamp_i64);
    let evicted = status.evicted.map(clamp_i64);
    // PostgreSQL keeps the device map as `jsonb`, SQLite as its text.
    let devices_param = match db.backend() {
        Backend::Postgres => "$11::jsonb",
        Backend::Sqlite => "$11",
    };
    let upsert = format!(
        "INSERT INTO site_status (site, online, last_seen, status_ts, backlog, \
         oldest_unsent_age_s, clock_synced, evicted, agent_version, config_version, devices, \
         updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, {devices_param}, $12) \
         ON CONFLICT (site) DO UPDATE SET online = excluded.online, \
         last_seen = COALESCE(excluded.last_seen, site_status.last_seen), \
         status_ts = COALESCE(excluded.status_ts, site_status.status_ts), \
         backlog = COALESCE(excluded.backlog, site_status.backlog), \
         oldest_unsent_age_s = COALESCE(excluded.oldest_unsent_age_s, \
                                        site_status.oldest_unsent_age_s), \
         clock_synced = COALESCE(excluded.clock_synced, site_status.clock_synced), \
         evicted = COALESCE(excluded.evicted, site_status.evicted), \
         agent_version = COALESCE(excluded.agent_version, site_status.agent_version), \
         config_version = COALESCE(excluded.config_version, site_status.config_version), \
         devices = COALESCE(excluded.devices, site_status.devices), \
         updated_at = excluded.updated_at"
    );
    each_db!(db, |pool, to_db, from_row| {
        let mut tx = pool.begin_write().await?;
        let active: Option<bool> = sqlx::query_scalar("SELECT active FROM sites WHERE id = $1")
            .bind(site)
            .fetch_optional(&mut *tx)
            .await?;
        check_site(&status.site, active)?;
        sqlx::query(sqlx::AssertSqlSafe(upsert))
            .bind(site)
            .bind(status.online)
            .bind(last_seen.map(to_db))
            .bind(status.ts.map(to_db))
            .bind(backlog)
            .bind(age)
            .bind(status.clock_synced)
            .bind(evicted)
            .bind(&status.agent_version)
            .bind(&status.config_version)
            .bind(devices)
            .bind(to_db(received_at))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    });
    Ok(())
}

/// What the cloud last knew of a site's agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteStatus {
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
    pub backlog: Option<i64>,
    pub oldest_unsent_age_s: Option<i64>,
    pub agent_version: Option<String>,
    pub config_version: Option<String>,
    /// Device id → last poll state, as the agent reported it.
    pub devices: Option<serde_json::Value>,
    pub updated_at: DateTime<Utc>,
}

/// The stored status of `site`, if any message was stored for it.
pub async fn site_status(db: &Db, site: &SiteId) -> Result<Option<SiteStatus>, StoreError> {
    let parse_devices = |s: Option<String>| -> Result<Option<serde_json::Value>, StoreError> {
        s.map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| StoreError::Invalid(format!("site_status.devices of {site}: {e}")))
    };
    let time = |micros: i64, column: &str| {
        from_sqlite_time(micros).ok_or_else(|| {
            StoreError::Invalid(format!("site_status.{column} of {site} is out of range"))
        })
    };
    match db {
        Db::Sqlite(p) => {
            let Some(r) = sqlx::query(
                "SELECT online, last_seen, backlog, oldest_unsent_age_s, agent_version, \
                 config_version, devices, updated_at FROM site_status WHERE site = ?",
            )
            .bind(site.as_str())
            .fetch_optional(p)
            .await?
            else {
                return Ok(None);
            };
            let last_seen: Option<i64> = r.try_get("last_seen")?;
            Ok(Some(SiteStatus {
                online: r.try_get("online")?,
                last_seen: last_seen.map(|t| time(t, "last_seen")).transpose()?,
                backlog: r.try_get("backlog")?,
                oldest_unsent_age_s: r.try_get("oldest_unsent_age_s")?,
                agent_version: r.try_get("agent_version")?,
                config_version: r.try_get("config_version")?,
                devices: parse_devices(r.try_get("devices")?)?,
                updated_at: time(r.try_get("updated_at")?, "updated_at")?,
            }))
        }
        Db::Postgres(p) => {
            let Some(r) = sqlx::query(
                "SELECT online, last_seen, backlog, oldest_unsent_age_s, agent_version, \
                 config_version, devices::text AS devices, updated_at \
                 FROM site_status WHERE site = $1",
            )
            .bind(site.as_str())
            .fetch_optional(p)
            .await?
            else {
                return Ok(None);
            };
            Ok(Some(SiteStatus {
                online: r.try_get("online")?,
                last_seen: r.try_get("last_seen")?,
                backlog: r.try_get("backlog")?,
                oldest_unsent_age_s: r.try_get("oldest_unsent_age_s")?,
                agent_version: r.try_get("agent_version")?,
                config_version: r.try_get("config_version")?,
                devices: parse_devices(r.try_get("devices")?)?,
                updated_at: r.try_get("updated_at")?,
            }))
        }
    }
}

/// When each site's agent was last heard (a status from the agent, or a batch), by site id;
/// a site never heard from is absent.
pub async fn last_seen(db: &Db) -> Result<HashMap<String, DateTime<Utc>>, sqlx::Error> {
    let sql = "SELECT site, last_seen FROM site_status WHERE last_seen IS NOT NULL";
    Ok(each_db!(db, |pool, to_db, from_row| {
        let rows = sqlx::query(sql).fetch_all(pool).await?;
        let mut out = HashMap::with_capacity(rows.len());
        for r in &rows {
            out.insert(r.try_get("site")?, from_row(r, "last_seen")?);
        }
        out
    }))
}

/// How many records of each kind are stored for a site.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RecordCounts {
    pub readings: i64,
    pub events: i64,
    pub gaps: i64,
}

/// Counts the records stored for `site`.
pub async fn record_counts(db: &Db, site: &SiteId) -> Result<RecordCounts, sqlx::Error> {
    let site = site.as_str();
    let (readings, events, gaps) = each_db!(db, |pool, to_db, from_row| {
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM readings WHERE site = $1), \
                    (SELECT count(*) FROM events WHERE site = $1), \
                    (SELECT count(*) FROM gaps WHERE site = $1)",
        )
        .bind(site)
        .fetch_one(pool)
        .await?
    });
    Ok(RecordCounts {
        readings,
        events,
        gaps,
    })
}

/// A reading row: seq, device, ts (as the backend stores it), quality, flow, total, level, extra.
type ReadingRow<T> = (
    i64,
    String,
    T,
    i32,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Option<String>,
);

/// The readings of `site`, oldest `seq` first, at most `limit`, as the agent sent them.
pub async fn readings(db: &Db, site: &SiteId, limit: i64) -> Result<Vec<Reading>, StoreError> {
    let rows: Vec<ReadingRow<Option<DateTime<Utc>>>> = match db {
        Db::Sqlite(p) => {
            let rows: Vec<ReadingRow<i64>> = sqlx::query_as(
                "SELECT seq, device, ts, quality, flow_lps, total_m3, level_m, extra \
                 FROM readings WHERE site = ? ORDER BY seq LIMIT ?",
            )
            .bind(site.as_str())
            .bind(limit)
            .fetch_all(p)
            .await?;
            rows.into_iter()
                .map(|(s, d, t, q, f, tot, l, e)| (s, d, from_sqlite_time(t), q, f, tot, l, e))
                .collect()
        }
        Db::Postgres(p) => {
            let rows: Vec<ReadingRow<DateTime<Utc>>> = sqlx::query_as(
                "SELECT seq, device, ts, quality, flow_lps, total_m3, level_m, extra::text \
                 FROM readings WHERE site = $1 ORDER BY seq LIMIT $2",
            )
            .bind(site.as_str())
            .bind(limit)
            .fetch_all(p)
            .await?;
            rows.into_iter()
                .map(|(s, d, t, q, f, tot, l, e)| (s, d, Some(t), q, f, tot, l, e))
                .collect()
        }
    };
    rows.into_iter()
        .map(|(seq, device, ts, q, flow, total, level, extra)| {
            let bad = |what: String| StoreError::Invalid(format!("reading {site}/{seq}: {what}"));
            Ok(Reading {
                seq: Seq(u64::try_from(seq).map_err(|_| bad("negative seq".into()))?),
                device: device.parse().map_err(|e| bad(format!("device: {e}")))?,
                ts: ts.ok_or_else(|| bad("ts out of range".into()))?,
                q: caudal_common::Quality::from_bits(
                    u16::try_from(q).map_err(|_| bad(format!("quality {q}")))?,
                ),
                flow_lps: flow,
                total_m3: total,
                level_m: level,
                extra: match extra {
                    Some(e) => serde_json::from_str(&e).map_err(|e| bad(format!("extra: {e}")))?,
                    None => Default::default(),
                },
            })
        })
        .collect()
}

/// A refused message, as kept.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub topic: String,
    pub site: Option<String>,
    /// As received, cut at `ingest.dead_letter_max_payload_bytes`.
    pub payload: Vec<u8>,
    pub reason: String,
    /// Refusals this row stands for (`telemetry::dead_letter`).
    pub count: i64,
    /// The size the payload had.
    pub payload_bytes: Option<i64>,
}

/// The most recent dead letters (by their last arrival), newest first.
pub async fn dead_letters(db: &Db, limit: i64) -> Result<Vec<DeadLetter>, sqlx::Error> {
    type Row = (
        i64,
        String,
        Option<String>,
        Vec<u8>,
        String,
        i64,
        Option<i64>,
    );
    let rows: Vec<Row> = each_db!(db, |pool, to_db, from_row| {
        sqlx::query_as(
            "SELECT id, topic, site, payload, reason, count, payload_bytes FROM dead_letters \
             ORDER BY COALESCE(last_received_at, received_at) DESC, id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(pool)
        .await?
    });
    Ok(rows
        .into_iter()
        .map(
            |(id, topic, site, payload, reason, count, payload_bytes)| DeadLetter {
                id,
                topic,
                site,
                payload,
                reason,
                count,
                payload_bytes,
            },
        )
        .collect())
}
