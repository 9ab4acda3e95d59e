//! The configuration file's format: one serde struct per table, unknown keys refused, a doc
//! comment per key, and the defaults of keys that may be left out.

use super::{Parity, SourceText};
use caudal_common::{DeviceId, SiteId};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A string that does not print (passwords, keys).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that hands it on (the MQTT login).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Who the agent is and where it keeps its state (required).
    pub site: SiteConfig,
    /// The durable store of readings waiting for the cloud.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// The MQTT connection to the cloud (required).
    pub uplink: UplinkConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Log lines: format and filter.
    #[serde(default)]
    pub log: LogConfig,
    /// When the wall clock counts as trustworthy.
    #[serde(default)]
    pub clock: ClockConfig,
    /// Where meter profiles come from, besides the built-in ones.
    #[serde(default)]
    pub profiles: ProfilesConfig,
    /// Physical buses (one RS-485 line, or one Modbus TCP endpoint) and their devices.
    #[serde(default, rename = "bus")]
    pub buses: Vec<BusConfig>,
    /// The file this configuration was read from, to put line numbers on later errors.
    #[serde(skip)]
    pub(super) source: Option<SourceText>,
}

/// `[site]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// The site's identity: MQTT topics, client id and sequence space.
    pub id: SiteId,
    /// Where the agent keeps its state (outbox database).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/caudal")
}

/// How hard the outbox pushes each commit to the storage medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// fsync the WAL on every commit: a committed reading survives power loss.
    #[default]
    Full,
    /// fsync only at checkpoints: survives a process crash, the last commits may be lost on
    /// power loss (never corrupts).
    Normal,
}

/// `[outbox]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Database file; default `<data_dir>/outbox.db`.
    pub path: Option<PathBuf>,
    /// Upper bound for stored records, in MiB. When reached the oldest records are evicted and
    /// reported as gap records.
    pub disk_budget_mb: u64,
    /// How hard each commit is pushed to the storage medium; default `full`.
    pub synchronous: Synchronous,
    /// Longest a reading waits in memory before its group commit, in milliseconds.
    pub commit_interval_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            path: None,
            disk_budget_mb: 256,
            synchronous: Synchronous::Full,
            commit_interval_ms: 200,
        }
    }
}

/// `[uplink]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub broker: String,
    /// MQTT client id; default `caudal-agent-<site>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// MQTT user name; with the cloud's site credentials, the site id.
    #[serde(default)]
    pub username: Option<String>,
    /// MQTT password; better set through `CAUDAL_UPLINK__PASSWORD` than in the file.
    #[serde(default)]
    pub password: Option<Secret>,
    /// PEM CA bundle to verify the broker (mqtts); default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS; goes with `client_key`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// MQTT keep-alive, seconds.
    #[serde(default = "d_keep_alive_s")]
    pub keep_alive_s: u64,
    /// Most records in one batch.
    #[serde(default = "d_batch_max_records")]
    pub batch_max_records: usize,
    /// Longest a live record waits for its batch to fill, in milliseconds.
    #[serde(default = "d_batch_max_age_ms")]
    pub batch_max_age_ms: u64,
    /// Backlog drain rate, records per second (live records are not limited).
    #[serde(default = "d_backlog_rate")]
    pub backlog_rate: u32,
    /// Batches published and not yet acknowledged, at most.
    #[serde(default = "d_max_inflight")]
    pub max_inflight_batches: usize,
    /// A batch not acknowledged within this many seconds is sent again.
    #[serde(default = "d_ack_timeout_s")]
    pub ack_timeout_s: u64,
    /// Shortest reconnect back-off, milliseconds (exponential with full jitter).
    #[serde(default = "d_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect back-off, milliseconds.
    #[serde(default = "d_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// How often the retained status is refreshed, seconds.
    #[serde(default = "d_status_interval_s")]
    pub status_interval_s: u64,
    /// The cloud's Ed25519 public key (base64, `caudal-cloud signing-key` prints it). When set,
    /// acks, commands and desired configuration are taken only signed with it; anything unsigned
    /// or forged is refused, counted and deletes or runs nothing. When absent, they are taken
    /// unsigned, with a warning at start (`docs/adr/010-signed-messages.md`).
    #[serde(default)]
    pub cloud_public_key: Option<String>,
}

fn d_keep_alive_s() -> u64 {
    30
}
fn d_batch_max_records() -> usize {
    500
}
fn d_batch_max_age_ms() -> u64 {
    1000
}
fn d_backlog_rate() -> u32 {
    2000
}
fn d_max_inflight() -> usize {
    8
}
fn d_ack_timeout_s() -> u64 {
    30
}
fn d_reconnect_min_ms() -> u64 {
    500
}
fn d_reconnect_max_ms() -> u64 {
    60_000
}
fn d_status_interval_s() -> u64 {
    60
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `/metrics` and `/healthz` are served; empty string disables.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9187".into(),
        }
    }
}

impl MetricsConfig {
    /// The address to serve on, or `None` when disabled.
    pub fn addr(&self) -> Result<Option<SocketAddr>, std::net::AddrParseError> {
        if self.listen.is_empty() {
            Ok(None)
        } else {
            self.listen.parse().map(Some)
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Plain lines without timestamps (journald adds its own).
    #[default]
    Plain,
    /// One JSON object per line, for central collection.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `plain` (default) or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `caudal_agent::poller=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Plain,
            level: "info".into(),
        }
    }
}

/// `[clock]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    /// Also require the kernel to report the clock as synchronised (NTP/chrony/timesyncd), not
    /// only plausible. Turn off on boards with a battery-backed RTC and no NTP.
    pub require_ntp_sync: bool,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            require_ntp_sync: true,
        }
    }
}

/// `[profiles]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProfilesConfig {
    /// Extra directories with meter profiles (`*.toml`); searched before the built-in ones.
    pub dirs: Vec<PathBuf>,
}

/// `[[bus]]`: one physical bus (an RS-485 line, or a Modbus TCP endpoint).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// Used in logs, metrics and errors; unique per site.
    pub name: String,
    /// How the bus is reached.
    pub kind: LinkKind,
    /// `host:port` for `tcp` and `rtu_over_tcp`.
    #[serde(default)]
    pub address: Option<String>,
    /// Serial device for `rtu`, e.g. `/dev/ttyUSB0`.
    #[serde(default)]
    pub port: Option<PathBuf>,
    /// `rtu` baud rate; default: what the devices' profiles agree on, else 9600.
    #[serde(default)]
    pub baud: Option<u32>,
    /// `rtu` parity; default: from the profiles, else none.
    #[serde(default)]
    pub parity: Option<Parity>,
    /// `rtu` data bits, 7 or 8; default: from the profiles, else 8.
    #[serde(default)]
    pub data_bits: Option<u8>,
    /// `rtu` stop bits, 1 or 2; default: from the profiles, else 1.
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// Silence between a reply and the next request on this bus, milliseconds.
    #[serde(default)]
    pub inter_frame_gap_ms: Option<u64>,
    /// The meters and sensors on this bus.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
}

/// How a bus is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    /// Modbus TCP (MBAP framing).
    Tcp,
    /// Modbus RTU on a local serial port (RS-485/RS-232).
    Rtu,
    /// Modbus RTU frames through a TCP socket (serial-to-Ethernet converter in transparent mode).
    RtuOverTcp,
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkKind::Tcp => "tcp",
            LinkKind::Rtu => "rtu",
            LinkKind::RtuOverTcp => "rtu_over_tcp",
        })
    }
}

/// `[[bus.device]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Unique per site; appears in readings.
    pub id: DeviceId,
    /// Modbus unit (slave) id, 1-247 (0 is broadcast; 255 is allowed for Modbus TCP gateways).
    pub unit: u8,
    /// Profile id, e.g. `siemens-mag8000`.
    pub profile: String,
    /// Poll period, seconds; polls align to multiples of it on the wall clock.
    #[serde(default)]
    pub period_s: Option<u64>,
    /// Response timeout, milliseconds; default: the profile's, else 1000.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Attempts after a failed one; default: the profile's, else 1.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Largest block read, registers (1-125); default: the profile's, else 125.
    #[serde(default)]
    pub max_regs_per_read: Option<u16>,
    /// Per-channel overrides of the profile's points (any field of a profile point).
    #[serde(default)]
    pub points: BTreeMap<String, toml::Table>,
    /// Plausibility limits; none by default.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[bus.device.limits]`: plausibility checks for validation.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Flow above this (L/s, absolute) is flagged out of range.
    pub flow_max_lps: Option<f64>,
    /// Level below this (m) is flagged out of range.
    pub level_min_m: Option<f64>,
    /// Level above this (m) is flagged out of range.
    pub level_max_m: Option<f64>,
    /// A totalizer increase larger than this between two polls (m³) is flagged out of range.
    pub total_max_step_m3: Option<f64>,
    /// A value unchanged for this long, seconds, is flagged frozen (flow only while non-zero).
    pub frozen_after_s: Option<u64>,
}
