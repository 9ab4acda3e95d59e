//! Resolution: the file format turned into the runtime model, with each device's profile merged
//! and the defaults filled in; every problem found is collected, each at its place.

use super::check::{
    Place, Problems, Warning, check_limits, check_point_sizes, check_polling, check_serial,
    check_unit, host_port,
};
use super::{
    AgentConfig, Bus, BusConfig, ConfigError, DEFAULT_BAUD, DEFAULT_DATA_BITS, DEFAULT_PARITY,
    DEFAULT_PERIOD_S, DEFAULT_RETRIES, DEFAULT_SERIAL_GAP_MS, DEFAULT_STOP_BITS,
    DEFAULT_TIMEOUT_MS, Device, DeviceConfig, Link, LinkKind, Problem, Site,
};
use crate::profile::{Profile, ProfileSet, SerialDefaults};
use crate::register::MAX_REGISTERS_PER_READ;
use caudal_common::DeviceId;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

impl AgentConfig {
    /// Turns the file format into the runtime model: profiles merged, overrides applied,
    /// defaults filled in (device, then profile, then the `DEFAULT_*` constants). Returns every
    /// problem found, each naming its bus, device and key.
    pub fn resolve(&self, profiles: &ProfileSet) -> Result<Site, Vec<ConfigError>> {
        let mut p = Problems::new(self.source.as_ref());
        self.check_globals(&mut p);

        let mut bus_names: HashSet<&str> = HashSet::new();
        let mut device_buses: HashMap<&DeviceId, &str> = HashMap::new();
        let mut buses = Vec::new();
        for (bi, bus) in self.buses.iter().enumerate() {
            let bus_place = Place::bus(bi, bus);
            if !bus_names.insert(&bus.name) {
                let name = bus.name.clone();
                p.push(&bus_place, "name", Problem::DuplicateBus { name });
            }
            let bus_profiles: Vec<&Profile> = bus
                .devices
                .iter()
                .filter_map(|d| profiles.get(&d.profile).ok())
                .collect();
            let link = resolve_link(bus, &bus_place, &bus_profiles, &mut p);
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
                let place = bus_place.device(di, dev);
                if let Some(first_bus) = device_buses.insert(&dev.id, &bus.name) {
                    let problem = Problem::DuplicateDevice {
                        id: dev.id.clone(),
                        first_bus: first_bus.to_string(),
                    };
                    p.push(&place, "id", problem);
                }
                if let Some(first) = units.insert(dev.unit, &dev.id) {
                    let problem = Problem::DuplicateUnit {
                        unit: dev.unit,
                        first: first.clone(),
                    };
                    p.push(&place, "unit", problem);
                }
                if let Some(d) = resolve_device(bus, dev, &place, profiles, &mut p) {
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

        let warnings = p.finish()?;
        Ok(Site {
            id: self.site.id.clone(),
            outbox_path: self
                .outbox
                .path
                .clone()
                .unwrap_or_else(|| self.site.data_dir.join("outbox.db")),
            buses,
            warnings,
        })
    }
}

/// The link of a bus, with serial settings filled in; `None` (and problems) when incomplete.
fn resolve_link(
    bus: &BusConfig,
    place: &Place<'_>,
    bus_profiles: &[&Profile],
    p: &mut Problems<'_>,
) -> Option<Link> {
    let before = p.count();
    let not_for = |settings: &[(&'static str, bool)], p: &mut Problems<'_>| {
        for &(key, set) in settings {
            if set {
                let kind = bus.kind;
                p.push(place, key, Problem::NotForKind { key, kind });
            }
        }
    };
    let missing = |key: &'static str, p: &mut Problems<'_>| {
        let kind = bus.kind;
        p.push(place, key, Problem::Missing { key, kind });
    };
    match bus.kind {
        LinkKind::Tcp | LinkKind::RtuOverTcp => {
            not_for(
                &[
                    ("port", bus.port.is_some()),
                    ("baud", bus.baud.is_some()),
                    ("parity", bus.parity.is_some()),
                    ("data_bits", bus.data_bits.is_some()),
                    ("stop_bits", bus.stop_bits.is_some()),
                ],
                p,
            );
            let Some(address) = bus.address.clone() else {
                missing("address", p);
                return None;
            };
            if let Err(reason) = host_port(&address) {
                p.push(place, "address", Problem::BadAddress { address, reason });
                return None;
            }
            if p.count() > before {
                return None;
            }
            Some(if bus.kind == LinkKind::Tcp {
                Link::Tcp { address }
            } else {
                Link::RtuOverTcp { address }
            })
        }
        LinkKind::Rtu => {
            not_for(&[("address", bus.address.is_some())], p);
            let Some(port) = bus.port.clone() else {
                missing("port", p);
                return None;
            };
            let serial = SerialSources {
                bus: place,
                profiles: bus_profiles,
            };
            let baud = serial.setting("baud", bus.baud, |s| s.baud, DEFAULT_BAUD, p);
            let parity = serial.setting("parity", bus.parity, |s| s.parity, DEFAULT_PARITY, p);
            let data_bits = serial.setting(
                "data_bits",
                bus.data_bits,
                |s| s.data_bits,
                DEFAULT_DATA_BITS,
                p,
            );
            let stop_bits = serial.setting(
                "stop_bits",
                bus.stop_bits,
                |s| s.stop_bits,
                DEFAULT_STOP_BITS,
                p,
            );
            check_serial(place, baud, data_bits, stop_bits, p);
            if p.count() > before {
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

/// Where a serial bus's settings come from: the bus itself, and the profiles of its devices.
struct SerialSources<'a> {
    bus: &'a Place<'a>,
    profiles: &'a [&'a Profile],
}

impl SerialSources<'_> {
    /// A serial setting: the bus's own, else the one every device profile on the bus agrees
    /// on, else the default. Profiles that disagree are an error: only the bus can settle it.
    fn setting<T: Copy + PartialEq + fmt::Display>(
        &self,
        key: &'static str,
        own: Option<T>,
        of: impl Fn(&SerialDefaults) -> Option<T>,
        default: T,
        p: &mut Problems<'_>,
    ) -> T {
        if let Some(v) = own {
            return v;
        }
        let mut found: Option<(&str, T)> = None;
        for pr in self.profiles {
            let Some(v) = of(&pr.serial) else { continue };
            match found {
                None => found = Some((&pr.id, v)),
                Some((first_id, first)) if first != v => {
                    let problem = Problem::ProfilesDisagree {
                        key,
                        first_profile: first_id.to_string(),
                        first: first.to_string(),
                        second_profile: pr.id.clone(),
                        second: v.to_string(),
                    };
                    p.push(self.bus, key, problem);
                    return default;
                }
                Some(_) => {}
            }
        }
        found.map_or(default, |(_, v)| v)
    }
}

fn resolve_device(
    bus: &BusConfig,
    dev: &DeviceConfig,
    place: &Place<'_>,
    profiles: &ProfileSet,
    p: &mut Problems<'_>,
) -> Option<Device> {
    let before = p.count();
    check_unit(place, dev.unit, bus.kind, p);
    let profile = match profiles.get(&dev.profile) {
        Ok(pr) => Some(pr),
        Err(e) => {
            p.push(place, "profile", Problem::UnknownProfile(e));
            None
        }
    };

    let timing = profile.map(|pr| &pr.timing);
    let period_s = dev.period_s.unwrap_or(DEFAULT_PERIOD_S);
    let timeout_ms = dev
        .timeout_ms
        .or(timing.and_then(|t| t.timeout_ms))
        .unwrap_or(DEFAULT_TIMEOUT_MS);
    let retries = dev
        .retries
        .or(timing.and_then(|t| t.retries))
        .unwrap_or(DEFAULT_RETRIES);
    let max_regs = dev
        .max_regs_per_read
        .or(timing.and_then(|t| t.max_regs_per_read))
        .unwrap_or(MAX_REGISTERS_PER_READ);
    check_polling(place, period_s, timeout_ms, max_regs, p);
    check_limits(&place.child("limits"), &dev.limits, p);

    let points = match profile.map(|pr| (pr, pr.resolve(&dev.points))) {
        None => Vec::new(),
        Some((_, Ok(points))) => points,
        Some((pr, Err(errors))) => {
            for error in errors {
                let channel = error.channel().to_string();
                let field = error.field().map(str::to_string);
                // Point at the override when there is one, else at the device's profile key.
                let at = if dev.points.contains_key(&channel) {
                    let point = place.child("points").child(&channel);
                    match &field {
                        Some(f) => point.child(f),
                        None => point,
                    }
                } else {
                    place.child("profile")
                };
                let profile = pr.id.clone();
                p.at(&at, Problem::Point { profile, error });
            }
            Vec::new()
        }
    };
    if profile.is_some() && points.is_empty() && p.count() == before {
        p.push(place, "points", Problem::NoPoints);
    }
    check_point_sizes(place, &points, max_regs, p);
    if let Some(pr) = profile {
        for (channel, unit) in pr.assumed_units(&dev.points) {
            // At the override's table when the device has one, else at its `profile` line.
            let at = if dev.points.contains_key(&channel) {
                place.child("points").child(&channel).child("unit")
            } else {
                place
                    .child("profile")
                    .shown_as(&format!("points.{channel}.unit"))
            };
            let warning = Warning::UnitAssumed {
                profile: pr.id.clone(),
                channel: channel.clone(),
                unit,
            };
            p.warn(&at, warning);
        }
    }

    if p.count() > before {
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
