//! The agent's configuration: file format, defaults, environment overrides and validation.
//!
//! The file is TOML (`config/agent.example.toml` documents every key). Unknown keys are errors.
//! `CAUDAL_*` environment variables override file values (`CAUDAL_UPLINK__PASSWORD`, double
//! underscore between levels). [`AgentConfig::resolve`] turns the file format into the runtime
//! model ([`Site`], [`Bus`], [`Device`]) with every profile merged and every register point
//! resolved, so nothing later needs to look at raw configuration.
//!
//! Errors point at the place to fix. The `config` crate merges file and environment but loses
//! positions, so the file text is also parsed with `toml`, whose errors carry byte spans: a
//! problem in the file reads `agent.toml:14:1: bus[rs485].device[fm1].perod_s: unknown field`,
//! one in the environment names the variable. [`AgentConfig::resolve`] collects every problem
//! (not only the first), each naming its bus, device and key with the line it is on.

use crate::position::Seg;
pub use crate::position::{Location, SourceText};
pub use crate::profile::Parity;
use crate::profile::{PointError, ProfileError, ProfileSet, UnknownProfile};
use crate::register::Point;
use caudal_common::{DeviceId, SiteId};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A string that does not print (passwords, keys).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
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
    pub site: SiteConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    pub uplink: UplinkConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub clock: ClockConfig,
    #[serde(default)]
    pub profiles: ProfilesConfig,
    /// Physical buses (one RS-485 line, or one Modbus TCP endpoint) and their devices.
    #[serde(default, rename = "bus")]
    pub buses: Vec<BusConfig>,
    /// The file this configuration was read from, to put line numbers on later errors.
    #[serde(skip)]
    source: Option<SourceText>,
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
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// PEM CA bundle to verify the broker (mqtts); default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
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
    /// Reconnect back-off bounds, milliseconds (exponential with full jitter).
    #[serde(default = "d_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "d_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// How often the retained status is refreshed, seconds.
    #[serde(default = "d_status_interval_s")]
    pub status_interval_s: u64,
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

/// `[[bus]]`: one physical bus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    pub name: String,
    pub kind: LinkKind,
    /// `host:port` for `tcp` and `rtu_over_tcp`.
    #[serde(default)]
    pub address: Option<String>,
    /// Serial device for `rtu`, e.g. `/dev/ttyUSB0`.
    #[serde(default)]
    pub port: Option<PathBuf>,
    #[serde(default)]
    pub baud: Option<u32>,
    #[serde(default)]
    pub parity: Option<Parity>,
    #[serde(default)]
    pub data_bits: Option<u8>,
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// Silence between a reply and the next request on this bus, milliseconds.
    #[serde(default)]
    pub inter_frame_gap_ms: Option<u64>,
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
    pub id: DeviceId,
    /// Modbus unit (slave) id, 1-247 (0 is broadcast; 255 is allowed for Modbus TCP gateways).
    pub unit: u8,
    /// Profile id, e.g. `siemens-mag8000`.
    pub profile: String,
    /// Poll period, seconds; polls align to multiples of it on the wall clock.
    #[serde(default)]
    pub period_s: Option<u64>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub retries: Option<u32>,
    #[serde(default)]
    pub max_regs_per_read: Option<u16>,
    /// Per-channel overrides of the profile's points (any field of a profile point).
    #[serde(default)]
    pub points: BTreeMap<String, toml::Table>,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[bus.device.limits]`: plausibility checks for validation.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Flow above this (L/s, absolute) is flagged out of range.
    pub flow_max_lps: Option<f64>,
    pub level_min_m: Option<f64>,
    pub level_max_m: Option<f64>,
    /// A totalizer increase larger than this between two polls (m³) is flagged out of range.
    pub total_max_step_m3: Option<f64>,
    /// A value unchanged for this long, seconds, is flagged frozen (flow only while non-zero).
    pub frozen_after_s: Option<u64>,
}

// ---- Runtime model produced by `AgentConfig::resolve` ----

/// Everything the agent runs, resolved.
#[derive(Debug, Clone)]
pub struct Site {
    pub id: SiteId,
    pub outbox_path: PathBuf,
    pub buses: Vec<Bus>,
}

/// One physical bus and the devices on it.
#[derive(Debug, Clone)]
pub struct Bus {
    pub name: String,
    pub link: Link,
    pub inter_frame_gap: Duration,
    pub devices: Vec<Device>,
}

/// How to reach a bus.
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    Tcp {
        address: String,
    },
    RtuOverTcp {
        address: String,
    },
    Rtu {
        port: PathBuf,
        baud: u32,
        parity: Parity,
        data_bits: u8,
        stop_bits: u8,
    },
}

/// For messages: `tcp 10.0.0.5:502`, `rtu_over_tcp 10.0.0.9:4001` (the `kind` spelling of the configuration), `rtu /dev/ttyUSB0 19200 8E1`.
impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Tcp { address } => write!(f, "tcp {address}"),
            Link::RtuOverTcp { address } => write!(f, "rtu_over_tcp {address}"),
            Link::Rtu {
                port,
                baud,
                parity,
                data_bits,
                stop_bits,
            } => write!(
                f,
                "rtu {} {baud} {data_bits}{}{stop_bits}",
                port.display(),
                parity.letter()
            ),
        }
    }
}

/// One device, with its profile merged and overrides applied.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: DeviceId,
    pub unit: u8,
    pub profile: String,
    pub period: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub max_regs_per_read: u16,
    pub points: Vec<Point>,
    pub limits: LimitsConfig,
}

// ---- Defaults applied by `AgentConfig::resolve` ----

/// Poll period when neither the device nor anything else says, seconds.
pub const DEFAULT_PERIOD_S: u64 = 60;
/// Response timeout when neither the device nor its profile says, milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
/// Retries when neither the device nor its profile says.
pub const DEFAULT_RETRIES: u32 = 1;
/// Serial settings when neither the bus nor any of its devices' profiles say: 9600 8N1.
pub const DEFAULT_BAUD: u32 = 9600;
pub const DEFAULT_PARITY: Parity = Parity::None;
pub const DEFAULT_DATA_BITS: u8 = 8;
pub const DEFAULT_STOP_BITS: u8 = 1;
/// Gap between a reply and the next request on a serial line (`rtu`, `rtu_over_tcp`) when
/// neither the bus nor a profile says, milliseconds: 3.5 characters at 9600 baud plus margin
/// for USB adapters and converters.
pub const DEFAULT_SERIAL_GAP_MS: u64 = 10;

/// Environment variables that override file values start with this.
pub const ENV_PREFIX: &str = "CAUDAL_";
/// Separates levels in an environment variable name (`CAUDAL_UPLINK__PASSWORD`).
pub const ENV_SEPARATOR: &str = "__";

// ---- Errors ----

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax error, unknown key, wrong type or missing key in the file.
    #[error("{at}: {message}")]
    File { at: Location, message: String },
    /// An environment override that does not fit the key it names.
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// A profile file that cannot be loaded.
    #[error(transparent)]
    Profile(Box<ProfileError>),
    /// The file parses but describes something that cannot run.
    #[error("{at}: {problem}")]
    Invalid { at: Location, problem: Box<Problem> },
}

impl ConfigError {
    /// The problem of an [`ConfigError::Invalid`] error.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ConfigError::Invalid { problem, .. } => Some(problem),
            _ => None,
        }
    }

    /// Where the error is, when it is in a file.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::File { at, .. } | ConfigError::Invalid { at, .. } => Some(at),
            ConfigError::Profile(e) => e.location(),
            ConfigError::Read { .. } | ConfigError::Env { .. } => None,
        }
    }
}

impl From<ProfileError> for ConfigError {
    fn from(e: ProfileError) -> Self {
        ConfigError::Profile(Box::new(e))
    }
}

/// What is wrong with a configuration that parses (see [`ConfigError::Invalid`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error(transparent)]
    UnknownProfile(#[from] UnknownProfile),
    #[error("bus name `{name}` is used twice")]
    DuplicateBus { name: String },
    #[error(
        "device id `{id}` is already used on bus `{first_bus}`; device ids are unique per site"
    )]
    DuplicateDevice { id: DeviceId, first_bus: String },
    #[error("unit {unit} is already used by device `{first}` on this bus")]
    DuplicateUnit { unit: u8, first: DeviceId },
    #[error("a {kind} bus needs `{key}`")]
    Missing { key: &'static str, kind: LinkKind },
    #[error("`{key}` does not apply to a {kind} bus")]
    NotForKind { key: &'static str, kind: LinkKind },
    #[error("address `{address}`: {reason}")]
    BadAddress {
        address: String,
        reason: &'static str,
    },
    #[error("unit {unit}: {reason}")]
    BadUnitId { unit: u8, reason: &'static str },
    #[error("{what} = {value} is out of range; expected {expected}")]
    OutOfRange {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "the profiles on this bus disagree on {key}: `{first_profile}` says {first}, `{second_profile}` says {second}; set {key} on the bus"
    )]
    ProfilesDisagree {
        key: &'static str,
        first_profile: String,
        first: String,
        second_profile: String,
        second: String,
    },
    #[error("profile `{profile}`: {error}")]
    Point { profile: String, error: PointError },
    #[error(
        "point `{channel}` needs {registers} registers in one read but max_regs_per_read is {max}"
    )]
    PointTooLarge {
        channel: String,
        registers: u16,
        max: u16,
    },
    #[error("device has no points left (all disabled)")]
    NoPoints,
    #[error("{0}")]
    Value(String),
}

// ---- Loading ----

impl AgentConfig {
    /// Reads the file at `path` and applies `CAUDAL_*` overrides from the process environment.
    pub fn load(path: impl AsRef<Path>) -> Result<AgentConfig, ConfigError> {
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        AgentConfig::load_with_env(path, env)
    }

    /// [`AgentConfig::load`] with an explicit environment (tests, or a caller that filters).
    pub fn load_with_env(
        path: impl AsRef<Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AgentConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        AgentConfig::from_source(SourceText::new(path, text), env)
    }

    /// Parses configuration text (named by `source` in errors) with environment overrides.
    ///
    /// Only variables `CAUDAL_<SECTION>__<KEY>` (at least one `__`) are overrides; single-level
    /// ones such as `CAUDAL_CONFIG` are left to the command line. Empty values count as unset.
    pub fn from_source(
        source: SourceText,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AgentConfig, ConfigError> {
        let overrides = env_overrides(env);
        let strict = toml::from_str::<AgentConfig>(source.text());
        match merge(source.text(), &overrides) {
            Ok(mut config) => {
                if let Err(e) = &strict {
                    // The merge coerces ("5.5" to 6, "yes" to true); the file on its own must
                    // still be well typed. A key missing from the file may come from the
                    // environment, so that alone is not an error.
                    if !e.message().starts_with("missing field") {
                        let (at, message) = source.toml_error(e);
                        return Err(ConfigError::File { at, message });
                    }
                }
                config.source = Some(source);
                Ok(config)
            }
            Err(merged) => {
                if let Err(e) = &strict {
                    let (at, message) = source.toml_error(e);
                    return Err(ConfigError::File { at, message });
                }
                if overrides.is_empty() {
                    // The `toml` parser accepted what the `config` crate's did not.
                    return Err(ConfigError::File {
                        at: Location {
                            file: source.path().to_path_buf(),
                            line: None,
                            column: None,
                            key: String::new(),
                        },
                        message: merged.to_string(),
                    });
                }
                // The file alone is fine: find the variable that breaks it.
                for (var, value) in &overrides {
                    let one = BTreeMap::from([(var.clone(), value.clone())]);
                    if let Err(e) = merge(source.text(), &one) {
                        return Err(ConfigError::Env {
                            var: var.clone(),
                            message: e.to_string(),
                        });
                    }
                }
                Err(ConfigError::Env {
                    var: overrides.keys().cloned().collect::<Vec<_>>().join(", "),
                    message: merged.to_string(),
                })
            }
        }
    }

    /// The file this configuration was read from, if it was read from one.
    pub fn source(&self) -> Option<&SourceText> {
        self.source.as_ref()
    }

    /// `[profiles] dirs`, relative ones taken from the configuration file's directory.
    pub fn profile_dirs(&self) -> Vec<PathBuf> {
        let base = self
            .source
            .as_ref()
            .and_then(|s| s.path().parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        self.profiles
            .dirs
            .iter()
            .map(|d| {
                if d.is_relative() {
                    base.join(d)
                } else {
                    d.clone()
                }
            })
            .collect()
    }

    /// Loads the profiles this configuration can use: `[profiles] dirs`, then the built-ins.
    pub fn load_profiles(&self) -> Result<ProfileSet, Vec<ConfigError>> {
        ProfileSet::load(&self.profile_dirs())
            .map_err(|errors| errors.into_iter().map(ConfigError::from).collect())
    }
}

fn env_overrides(env: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    env.into_iter()
        .filter(|(k, v)| {
            !v.is_empty()
                && k.strip_prefix(ENV_PREFIX)
                    .is_some_and(|rest| rest.contains(ENV_SEPARATOR))
        })
        .collect()
}

fn merge(
    text: &str,
    overrides: &BTreeMap<String, String>,
) -> Result<AgentConfig, config::ConfigError> {
    let env = config::Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
        .prefix_separator("_")
        .separator(ENV_SEPARATOR)
        .source(Some(overrides.clone().into_iter().collect()));
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(env)
        .build()?
        .try_deserialize()
}

// ---- Resolving into the runtime model ----

/// Collects problems with their positions while resolving.
struct Problems<'a> {
    source: Option<&'a SourceText>,
    errors: Vec<ConfigError>,
}

impl Problems<'_> {
    fn push(&mut self, path: &[Seg<'_>], key: String, problem: Problem) {
        let at = match self.source {
            Some(s) => s.locate(path, key),
            None => Location {
                file: PathBuf::new(),
                line: None,
                column: None,
                key,
            },
        };
        self.errors.push(ConfigError::Invalid {
            at,
            problem: Box::new(problem),
        });
    }
}

fn bus_key(bus: &BusConfig) -> String {
    format!("bus[{}]", bus.name)
}

fn device_key(bus: &BusConfig, dev: &DeviceConfig) -> String {
    format!("bus[{}].device[{}]", bus.name, dev.id)
}

impl AgentConfig {
    /// Turns the file format into the runtime model: profiles merged, overrides applied,
    /// defaults filled in (device, then profile, then the `DEFAULT_*` constants). Returns every
    /// problem found, each naming its bus, device and key.
    pub fn resolve(&self, profiles: &ProfileSet) -> Result<Site, Vec<ConfigError>> {
        let mut p = Problems {
            source: self.source.as_ref(),
            errors: Vec::new(),
        };
        self.check_globals(&mut p);

        let mut bus_names: HashSet<&str> = HashSet::new();
        let mut device_buses: HashMap<&DeviceId, &str> = HashMap::new();
        let mut buses = Vec::new();
        for (bi, bus) in self.buses.iter().enumerate() {
            let at = |k: &'static str| [Seg::Key("bus"), Seg::Index(bi), Seg::Key(k)];
            if !bus_names.insert(&bus.name) {
                p.push(
                    &at("name"),
                    format!("{}.name", bus_key(bus)),
                    Problem::DuplicateBus {
                        name: bus.name.clone(),
                    },
                );
            }
            let bus_profiles: Vec<&crate::profile::Profile> = bus
                .devices
                .iter()
                .filter_map(|d| profiles.get(&d.profile).ok())
                .collect();
            let link = resolve_link(bus, bi, &bus_profiles, &mut p);
            let gap_ms = bus.inter_frame_gap_ms.unwrap_or_else(|| {
                let from_profiles = bus_profiles
                    .iter()
                    .filter_map(|pr| pr.timing.inter_request_ms)
                    .max();
                let serial = !matches!(bus.kind, LinkKind::Tcp);
                from_profiles.unwrap_or(if serial { DEFAULT_SERIAL_GAP_MS } else { 0 })
            });

            let mut units: HashMap<u8, &DeviceId> = HashMap::new();
            let mut devices = Vec::new();
            for (di, dev) in bus.devices.iter().enumerate() {
                let dev_path = [
                    Seg::Key("bus"),
                    Seg::Index(bi),
                    Seg::Key("device"),
                    Seg::Index(di),
                ];
                if let Some(first_bus) = device_buses.insert(&dev.id, &bus.name) {
                    p.push(
                        &[&dev_path[..], &[Seg::Key("id")]].concat(),
                        format!("{}.id", device_key(bus, dev)),
                        Problem::DuplicateDevice {
                            id: dev.id.clone(),
                            first_bus: first_bus.to_string(),
                        },
                    );
                }
                if let Some(first) = units.insert(dev.unit, &dev.id) {
                    p.push(
                        &[&dev_path[..], &[Seg::Key("unit")]].concat(),
                        format!("{}.unit", device_key(bus, dev)),
                        Problem::DuplicateUnit {
                            unit: dev.unit,
                            first: first.clone(),
                        },
                    );
                }
                if let Some(d) = resolve_device(bus, dev, &dev_path, profiles, &mut p) {
                    devices.push(d);
                }
            }
            if let Some(link) = link {
                buses.push(Bus {
                    name: bus.name.clone(),
                    link,
                    inter_frame_gap: Duration::from_millis(gap_ms),
                    devices,
                });
            }
        }

        if !p.errors.is_empty() {
            return Err(p.errors);
        }
        Ok(Site {
            id: self.site.id.clone(),
            outbox_path: self
                .outbox
                .path
                .clone()
                .unwrap_or_else(|| self.site.data_dir.join("outbox.db")),
            buses,
        })
    }

    fn check_globals(&self, p: &mut Problems<'_>) {
        let u = &self.uplink;
        let broker_ok = ["mqtt://", "mqtts://"].iter().any(|scheme| {
            u.broker
                .strip_prefix(scheme)
                .is_some_and(|rest| host_port(rest).is_ok())
        });
        if !broker_ok {
            p.push(
                &[Seg::Key("uplink"), Seg::Key("broker")],
                "uplink.broker".into(),
                Problem::Value(format!(
                    "`{}` is not mqtt://host:port or mqtts://host:port",
                    u.broker
                )),
            );
        }
        if u.client_cert.is_some() != u.client_key.is_some() {
            p.push(
                &[Seg::Key("uplink"), Seg::Key("client_cert")],
                "uplink.client_cert".into(),
                Problem::Value("client_cert and client_key go together".into()),
            );
        }
        for (key, value) in [
            ("batch_max_records", u.batch_max_records as u64),
            ("max_inflight_batches", u.max_inflight_batches as u64),
            ("ack_timeout_s", u.ack_timeout_s),
            ("keep_alive_s", u.keep_alive_s),
            ("backlog_rate", u64::from(u.backlog_rate)),
        ] {
            if value == 0 {
                p.push(
                    &[Seg::Key("uplink"), Seg::Key(key)],
                    format!("uplink.{key}"),
                    Problem::OutOfRange {
                        what: key,
                        value: "0".into(),
                        expected: "at least 1",
                    },
                );
            }
        }
        if u.reconnect_min_ms > u.reconnect_max_ms {
            p.push(
                &[Seg::Key("uplink"), Seg::Key("reconnect_min_ms")],
                "uplink.reconnect_min_ms".into(),
                Problem::Value(format!(
                    "reconnect_min_ms ({}) is above reconnect_max_ms ({})",
                    u.reconnect_min_ms, u.reconnect_max_ms
                )),
            );
        }
        if self.outbox.disk_budget_mb == 0 {
            p.push(
                &[Seg::Key("outbox"), Seg::Key("disk_budget_mb")],
                "outbox.disk_budget_mb".into(),
                Problem::OutOfRange {
                    what: "disk_budget_mb",
                    value: "0".into(),
                    expected: "at least 1",
                },
            );
        }
        if let Err(e) = self.metrics.addr() {
            p.push(
                &[Seg::Key("metrics"), Seg::Key("listen")],
                "metrics.listen".into(),
                Problem::Value(format!(
                    "`{}` is not ip:port ({e}); use \"\" to disable",
                    self.metrics.listen
                )),
            );
        }
    }
}

/// The link of a bus, with serial settings filled in; `None` (and problems) when incomplete.
fn resolve_link(
    bus: &BusConfig,
    bi: usize,
    bus_profiles: &[&crate::profile::Profile],
    p: &mut Problems<'_>,
) -> Option<Link> {
    let at = |k: &'static str| [Seg::Key("bus"), Seg::Index(bi), Seg::Key(k)];
    let key = |k: &str| format!("{}.{k}", bus_key(bus));
    let before = p.errors.len();
    let not_for = |k: &'static str, set: bool, p: &mut Problems<'_>| {
        if set {
            p.push(
                &at(k),
                key(k),
                Problem::NotForKind {
                    key: k,
                    kind: bus.kind,
                },
            );
        }
    };
    match bus.kind {
        LinkKind::Tcp | LinkKind::RtuOverTcp => {
            not_for("port", bus.port.is_some(), p);
            not_for("baud", bus.baud.is_some(), p);
            not_for("parity", bus.parity.is_some(), p);
            not_for("data_bits", bus.data_bits.is_some(), p);
            not_for("stop_bits", bus.stop_bits.is_some(), p);
            let address = match &bus.address {
                None => {
                    p.push(
                        &at("address"),
                        key("address"),
                        Problem::Missing {
                            key: "address",
                            kind: bus.kind,
                        },
                    );
                    return None;
                }
                Some(a) => a.clone(),
            };
            if let Err(reason) = host_port(&address) {
                p.push(
                    &at("address"),
                    key("address"),
                    Problem::BadAddress { address, reason },
                );
                return None;
            }
            if p.errors.len() > before {
                return None;
            }
            Some(if bus.kind == LinkKind::Tcp {
                Link::Tcp { address }
            } else {
                Link::RtuOverTcp { address }
            })
        }
        LinkKind::Rtu => {
            not_for("address", bus.address.is_some(), p);
            let Some(port) = bus.port.clone() else {
                p.push(
                    &at("port"),
                    key("port"),
                    Problem::Missing {
                        key: "port",
                        kind: bus.kind,
                    },
                );
                return None;
            };
            let baud = serial_setting(
                "baud",
                bus.baud,
                bus_profiles,
                |pr| pr.serial.baud,
                DEFAULT_BAUD,
                &at("baud"),
                key("baud"),
                p,
            );
            let parity = serial_setting(
                "parity",
                bus.parity,
                bus_profiles,
                |pr| pr.serial.parity,
                DEFAULT_PARITY,
                &at("parity"),
                key("parity"),
                p,
            );
            let data_bits = serial_setting(
                "data_bits",
                bus.data_bits,
                bus_profiles,
                |pr| pr.serial.data_bits,
                DEFAULT_DATA_BITS,
                &at("data_bits"),
                key("data_bits"),
                p,
            );
            let stop_bits = serial_setting(
                "stop_bits",
                bus.stop_bits,
                bus_profiles,
                |pr| pr.serial.stop_bits,
                DEFAULT_STOP_BITS,
                &at("stop_bits"),
                key("stop_bits"),
                p,
            );
            for (k, value, ok, expected) in [
                ("baud", u64::from(baud), baud > 0, "above 0"),
                (
                    "data_bits",
                    u64::from(data_bits),
                    (7..=8).contains(&data_bits),
                    "7 or 8",
                ),
                (
                    "stop_bits",
                    u64::from(stop_bits),
                    (1..=2).contains(&stop_bits),
                    "1 or 2",
                ),
            ] {
                if !ok {
                    p.push(
                        &at(k),
                        key(k),
                        Problem::OutOfRange {
                            what: k,
                            value: value.to_string(),
                            expected,
                        },
                    );
                }
            }
            if p.errors.len() > before {
                return None;
            }
            Some(Link::Rtu {
                port,
                baud,
                parity,
                data_bits,
                stop_bits,
            })
        }
    }
}

/// A serial setting: the bus's own, else the one every device profile on the bus agrees on,
/// else the default. Profiles that disagree are an error: only the bus can settle it.
#[allow(clippy::too_many_arguments)]
fn serial_setting<T: Copy + PartialEq + fmt::Display>(
    name: &'static str,
    own: Option<T>,
    profiles: &[&crate::profile::Profile],
    of: impl Fn(&crate::profile::Profile) -> Option<T>,
    default: T,
    path: &[Seg<'_>],
    key: String,
    p: &mut Problems<'_>,
) -> T {
    if let Some(v) = own {
        return v;
    }
    let mut found: Option<(&str, T)> = None;
    for pr in profiles {
        let Some(v) = of(pr) else { continue };
        match found {
            None => found = Some((&pr.id, v)),
            Some((first_id, first)) if first != v => {
                p.push(
                    path,
                    key,
                    Problem::ProfilesDisagree {
                        key: name,
                        first_profile: first_id.to_string(),
                        first: first.to_string(),
                        second_profile: pr.id.clone(),
                        second: v.to_string(),
                    },
                );
                return default;
            }
            Some(_) => {}
        }
    }
    found.map_or(default, |(_, v)| v)
}

/// Checks `host:port` (host may be a name, an IPv4 address or a bracketed IPv6 address).
fn host_port(s: &str) -> Result<(), &'static str> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("expected host:port");
    };
    if host.is_empty() || host == "[]" {
        return Err("the host is empty");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("the port must be 1-65535"),
        Ok(_) => Ok(()),
    }
}

fn resolve_device(
    bus: &BusConfig,
    dev: &DeviceConfig,
    dev_path: &[Seg<'_>],
    profiles: &ProfileSet,
    p: &mut Problems<'_>,
) -> Option<Device> {
    let at = |k: &'static str| [dev_path, &[Seg::Key(k)]].concat();
    let key = |k: &str| format!("{}.{k}", device_key(bus, dev));
    let before = p.errors.len();

    let unit_problem = match dev.unit {
        0 => Some("0 is the broadcast address; use 1-247"),
        248..=254 => Some("248-254 are reserved; use 1-247"),
        255 if bus.kind != LinkKind::Tcp => Some("255 is only for Modbus TCP gateways; use 1-247"),
        _ => None,
    };
    if let Some(reason) = unit_problem {
        p.push(
            &at("unit"),
            key("unit"),
            Problem::BadUnitId {
                unit: dev.unit,
                reason,
            },
        );
    }

    let profile = match profiles.get(&dev.profile) {
        Ok(pr) => Some(pr),
        Err(e) => {
            p.push(&at("profile"), key("profile"), Problem::UnknownProfile(e));
            None
        }
    };

    let period_s = dev.period_s.unwrap_or(DEFAULT_PERIOD_S);
    let timeout_ms = dev
        .timeout_ms
        .or(profile.and_then(|pr| pr.timing.timeout_ms))
        .unwrap_or(DEFAULT_TIMEOUT_MS);
    let retries = dev
        .retries
        .or(profile.and_then(|pr| pr.timing.retries))
        .unwrap_or(DEFAULT_RETRIES);
    let max_regs = dev
        .max_regs_per_read
        .or(profile.and_then(|pr| pr.timing.max_regs_per_read))
        .unwrap_or(crate::register::MAX_REGISTERS_PER_READ);
    for (k, value, ok, expected) in [
        ("period_s", period_s, period_s > 0, "at least 1"),
        ("timeout_ms", timeout_ms, timeout_ms > 0, "at least 1"),
        (
            "max_regs_per_read",
            u64::from(max_regs),
            (1..=crate::register::MAX_REGISTERS_PER_READ).contains(&max_regs),
            "1-125",
        ),
    ] {
        if !ok {
            p.push(
                &at(k),
                key(k),
                Problem::OutOfRange {
                    what: k,
                    value: value.to_string(),
                    expected,
                },
            );
        }
    }
    check_limits(&dev.limits, &at("limits"), key("limits"), p);

    let points = match profile.map(|pr| (pr, pr.resolve(&dev.points))) {
        None => Vec::new(),
        Some((_, Ok(points))) => points,
        Some((pr, Err(errors))) => {
            for error in errors {
                let channel = error.channel().to_string();
                // Point at the override when there is one, else at the device's profile key.
                let field = error.field().map(str::to_string);
                let mut path = at("points");
                let mut k = format!("points.{channel}");
                if dev.points.contains_key(&channel) {
                    path.push(Seg::Key(&channel));
                    if let Some(f) = &field {
                        path.push(Seg::Key(f));
                        k = format!("{k}.{f}");
                    }
                } else {
                    path = at("profile");
                    k = "profile".into();
                }
                p.push(
                    &path,
                    key(&k),
                    Problem::Point {
                        profile: pr.id.clone(),
                        error,
                    },
                );
            }
            Vec::new()
        }
    };
    if profile.is_some() && points.is_empty() && p.errors.len() == before {
        p.push(&at("points"), key("points"), Problem::NoPoints);
    }
    for point in &points {
        let registers = point.data_type.registers();
        if !point.fc.is_bits() && registers > max_regs && (1..=125).contains(&max_regs) {
            p.push(
                &at("max_regs_per_read"),
                key("max_regs_per_read"),
                Problem::PointTooLarge {
                    channel: point.channel.name().to_string(),
                    registers,
                    max: max_regs,
                },
            );
        }
    }

    if p.errors.len() > before {
        return None;
    }
    Some(Device {
        id: dev.id.clone(),
        unit: dev.unit,
        profile: dev.profile.clone(),
        period: Duration::from_secs(period_s),
        timeout: Duration::from_millis(timeout_ms),
        retries,
        max_regs_per_read: max_regs,
        points,
        limits: dev.limits.clone(),
    })
}

fn check_limits(l: &LimitsConfig, path: &[Seg<'_>], key: String, p: &mut Problems<'_>) {
    let mut bad = |field: &'static str, value: f64, expected: &'static str| {
        let mut path = path.to_vec();
        path.push(Seg::Key(field));
        p.push(
            &path,
            format!("{key}.{field}"),
            Problem::OutOfRange {
                what: field,
                value: value.to_string(),
                expected,
            },
        );
    };
    for (field, v) in [
        ("flow_max_lps", l.flow_max_lps),
        ("total_max_step_m3", l.total_max_step_m3),
    ] {
        if let Some(v) = v
            && !(v.is_finite() && v > 0.0)
        {
            bad(field, v, "finite and above 0");
        }
    }
    for (field, v) in [
        ("level_min_m", l.level_min_m),
        ("level_max_m", l.level_max_m),
    ] {
        if let Some(v) = v
            && !v.is_finite()
        {
            bad(field, v, "finite");
        }
    }
    if let (Some(min), Some(max)) = (l.level_min_m, l.level_max_m)
        && min >= max
    {
        bad("level_max_m", max, "above level_min_m");
    }
    if l.frozen_after_s == Some(0) {
        bad("frozen_after_s", 0.0, "at least 1");
    }
}

// ---- check-config ----

/// The outcome of `caudal-agent check-config`: the resolved site, or every problem found.
#[derive(Debug)]
pub struct CheckReport {
    pub path: PathBuf,
    pub outcome: Result<Site, Vec<ConfigError>>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.outcome.is_ok()
    }
}

/// Loads, loads profiles for, and resolves the configuration at `path` with the process
/// environment, collecting every problem.
pub fn check(path: impl AsRef<Path>) -> CheckReport {
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    check_with_env(path, env)
}

/// [`check`] with an explicit environment.
pub fn check_with_env(
    path: impl AsRef<Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> CheckReport {
    let path = path.as_ref().to_path_buf();
    let outcome = AgentConfig::load_with_env(&path, env)
        .map_err(|e| vec![e])
        .and_then(|config| {
            let profiles = config.load_profiles()?;
            config.resolve(&profiles)
        });
    CheckReport { path, outcome }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let site = match &self.outcome {
            Err(errors) => {
                for e in errors {
                    writeln!(f, "{e}")?;
                }
                return writeln!(
                    f,
                    "{}: {} problem{}",
                    self.path.display(),
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" }
                );
            }
            Ok(site) => site,
        };
        let devices: usize = site.buses.iter().map(|b| b.devices.len()).sum();
        let points: usize = site
            .buses
            .iter()
            .flat_map(|b| &b.devices)
            .map(|d| d.points.len())
            .sum();
        writeln!(
            f,
            "{}: OK: site {}, {} bus{}, {} device{}, {} point{}; outbox {}",
            self.path.display(),
            site.id,
            site.buses.len(),
            if site.buses.len() == 1 { "" } else { "es" },
            devices,
            if devices == 1 { "" } else { "s" },
            points,
            if points == 1 { "" } else { "s" },
            site.outbox_path.display()
        )?;
        for bus in &site.buses {
            let link = &bus.link;
            writeln!(
                f,
                "  bus {}: {link}, gap {} ms",
                bus.name,
                bus.inter_frame_gap.as_millis()
            )?;
            for d in &bus.devices {
                writeln!(
                    f,
                    "    device {} unit {} profile {}: every {} s, timeout {} ms, {} retr{}, ≤{} regs/read",
                    d.id,
                    d.unit,
                    d.profile,
                    d.period.as_secs(),
                    d.timeout.as_millis(),
                    d.retries,
                    if d.retries == 1 { "y" } else { "ies" },
                    d.max_regs_per_read
                )?;
                for pt in &d.points {
                    write!(
                        f,
                        "      {:<14} {} address {} {} {:?} {}",
                        pt.channel.name(),
                        pt.fc,
                        pt.address,
                        pt.data_type,
                        pt.order,
                        pt.unit
                    )?;
                    if pt.scale != 1.0 {
                        write!(f, " scale {}", pt.scale)?;
                    }
                    if pt.offset != 0.0 {
                        write!(f, " offset {}", pt.offset)?;
                    }
                    writeln!(f)?;
                }
            }
        }
        Ok(())
    }
}
