//! The outbox's SQLite schema and its versions (`PRAGMA user_version`), the connection settings,
//! what a stored row costs on disk, and the queries shared by the writer and the read-only
//! inspection.
//!
//! The lowest layer of the outbox: `store` and `evict` (which `store` calls) use it, and it uses
//! neither.

use super::{DeviceStatusRow, OutboxError};
use crate::config::Synchronous;
use caudal_common::{DeviceId, Seq};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

/// Migration `i` takes the schema from version `i` to `i + 1`. Never edit a released entry; add
/// one.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema. `records` holds sendable records, `held` those waiting for a trusted
    // clock (same columns); both are keyed by seq so scans run in seq order without an index.
    // Timestamps are Unix milliseconds. `boots` maps the 36-character boot ids to small
    // integers so each row does not repeat one.
    "CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epoch INTEGER NOT NULL,
        next_counter INTEGER NOT NULL,
        last_seq INTEGER,
        record_count INTEGER NOT NULL,
        record_bytes INTEGER NOT NULL,
        held_count INTEGER NOT NULL,
        evicted_total INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE boots (
        id INTEGER PRIMARY KEY,
        boot_id TEXT NOT NULL UNIQUE
    );
    CREATE TABLE records (
        seq INTEGER PRIMARY KEY,
        kind INTEGER NOT NULL,
        device TEXT,
        ts INTEGER NOT NULL,
        boot INTEGER NOT NULL,
        boottime_ms INTEGER NOT NULL,
        trusted INTEGER NOT NULL,
        size INTEGER NOT NULL,
        json TEXT NOT NULL
    );
    CREATE TABLE held (
        seq INTEGER PRIMARY KEY,
        kind INTEGER NOT NULL,
        device TEXT,
        ts INTEGER NOT NULL,
        boot INTEGER NOT NULL,
        boottime_ms INTEGER NOT NULL,
        trusted INTEGER NOT NULL,
        size INTEGER NOT NULL,
        json TEXT NOT NULL
    );
    CREATE TABLE device_status (
        device TEXT PRIMARY KEY,
        bus TEXT NOT NULL,
        last_poll INTEGER NOT NULL,
        result TEXT NOT NULL,
        last_error TEXT,
        consecutive_failures INTEGER NOT NULL,
        last_reading TEXT
    ) WITHOUT ROWID;",
    // 2: every start opens a new epoch (`store::open_epoch`); `epochs` keeps, for the epochs a
    // start closed, the counter of the last record committed in each (0: none), so the seqs an
    // agent ever committed are known: `(epoch, 1..=last_counter)` for each, and the current
    // epoch up to `meta.last_seq`. Bounded to the latest `EPOCHS_KEPT` rows.
    "CREATE TABLE epochs (
        epoch INTEGER PRIMARY KEY,
        last_counter INTEGER NOT NULL,
        closed_ms INTEGER NOT NULL
    );",
];

/// Closed epochs kept in `epochs`, at most.
pub(super) const EPOCHS_KEPT: i64 = 1000;

/// The schema version this build writes.
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Bytes a stored row costs beyond its JSON, for the disk budget: the other columns, the
/// record and cell headers, the b-tree's interior pages and unused page space. Measured as
/// (file size − JSON bytes) / rows for a million ~143-byte readings: 53 B, rounded up
/// (`cargo bench -p caudal-agent --bench outbox`).
pub const ROW_OVERHEAD_BYTES: u64 = 56;

/// WAL larger than this is truncated back after a checkpoint (a large eviction or re-stamping
/// can grow it well beyond the usual ~4 MiB between checkpoints).
const JOURNAL_SIZE_LIMIT: i64 = 8 * 1024 * 1024;

/// Settings of the writing connection. `auto_vacuum` only takes effect on a database without
/// tables, so it is set before the first migration (and is a no-op on an existing file).
pub(super) fn configure_writer(conn: &Connection, sync: Synchronous) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    if user_version(conn)? == 0 {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    // journal_mode returns the resulting mode as a row.
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {mode}, WAL could not be enabled"
        )));
    }
    let sync = match sync {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
    Ok(())
}

pub(super) fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

/// Brings the schema to [`SCHEMA_VERSION`], one transaction per step (each sets its
/// `user_version`, so a crash leaves a whole version behind). A new database gets its meta row
/// with `first_epoch`.
pub(super) fn migrate(
    conn: &mut Connection,
    path: &str,
    first_epoch: impl FnOnce() -> u32,
) -> Result<(), OutboxError> {
    let found = user_version(conn)?;
    if !(0..=SCHEMA_VERSION).contains(&found) {
        return Err(OutboxError::Schema {
            path: path.to_string(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let mut first_epoch = Some(first_epoch);
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        if from == 0
            && let Some(f) = first_epoch.take()
        {
            tx.execute(
                "INSERT INTO meta (id, epoch, next_counter, last_seq, record_count, record_bytes,
                    held_count, evicted_total, created_ms)
                 VALUES (1, ?1, 1, NULL, 0, 0, 0, 0, ?2)",
                params![i64::from(f()), Utc::now().timestamp_millis()],
            )?;
        }
        tx.pragma_update(None, "user_version", from as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Checks that a file another process writes can be read by this build.
pub(super) fn check_readable(conn: &Connection, path: &str) -> Result<(), OutboxError> {
    let found = user_version(conn)?;
    if !(1..=SCHEMA_VERSION).contains(&found) {
        return Err(OutboxError::Schema {
            path: path.to_string(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// The `meta` row: the sequence state and the running totals. The writer keeps a copy of the
/// committed row and reloads it inside every write transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Meta {
    pub epoch: u32,
    /// Counter of the next seq, 1 ..= 2^32; 2^32 means the epoch is used up.
    pub next_counter: u64,
    pub last_seq: Option<Seq>,
    /// Rows in `records` and `held`.
    pub record_count: u64,
    /// JSON bytes in `records` and `held`.
    pub record_bytes: u64,
    /// Rows in `held`.
    pub held_count: u64,
    pub evicted_total: u64,
}

impl Meta {
    pub fn load(conn: &Connection) -> rusqlite::Result<Meta> {
        conn.prepare_cached(
            "SELECT epoch, next_counter, last_seq, record_count, record_bytes, held_count,
                evicted_total FROM meta WHERE id = 1",
        )?
        .query_row([], |r| {
            Ok(Meta {
                epoch: u32::try_from(r.get::<_, i64>(0)?).unwrap_or(u32::MAX),
                next_counter: r.get::<_, i64>(1)?.max(1) as u64,
                last_seq: r.get::<_, Option<i64>>(2)?.map(|s| Seq(s as u64)),
                record_count: r.get::<_, i64>(3)?.max(0) as u64,
                record_bytes: r.get::<_, i64>(4)?.max(0) as u64,
                held_count: r.get::<_, i64>(5)?.max(0) as u64,
                evicted_total: r.get::<_, i64>(6)?.max(0) as u64,
            })
        })
    }

    pub fn save(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.prepare_cached(
            "UPDATE meta SET epoch = ?1, next_counter = ?2, last_seq = ?3, record_count = ?4,
                record_bytes = ?5, held_count = ?6, evicted_total = ?7 WHERE id = 1",
        )?
        .execute(params![
            i64::from(self.epoch),
            self.next_counter as i64,
            self.last_seq.map(|s| s.0 as i64),
            self.record_count as i64,
            self.record_bytes as i64,
            self.held_count as i64,
            self.evicted_total as i64,
        ])?;
        Ok(())
    }
}

/// The closed epochs with records, ascending: `(epoch, counter of its last record)`.
pub(super) fn closed_epochs(conn: &Connection) -> rusqlite::Result<Vec<(u32, u32)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT epoch, last_counter FROM epochs WHERE last_counter > 0 ORDER BY epoch",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            u32::try_from(r.get::<_, i64>(0)?).unwrap_or(u32::MAX),
            u32::try_from(r.get::<_, i64>(1)?).unwrap_or(u32::MAX),
        ))
    })?;
    rows.collect()
}

pub(super) fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Timestamp of the sendable record with the lowest seq. Held records are left out: their
/// time comes from a clock that was not trusted (often 1970).
pub(super) fn oldest(conn: &Connection) -> rusqlite::Result<Option<DateTime<Utc>>> {
    let ms: Option<i64> = conn
        .prepare_cached("SELECT ts FROM records ORDER BY seq LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(ms.map(from_ms))
}

/// Every device's last poll, by device id.
pub(super) fn device_rows(conn: &Connection) -> rusqlite::Result<Vec<DeviceStatusRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT device, bus, last_poll, result, last_error, consecutive_failures, last_reading
         FROM device_status ORDER BY device",
    )?;
    let rows = stmt.query_map([], |r| {
        let device: String = r.get(0)?;
        let device = DeviceId::new(device).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?;
        Ok(DeviceStatusRow {
            device,
            bus: r.get(1)?,
            last_poll: from_ms(r.get(2)?),
            result: r.get(3)?,
            last_error: r.get(4)?,
            consecutive_failures: u32::try_from(r.get::<_, i64>(5)?).unwrap_or(u32::MAX),
            last_reading: r.get(6)?,
        })
    })?;
    rows.collect()
}
