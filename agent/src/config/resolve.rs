//! Resolution: the file format turned into the runtime model, with each device's profile merged
//! and the defaults filled in; every problem found is collected, each at its place.

use super::check::{Problems, check_limits, host_port};
use super::{
    AgentConfig, Bus, BusConfig, ConfigError, DEFAULT_BAUD, DEFAULT_DATA_BITS, DEFAULT_PARITY,
    DEFAULT_PERIOD_S, DEFAULT_RETRIES, DEFAULT_SERIAL_GAP_MS, DEFAULT_STOP_BITS,
    DEFAULT_TIMEOUT_MS, Device, DeviceConfig, Link, LinkKind, Problem, Site,
};
use crate::position::Seg;
use crate::profile::{Profile, ProfileSet};
use crate::register::MAX_REGISTERS_PER_READ;
use caudal_common::DeviceId;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

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
            let bus_profiles: Vec<&Profile> = bus
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
}

/// The link of a bus, with serial settings filled in; `None` (and problems) when incomplete.
fn resolve_link(
    bus: &BusConfig,
    bi: usize,
    bus_profiles: &[&Profile],
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
    profiles: &[&Profile],
    of: impl Fn(&Profile) -> Option<T>,
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
        .unwrap_or(MAX_REGISTERS_PER_READ);
    for (k, value, ok, expected) in [
        ("period_s", period_s, period_s > 0, "at least 1"),
        ("timeout_ms", timeout_ms, timeout_ms > 0, "at least 1"),
        (
            "max_regs_per_read",
            u64::from(max_regs),
            (1..=MAX_REGISTERS_PER_READ).contains(&max_regs),
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
