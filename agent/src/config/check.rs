//! The checks: what can be wrong with a configuration that parses ([`Problem`]), the rules its
//! values obey, and [`Problems`], which records each problem at its place in the file.

use super::{AgentConfig, BusConfig, ConfigError, DeviceConfig, LimitsConfig, LinkKind, Location};
use crate::position::{Seg, SourceText};
use crate::profile::{PointError, UnknownProfile};
use crate::register::{MAX_REGISTERS_PER_READ, Point};
use caudal_common::DeviceId;
use caudal_common::units::Unit;
use std::fmt;
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

/// Something `check-config` reports without refusing the configuration: the agent runs, but a
/// person should look (see [`ConfigWarning`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Warning {
    #[error(
        "profile `{profile}` assumes `{unit}` for point `{channel}`, a guess: compare a reading with the meter's display on site and set points.{channel}.unit (also when `{unit}` is right)"
    )]
    UnitAssumed {
        profile: String,
        channel: String,
        unit: Unit,
    },
}

/// A [`Warning`] at its place in the file: `agent.toml:12:1: bus[b].device[fm1].points.total.unit: warning: …`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigWarning {
    pub at: Location,
    pub warning: Warning,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: warning: {}", self.at, self.warning)
    }
}

/// A table of the file that problems are found in (`uplink`, a bus, a device, a device's
/// `limits`): its path in the TOML tree, to find the line it is on, and its dotted name, to
/// print (`bus[rs485].device[fm1]`).
#[derive(Debug, Clone)]
pub(super) struct Place<'a> {
    path: Vec<Seg<'a>>,
    key: String,
}

impl<'a> Place<'a> {
    /// A top-level table: `uplink`, `outbox`, `metrics`.
    pub(super) fn table(name: &'a str) -> Place<'a> {
        Place {
            path: vec![Seg::Key(name)],
            key: name.to_string(),
        }
    }

    /// The `index`th `[[bus]]`, named by its `name`.
    pub(super) fn bus(index: usize, bus: &BusConfig) -> Place<'a> {
        Place {
            path: vec![Seg::Key("bus"), Seg::Index(index)],
            key: format!("bus[{}]", bus.name),
        }
    }

    /// The `index`th `[[bus.device]]` of this bus, named by its `id`.
    pub(super) fn device(&self, index: usize, dev: &DeviceConfig) -> Place<'a> {
        let mut path = self.path.clone();
        path.extend([Seg::Key("device"), Seg::Index(index)]);
        Place {
            path,
            key: format!("{}.device[{}]", self.key, dev.id),
        }
    }

    /// This place, printed as `key` of the table instead (a key the file lacks, found at the
    /// line of one it has).
    pub(super) fn shown_as(mut self, key: &str) -> Place<'a> {
        let table = self.key.rsplit_once('.').map_or("", |(t, _)| t);
        self.key = format!("{table}.{key}");
        self
    }

    /// A key of this table, or a table below it.
    pub(super) fn child<'b>(&self, key: &'b str) -> Place<'b>
    where
        'a: 'b,
    {
        let mut path: Vec<Seg<'b>> = self.path.clone();
        path.push(Seg::Key(key));
        Place {
            path,
            key: format!("{}.{key}", self.key),
        }
    }
}

/// Collects problems (and warnings) with their positions while resolving.
pub(super) struct Problems<'a> {
    source: Option<&'a SourceText>,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigWarning>,
}

impl<'a> Problems<'a> {
    /// Problems in the file `source` (none: a configuration built in code).
    pub(super) fn new(source: Option<&'a SourceText>) -> Problems<'a> {
        Problems {
            source,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// How many so far: a part that added none since it started is sound.
    pub(super) fn count(&self) -> usize {
        self.errors.len()
    }

    /// The warnings, when no problem was recorded; else every problem.
    pub(super) fn finish(self) -> Result<Vec<ConfigWarning>, Vec<ConfigError>> {
        if self.errors.is_empty() {
            Ok(self.warnings)
        } else {
            Err(self.errors)
        }
    }

    fn locate(&self, place: &Place<'_>) -> Location {
        let key = place.key.clone();
        match self.source {
            Some(s) => s.locate(&place.path, key),
            None => Location {
                file: PathBuf::new(),
                line: None,
                column: None,
                key,
            },
        }
    }

    /// Records `problem` at `place` itself.
    pub(super) fn at(&mut self, place: &Place<'_>, problem: Problem) {
        let at = self.locate(place);
        self.errors.push(ConfigError::Invalid {
            at,
            problem: Box::new(problem),
        });
    }

    /// Records `warning` at `place` (or the nearest table above it that the file has).
    pub(super) fn warn(&mut self, place: &Place<'_>, warning: Warning) {
        let at = self.locate(place);
        self.warnings.push(ConfigWarning { at, warning });
    }

    /// Records `problem` at `key` of `place`.
    pub(super) fn push(&mut self, place: &Place<'_>, key: &str, problem: Problem) {
        self.at(&place.child(key), problem);
    }

    /// Records that `key` of `place` has a `value` outside what is `expected`.
    pub(super) fn out_of_range(
        &mut self,
        place: &Place<'_>,
        key: &'static str,
        value: impl fmt::Display,
        expected: &'static str,
    ) {
        let problem = Problem::OutOfRange {
            what: key,
            value: value.to_string(),
            expected,
        };
        self.push(place, key, problem);
    }
}

impl AgentConfig {
    /// The tables outside the buses: `uplink`, `outbox` and `metrics`.
    pub(super) fn check_globals(&self, p: &mut Problems<'_>) {
        let u = &self.uplink;
        let uplink = Place::table("uplink");
        let broker_ok = ["mqtt://", "mqtts://"].iter().any(|scheme| {
            u.broker
                .strip_prefix(scheme)
                .is_some_and(|rest| host_port(rest).is_ok())
        });
        if !broker_ok {
            p.push(
                &uplink,
                "broker",
                Problem::Value(format!(
                    "`{}` is not mqtt://host:port or mqtts://host:port",
                    u.broker
                )),
            );
        }
        if let Some(problem) = u
            .client_id
            .as_deref()
            .and_then(crate::uplink::client_id_problem)
        {
            p.push(
                &uplink,
                "client_id",
                Problem::Value(format!("the client id {problem}")),
            );
        }
        if let Some(Err(e)) = u
            .cloud_public_key
            .as_deref()
            .map(str::parse::<caudal_common::signed::PublicKey>)
        {
            p.push(&uplink, "cloud_public_key", Problem::Value(e.to_string()));
        }
        if u.client_cert.is_some() != u.client_key.is_some() {
            p.push(
                &uplink,
                "client_cert",
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
                p.out_of_range(&uplink, key, value, "at least 1");
            }
        }
        if u.reconnect_min_ms > u.reconnect_max_ms {
            p.push(
                &uplink,
                "reconnect_min_ms",
                Problem::Value(format!(
                    "reconnect_min_ms ({}) is above reconnect_max_ms ({})",
                    u.reconnect_min_ms, u.reconnect_max_ms
                )),
            );
        }
        if self.outbox.disk_budget_mb == 0 {
            let outbox = Place::table("outbox");
            p.out_of_range(&outbox, "disk_budget_mb", 0, "at least 1");
        }
        if let Err(e) = self.metrics.addr() {
            p.push(
                &Place::table("metrics"),
                "listen",
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

/// A serial line's settings as they will be used (the bus's own or its profiles').
pub(super) fn check_serial(
    bus: &Place<'_>,
    baud: u32,
    data_bits: u8,
    stop_bits: u8,
    p: &mut Problems<'_>,
) {
    if baud == 0 {
        p.out_of_range(bus, "baud", baud, "above 0");
    }
    if !(7..=8).contains(&data_bits) {
        p.out_of_range(bus, "data_bits", data_bits, "7 or 8");
    }
    if !(1..=2).contains(&stop_bits) {
        p.out_of_range(bus, "stop_bits", stop_bits, "1 or 2");
    }
}

/// A device's unit id: 1-247 (0 is broadcast, 248-254 reserved), or 255 through a Modbus TCP
/// gateway.
pub(super) fn check_unit(device: &Place<'_>, unit: u8, kind: LinkKind, p: &mut Problems<'_>) {
    let reason = match unit {
        0 => "0 is the broadcast address; use 1-247",
        248..=254 => "248-254 are reserved; use 1-247",
        255 if kind != LinkKind::Tcp => "255 is only for Modbus TCP gateways; use 1-247",
        _ => return,
    };
    p.push(device, "unit", Problem::BadUnitId { unit, reason });
}

/// How a device is polled, as it will be (the device's own settings or its profile's).
pub(super) fn check_polling(
    device: &Place<'_>,
    period_s: u64,
    timeout_ms: u64,
    max_regs_per_read: u16,
    p: &mut Problems<'_>,
) {
    if period_s == 0 {
        p.out_of_range(device, "period_s", period_s, "at least 1");
    }
    if timeout_ms == 0 {
        p.out_of_range(device, "timeout_ms", timeout_ms, "at least 1");
    }
    if !(1..=MAX_REGISTERS_PER_READ).contains(&max_regs_per_read) {
        p.out_of_range(device, "max_regs_per_read", max_regs_per_read, "1-125");
    }
}

/// Every register point of a device fits in one read of `max_regs_per_read` registers, since a
/// value is never split across requests (bit points are read apart), except a composite
/// totalizer, which is read in its 2-register halves and checked for tearing
/// ([`crate::register::plan_reads`]). An out-of-range `max_regs_per_read` is
/// [`check_polling`]'s to report.
pub(super) fn check_point_sizes(
    device: &Place<'_>,
    points: &[Point],
    max_regs_per_read: u16,
    p: &mut Problems<'_>,
) {
    if !(1..=MAX_REGISTERS_PER_READ).contains(&max_regs_per_read) {
        return;
    }
    for point in points {
        let registers = point.data_type.smallest_read();
        if !point.fc.is_bits() && registers > max_regs_per_read {
            p.push(
                device,
                "max_regs_per_read",
                Problem::PointTooLarge {
                    channel: point.channel.name().to_string(),
                    registers,
                    max: max_regs_per_read,
                },
            );
        }
    }
}

/// A device's `[limits]`: maxima above 0, levels finite and in order, `frozen_after_s` at
/// least 1.
pub(super) fn check_limits(limits: &Place<'_>, l: &LimitsConfig, p: &mut Problems<'_>) {
    for (field, v) in [
        ("flow_max_lps", l.flow_max_lps),
        ("total_max_step_m3", l.total_max_step_m3),
    ] {
        if let Some(v) = v
            && !(v.is_finite() && v > 0.0)
        {
            p.out_of_range(limits, field, v, "finite and above 0");
        }
    }
    for (field, v) in [
        ("level_min_m", l.level_min_m),
        ("level_max_m", l.level_max_m),
    ] {
        if let Some(v) = v
            && !v.is_finite()
        {
            p.out_of_range(limits, field, v, "finite");
        }
    }
    if let (Some(min), Some(max)) = (l.level_min_m, l.level_max_m)
        && min >= max
    {
        p.out_of_range(limits, "level_max_m", max, "above level_min_m");
    }
    if l.frozen_after_s == Some(0) {
        p.out_of_range(limits, "frozen_after_s", 0, "at least 1");
    }
}
