//! The checks: what is wrong with a configuration that parses ([`Problem`]), and the rules
//! values must obey.

use super::{AgentConfig, ConfigError, LimitsConfig, LinkKind, Location, SourceText};
use crate::position::Seg;
use crate::profile::{PointError, UnknownProfile};
use caudal_common::DeviceId;
use std::path::PathBuf;

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

/// Collects problems with their positions while resolving.
pub(super) struct Problems<'a> {
    pub(super) source: Option<&'a SourceText>,
    pub(super) errors: Vec<ConfigError>,
}

impl Problems<'_> {
    pub(super) fn push(&mut self, path: &[Seg<'_>], key: String, problem: Problem) {
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

impl AgentConfig {
    pub(super) fn check_globals(&self, p: &mut Problems<'_>) {
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

/// Checks `host:port` (host may be a name, an IPv4 address or a bracketed IPv6 address).
pub(super) fn host_port(s: &str) -> Result<(), &'static str> {
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

pub(super) fn check_limits(l: &LimitsConfig, path: &[Seg<'_>], key: String, p: &mut Problems<'_>) {
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
