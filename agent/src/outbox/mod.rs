//! The durable outbox: every record (reading, event, gap) is committed here before anything is
//! sent, and deleted only after the cloud acknowledges the batch that carried it.
//!
//! # Durability invariant
//!
//! The outbox is one SQLite database in WAL mode, written by one connection on one thread
//! ([`OutboxHandle`] owns it through a worker thread; [`Outbox`] is the synchronous core).
//!
//! - **On disk**: table `records` holds every committed record that may be sent (wire JSON with
//!   its seq, kind, device, timestamp, clock stamp, size); table `held` holds committed records
//!   taken while the clock was not trusted, not sendable until re-stamped; `meta` holds the
//!   current epoch, the next counter, the last seq and the running totals; `device_status` holds
//!   the last poll of each device.
//! - **Commit**: [`Outbox::append`] (and a whole group commit of the handle) is ONE SQLite
//!   transaction that inserts the records, upserts the device rows and advances the counter in
//!   `meta`. It either commits entirely or leaves nothing behind: seq numbers come from `meta`
//!   inside the transaction, so a rolled-back append burns no counter and committed seqs have no
//!   holes. An append returns only after its commit; with `synchronous = full` the commit is on
//!   the storage medium (fsync of the WAL) when it returns, with `normal` it survives a process
//!   crash and the last commits may be lost on power loss (the file is never corrupted).
//! - **Deletion**: a row leaves the outbox only (1) when the cloud acknowledged its seq
//!   ([`Outbox::ack`]), or (2) by eviction when the disk budget or the disk itself is full; the
//!   same transaction then inserts a [`Gap`] record per device naming what was evicted. Nothing
//!   is deleted on send, on load, on restart or on re-stamping (re-stamping moves a row from
//!   `held` to `records` in one transaction).
//! - **Crash at any line**: before the commit's WAL frame is written the transaction does not
//!   exist (on open SQLite ignores WAL frames after the last complete commit); after it,
//!   everything in it exists. The in-memory state is only a copy of `meta`, reloaded inside each
//!   write transaction, so a restart resumes from the file (and even a second writer on the same
//!   file, which the agent never starts, could not reuse a seq). A crash while creating the database leaves
//!   an empty file (the schema is created in one transaction with its `user_version`).
//!   `agent/tests/outbox_crash.rs` kills a writer with SIGKILL at random moments and checks it.
//!
//! # Clock hold-back
//!
//! A record stamped with an untrusted clock ([`ClockStamp::trusted`] false) is committed to `held`
//! and not sent: its wall time may be 1970. A reading among them carries `clock_unsynced`: the
//! outbox sets it on every record it commits ([`Draft::wire_json`]), so whoever produced the record
//! only states how the clock stood. When the clock becomes trusted, the agent calls
//! [`OutboxHandle::restamp`] with the current boot id and `wall − CLOCK_BOOTTIME`; records of that
//! boot get their time recomputed from their `boottime_ms` (readings keep `clock_unsynced` and gain
//! `restamped`); records of earlier boots cannot be recomputed and get `time_unknown` with the
//! release time as an upper bound. They move to `records` in one transaction and
//! [`SpoolState::generation`] changes, telling the uplink to rescan from the start since their seqs
//! are below its cursor.
//!
//! # What a commit writes (flash wear)
//!
//! A commit appends to the WAL one 4 KiB page per modified b-tree page (plus a 24-byte frame
//! header) and, with `full`, fsyncs it; every ~1 000 WAL pages a checkpoint copies the latest
//! version of each page into the database file, so a page is written about twice. A single
//! reading dirties the last `records` leaf and `meta` (and `device_status` when a device row
//! comes along): measured 8.9 KiB written per one-reading commit, 18 KiB per 10 readings,
//! 413 KiB per 1 000 readings (~143 KiB of JSON), WAL and checkpoint included. Grouping is what
//! saves the flash: commits are paced by `commit_interval_ms` (see [`OutboxHandle`]) so a burst
//! of polls becomes one commit rather than one per device.
//!
//! # Disk budget and full disk
//!
//! `disk_budget_mb` bounds the stored record bytes, counted as the record JSON plus
//! [`ROW_OVERHEAD_BYTES`] per row (row header, b-tree cell, page fill, measured with
//! `cargo bench -p caudal-agent --bench outbox`). When an append would exceed it, the oldest
//! records (ascending seq, sendable or held) are evicted in the same transaction until the
//! append fits with 5 % of the budget to spare, and one `Gap { cause: evicted }` per device
//! (device-less records get one without a device) is inserted, stating the time span, the seq
//! range and the count; an evicted gap is folded into the new one so no earlier loss is
//! forgotten. An append larger than the whole budget fails with [`OutboxError::Full`] and
//! changes nothing.
//!
//! When the filesystem itself is full (`SQLITE_FULL`) the transaction rolls back, the oldest
//! records are evicted in a transaction of their own (the append plus 5 % of what is stored;
//! deleting needs no new space, as the WAL is reused from its start after a checkpoint), and
//! the append is retried once; if it fails again, or if even evicting everything could not make
//! room, it fails with [`OutboxError::Full`]. Committed data is never touched by a failure.
//!
//! Freed pages are reused by later appends, so the file stays near the budget and is not shrunk
//! after an eviction (the next appends refill those pages at once; shrinking and regrowing would
//! only wear the flash). When a large backlog drains, though, the pages would stay allocated for
//! nothing: once free pages are three quarters of the file (and at least 8 MiB) an
//! acknowledgement returns up to 16 MiB of them to the filesystem with
//! `PRAGMA incremental_vacuum` (new databases use `auto_vacuum = INCREMENTAL`).

mod evict;
mod inspect;
#[cfg(test)]
pub(crate) mod memory;
mod schema;
mod store;
mod worker;

pub use inspect::{Inspection, inspect};
pub use schema::ROW_OVERHEAD_BYTES;
pub use store::{Outbox, Restamped, SetAside};
pub use worker::OutboxHandle;

use caudal_common::payload::RecordKind;
use caudal_common::{DeviceId, Event, Flag, Gap, Reading, Seq, SeqRange};
use chrono::{DateTime, Utc};
use std::future::Future;
use tokio::sync::watch;

/// How the wall clock stood when a record was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockStamp {
    /// The wall clock was trustworthy (plausible and synchronised).
    pub trusted: bool,
    /// `/proc/sys/kernel/random/boot_id` of the boot the record was taken in.
    pub boot_id: String,
    /// `CLOCK_BOOTTIME` in milliseconds when the record was taken.
    pub boottime_ms: u64,
}

/// A record to commit; its `seq` field is ignored and assigned by the outbox.
#[derive(Debug, Clone, PartialEq)]
pub enum Draft {
    Reading(Reading),
    Event(Event),
    Gap(Gap),
}

impl Draft {
    /// The kind of record this draft becomes.
    pub fn kind(&self) -> RecordKind {
        match self {
            Draft::Reading(_) => RecordKind::Reading,
            Draft::Event(_) => RecordKind::Event,
            Draft::Gap(_) => RecordKind::Gap,
        }
    }

    /// The device the record belongs to, if any.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Draft::Reading(r) => Some(&r.device),
            Draft::Event(e) => e.device.as_ref(),
            Draft::Gap(g) => g.device.as_ref(),
        }
    }

    /// The wall-clock time the record's [`ClockStamp`] refers to: a reading's or event's `ts`,
    /// a gap's `to`.
    pub fn ts(&self) -> DateTime<Utc> {
        match self {
            Draft::Reading(r) => r.ts,
            Draft::Event(e) => e.ts,
            Draft::Gap(g) => g.to,
        }
    }

    /// Pairs the draft with the clock it was taken under.
    pub fn stamped(self, clock: ClockStamp) -> Stamped {
        Stamped { draft: self, clock }
    }

    /// The record's wire JSON as the outbox commits it: numbered `seq`, and taken under a clock
    /// that was `clock_trusted` or not.
    ///
    /// **Clock rule.** A reading taken under an untrusted clock carries `clock_unsynced`, whether
    /// or not its producer set it: its time may be 1970 or a step away from the truth. The
    /// outbox owns the rule, as it also holds such records back and re-stamps them (adding
    /// `restamped` or `time_unknown` beside it, never removing it), and enforces it here, on
    /// every record it commits. Nobody else sets the flag; the poller encodes the reading it
    /// hands back to `poll_now` here too, so that answer carries the same flags.
    pub fn wire_json(&self, seq: Seq, clock_trusted: bool) -> serde_json::Result<String> {
        match self {
            Draft::Reading(r) => {
                let mut r = r.clone();
                r.seq = seq;
                if !clock_trusted {
                    r.q.set(Flag::ClockUnsynced);
                }
                serde_json::to_string(&r)
            }
            Draft::Event(e) => {
                let mut e = e.clone();
                e.seq = seq;
                serde_json::to_string(&e)
            }
            Draft::Gap(g) => {
                let mut g = g.clone();
                g.seq = seq;
                serde_json::to_string(&g)
            }
        }
    }
}

impl From<Reading> for Draft {
    fn from(r: Reading) -> Self {
        Draft::Reading(r)
    }
}

impl From<Event> for Draft {
    fn from(e: Event) -> Self {
        Draft::Event(e)
    }
}

impl From<Gap> for Draft {
    fn from(g: Gap) -> Self {
        Draft::Gap(g)
    }
}

/// What [`OutboxHandle::append`] takes: a draft and the clock it was taken under.
///
/// A record stamped `trusted: false` is committed but *held*: [`Spool::pending`] does not return
/// it until [`OutboxHandle::restamp`] recomputes its time from `boottime_ms`. A reading stamped
/// untrusted gets the `clock_unsynced` quality flag from the outbox ([`Draft::wire_json`]);
/// callers do not set it. For a gap the stamp refers to its `to` time; re-stamping shifts
/// `from` and `to` alike.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    pub draft: Draft,
    pub clock: ClockStamp,
}

impl Stamped {
    /// `Stamped::new(reading, clock.clone())`: one record taken under `clock`.
    pub fn new(draft: impl Into<Draft>, clock: ClockStamp) -> Self {
        Stamped {
            draft: draft.into(),
            clock,
        }
    }

    /// The record's wire JSON as the outbox commits it with `seq`, under its own clock stamp
    /// (see [`Draft::wire_json`] for the clock rule).
    pub fn wire_json(&self, seq: Seq) -> serde_json::Result<String> {
        self.draft.wire_json(seq, self.clock.trusted)
    }
}

/// The last poll of a device, kept in the outbox so `caudal-agent status` can show it while the
/// daemon runs.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStatusRow {
    pub device: DeviceId,
    pub bus: String,
    pub last_poll: DateTime<Utc>,
    /// `ok` or the failure kind (`timeout`, `exception`, `bad_frame`, `io`, `backoff`).
    pub result: String,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// JSON of the last reading taken, if this poll produced one. When a poll produced none the
    /// outbox keeps the previous one.
    pub last_reading: Option<String>,
}

/// A committed record waiting for the cloud's acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub seq: Seq,
    pub kind: RecordKind,
    /// The record's wire JSON (a `Reading`, `Event` or `Gap` object with its seq).
    pub json: String,
    pub ts: DateTime<Utc>,
}

/// Figures about the outbox.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Records not yet acknowledged (including those held back for the clock).
    pub backlog: u64,
    /// Timestamp of the oldest record not yet acknowledged (the sendable one with the lowest
    /// seq; held records have no trustworthy time).
    pub oldest: Option<DateTime<Utc>>,
    /// Bytes of record JSON held.
    pub bytes: u64,
    /// Records evicted since the database was created.
    pub evicted_total: u64,
    /// Records held back until the clock is trusted.
    pub held: u64,
}

/// What the uplink watches: the highest committed seq, and a generation that changes when
/// records below the uplink's cursor become sendable (clock re-stamping released them), so the
/// uplink must rescan from the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolState {
    pub committed: Seq,
    pub generation: u64,
}

/// Errors of the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("outbox database {path} is unreadable and could not be moved aside: {source}")]
    SetAside {
        path: String,
        source: std::io::Error,
    },
    #[error("outbox storage is full and nothing is left to evict")]
    Full,
    #[error("outbox: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("outbox record seq {seq} is corrupt: {reason}")]
    Corrupt { seq: Seq, reason: String },
    #[error("outbox worker stopped")]
    Stopped,
    /// The file was written by a newer agent (or is not an outbox at all).
    #[error(
        "outbox database {path} has schema version {found}; this build reads versions 1 to {supported}"
    )]
    Schema {
        path: String,
        found: i64,
        supported: i64,
    },
    /// The counter space is exhausted (2^31 epochs of 2^32 records): never in practice.
    #[error("outbox sequence space is exhausted after epoch {epoch}")]
    SeqExhausted { epoch: u32 },
    #[error("outbox worker thread could not start: {0}")]
    Spawn(std::io::Error),
}

/// What the uplink needs from the outbox. The seam exists so the uplink's state machine can be
/// driven in tests: the agent always runs it on [`OutboxHandle`], the uplink's unit tests on an
/// in-memory double (`memory::MemorySpool`) that fails a read or an acknowledgement, or stops,
/// on demand.
pub trait Spool: Clone + Send + Sync + 'static {
    /// Sendable records (not acknowledged, not held back) with `after < seq <= upto`, ascending,
    /// at most `limit`.
    fn pending(
        &self,
        after: Seq,
        upto: Option<Seq>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Pending>, OutboxError>> + Send;
    /// Deletes the acknowledged records; returns how many existed.
    fn ack(&self, ranges: Vec<SeqRange>) -> impl Future<Output = Result<u64, OutboxError>> + Send;
    fn stats(&self) -> impl Future<Output = Result<Stats, OutboxError>> + Send;
    fn watch(&self) -> watch::Receiver<SpoolState>;
}
