//! The durable outbox: every record (reading, event, gap) is committed here before anything is
//! sent, and deleted only after the cloud acknowledges the batch that carried it.
//!
//! (Interface only; the SQLite implementation lands in its own change.)

use caudal_common::payload::RecordKind;
use caudal_common::{DeviceId, Event, Gap, Reading, Seq, SeqRange};
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
    /// JSON of the last reading taken, if this poll produced one.
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
    /// Timestamp of the oldest record not yet acknowledged.
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
    #[error("outbox storage is full and nothing is left to evict")]
    Full,
    #[error("outbox: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("outbox record seq {seq} is corrupt: {reason}")]
    Corrupt { seq: Seq, reason: String },
    #[error("outbox worker stopped")]
    Stopped,
}

/// What the uplink needs from the outbox. The seam exists so the uplink's state machine can be
/// driven in tests; the agent always runs it on [`OutboxHandle`].
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
