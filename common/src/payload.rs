//! Versioned payloads of the v1 contract, and their JSON codec.
//!
//! Every payload is a JSON object with `"v": 1`. [`decode`] checks the version before anything
//! else, so a v2 payload gets "unsupported schema version 2", not a confusing field error, and it
//! returns an error (never panics) on arbitrary bytes. Floats round-trip exactly (shortest
//! representation on encode, correctly rounded parse on decode), which matters for totalizers.
//! What a batch must satisfy beyond its shape (every seq fits, none twice, no text the cloud's
//! databases cannot store, …) is [`Batch::check`], in `rules`; [`decode`] applies the part
//! about each record on its own, [`Batch::check_records`].

use crate::id::{DeviceId, SiteId};
use crate::quality::Quality;
use crate::seq::{Seq, SeqRange};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod rules;
pub use rules::BatchError;

/// The schema version this crate writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not a JSON object with a numeric \"v\": {0}")]
    NoVersion(serde_json::Error),
    #[error("unsupported schema version {0}; this build reads version {SCHEMA_VERSION}")]
    UnsupportedVersion(u32),
    #[error("invalid v{SCHEMA_VERSION} payload: {0}")]
    Invalid(serde_json::Error),
    #[error("invalid v{SCHEMA_VERSION} payload: {0}")]
    Rule(String),
    /// A batch breaks one of the rules of [`Batch::check`].
    #[error("invalid v{SCHEMA_VERSION} payload: {0}")]
    Batch(#[from] BatchError),
}

#[derive(Deserialize)]
struct Header {
    v: u32,
}

/// A payload of the v1 contract.
pub trait Payload: Serialize + DeserializeOwned {
    /// Checks rules that serde cannot express (finite numbers, ordered ranges, ...).
    fn check(&self) -> Result<(), DecodeError> {
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        // Serializing these plain structs to a Vec cannot fail: no maps with non-string keys,
        // no failing Serialize impls.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Decodes a payload, checking the schema version first.
pub fn decode<T: Payload>(bytes: &[u8]) -> Result<T, DecodeError> {
    let h: Header = serde_json::from_slice(bytes).map_err(DecodeError::NoVersion)?;
    if h.v != SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedVersion(h.v));
    }
    let t: T = serde_json::from_slice(bytes).map_err(DecodeError::Invalid)?;
    t.check()?;
    Ok(t)
}

fn v1() -> u32 {
    SCHEMA_VERSION
}

/// One measurement of one device, in canonical units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    pub seq: Seq,
    pub device: DeviceId,
    /// When the device was read, UTC.
    pub ts: DateTime<Utc>,
    /// Quality flags; absent or empty means good.
    #[serde(default, skip_serializing_if = "Quality::is_good")]
    pub q: Quality,
    /// Instantaneous flow, L/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_lps: Option<f64>,
    /// Totalizer (accumulated volume), m³.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_m3: Option<f64>,
    /// Level (depth to water or water column, as the device is configured), m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level_m: Option<f64>,
    /// Named extra channels (velocity, temperature, battery, ...), in the unit the profile names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// Something the agent noticed: a totalizer reset, a device that stopped answering, ...
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub seq: Seq,
    pub ts: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    pub kind: EventKind,
    /// Human-readable detail naming the channel, register or values involved.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The value before the event (e.g. the last totalizer), in canonical units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<f64>,
    /// The value that triggered the event, in canonical units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<f64>,
    /// For `totalizer_rollover`: the total at which the register returns to zero, in canonical
    /// units, so the volume across the wrap can be computed again from the stored readings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrap: Option<f64>,
}

/// What an [`Event`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    NotFinite,
    OutOfRange,
    Frozen,
    TotalizerBackwards,
    TotalizerRollover,
    TotalizerReset,
    MeterReplaced,
    ReverseFlow,
    /// The system clock is not trustworthy; readings are flagged until it is.
    ClockUnsynced,
    /// The clock became trustworthy; `current` holds how many readings were re-stamped.
    ClockSynced,
    /// A device stopped answering and is being backed off.
    DeviceUnreachable,
    /// One poll of a device read nothing; `message` starts with the cause (`timeout`,
    /// `exception`, `bad_frame`, `io`) and names the request. Every failed poll has one, so
    /// even a short outage leaves a trace.
    PollFailed,
    /// A device answers again after being unreachable.
    DeviceRecovered,
    /// The agent started; `message` holds its version.
    AgentStarted,
}

/// Records the agent no longer has or never took: evicted from a full outbox, or a device that
/// could not be read for a while. The cloud shows these as "unknown", never interpolates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gap {
    pub seq: Seq,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    /// Timestamp of the first missing record (or the start of the outage).
    pub from: DateTime<Utc>,
    /// Timestamp of the last missing record (or the end of the outage).
    pub to: DateTime<Utc>,
    /// Sequence numbers the gap covers, when records were taken and then lost (eviction). The
    /// range may include other devices' records that were not lost; only those absent are covered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seqs: Option<SeqRange>,
    /// How many records of this device the gap stands for (0 when unknown).
    pub count: u64,
    pub cause: GapCause,
}

/// Why a [`Gap`] exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapCause {
    /// The outbox reached its disk budget and dropped its oldest records.
    Evicted,
    /// The device did not answer; no readings exist for the time range.
    DeviceUnreachable,
    /// The agent found its outbox file unreadable (not a database, corrupt) and started a new
    /// one: its unsent records, of an unknown range up to `to`, are lost. `from` is when the
    /// file was last written (else `to`), `count` 0 and `seqs` absent: what it held is unknown.
    OutboxLost,
}

/// Agent → cloud on `caudal/v1/{site}/telemetry`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    #[serde(default = "v1")]
    pub v: u32,
    pub site: SiteId,
    /// Unique per agent; echoed by the [`Ack`].
    pub batch: String,
    pub sent_at: DateTime<Utc>,
    #[serde(default)]
    pub readings: Vec<Reading>,
    #[serde(default)]
    pub events: Vec<Event>,
    #[serde(default)]
    pub gaps: Vec<Gap>,
}

impl Batch {
    /// Every sequence number the batch carries, ascending.
    pub fn seqs(&self) -> Vec<Seq> {
        let mut v: Vec<Seq> = self
            .readings
            .iter()
            .map(|r| r.seq)
            .chain(self.events.iter().map(|e| e.seq))
            .chain(self.gaps.iter().map(|g| g.seq))
            .collect();
        v.sort_unstable();
        v
    }

    pub fn len(&self) -> usize {
        self.readings.len() + self.events.len() + self.gaps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Payload for Batch {
    fn check(&self) -> Result<(), DecodeError> {
        Ok(self.check_records()?)
    }
}

/// Builds the JSON of a [`Batch`] from records that are already encoded (the agent stores each
/// record's JSON in its outbox and does not decode it again to send it).
#[derive(Debug, Default)]
pub struct RawBatch {
    lists: [String; 3],
    len: usize,
}

impl RawBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one encoded record (compact JSON of a [`Reading`], [`Event`] or [`Gap`]).
    pub fn push(&mut self, kind: RecordKind, json: &str) {
        let list = &mut self.lists[kind as usize];
        if !list.is_empty() {
            list.push(',');
        }
        list.push_str(json);
        self.len += 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batch's JSON.
    pub fn finish(&self, site: &SiteId, batch: &str, sent_at: DateTime<Utc>) -> Vec<u8> {
        let head = serde_json::json!({
            "v": SCHEMA_VERSION, "site": site, "batch": batch, "sent_at": sent_at,
        })
        .to_string();
        let body: usize = self.lists.iter().map(String::len).sum();
        let mut out = String::with_capacity(head.len() + body + 48);
        // `head` is a JSON object: reopen it to append the three lists.
        out.push_str(head.strip_suffix('}').unwrap_or(&head));
        for (list, name) in self.lists.iter().zip(["readings", "events", "gaps"]) {
            out.push_str(",\"");
            out.push_str(name);
            out.push_str("\":[");
            out.push_str(list);
            out.push(']');
        }
        out.push('}');
        out.into_bytes()
    }
}

/// The kind of a record in the outbox and in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    Reading = 0,
    Event = 1,
    Gap = 2,
}

impl RecordKind {
    /// `reading`, `event` or `gap`, as errors name a record.
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Reading => "reading",
            RecordKind::Event => "event",
            RecordKind::Gap => "gap",
        }
    }

    pub fn from_u8(v: u8) -> Option<RecordKind> {
        match v {
            0 => Some(RecordKind::Reading),
            1 => Some(RecordKind::Event),
            2 => Some(RecordKind::Gap),
            _ => None,
        }
    }
}

impl std::fmt::Display for RecordKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Cloud → agent on `caudal/v1/{site}/ack`, published only after the batch is committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    #[serde(default = "v1")]
    pub v: u32,
    pub site: SiteId,
    /// The acknowledged batch's id.
    pub batch: String,
    pub status: AckStatus,
    /// The sequence numbers now safely stored in the cloud (for `accepted`). The agent deletes
    /// exactly these, so a late ack for a batch the agent already re-sent is still correct.
    #[serde(default)]
    pub seqs: Vec<SeqRange>,
    /// Why the batch was rejected (for `rejected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Payload for Ack {
    fn check(&self) -> Result<(), DecodeError> {
        match self.seqs.iter().find(|r| r.from > r.to) {
            Some(r) => Err(DecodeError::Rule(format!(
                "ack range {}..{} is reversed",
                r.from.0, r.to.0
            ))),
            None => Ok(()),
        }
    }
}

/// The cloud's verdict on a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// Stored (or already stored: duplicates are accepted). The agent may delete `seqs`.
    Accepted,
    /// Not stored; the cloud keeps the payload in its dead-letter table. The agent keeps the
    /// records and retries later.
    Rejected,
}

/// Agent → cloud on `caudal/v1/{site}/status`, retained. The last will is the same payload with
/// `online: false` and no other details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    #[serde(default = "v1")]
    pub v: u32,
    pub site: SiteId,
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<String>,
    /// Records committed locally and not yet acknowledged by the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<u64>,
    /// Age in seconds of the oldest record not yet acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unsent_age_s: Option<u64>,
    /// Whether the agent trusts its wall clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_synced: Option<bool>,
    /// Records evicted since the outbox was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, DeviceState>,
}

impl Payload for Status {}

impl Status {
    /// The last-will payload: offline, nothing else known.
    pub fn offline(site: SiteId) -> Status {
        Status {
            v: SCHEMA_VERSION,
            site,
            online: false,
            ts: None,
            agent_version: None,
            config_version: None,
            backlog: None,
            oldest_unsent_age_s: None,
            clock_synced: None,
            evicted: None,
            devices: BTreeMap::new(),
        }
    }
}

/// The last poll of one device, as reported in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll: Option<DateTime<Utc>>,
    /// `ok`, or the kind of failure: `timeout`, `exception`, `bad_frame`, `io`, `backoff`.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default)]
    pub consecutive_failures: u32,
}

/// Cloud → agent on `caudal/v1/{site}/command`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    #[serde(default = "v1")]
    pub v: u32,
    /// Chosen by the cloud; echoed in the [`CommandResult`].
    pub id: String,
    #[serde(flatten)]
    pub kind: CommandKind,
}

impl Payload for Command {}

/// What a [`Command`] asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum CommandKind {
    /// Answer at once; proves the command path works end to end.
    Ping,
    /// Publish the retained status now.
    PublishStatus,
    /// Read one device now and return the decoded values.
    PollNow { device: DeviceId },
}

/// Agent → cloud on `caudal/v1/{site}/command/result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    #[serde(default = "v1")]
    pub v: u32,
    pub site: SiteId,
    pub id: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub output: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Payload for CommandResult {}

/// Cloud → agent on `caudal/v1/{site}/config/desired`, retained: the configuration the agent
/// should run. The agent reports the version it runs in [`Status::config_version`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredConfig {
    #[serde(default = "v1")]
    pub v: u32,
    pub version: String,
    /// The agent configuration, TOML text.
    pub config: String,
}

impl Payload for DesiredConfig {}

#[cfg(test)]
mod tests;
