//! The synchronous outbox: one SQLite connection and the transactions on it (append with its
//! eviction, pending, ack, re-stamping), the sequence state and the disk budget.

use super::evict::{evict, merge_gaps};
use super::schema::{self, Meta, ROW_OVERHEAD_BYTES, from_ms};
use super::{DeviceStatusRow, Draft, OutboxError, Pending, SpoolState, Stamped, Stats};
use crate::config::OutboxConfig;
use crate::metrics::Metrics;
use caudal_common::payload::RecordKind;
use caudal_common::seq::{random_epoch, time_epoch};
use caudal_common::{DeviceId, Event, Flag, Gap, Reading, Seq, SeqRange};
use chrono::{DateTime, Utc};
use rusqlite::{
    Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior, params,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Share of the budget freed beyond what an append needs, so a full outbox evicts once per
/// ~5 % of its budget rather than on every append.
const EVICTION_SLACK_DIVISOR: u64 = 20;

/// Highest epoch that fits the seq layout (31 bits).
const MAX_EPOCH: u32 = (1 << 31) - 1;

/// Free pages are returned to the filesystem once they exceed this share of the file (the
/// backlog has drained; moving the few live pages costs little)...
const VACUUM_FREE_SHARE: f64 = 0.75;
/// ...and this many bytes.
const VACUUM_MIN_FREE_BYTES: i64 = 8 * 1024 * 1024;
/// Pages moved per vacuum step, so one acknowledgement never stalls appends for long.
const VACUUM_STEP_PAGES: i64 = 4096;

/// One append's records and device rows, as the handle groups them.
pub(super) type Group = (Vec<Stamped>, Vec<DeviceStatusRow>);

/// What [`Outbox::restamp`] did with the held records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restamped {
    /// Records of the named boot whose time was recomputed (readings gain `restamped`).
    pub restamped: u64,
    /// Records of earlier boots: time unknown, stamped with the release time as an upper bound
    /// (readings gain `time_unknown`).
    pub time_unknown: u64,
}

impl Restamped {
    pub fn released(&self) -> u64 {
        self.restamped + self.time_unknown
    }
}

/// The outbox on one SQLite file. Not `Sync`: the agent drives it from one thread through
/// [`super::OutboxHandle`]; tests and tools may use it directly.
#[derive(Debug)]
pub struct Outbox {
    conn: Connection,
    path: PathBuf,
    budget: u64,
    commit_interval: Duration,
    /// The committed `meta` row as of this connection's last transaction.
    meta: Meta,
    /// `boots.id` of boot ids already stored.
    boots: HashMap<String, i64>,
    /// Whether the wall clock was last known to be trusted (for a new epoch's choice).
    clock_trusted: bool,
    incremental_vacuum: bool,
    metrics: Arc<Metrics>,
    state: watch::Sender<SpoolState>,
}

/// An unreadable outbox file moved aside by [`Outbox::open_or_set_aside`].
#[derive(Debug, Clone)]
pub struct SetAside {
    pub moved_to: PathBuf,
    /// Why it could not be opened.
    pub error: String,
    /// When the file was last written, if known: its lost records are older.
    pub modified: Option<DateTime<Utc>>,
}

/// A record ready to insert.
struct Row {
    seq: Seq,
    kind: RecordKind,
    device: Option<String>,
    ts_ms: i64,
    boot: i64,
    boottime_ms: i64,
    trusted: bool,
    json: String,
}

impl Row {
    fn cost(&self) -> u64 {
        self.json.len() as u64 + ROW_OVERHEAD_BYTES
    }
}

impl Outbox {
    /// Opens (or creates) the outbox at `path` (its directory must exist), bringing the schema
    /// up to date. A new database starts a time-based epoch when `clock_trusted_now`, a random
    /// one otherwise (see [`caudal_common::seq`]). Counts into a private [`Metrics`] until
    /// [`Outbox::with_metrics`].
    pub fn open(
        path: &Path,
        config: &OutboxConfig,
        clock_trusted_now: bool,
    ) -> Result<Outbox, OutboxError> {
        let name = path.display().to_string();
        let open_err = |source| OutboxError::Open {
            path: name.clone(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        schema::configure_writer(&conn, config.synchronous).map_err(open_err)?;
        let existed = schema::user_version(&conn).map_err(open_err)? > 0;
        schema::migrate(&mut conn, &name, || {
            first_epoch(clock_trusted_now, Utc::now().timestamp())
        })
        .map_err(|e| match e {
            OutboxError::Sqlite(source) => open_err(source),
            e => e,
        })?;
        let meta = if existed {
            open_epoch(&mut conn, clock_trusted_now).map_err(|e| match e {
                OutboxError::Sqlite(source) => open_err(source),
                e => e,
            })?
        } else {
            Meta::load(&conn).map_err(open_err)?
        };
        let auto_vacuum: i64 = conn
            .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
            .map_err(open_err)?;
        let (state, _) = watch::channel(SpoolState {
            committed: meta.last_seq.unwrap_or_default(),
            generation: 0,
        });
        info!(
            path = %name,
            epoch = meta.epoch,
            backlog = meta.record_count,
            held = meta.held_count,
            "outbox opened"
        );
        let outbox = Outbox {
            conn,
            path: path.to_path_buf(),
            budget: config.disk_budget_mb.saturating_mul(1024 * 1024),
            commit_interval: Duration::from_millis(config.commit_interval_ms),
            meta,
            boots: HashMap::new(),
            clock_trusted: clock_trusted_now,
            // 2 = INCREMENTAL.
            incremental_vacuum: auto_vacuum == 2,
            metrics: Metrics::new(),
            state,
        };
        outbox.publish_gauges();
        Ok(outbox)
    }

    /// [`Outbox::open`], except that a file SQLite says is not a database, or is corrupt, is
    /// moved aside (with its `-wal` and `-shm`, to `<name>.unreadable-<unix seconds>`) and a
    /// new outbox is created in its place: a new epoch, so no seq of the old file can recur.
    /// The agent then writes an `outbox_lost` gap record (see `daemon`) so the cloud knows
    /// that an unknown range of records was lost, and polling goes on. Any other open failure
    /// (permissions, a missing directory) is returned as is: moving the file would not mend it.
    pub fn open_or_set_aside(
        path: &Path,
        config: &OutboxConfig,
        clock_trusted_now: bool,
    ) -> Result<(Outbox, Option<SetAside>), OutboxError> {
        let err = match Outbox::open(path, config, clock_trusted_now) {
            Ok(o) => return Ok((o, None)),
            Err(e) => e,
        };
        let unreadable = matches!(
            &err,
            OutboxError::Open { source: rusqlite::Error::SqliteFailure(f, _), .. }
                if matches!(f.code, rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
        );
        if !unreadable {
            return Err(err);
        }
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .map(DateTime::<Utc>::from);
        let mut moved_to = path.as_os_str().to_owned();
        moved_to.push(format!(".unreadable-{}", Utc::now().timestamp()));
        let moved_to = PathBuf::from(moved_to);
        std::fs::rename(path, &moved_to).map_err(|e| OutboxError::SetAside {
            path: path.display().to_string(),
            source: e,
        })?;
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            let mut to = moved_to.as_os_str().to_owned();
            to.push(suffix);
            // Absent side files are the usual case.
            let _ = std::fs::rename(&side, &to);
        }
        error!(path = %path.display(), moved_to = %moved_to.display(), error = %err,
            "outbox file unreadable: moved aside, a new outbox starts; its unsent records are lost");
        let outbox = Outbox::open(path, config, clock_trusted_now)?;
        Ok((
            outbox,
            Some(SetAside {
                moved_to,
                error: err.to_string(),
                modified,
            }),
        ))
    }

    /// Counts into `metrics` instead of a private registry.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Outbox {
        self.metrics = metrics;
        self.publish_gauges();
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pacing of group commits (`commit_interval_ms`).
    pub fn commit_interval(&self) -> Duration {
        self.commit_interval
    }

    /// The highest committed seq and the rescan generation.
    pub fn state(&self) -> SpoolState {
        *self.state.borrow()
    }

    pub fn watch(&self) -> watch::Receiver<SpoolState> {
        self.state.subscribe()
    }

    /// Caps the database file at about `bytes`: a write beyond it fails as on a full disk
    /// (`SQLITE_FULL`) and is handled the same way (evict, retry once, else
    /// [`OutboxError::Full`]). For a hard cap below the filesystem's free space; the budget is
    /// the usual bound.
    pub fn set_max_file_bytes(&mut self, bytes: u64) -> Result<(), OutboxError> {
        let page: i64 = self
            .conn
            .pragma_query_value(None, "page_size", |r| r.get(0))?;
        let pages = (bytes as i64 / page.max(512)).max(1);
        self.conn.pragma_update(None, "max_page_count", pages)?;
        Ok(())
    }

    /// Commits `records` (seqs assigned in order) and upserts `devices`, in one transaction.
    /// Returns the seqs, one per record. When the disk budget would be exceeded the oldest
    /// records are evicted first (see the module doc); on a full disk it evicts and retries
    /// once, then fails with [`OutboxError::Full`] having changed nothing.
    pub fn append(
        &mut self,
        records: Vec<Stamped>,
        devices: Vec<DeviceStatusRow>,
    ) -> Result<Vec<Seq>, OutboxError> {
        let mut seqs = self.append_groups(&[(records, devices)])?;
        Ok(seqs.pop().unwrap_or_default())
    }

    /// Commits several appends in one transaction (the handle's group commit); seqs per group.
    pub(super) fn append_groups(&mut self, groups: &[Group]) -> Result<Vec<Vec<Seq>>, OutboxError> {
        let mut disk_full = false;
        let result = match self.try_append(groups) {
            Err(e) if is_disk_full(&e) => {
                disk_full = true;
                self.count_error(&e);
                // The filesystem, not the budget, is the limit here: make room for the append
                // plus 5 % of what is stored, unless even evicting everything would not do.
                let incoming: u64 = groups
                    .iter()
                    .flat_map(|g| &g.0)
                    .map(|s| estimate_cost(&s.draft))
                    .sum();
                let used = self.budget_used();
                let need = incoming + used / EVICTION_SLACK_DIVISOR;
                warn!(path = %self.path.display(), need, used, "outbox disk full; evicting to retry");
                let evicted = if incoming > used {
                    Ok(0)
                } else {
                    self.evict_now(need)
                };
                match evicted {
                    Ok(0) => Err(OutboxError::Full),
                    Ok(_) => match self.try_append(groups) {
                        Err(e) if is_disk_full(&e) => Err(OutboxError::Full),
                        r => r,
                    },
                    Err(e) if is_disk_full(&e) => Err(OutboxError::Full),
                    Err(e) => Err(e),
                }
            }
            r => r,
        };
        if let Err(e) = &result {
            // The disk-full occurrence was counted above; a Full after it is the same failure.
            if !(disk_full && matches!(e, OutboxError::Full)) {
                self.count_error(e);
            }
            error!(path = %self.path.display(), error = %e, "outbox append failed; nothing was stored");
        }
        result
    }

    fn slack(&self) -> u64 {
        self.budget / EVICTION_SLACK_DIVISOR
    }

    fn try_append(&mut self, groups: &[Group]) -> Result<Vec<Vec<Seq>>, OutboxError> {
        let now = Utc::now();
        if let Some(last) = groups.iter().flat_map(|g| &g.0).last() {
            self.clock_trusted = last.clock.trusted;
        }
        let trusted_now = self.clock_trusted.then(|| now.timestamp());
        let (budget, slack) = (self.budget, self.slack());
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut meta = Meta::load(&tx)?;
        let mut new_boots: HashMap<String, i64> = HashMap::new();
        let mut rows: Vec<Row> = Vec::new();
        let mut seqs: Vec<Vec<Seq>> = Vec::with_capacity(groups.len());
        for (records, _) in groups {
            let mut group_seqs = Vec::with_capacity(records.len());
            for s in records {
                let seq = next_seq(&mut meta, trusted_now)?;
                let boot = match self.boots.get(&s.clock.boot_id) {
                    Some(id) => *id,
                    None => match new_boots.get(&s.clock.boot_id) {
                        Some(id) => *id,
                        None => {
                            let id = boot_row(&tx, &s.clock.boot_id)?;
                            new_boots.insert(s.clock.boot_id.clone(), id);
                            id
                        }
                    },
                };
                rows.push(Row {
                    seq,
                    kind: s.draft.kind(),
                    device: s.draft.device().map(|d| d.as_str().to_string()),
                    ts_ms: s.draft.ts().timestamp_millis(),
                    boot,
                    boottime_ms: i64::try_from(s.clock.boottime_ms).unwrap_or(i64::MAX),
                    trusted: s.clock.trusted,
                    json: encode(&s.draft, seq, s.clock.trusted)?,
                });
                group_seqs.push(seq);
            }
            seqs.push(group_seqs);
        }

        let incoming: u64 = rows.iter().map(Row::cost).sum();
        let mut evicted = 0;
        let used = meta.record_bytes + meta.record_count * ROW_OVERHEAD_BYTES;
        if used + incoming > budget {
            let need = used + incoming - budget + slack;
            let (mut gaps, mut n) = evict(&tx, &mut meta, need)?;
            // The gap records take budget too, one per device that lost records: with many
            // devices they can cost more than the slack, and without evicting for them the
            // append would fail every time it is retried. Evict again until the append and its
            // gaps fit, or nothing is left (the check below then refuses the append).
            loop {
                let gap_cost = gaps
                    .iter()
                    .map(gap_cost_bound)
                    .sum::<Result<u64, OutboxError>>()?;
                let used = meta.record_bytes + meta.record_count * ROW_OVERHEAD_BYTES;
                let over = (used + incoming + gap_cost).saturating_sub(budget);
                if over == 0 {
                    break;
                }
                let (more, m) = evict(&tx, &mut meta, over + slack)?;
                if m == 0 {
                    break;
                }
                n += m;
                gaps = merge_gaps(gaps, more);
            }
            evicted = n;
            // Gap rows carry the stamp of the append that caused the eviction.
            let stamp = rows
                .first()
                .map(|r| (r.boot, r.boottime_ms))
                .unwrap_or((0, 0));
            for gap in gaps {
                let seq = next_seq(&mut meta, trusted_now)?;
                rows.push(Row {
                    seq,
                    kind: RecordKind::Gap,
                    device: gap.device.as_ref().map(|d| d.as_str().to_string()),
                    ts_ms: gap.to.timestamp_millis(),
                    boot: stamp.0,
                    boottime_ms: stamp.1,
                    trusted: true,
                    json: encode(&Draft::Gap(gap), seq, true)?,
                });
            }
            // Only when everything older is gone and the append alone is over the budget.
            let incoming: u64 = rows.iter().map(Row::cost).sum();
            if meta.record_bytes + meta.record_count * ROW_OVERHEAD_BYTES + incoming > budget {
                return Err(OutboxError::Full);
            }
        }

        let mut stored = [0u64; 3];
        {
            let mut ins_records = tx.prepare_cached(INSERT_RECORDS)?;
            let mut ins_held = tx.prepare_cached(INSERT_HELD)?;
            for r in &rows {
                let stmt = if r.trusted {
                    &mut ins_records
                } else {
                    &mut ins_held
                };
                stmt.execute(params![
                    r.seq.0 as i64,
                    r.kind as u8,
                    r.device,
                    r.ts_ms,
                    r.boot,
                    r.boottime_ms,
                    r.trusted,
                    r.json.len() as i64,
                    r.json,
                ])?;
                meta.record_count += 1;
                meta.record_bytes += r.json.len() as u64;
                if !r.trusted {
                    meta.held_count += 1;
                }
                stored[r.kind as usize] += 1;
            }
            // A status row's last reading was encoded before its seq existed; keep the stored
            // JSON of that device's newest reading in this append instead, seq included.
            let stored_reading: std::collections::HashMap<&str, &str> = rows
                .iter()
                .filter(|r| r.kind == RecordKind::Reading)
                .filter_map(|r| Some((r.device.as_deref()?, r.json.as_str())))
                .collect();
            let mut upsert = tx.prepare_cached(UPSERT_DEVICE)?;
            for d in groups.iter().flat_map(|g| &g.1) {
                let last_reading = d.last_reading.as_ref().map(|given| {
                    stored_reading
                        .get(d.device.as_str())
                        .map_or(given.as_str(), |j| *j)
                });
                upsert.execute(params![
                    d.device.as_str(),
                    d.bus,
                    d.last_poll.timestamp_millis(),
                    d.result,
                    d.last_error,
                    i64::from(d.consecutive_failures),
                    last_reading,
                ])?;
            }
        }
        meta.save(&tx)?;
        tx.commit()?;

        self.meta = meta;
        self.boots.extend(new_boots);
        for (kind, n) in ["reading", "event", "gap"].iter().zip(stored) {
            if n > 0 {
                self.metrics
                    .stored
                    .get_or_create(&Metrics::kind(kind))
                    .inc_by(n);
            }
        }
        if evicted > 0 {
            self.metrics.evicted.inc_by(evicted);
        }
        self.state.send_if_modified(|s| {
            let changed = s.committed != meta.last_seq.unwrap_or_default();
            s.committed = meta.last_seq.unwrap_or_default();
            changed
        });
        self.publish_gauges();
        Ok(seqs)
    }

    /// Evicts at least `need` budget bytes of the oldest records in a transaction of its own
    /// (the disk-full path). Returns how many records were evicted.
    fn evict_now(&mut self, need: u64) -> Result<u64, OutboxError> {
        let trusted_now = self.clock_trusted.then(|| Utc::now().timestamp());
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut meta = Meta::load(&tx)?;
        let (gaps, evicted) = evict(&tx, &mut meta, need)?;
        if evicted == 0 {
            return Ok(0);
        }
        let boot: i64 = tx
            .query_row("SELECT coalesce(max(id), 0) FROM boots", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let n_gaps = gaps.len() as u64;
        {
            let mut ins = tx.prepare_cached(INSERT_RECORDS)?;
            for gap in gaps {
                let seq = next_seq(&mut meta, trusted_now)?;
                let json = encode(&Draft::Gap(gap.clone()), seq, true)?;
                ins.execute(params![
                    seq.0 as i64,
                    RecordKind::Gap as u8,
                    gap.device.as_ref().map(DeviceId::as_str),
                    gap.to.timestamp_millis(),
                    boot,
                    0i64,
                    true,
                    json.len() as i64,
                    json,
                ])?;
                meta.record_count += 1;
                meta.record_bytes += json.len() as u64;
            }
        }
        meta.save(&tx)?;
        tx.commit()?;
        self.meta = meta;
        self.metrics.evicted.inc_by(evicted);
        self.metrics
            .stored
            .get_or_create(&Metrics::kind("gap"))
            .inc_by(n_gaps);
        self.state.send_if_modified(|s| {
            let changed = s.committed != meta.last_seq.unwrap_or_default();
            s.committed = meta.last_seq.unwrap_or_default();
            changed
        });
        // Let the checkpoint copy the freed pages back so the retry finds room in the file.
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        self.publish_gauges();
        Ok(evicted)
    }

    /// Sendable records with `after < seq <= upto`, ascending, at most `limit`.
    pub fn pending(
        &self,
        after: Seq,
        upto: Option<Seq>,
        limit: usize,
    ) -> Result<Vec<Pending>, OutboxError> {
        let after = i64::try_from(after.0).unwrap_or(i64::MAX);
        let upto = upto.map_or(i64::MAX, |s| i64::try_from(s.0).unwrap_or(i64::MAX));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, kind, json, ts FROM records WHERE seq > ?1 AND seq <= ?2
             ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![after, upto, limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, kind, json, ts) = row?;
            let seq = Seq(seq as u64);
            let kind = u8::try_from(kind)
                .ok()
                .and_then(RecordKind::from_u8)
                .ok_or_else(|| OutboxError::Corrupt {
                    seq,
                    reason: format!("unknown record kind {kind}"),
                })?;
            out.push(Pending {
                seq,
                kind,
                json,
                ts: from_ms(ts),
            });
        }
        Ok(out)
    }

    /// Deletes exactly the acknowledged seqs that exist (held records are never sent, so an
    /// ack does not touch them); returns how many existed. Acking twice is harmless.
    pub fn ack(&mut self, ranges: &[SeqRange]) -> Result<u64, OutboxError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut meta = Meta::load(&tx)?;
        let (mut count, mut bytes) = (0u64, 0u64);
        {
            let mut del = tx
                .prepare_cached("DELETE FROM records WHERE seq BETWEEN ?1 AND ?2 RETURNING size")?;
            for r in ranges.iter().filter(|r| r.from <= r.to) {
                let from = i64::try_from(r.from.0).unwrap_or(i64::MAX);
                let to = i64::try_from(r.to.0).unwrap_or(i64::MAX);
                let mut rows = del.query(params![from, to])?;
                while let Some(row) = rows.next()? {
                    count += 1;
                    bytes += row.get::<_, i64>(0)?.max(0) as u64;
                }
            }
        }
        if count == 0 {
            return Ok(0);
        }
        meta.record_count = meta.record_count.saturating_sub(count);
        meta.record_bytes = meta.record_bytes.saturating_sub(bytes);
        meta.save(&tx)?;
        tx.commit()?;
        self.meta = meta;
        self.shrink_after_drain();
        self.publish_gauges();
        Ok(count)
    }

    /// Returns free pages to the filesystem once a drained backlog left most of the file free.
    /// A failure here loses nothing (the pages stay on the free list), so it is only logged.
    fn shrink_after_drain(&mut self) {
        if !self.incremental_vacuum {
            return;
        }
        let figures = (|| -> rusqlite::Result<(i64, i64, i64)> {
            let free = self
                .conn
                .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
            let pages = self
                .conn
                .pragma_query_value(None, "page_count", |r| r.get(0))?;
            let size = self
                .conn
                .pragma_query_value(None, "page_size", |r| r.get(0))?;
            Ok((free, pages, size))
        })();
        let Ok((free, pages, size)) = figures else {
            return;
        };
        if free * size < VACUUM_MIN_FREE_BYTES || (free as f64) < pages as f64 * VACUUM_FREE_SHARE {
            return;
        }
        // The pragma frees one page per result row: it must be stepped to the end.
        let step = format!("PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})");
        let r = self.conn.prepare(&step).and_then(|mut s| {
            let mut rows = s.query([])?;
            while rows.next()?.is_some() {}
            Ok(())
        });
        match r {
            Ok(()) => {
                info!(path = %self.path.display(), free_pages = free, "outbox file shrunk after the backlog drained")
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "outbox incremental vacuum failed")
            }
        }
    }

    /// Releases the held records once the clock is trusted: those of `boot_id` get
    /// `ts = boottime_ms + wall_minus_boottime_ms` and the `restamped` flag; those of other
    /// (earlier) boots cannot be recomputed and get the `time_unknown` flag with `ts` = now, an
    /// upper bound. Bumps the generation when anything was released.
    pub fn restamp(
        &mut self,
        boot_id: &str,
        wall_minus_boottime_ms: i64,
    ) -> Result<Restamped, OutboxError> {
        self.restamp_at(boot_id, wall_minus_boottime_ms, Utc::now())
    }

    /// [`Outbox::restamp`] with the release time given.
    pub fn restamp_at(
        &mut self,
        boot_id: &str,
        wall_minus_boottime_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<Restamped, OutboxError> {
        self.clock_trusted = true;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut meta = Meta::load(&tx)?;
        if meta.held_count == 0 {
            return Ok(Restamped::default());
        }
        let boot: Option<i64> = tx
            .query_row(
                "SELECT id FROM boots WHERE boot_id = ?1",
                params![boot_id],
                |r| r.get(0),
            )
            .optional()?;
        let mut done = Restamped::default();
        let mut readings_restamped = 0u64;
        let (mut moved, mut old_bytes, mut new_bytes) = (0u64, 0u64, 0u64);
        {
            let mut sel = tx.prepare(
                "SELECT seq, kind, device, ts, boot, boottime_ms, size, json FROM held ORDER BY seq",
            )?;
            let mut ins = tx.prepare_cached(INSERT_RECORDS)?;
            let mut rows = sel.query([])?;
            while let Some(r) = rows.next()? {
                let seq = Seq(r.get::<_, i64>(0)? as u64);
                let kind_raw: i64 = r.get(1)?;
                let kind = u8::try_from(kind_raw)
                    .ok()
                    .and_then(RecordKind::from_u8)
                    .ok_or_else(|| OutboxError::Corrupt {
                        seq,
                        reason: format!("unknown record kind {kind_raw}"),
                    })?;
                let device: Option<String> = r.get(2)?;
                let this_boot: i64 = r.get(4)?;
                let boottime_ms: i64 = r.get(5)?;
                let size: i64 = r.get(6)?;
                let json: String = r.get(7)?;
                let (new_ts, flag) = if Some(this_boot) == boot {
                    let ts = boottime_ms
                        .checked_add(wall_minus_boottime_ms)
                        .and_then(DateTime::from_timestamp_millis)
                        .unwrap_or(now);
                    done.restamped += 1;
                    if kind == RecordKind::Reading {
                        readings_restamped += 1;
                    }
                    (ts, Flag::Restamped)
                } else {
                    done.time_unknown += 1;
                    (now, Flag::TimeUnknown)
                };
                let json = restamp_json(seq, kind, &json, new_ts, flag)?;
                ins.execute(params![
                    seq.0 as i64,
                    kind as u8,
                    device,
                    new_ts.timestamp_millis(),
                    this_boot,
                    boottime_ms,
                    false,
                    json.len() as i64,
                    json,
                ])?;
                moved += 1;
                old_bytes += size.max(0) as u64;
                new_bytes += json.len() as u64;
            }
        }
        tx.execute("DELETE FROM held", [])?;
        meta.held_count = meta.held_count.saturating_sub(moved);
        meta.record_bytes = (meta.record_bytes + new_bytes).saturating_sub(old_bytes);
        meta.save(&tx)?;
        tx.commit()?;
        self.meta = meta;
        self.metrics.restamped.inc_by(readings_restamped);
        if moved > 0 {
            self.state.send_modify(|s| s.generation += 1);
        }
        info!(
            boot_id,
            restamped = done.restamped,
            time_unknown = done.time_unknown,
            "held records released"
        );
        self.publish_gauges();
        Ok(done)
    }

    /// Figures about the outbox.
    pub fn stats(&self) -> Result<Stats, OutboxError> {
        Ok(Stats {
            backlog: self.meta.record_count,
            oldest: schema::oldest(&self.conn)?,
            bytes: self.meta.record_bytes,
            evicted_total: self.meta.evicted_total,
            held: self.meta.held_count,
        })
    }

    /// Bytes the disk budget counts as used (record JSON plus the per-row overhead).
    pub fn budget_used(&self) -> u64 {
        self.meta.record_bytes + self.meta.record_count * ROW_OVERHEAD_BYTES
    }

    /// Every device's last poll.
    pub fn device_status(&self) -> Result<Vec<DeviceStatusRow>, OutboxError> {
        Ok(schema::device_rows(&self.conn)?)
    }

    /// Closes the database (checkpointing the WAL into the main file).
    pub fn close(self) -> Result<(), OutboxError> {
        self.conn.close().map_err(|(_, e)| OutboxError::Sqlite(e))
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.backlog.set(self.meta.record_count as i64);
        m.outbox_bytes.set(self.meta.record_bytes as i64);
        let age = match schema::oldest(&self.conn) {
            Ok(Some(t)) => (Utc::now() - t).num_seconds().max(0),
            _ => 0,
        };
        m.backlog_age_seconds.set(age);
    }

    fn count_error(&self, e: &OutboxError) {
        let kind = match e {
            OutboxError::Full => "full",
            e if is_disk_full(e) => "disk_full",
            OutboxError::Sqlite(s) => match s.sqlite_error_code() {
                Some(ErrorCode::SystemIoFailure) => "io",
                Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => "corrupt",
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => "busy",
                _ => "sqlite",
            },
            OutboxError::Corrupt { .. } => "corrupt",
            _ => "other",
        };
        self.metrics
            .store_errors
            .get_or_create(&Metrics::kind(kind))
            .inc();
    }
}

const INSERT_RECORDS: &str = "INSERT INTO records
    (seq, kind, device, ts, boot, boottime_ms, trusted, size, json)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";
const INSERT_HELD: &str = "INSERT INTO held
    (seq, kind, device, ts, boot, boottime_ms, trusted, size, json)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";
const UPSERT_DEVICE: &str = "INSERT INTO device_status
    (device, bus, last_poll, result, last_error, consecutive_failures, last_reading)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
    ON CONFLICT (device) DO UPDATE SET bus = excluded.bus, last_poll = excluded.last_poll,
        result = excluded.result, last_error = excluded.last_error,
        consecutive_failures = excluded.consecutive_failures,
        last_reading = coalesce(excluded.last_reading, device_status.last_reading)";

fn is_disk_full(e: &OutboxError) -> bool {
    matches!(e, OutboxError::Sqlite(s) if s.sqlite_error_code() == Some(ErrorCode::DiskFull))
}

/// The epoch of a new database.
fn first_epoch(clock_trusted: bool, unix_secs: i64) -> u32 {
    clock_trusted
        .then(|| time_epoch(unix_secs))
        .flatten()
        .unwrap_or_else(|| random_epoch(fastrand::u32(..)))
}

/// Spread of the epoch step at a start without a trusted clock: the new epoch is drawn from
/// `old + 1 ..= old + START_JITTER`. Large enough that a start after a roll-back rarely lands
/// on an epoch the lost run used (1 in 1024 per lost start), small enough that a crash loop
/// (one start every 5 s, 512 epochs each on average) takes years to use up the epoch space.
const START_JITTER: u32 = 1024;

/// **Sequence rule.** Every start of an existing outbox opens a new epoch, committed before any
/// record is appended: the file may have been rolled back (power loss under
/// `synchronous = normal`, a lost `-wal`, a restored SD-card image), and a run that continued
/// its epoch would hand out again seqs the lost run already sent with other content. The new
/// epoch is [`start_epoch`]; the counter restarts at 1.
fn open_epoch(conn: &mut Connection, clock_trusted: bool) -> Result<Meta, OutboxError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut meta = Meta::load(&tx)?;
    let old = meta.epoch;
    let trusted_now = clock_trusted.then(|| Utc::now().timestamp());
    meta.epoch = start_epoch(old, trusted_now, fastrand::u32(..))?;
    let last_counter = meta
        .last_seq
        .filter(|s| s.epoch() == old)
        .map_or(0, |s| s.counter());
    tx.execute(
        "INSERT INTO epochs (epoch, last_counter, closed_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (epoch) DO UPDATE SET last_counter = excluded.last_counter,
             closed_ms = excluded.closed_ms",
        params![
            i64::from(old),
            i64::from(last_counter),
            Utc::now().timestamp_millis()
        ],
    )?;
    tx.execute(
        "DELETE FROM epochs WHERE epoch < (SELECT epoch FROM epochs ORDER BY epoch DESC
             LIMIT 1 OFFSET ?1)",
        params![schema::EPOCHS_KEPT - 1],
    )?;
    meta.next_counter = 1;
    meta.save(&tx)?;
    tx.commit()?;
    info!(old, new = meta.epoch, "outbox started a new epoch");
    Ok(meta)
}

/// The epoch a start opens after `old`: the time epoch when the clock is trusted and it is
/// later than `old` (unique as long as time moves forward: a rolled-back run's epochs are all
/// earlier seconds), else `old + 1 + random % START_JITTER` (seqs keep increasing either way).
pub(super) fn start_epoch(
    old: u32,
    trusted_unix_secs: Option<i64>,
    random: u32,
) -> Result<u32, OutboxError> {
    if let Some(t) = trusted_unix_secs.and_then(time_epoch)
        && t > old
    {
        return Ok(t);
    }
    let bumped = old
        .checked_add(1)
        .filter(|e| *e <= MAX_EPOCH)
        .ok_or(OutboxError::SeqExhausted { epoch: old })?;
    Ok(bumped
        .checked_add(random % START_JITTER)
        .filter(|e| *e <= MAX_EPOCH)
        .unwrap_or(bumped))
}

/// The epoch after `old` when its counter is used up: the time epoch when the clock is trusted
/// and it is later, else `old + 1` (so seqs keep increasing, and a time epoch stays in the time
/// range while it can).
pub(super) fn next_epoch(old: u32, trusted_unix_secs: Option<i64>) -> Result<u32, OutboxError> {
    let bumped = old
        .checked_add(1)
        .filter(|e| *e <= MAX_EPOCH)
        .ok_or(OutboxError::SeqExhausted { epoch: old })?;
    let time = trusted_unix_secs.and_then(time_epoch).unwrap_or(0);
    Ok(bumped.max(time))
}

fn next_seq(meta: &mut Meta, trusted_unix_secs: Option<i64>) -> Result<Seq, OutboxError> {
    if meta.next_counter > u64::from(u32::MAX) {
        let epoch = next_epoch(meta.epoch, trusted_unix_secs)?;
        info!(
            old = meta.epoch,
            new = epoch,
            "outbox sequence counter used up; new epoch"
        );
        meta.epoch = epoch;
        meta.next_counter = 1;
    }
    let seq = Seq::new(meta.epoch, meta.next_counter as u32);
    meta.next_counter += 1;
    meta.last_seq = Some(seq);
    Ok(seq)
}

fn boot_row(tx: &Transaction<'_>, boot_id: &str) -> rusqlite::Result<i64> {
    tx.prepare_cached("INSERT INTO boots (boot_id) VALUES (?1) ON CONFLICT (boot_id) DO NOTHING")?
        .execute(params![boot_id])?;
    tx.prepare_cached("SELECT id FROM boots WHERE boot_id = ?1")?
        .query_row(params![boot_id], |r| r.get(0))
}

/// What the gap record `g` will cost once stored, at most: encoded with the longest seq.
fn gap_cost_bound(g: &Gap) -> Result<u64, OutboxError> {
    let json = encode(&Draft::Gap(g.clone()), Seq::new(u32::MAX, u32::MAX), true)?;
    Ok(json.len() as u64 + ROW_OVERHEAD_BYTES)
}

/// The record's wire JSON with its seq; the clock rule (an untrusted reading carries
/// `clock_unsynced`) is applied in [`Draft::wire_json`], for every record committed.
fn encode(draft: &Draft, seq: Seq, trusted: bool) -> Result<String, OutboxError> {
    draft
        .wire_json(seq, trusted)
        .map_err(|e| OutboxError::Corrupt {
            seq,
            reason: format!("cannot encode: {e}"),
        })
}

/// A cheap upper estimate of a draft's stored cost, for the disk-full path.
fn estimate_cost(draft: &Draft) -> u64 {
    let extra = match draft {
        Draft::Reading(r) => r.extra.len() * 40,
        Draft::Event(e) => e.message.len(),
        Draft::Gap(_) => 0,
    };
    256 + extra as u64 + ROW_OVERHEAD_BYTES
}

/// Rewrites a held record's JSON with its new time and quality flag.
fn restamp_json(
    seq: Seq,
    kind: RecordKind,
    json: &str,
    ts: DateTime<Utc>,
    flag: Flag,
) -> Result<String, OutboxError> {
    let corrupt = |e: serde_json::Error| OutboxError::Corrupt {
        seq,
        reason: e.to_string(),
    };
    match kind {
        RecordKind::Reading => {
            let mut r: Reading = serde_json::from_str(json).map_err(corrupt)?;
            r.ts = ts;
            r.q.set(flag);
            serde_json::to_string(&r).map_err(corrupt)
        }
        RecordKind::Event => {
            let mut e: Event = serde_json::from_str(json).map_err(corrupt)?;
            e.ts = ts;
            serde_json::to_string(&e).map_err(corrupt)
        }
        RecordKind::Gap => {
            let mut g: Gap = serde_json::from_str(json).map_err(corrupt)?;
            let shift = ts - g.to;
            g.from += shift;
            g.to = ts;
            serde_json::to_string(&g).map_err(corrupt)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_epoch_stays_in_the_time_range_and_increases() {
        let now = caudal_common::seq::EPOCH_ORIGIN_UNIX + 1_000_000;
        assert_eq!(next_epoch(10, Some(now)).unwrap(), 1_000_000);
        assert_eq!(next_epoch(2_000_000, Some(now)).unwrap(), 2_000_001);
        assert_eq!(next_epoch(10, None).unwrap(), 11);
        let random = random_epoch(7);
        assert_eq!(next_epoch(random, Some(now)).unwrap(), random + 1);
        assert!(matches!(
            next_epoch(MAX_EPOCH, None),
            Err(OutboxError::SeqExhausted { .. })
        ));
    }

    #[test]
    fn a_start_takes_the_later_time_epoch_or_steps_by_a_random_amount() {
        let now = caudal_common::seq::EPOCH_ORIGIN_UNIX + 1_000_000;
        assert_eq!(start_epoch(10, Some(now), 7).unwrap(), 1_000_000);
        assert_eq!(start_epoch(10, None, 7).unwrap(), 18);
        assert_eq!(
            start_epoch(1_000_000, Some(now), 5).unwrap(),
            1_000_006,
            "a second start in the same second steps"
        );
        assert_eq!(start_epoch(10, None, START_JITTER).unwrap(), 11);
        assert_eq!(start_epoch(MAX_EPOCH - 1, None, 900).unwrap(), MAX_EPOCH);
        assert!(matches!(
            start_epoch(MAX_EPOCH, None, 0),
            Err(OutboxError::SeqExhausted { .. })
        ));
    }

    #[test]
    fn first_epoch_is_random_without_a_trusted_clock() {
        let now = caudal_common::seq::EPOCH_ORIGIN_UNIX + 5;
        assert_eq!(first_epoch(true, now), 5);
        assert!(first_epoch(false, now) >= 1 << 30);
        assert!(
            first_epoch(true, 0) >= 1 << 30,
            "1970 is not a usable epoch"
        );
    }
}
