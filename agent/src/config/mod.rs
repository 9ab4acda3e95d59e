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
//!
//! # Where each part lives
//!
//! - `file`: the file format (one serde struct per table, a doc comment per key, defaults).
//! - `load`: reading the file and applying the environment over it.
//! - `site`: the runtime model and the defaults resolution fills in.
//! - `resolve`: the file format turned into the runtime model, with the profiles.
//! - `check`: what can be wrong ([`Problem`]), what is only worth a look ([`Warning`]), the
//!   rules values obey, and where each problem is.
//! - `report`: what `caudal-agent check-config` prints.
//!
//! Positions in files come from [`crate::position`]; profiles, and the serial [`Parity`] they
//! share with buses, from [`crate::profile`]. `config` uses both, neither uses `config`.

mod check;
mod file;
mod load;
mod report;
mod resolve;
mod site;

pub use crate::position::{Location, SourceText};
pub use crate::profile::Parity;
pub use check::{ConfigWarning, Problem, Warning};
pub use file::{
    AgentConfig, BusConfig, ClockConfig, DeviceConfig, LimitsConfig, LinkKind, LogConfig,
    LogFormat, MetricsConfig, OutboxConfig, ProfilesConfig, Secret, SiteConfig, Synchronous,
    UplinkConfig,
};
pub use load::{ENV_PREFIX, ENV_SEPARATOR};
pub use report::{CheckReport, check, check_with_env};
pub use site::{
    Bus, DEFAULT_BAUD, DEFAULT_DATA_BITS, DEFAULT_PARITY, DEFAULT_PERIOD_S, DEFAULT_RETRIES,
    DEFAULT_SERIAL_GAP_MS, DEFAULT_STOP_BITS, DEFAULT_TIMEOUT_MS, Device, Link, Site,
};

use crate::profile::ProfileError;
use std::path::PathBuf;

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
