//! The cloud's configuration: file format, defaults, `CAUDAL_*` overrides and the selection of
//! services a process runs.
//!
//! The file is TOML (`config/cloud.example.toml` documents every key); unknown keys are errors.
//! Environment variables override the file: `CAUDAL_` then the key path with `__` between levels
//! (`CAUDAL_DATABASE__URL`, `CAUDAL_MQTT__PASSWORD`), and `CAUDAL_SERVICES=core,telemetry` for the
//! list of services. Only variables whose first level is a known key are read, so unrelated
//! `CAUDAL_*` variables (the test suite's `CAUDAL_TEST_DATABASE_URL`) are not mistaken for typos.

use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A string that does not print (passwords, database URLs with credentials).
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

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    File {
        path: PathBuf,
        source: config::ConfigError,
    },
    #[error("configuration: {0}")]
    Invalid(config::ConfigError),
    #[error("configuration key services: unknown service {0:?}; known: {KNOWN_SERVICES}")]
    UnknownService(String),
    #[error("configuration key mqtt.url: {0}")]
    MqttUrl(String),
    #[error("configuration key mqtt.{key}: {reason}")]
    Mqtt { key: &'static str, reason: String },
    #[error("configuration key auth.{key}: {reason}")]
    Auth { key: &'static str, reason: String },
    #[error("configuration key compliance.{key}: {reason}")]
    Compliance { key: &'static str, reason: String },
    #[error("configuration key http.{key}: {reason}")]
    Http { key: &'static str, reason: String },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// Services this process runs: module names (`users`, `catchment`, `telemetry`,
    /// `compliance`) or presets (`core` = core + users + catchment, `all`). Core always runs.
    #[serde(default = "default_services")]
    pub services: Vec<String>,
    /// Directory for the default SQLite database.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub compliance: ComplianceConfig,
    #[serde(default)]
    pub signing: SigningConfig,
}

/// `[signing]`: the cloud's own Ed25519 key, with which it signs what it sends to agents.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// The cloud's key file (`caudal-cloud signing-key` creates it and prints its public key,
    /// which each agent is given as `uplink.cloud_public_key`). When set, every ack is sent
    /// signed; when absent, acks go out as plain v1 and agents with a cloud key refuse them.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

fn default_services() -> Vec<String> {
    vec!["all".to_string()]
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            services: default_services(),
            data_dir: default_data_dir(),
            http: HttpConfig::default(),
            database: DatabaseConfig::default(),
            mqtt: MqttConfig::default(),
            ingest: IngestConfig::default(),
            log: LogConfig::default(),
            auth: AuthConfig::default(),
            alerts: AlertsConfig::default(),
            compliance: ComplianceConfig::default(),
            signing: SigningConfig::default(),
        }
    }
}

/// `[compliance]`: how this process talks to the regulator. What is reported, per point, is in
/// the database (`/api/v1/compliance`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComplianceConfig {
    /// The 32-byte key that encrypts informante passwords at rest, base64. Prefer `key_file`
    /// or `CAUDAL_COMPLIANCE__KEY`; never logged.
    #[serde(default)]
    pub key: Option<Secret>,
    /// A file holding the key (base64, one line), readable by the service only.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Seconds between two rounds of building, checking and sending slots (1–600). A slot due
    /// now goes in the next round, so the default of 30 sends a live slot well within the hour
    /// (Res. DGA 2.170 §3); each round reads only what changed.
    #[serde(default = "default_compliance_interval_s")]
    pub interval_s: u64,
    /// Seconds between two POSTs for one código de obra (1–86400; 300 is Res. DGA 2.170 §6.1's
    /// "at least 5 minutes apart" for a backlog, and less is refused by no rule but logged as a
    /// warning). Measured from the obra's last POST as stored in the database, so a restart or
    /// a second process keeps it.
    #[serde(default = "default_obra_spacing_s")]
    pub obra_spacing_s: u64,
    /// The Centro de Control's POSTs per minute over every obra (1–600): a token bucket kept in
    /// the database, shared by every process that sends for it.
    #[serde(default = "default_max_posts_per_minute")]
    pub max_posts_per_minute: u32,
    /// Most POSTs the bucket lets go back to back (1–600, at most `max_posts_per_minute`).
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Seconds a process owns a slot it claimed (in flight) before another process may treat
    /// it as unanswered: at least `post_timeout_s` + 5, at most 86400.
    #[serde(default = "default_claim_lease_s")]
    pub claim_lease_s: u64,
    /// Seconds after a slot before it is built, so the agents' readings of that minute arrive.
    #[serde(default = "default_settle_s")]
    pub settle_s: u64,
    /// Timeout of a POST to the DGA, seconds (the time after which it counts as unanswered).
    #[serde(default = "default_post_timeout_s")]
    pub post_timeout_s: u64,
    /// Timeout of a GET (receipt verification), seconds.
    #[serde(default = "default_get_timeout_s")]
    pub get_timeout_s: u64,
    /// Sends of one slot before it becomes a "falla de transmisión" (one a day after the first).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Seconds between two rounds of the receipt check, which asks the DGA's GET endpoint
    /// what it stored under the receipts of a few accepted slots; 0 turns the background
    /// check off (a person can still ask for one slot).
    #[serde(default = "default_verify_interval_s")]
    pub verify_interval_s: u64,
    /// Accepted slots checked per round, taken at random among those never checked, one GET
    /// at a time. Small by default: the MOP blocks a Centro de Control whose traffic looks
    /// anomalous (Res. DGA 2.170 §7).
    #[serde(default = "default_verify_per_round")]
    pub verify_per_round: u32,
}

fn default_compliance_interval_s() -> u64 {
    30
}
fn default_obra_spacing_s() -> u64 {
    300
}
fn default_max_posts_per_minute() -> u32 {
    20
}
fn default_burst() -> u32 {
    10
}
fn default_claim_lease_s() -> u64 {
    120
}
fn default_settle_s() -> u64 {
    300
}
fn default_post_timeout_s() -> u64 {
    15
}
fn default_get_timeout_s() -> u64 {
    10
}
fn default_max_attempts() -> u32 {
    7
}
fn default_verify_interval_s() -> u64 {
    3600
}
fn default_verify_per_round() -> u32 {
    2
}

impl Default for ComplianceConfig {
    fn default() -> Self {
        ComplianceConfig {
            key: None,
            key_file: None,
            interval_s: default_compliance_interval_s(),
            obra_spacing_s: default_obra_spacing_s(),
            max_posts_per_minute: default_max_posts_per_minute(),
            burst: default_burst(),
            claim_lease_s: default_claim_lease_s(),
            settle_s: default_settle_s(),
            post_timeout_s: default_post_timeout_s(),
            get_timeout_s: default_get_timeout_s(),
            max_attempts: default_max_attempts(),
            verify_interval_s: default_verify_interval_s(),
            verify_per_round: default_verify_per_round(),
        }
    }
}

impl ComplianceConfig {
    /// Checks each key against its bounds; the error names the key, its value and the bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn within(key: &'static str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
            if (lo..=hi).contains(&v) {
                return Ok(());
            }
            Err(ConfigError::Compliance {
                key,
                reason: format!("is {v}; it must be between {lo} and {hi}"),
            })
        }
        within("interval_s", self.interval_s, 1, 600)?;
        within("obra_spacing_s", self.obra_spacing_s, 1, 86_400)?;
        within(
            "max_posts_per_minute",
            u64::from(self.max_posts_per_minute),
            1,
            600,
        )?;
        within("burst", u64::from(self.burst), 1, 600)?;
        if self.burst > self.max_posts_per_minute {
            return Err(ConfigError::Compliance {
                key: "burst",
                reason: format!(
                    "is {}; it must be at most max_posts_per_minute ({})",
                    self.burst, self.max_posts_per_minute
                ),
            });
        }
        within("post_timeout_s", self.post_timeout_s, 1, 600)?;
        within("get_timeout_s", self.get_timeout_s, 1, 600)?;
        within("max_attempts", u64::from(self.max_attempts), 1, 100)?;
        within("claim_lease_s", self.claim_lease_s, 1, 86_400)?;
        if self.claim_lease_s < self.post_timeout_s + 5 {
            return Err(ConfigError::Compliance {
                key: "claim_lease_s",
                reason: format!(
                    "is {}; it must be at least post_timeout_s ({}) + 5, so a POST still out \
                     is never taken for unanswered",
                    self.claim_lease_s, self.post_timeout_s
                ),
            });
        }
        Ok(())
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP server (`/healthz`, `/metrics`, the API). Port 0 picks a free port.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// Whether the console's cookies are marked `Secure` (sent over HTTPS only): `true` always,
    /// `false` never (plain HTTP, e.g. a test or a trusted LAN); unset, when a proxy in front
    /// says the request came over HTTPS (`X-Forwarded-Proto: https`).
    #[serde(default)]
    pub secure_cookies: Option<bool>,
    /// Whether the client address (for the login limits) is the last `X-Forwarded-For` entry:
    /// turn on only behind a reverse proxy that appends it, else a client could pick its own.
    #[serde(default)]
    pub trust_forwarded_for: bool,
    /// Largest request body accepted, bytes; a larger one is answered `413`.
    #[serde(default = "default_body_limit")]
    pub body_limit_bytes: usize,
    /// Longest a request may take, s; then it is answered `408` and its work dropped.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: u64,
}

fn default_body_limit() -> usize {
    1024 * 1024
}

fn default_request_timeout() -> u64 {
    30
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_http_listen(),
            secure_cookies: None,
            trust_forwarded_for: false,
            body_limit_bytes: default_body_limit(),
            request_timeout_s: default_request_timeout(),
        }
    }
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://path?mode=rwc` or `postgres://user:pass@host/db`. Default: the SQLite file
    /// `<data_dir>/caudal.db`.
    #[serde(default)]
    pub url: Option<Secret>,
    /// Connections in the pool.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Apply pending migrations at start. Turn off when migrations are run separately
    /// (`caudal-cloud migrate`) before processes start.
    #[serde(default = "yes")]
    pub migrate: bool,
    /// PostgreSQL: longest a statement may run, a lock wait included, s (0: no bound). One
    /// stuck statement then fails instead of holding its connection and its work (the ingest
    /// group it belongs to goes unacknowledged and is re-sent); migrations run without it.
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout_s: u64,
}

fn default_statement_timeout() -> u64 {
    30
}

fn default_max_connections() -> u32 {
    8
}

fn yes() -> bool {
    true
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            max_connections: default_max_connections(),
            migrate: true,
            statement_timeout_s: default_statement_timeout(),
        }
    }
}

impl CloudConfig {
    /// The database URL: the configured one, or the SQLite file in `data_dir`.
    pub fn database_url(&self) -> String {
        match &self.database.url {
            Some(u) => u.expose().to_string(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("caudal.db").display()
            ),
        }
    }
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// External broker (`mqtt://host:port`, or `mqtts://host:port` with `ca_file`), spoken to
    /// with MQTT v5. Unset: a process that runs telemetry starts the embedded broker.
    #[serde(default)]
    pub url: Option<String>,
    /// Username at the external broker; with `mqtt.embedded.authenticate`, the cloud's own login
    /// at the embedded broker.
    #[serde(default)]
    pub username: Option<String>,
    /// Password at the external broker, or at the embedded one (see `username`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// PEM CA bundle that signed the external broker's certificate (required with `mqtts://`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate (chain) the cloud presents to a broker that requires mutual TLS; with
    /// `client_key`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// MQTT client id; default `caudal-cloud-<random>`, unique per process.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Keep-alive interval, seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u16,
    #[serde(default)]
    pub embedded: EmbeddedBrokerConfig,
}

fn default_keep_alive() -> u16 {
    30
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: None,
            username: None,
            password: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            client_id: None,
            keep_alive_s: default_keep_alive(),
            embedded: EmbeddedBrokerConfig::default(),
        }
    }
}

/// `[mqtt.embedded]`: the broker started in-process when `mqtt.url` is unset.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedBrokerConfig {
    /// MQTT v3.1.1 listener, for agents. Port 0 picks a free port. Only a loopback address
    /// without `authenticate`.
    #[serde(default = "default_embedded_v4")]
    pub listen: SocketAddr,
    /// MQTT v5 listener (the broker serves one protocol per port); the ingest connects here.
    /// Port 0 picks a free port. Only a loopback address without `authenticate`.
    #[serde(default = "default_embedded_v5")]
    pub listen_v5: SocketAddr,
    /// Largest accepted MQTT payload, bytes.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Most client connections at once.
    #[serde(default = "default_max_connections_broker")]
    pub max_connections: usize,
    /// Require a login: agents with their site's credential (username = site id), the cloud's
    /// ingest with `mqtt.username` and `mqtt.password` (then required). Each site's login then
    /// publishes and reads only its own site's topics (`core::broker`).
    #[serde(default)]
    pub authenticate: bool,
}

fn default_embedded_v4() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}

fn default_embedded_v5() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1884))
}

fn default_max_payload() -> usize {
    1 << 20
}

fn default_max_connections_broker() -> usize {
    10_000
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        EmbeddedBrokerConfig {
            listen: default_embedded_v4(),
            listen_v5: default_embedded_v5(),
            max_payload_bytes: default_max_payload(),
            max_connections: default_max_connections_broker(),
            authenticate: false,
        }
    }
}

/// `[ingest]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// MQTT v5 shared-subscription group: ingest processes in the same group split the sites'
    /// batches between them.
    #[serde(default = "default_group")]
    pub group: String,
    /// Workers writing batches concurrently. A site always goes to the same worker, so its
    /// batches and statuses are stored in arrival order.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Messages waiting per worker. The MQTT receive maximum the ingest asks for is sized from
    /// it (`workers × (2 × queue + 1) + 1`, at least 128): the broker holds further messages
    /// until the ingest is done with earlier ones (back-pressure to the broker).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Most payload bytes a worker stores in one transaction. A worker takes the batches waiting
    /// in its queue, in order, until their payloads reach this size (never more than `queue`
    /// more), stores them together, and acknowledges each after the commit: one commit per group
    /// instead of one per batch. 0 stores each batch in its own transaction.
    #[serde(default = "default_group_bytes")]
    pub group_bytes: usize,
    /// Most bytes of messages the ingest holds beyond what its workers have taken, for brokers
    /// that send more than the receive maximum (Mosquitto 2.0 does under load). Only a message
    /// that would pass this budget is dropped (PUBACKed without an ack, so its agent re-sends
    /// it).
    #[serde(default = "default_inbound_bytes")]
    pub inbound_bytes: usize,
    /// Dead letters older than this (by their last arrival) are removed, days.
    #[serde(default = "default_dead_letter_retention")]
    pub dead_letter_retention_days: u32,
    /// Most dead letters kept; beyond it the oldest are removed.
    #[serde(default = "default_dead_letter_rows")]
    pub dead_letter_max_rows: u64,
    /// Most bytes of a refused payload kept in its dead letter (its full size is recorded).
    #[serde(default = "default_dead_letter_payload")]
    pub dead_letter_max_payload_bytes: usize,
    /// A site the cloud does not know or has deactivated gets its refusals written (dead
    /// letter, log line) at most once per this many seconds; the ones between are counted into
    /// the next.
    #[serde(default = "default_refused_site_interval")]
    pub refused_site_interval_s: u64,
    /// Accept batches from sites that have no enrolled public key: unsigned (v1) ones, and
    /// signed ones whose key is not enrolled (counted in `ingest_unsigned_accepted`, no proof
    /// kept). Default `false`: a batch is stored only when signed with its site's enrolled key.
    /// A refused batch stays in its agent's outbox and is sent again, so turning this on for a
    /// migration and off once every site's key is enrolled loses nothing. A site with an
    /// enrolled key must sign whatever this says (`docs/adr/010-signed-messages.md`).
    #[serde(default)]
    pub accept_unsigned: bool,
}

fn default_dead_letter_retention() -> u32 {
    30
}

fn default_dead_letter_rows() -> u64 {
    100_000
}

fn default_dead_letter_payload() -> usize {
    64 * 1024
}

fn default_refused_site_interval() -> u64 {
    60
}

fn default_group() -> String {
    "caudal-ingest".to_string()
}

fn default_workers() -> usize {
    4
}

fn default_queue() -> usize {
    16
}

fn default_group_bytes() -> usize {
    4 << 20
}

fn default_inbound_bytes() -> usize {
    64 << 20
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            group: default_group(),
            workers: default_workers(),
            queue: default_queue(),
            group_bytes: default_group_bytes(),
            inbound_bytes: default_inbound_bytes(),
            dead_letter_retention_days: default_dead_letter_retention(),
            dead_letter_max_rows: default_dead_letter_rows(),
            dead_letter_max_payload_bytes: default_dead_letter_payload(),
            refused_site_interval_s: default_refused_site_interval(),
            accept_unsigned: false,
        }
    }
}

/// `[alerts]`: the thresholds every site and point gets unless it has its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Evaluate alerts in processes that run telemetry.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Seconds between evaluations.
    #[serde(default = "default_interval")]
    pub interval_s: u64,
    /// A device that reported before and has sent nothing for this long has no data, seconds.
    #[serde(default = "default_no_data_after")]
    pub no_data_after_s: u64,
    /// Seconds between evaluations of the annual-volume rule, which reads the year's readings.
    #[serde(default = "default_volume_interval")]
    pub volume_interval_s: u64,
    /// How far back the no-data rule looks for devices that did report, days.
    #[serde(default = "default_lookback_days")]
    pub lookback_days: u32,
}

fn default_interval() -> u64 {
    60
}
fn default_volume_interval() -> u64 {
    3600
}
fn default_no_data_after() -> u64 {
    3600
}
fn default_lookback_days() -> u32 {
    30
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            enabled: true,
            interval_s: default_interval(),
            no_data_after_s: default_no_data_after(),
            volume_interval_s: default_volume_interval(),
            lookback_days: default_lookback_days(),
        }
    }
}

/// `[auth]`: how API callers prove who they are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Key that signs and checks API tokens (HS256), at least 32 bytes. Every process of a
    /// deployment must share it, so a token issued by one is accepted by all. Unset: the process
    /// draws a random key at start, and its tokens die with it (one machine, one process only).
    #[serde(default)]
    pub jwt_secret: Option<Secret>,
    /// How long a token issued at login is valid, seconds.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_s: u64,
    /// Password checks (Argon2id, ~19 MiB and tens of milliseconds each) run at once, at most.
    /// Default: the machine's cores.
    #[serde(default = "default_max_parallel_hashes")]
    pub max_parallel_hashes: usize,
    /// How long a login waits for a free password check before `503` with `Retry-After`, s.
    #[serde(default = "default_login_wait")]
    pub login_wait_s: u64,
    /// Logins one client address may try per `address_window_s`, right or wrong.
    #[serde(default = "default_address_attempts")]
    pub address_attempts: u32,
    #[serde(default = "default_address_window")]
    pub address_window_s: u64,
    /// Wrong passwords for one email per `account_window_s` before it is closed to logins
    /// until the window ends.
    #[serde(default = "default_account_failures")]
    pub account_failures: u32,
    #[serde(default = "default_account_window")]
    pub account_window_s: u64,
}

fn default_max_parallel_hashes() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn default_login_wait() -> u64 {
    10
}

fn default_address_attempts() -> u32 {
    30
}

fn default_address_window() -> u64 {
    60
}

fn default_account_failures() -> u32 {
    10
}

fn default_account_window() -> u64 {
    900
}

fn default_token_ttl() -> u64 {
    8 * 3600
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: None,
            token_ttl_s: default_token_ttl(),
            max_parallel_hashes: default_max_parallel_hashes(),
            login_wait_s: default_login_wait(),
            address_attempts: default_address_attempts(),
            address_window_s: default_address_window(),
            account_failures: default_account_failures(),
            account_window_s: default_account_window(),
        }
    }
}

/// Shortest accepted `auth.jwt_secret`, bytes: HS256's key should be at least its hash size.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `plain` (journald, terminals) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// Filter directives (`info`, `caudal_cloud=debug,sqlx=warn`). `RUST_LOG` wins when set.
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    // rumqttd logs every client connection at info and every disconnection, clean or not, at
    // error (`rumqttd::server::broker`); the embedded broker's own failures are reported by
    // `core::broker`.
    "info,rumqttd=warn,rumqttd::server::broker=off".to_string()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// A module a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    /// Configuration, logs, metrics, `/healthz`; always runs.
    Core,
    /// Accounts, roles, sessions: login and `/api/v1/users`.
    Users,
    /// Sites, catchment points and devices.
    Catchment,
    /// MQTT ingest, storage, queries, alerts.
    Telemetry,
    /// Submission to the regulator: settings, slots, the DGA submitter.
    Compliance,
}

const KNOWN_SERVICES: &str = "core, users, catchment, telemetry, compliance, all";

/// The set of services a process runs, presets expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Services(BTreeSet<Service>);

impl Services {
    /// Expands names and presets; `core` (the preset) is core + users + catchment.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Services, ConfigError> {
        let mut set = BTreeSet::from([Service::Core]);
        for name in names {
            let name = name.as_ref().trim();
            let add: &[Service] = match name {
                "core" => &[Service::Core, Service::Users, Service::Catchment],
                "users" => &[Service::Users],
                "catchment" => &[Service::Catchment],
                "telemetry" => &[Service::Telemetry],
                "compliance" => &[Service::Compliance],
                "all" => &[
                    Service::Users,
                    Service::Catchment,
                    Service::Telemetry,
                    Service::Compliance,
                ],
                other => return Err(ConfigError::UnknownService(other.to_string())),
            };
            set.extend(add.iter().copied());
        }
        Ok(Services(set))
    }

    pub fn contains(&self, s: Service) -> bool {
        self.0.contains(&s)
    }

    pub fn iter(&self) -> impl Iterator<Item = Service> + '_ {
        self.0.iter().copied()
    }
}

impl fmt::Display for Services {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self
            .iter()
            .map(|s| format!("{s:?}").to_lowercase())
            .collect();
        f.write_str(&names.join(","))
    }
}

/// The top-level keys, so that only `CAUDAL_*` variables meant for the configuration are read.
const TOP_KEYS: &[&str] = &[
    "services",
    "data_dir",
    "http",
    "database",
    "mqtt",
    "ingest",
    "log",
    "auth",
    "alerts",
    "compliance",
];

impl CloudConfig {
    /// Loads `path` (when given) and the `CAUDAL_*` variables of `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<CloudConfig, ConfigError> {
        let mut b = config::Config::builder();
        if let Some(p) = path {
            let file = config::File::from(p)
                .format(config::FileFormat::Toml)
                .required(true);
            // Parse the file on its own first so its errors name it.
            config::Config::builder()
                .add_source(file.clone())
                .build()
                .map_err(|source| ConfigError::File {
                    path: p.to_path_buf(),
                    source,
                })?;
            b = b.add_source(file);
        }
        let vars: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| {
                k.strip_prefix("CAUDAL_").is_some_and(|rest| {
                    let first = rest.split("__").next().unwrap_or_default();
                    TOP_KEYS.iter().any(|t| t.eq_ignore_ascii_case(first))
                })
            })
            .collect();
        b = b.add_source(
            config::Environment::with_prefix("CAUDAL")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("services")
                .try_parsing(true)
                .source(Some(vars)),
        );
        let cfg: CloudConfig = b
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(ConfigError::Invalid)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: service names, the broker URL.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Services::parse(&self.services)?;
        if let Some(s) = &self.auth.jwt_secret
            && s.expose().len() < MIN_JWT_SECRET_BYTES
        {
            return Err(ConfigError::Auth {
                key: "jwt_secret",
                reason: format!(
                    "is {} bytes long; at least {MIN_JWT_SECRET_BYTES} are required",
                    s.expose().len()
                ),
            });
        }
        let at_least_one = [
            ("token_ttl_s", self.auth.token_ttl_s),
            ("max_parallel_hashes", self.auth.max_parallel_hashes as u64),
            ("login_wait_s", self.auth.login_wait_s),
            ("address_attempts", u64::from(self.auth.address_attempts)),
            ("address_window_s", self.auth.address_window_s),
            ("account_failures", u64::from(self.auth.account_failures)),
            ("account_window_s", self.auth.account_window_s),
        ];
        if let Some((key, _)) = at_least_one.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Auth {
                key,
                reason: "must be at least 1".to_string(),
            });
        }
        if self.http.body_limit_bytes < 1024 {
            return Err(ConfigError::Http {
                key: "body_limit_bytes",
                reason: format!(
                    "is {}; at least 1024 (the API's bodies are small JSON, not nothing)",
                    self.http.body_limit_bytes
                ),
            });
        }
        if self.http.request_timeout_s == 0 {
            return Err(ConfigError::Http {
                key: "request_timeout_s",
                reason: "must be at least 1".to_string(),
            });
        }
        self.compliance.validate()?;
        if self.mqtt.url.is_none() && self.mqtt.embedded.authenticate {
            let required = |key: &'static str| ConfigError::Mqtt {
                key,
                reason: "is required with mqtt.embedded.authenticate: it is the cloud's own login \
                         at the embedded broker"
                    .to_string(),
            };
            let Some(user) = self.mqtt.username.as_deref().filter(|u| !u.is_empty()) else {
                return Err(required("username"));
            };
            // The gate prefixes client ids with the login and rumqttd refuses these in one.
            if let Some(c) = user
                .chars()
                .find(|c| matches!(c, '+' | '$' | '#' | '/' | ':'))
            {
                return Err(ConfigError::Mqtt {
                    key: "username",
                    reason: format!(
                        "{user:?} contains {c:?}, which the embedded broker cannot take in a \
                         login (mqtt.embedded.authenticate)"
                    ),
                });
            }
            if self
                .mqtt
                .password
                .as_ref()
                .is_none_or(|p| p.expose().is_empty())
            {
                return Err(required("password"));
            }
        }
        if let Some(url) = &self.mqtt.url {
            let tls = url.starts_with("mqtts://");
            if !tls && !url.starts_with("mqtt://") {
                return Err(ConfigError::MqttUrl(format!(
                    "{url:?} must start with mqtt:// or mqtts://"
                )));
            }
            if tls && self.mqtt.ca_file.is_none() {
                return Err(ConfigError::MqttUrl(format!(
                    "{url:?} uses TLS: set mqtt.ca_file to the CA that signed the broker's certificate"
                )));
            }
            let client = [
                ("mqtt.client_cert", &self.mqtt.client_cert),
                ("mqtt.client_key", &self.mqtt.client_key),
            ];
            if let Some((key, _)) = client.iter().find(|(_, v)| v.is_some()) {
                if !tls {
                    return Err(ConfigError::MqttUrl(format!(
                        "{key} is set but {url:?} is plain MQTT; use mqtts://"
                    )));
                }
                if let Some((missing, _)) = client.iter().find(|(_, v)| v.is_none()) {
                    return Err(ConfigError::MqttUrl(format!(
                        "{key} is set without {missing}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The services this process runs.
    pub fn services(&self) -> Result<Services, ConfigError> {
        Services::parse(&self.services)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn presets_expand() {
        let s = Services::parse(&["core"]).expect("valid");
        assert!(s.contains(Service::Catchment) && s.contains(Service::Users));
        assert!(!s.contains(Service::Telemetry));
        let t = Services::parse(&["telemetry"]).expect("valid");
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            [Service::Core, Service::Telemetry]
        );
        assert_eq!(Services::parse(&["all"]).expect("valid").iter().count(), 5);
        assert!(matches!(
            Services::parse(&["telemetri"]),
            Err(ConfigError::UnknownService(s)) if s == "telemetri"
        ));
    }

    #[test]
    fn environment_overrides_and_ignores_foreign_variables() {
        let c = CloudConfig::load(
            None,
            env(&[
                ("CAUDAL_SERVICES", "core,telemetry"),
                ("CAUDAL_DATABASE__URL", "postgres://u:p@h/db"),
                ("CAUDAL_MQTT__PASSWORD", "1234"),
                ("CAUDAL_INGEST__WORKERS", "2"),
                ("CAUDAL_TEST_DATABASE_URL", "postgres://elsewhere"),
                ("HOME", "/root"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.services, ["core", "telemetry"]);
        assert_eq!(c.database_url(), "postgres://u:p@h/db");
        assert_eq!(c.mqtt.password, Some(Secret::new("1234")));
        assert_eq!(c.ingest.workers, 2);
        assert!(!format!("{c:?}").contains("u:p@h"), "secrets do not print");
    }

    #[test]
    fn compliance_pacing_keys_are_bounded_and_name_the_key() {
        let c = CloudConfig::load(None, env(&[])).expect("defaults are valid");
        assert_eq!(
            (
                c.compliance.interval_s,
                c.compliance.obra_spacing_s,
                c.compliance.max_posts_per_minute,
                c.compliance.burst,
                c.compliance.claim_lease_s
            ),
            (30, 300, 20, 10, 120)
        );
        let refused = |vars: &[(&str, &str)]| match CloudConfig::load(None, env(vars)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{vars:?} was accepted"),
        };
        assert_eq!(
            refused(&[("CAUDAL_COMPLIANCE__INTERVAL_S", "0")]),
            "configuration key compliance.interval_s: is 0; it must be between 1 and 600"
        );
        assert_eq!(
            refused(&[("CAUDAL_COMPLIANCE__OBRA_SPACING_S", "0")]),
            "configuration key compliance.obra_spacing_s: is 0; it must be between 1 and 86400"
        );
        assert_eq!(
            refused(&[("CAUDAL_COMPLIANCE__MAX_POSTS_PER_MINUTE", "601")]),
            "configuration key compliance.max_posts_per_minute: is 601; it must be between 1 \
             and 600"
        );
        assert_eq!(
            refused(&[
                ("CAUDAL_COMPLIANCE__MAX_POSTS_PER_MINUTE", "5"),
                ("CAUDAL_COMPLIANCE__BURST", "6")
            ]),
            "configuration key compliance.burst: is 6; it must be at most max_posts_per_minute (5)"
        );
        assert!(
            refused(&[
                ("CAUDAL_COMPLIANCE__POST_TIMEOUT_S", "60"),
                ("CAUDAL_COMPLIANCE__CLAIM_LEASE_S", "64")
            ])
            .starts_with(
                "configuration key compliance.claim_lease_s: is 64; it must be at least \
                 post_timeout_s (60) + 5"
            )
        );
        let ok = CloudConfig::load(
            None,
            env(&[
                ("CAUDAL_COMPLIANCE__POST_TIMEOUT_S", "60"),
                ("CAUDAL_COMPLIANCE__CLAIM_LEASE_S", "65"),
            ]),
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn short_jwt_secret_is_refused_and_never_printed() {
        let e = CloudConfig::load(None, env(&[("CAUDAL_AUTH__JWT_SECRET", "short")]));
        assert!(
            matches!(
                e,
                Err(ConfigError::Auth {
                    key: "jwt_secret",
                    ..
                })
            ),
            "{e:?}"
        );
        let secret = "0123456789abcdef0123456789abcdef";
        let c =
            CloudConfig::load(None, env(&[("CAUDAL_AUTH__JWT_SECRET", secret)])).expect("valid");
        assert_eq!(c.auth.jwt_secret, Some(Secret::new(secret)));
        assert!(!format!("{c:?}").contains(secret));
    }

    #[test]
    fn embedded_authentication_needs_the_clouds_own_login() {
        let on = ("CAUDAL_MQTT__EMBEDDED__AUTHENTICATE", "true");
        let e = CloudConfig::load(None, env(&[on]));
        assert!(
            matches!(
                e,
                Err(ConfigError::Mqtt {
                    key: "username",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = CloudConfig::load(None, env(&[on, ("CAUDAL_MQTT__USERNAME", "caudal-cloud")]));
        assert!(
            matches!(
                e,
                Err(ConfigError::Mqtt {
                    key: "password",
                    ..
                })
            ),
            "{e:?}"
        );
        let c = CloudConfig::load(
            None,
            env(&[
                on,
                ("CAUDAL_MQTT__USERNAME", "caudal-cloud"),
                ("CAUDAL_MQTT__PASSWORD", "a long secret"),
            ]),
        )
        .expect("valid");
        assert!(c.mqtt.embedded.authenticate);
        let e = CloudConfig::load(
            None,
            env(&[
                on,
                ("CAUDAL_MQTT__USERNAME", "caudal/cloud"),
                ("CAUDAL_MQTT__PASSWORD", "a long secret"),
            ]),
        );
        assert!(
            matches!(&e, Err(ConfigError::Mqtt { key: "username", reason }) if reason.contains("'/'")),
            "{e:?}"
        );
    }

    #[test]
    fn typos_are_errors() {
        let e = CloudConfig::load(None, env(&[("CAUDAL_MQTT__URLL", "mqtt://x:1")]));
        assert!(matches!(e, Err(ConfigError::Invalid(_))), "{e:?}");
        let e = CloudConfig::load(None, env(&[("CAUDAL_MQTT__URL", "tcp://x:1")]));
        assert!(matches!(e, Err(ConfigError::MqttUrl(_))), "{e:?}");
    }

    #[test]
    fn a_client_certificate_needs_tls_and_its_key() {
        let msg = |vars: &[(&str, &str)]| match CloudConfig::load(None, env(vars)) {
            Err(ConfigError::MqttUrl(m)) => m,
            other => panic!("{other:?}"),
        };
        let m = msg(&[
            ("CAUDAL_MQTT__URL", "mqtt://x:1"),
            ("CAUDAL_MQTT__CLIENT_CERT", "/c.pem"),
            ("CAUDAL_MQTT__CLIENT_KEY", "/c.key"),
        ]);
        assert!(
            m.contains("mqtt.client_cert") && m.contains("mqtts://"),
            "{m}"
        );
        let m = msg(&[
            ("CAUDAL_MQTT__URL", "mqtts://x:1"),
            ("CAUDAL_MQTT__CA_FILE", "/ca.pem"),
            ("CAUDAL_MQTT__CLIENT_KEY", "/c.key"),
        ]);
        assert!(
            m.contains("mqtt.client_key is set without mqtt.client_cert"),
            "{m}"
        );
    }

    #[test]
    fn default_database_is_sqlite_in_data_dir() {
        let c =
            CloudConfig::load(None, env(&[("CAUDAL_DATA_DIR", "/var/lib/caudal")])).expect("valid");
        assert_eq!(
            c.database_url(),
            "sqlite:///var/lib/caudal/caudal.db?mode=rwc"
        );
    }

    #[test]
    fn alerts_and_compliance_take_environment_overrides() {
        let c = CloudConfig::load(
            None,
            env(&[
                ("CAUDAL_ALERTS__ENABLED", "false"),
                ("CAUDAL_COMPLIANCE__KEY", "a2V5"),
                ("CAUDAL_COMPLIANCE__POST_TIMEOUT_S", "20"),
            ]),
        )
        .expect("valid");
        assert!(!c.alerts.enabled);
        assert_eq!(c.compliance.key.as_ref().map(Secret::expose), Some("a2V5"));
        assert_eq!(c.compliance.post_timeout_s, 20);
        assert_eq!(c.compliance.get_timeout_s, 10);
    }

    #[test]
    fn example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/cloud.example.toml");
        let c = CloudConfig::load(Some(&path), Vec::new()).expect("example parses");
        c.services().expect("example services are valid");
    }
}
