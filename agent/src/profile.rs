//! Meter profiles: the register map of one meter model, and how a device's overrides apply to it.
//!
//! A profile (`config/profiles/<id>.toml`) says where a model keeps its flow, totalizer and level
//! (0-based PDU address and function code, data type, byte order, unit), which serial settings
//! it ships with and how gently it must be polled. Every file under `config/profiles/` is built
//! into the binary, so an installed agent needs no profile directory; directories listed in
//! `[profiles] dirs` are searched first and may shadow a built-in id.
//!
//! A device names a profile and may override any field of a point, or add a point, with a
//! `[bus.device.points.<channel>]` table. [`Profile::resolve`] merges the two field by field and
//! validates the result into [`Point`]s: the registers fit the address space, composite
//! totalizers carry the fields they need, and the unit measures what the channel carries (flow a
//! volume per time, total a volume, level a length or a pressure read as water column). A level
//! read as pressure states the water's density and, for an absolute cell, the air pressure
//! ([`WaterColumn`]); a profile marks a unit it could only guess (`unit_assumed`), which
//! `check-config` then warns about on every device that does not confirm it.

use crate::position::{Location, SourceText};
use crate::register::{
    Atmosphere, ByteOrder, Channel, DataType, FRESH_WATER_DENSITY, Fc, MAX_REGISTERS_PER_READ,
    Point, WaterColumn, is_pressure,
};
use caudal_common::units::{Dimension, Unit};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Not;
use std::path::{Path, PathBuf};

macro_rules! builtin {
    ($id:literal) => {
        (
            concat!($id, ".toml"),
            include_str!(concat!("../../config/profiles/", $id, ".toml")),
        )
    };
}

/// Every file under `config/profiles/`, compiled in: (file name, text).
pub const BUILTIN: &[(&str, &str)] = &[
    builtin!("abb-aquamaster3"),
    builtin!("arad-octave"),
    builtin!("badger-m2000"),
    builtin!("endress-promag"),
    builtin!("generic"),
    builtin!("generic-level-transmitter"),
    builtin!("keller-level"),
    builtin!("krohne-ifc"),
    builtin!("seametrics-imag4700"),
    builtin!("siemens-mag6000"),
    builtin!("siemens-mag8000"),
    builtin!("tuf2000"),
];

/// How far a profile's register map has been checked (from the research notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Confidence {
    /// Seen in the vendor's own manual text.
    A,
    /// Two independent public sources agree, or an official fragment plus a consistent map.
    B,
    /// A single non-official source, or inferred from neighbouring registers.
    C,
}

/// One profile file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The id devices name in `profile = "..."`.
    pub id: String,
    /// Human name of the model(s) covered.
    pub name: String,
    pub confidence: Confidence,
    /// Where the register map comes from (manual numbers, pages, public code).
    pub sources: Vec<String>,
    /// Commissioning notes worth showing to a technician.
    #[serde(default)]
    pub notes: Option<String>,
    /// Factory serial settings; fill a bus's missing baud/parity/data/stop bits.
    #[serde(default)]
    pub serial: SerialDefaults,
    /// How the model wants to be polled; fills a device's missing timeout/retries/block size.
    #[serde(default)]
    pub timing: Timing,
    /// Points by channel name: `flow`, `total`, `level`, `direction` or any extra name.
    pub points: BTreeMap<String, PointSpec>,
}

/// `[serial]` of a profile: the model's factory settings, where known.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialDefaults {
    /// Factory baud rate.
    pub baud: Option<u32>,
    /// Factory parity.
    pub parity: Option<Parity>,
    /// Factory data bits, 7 or 8.
    pub data_bits: Option<u8>,
    /// Factory stop bits, 1 or 2.
    pub stop_bits: Option<u8>,
    /// Factory unit id (informational: a device always states its own `unit`).
    pub unit: Option<u8>,
}

/// Serial parity, as a bus (`[[bus]] parity`) or a profile's `[serial]` states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    None,
    Even,
    Odd,
}

impl Parity {
    /// The letter of the usual `8E1` notation.
    pub fn letter(self) -> char {
        match self {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        }
    }
}

impl fmt::Display for Parity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Parity::None => "none",
            Parity::Even => "even",
            Parity::Odd => "odd",
        })
    }
}

/// `[timing]` of a profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    /// Response timeout, milliseconds.
    pub timeout_ms: Option<u64>,
    /// Attempts after the first one fails.
    pub retries: Option<u32>,
    /// Silence between a reply and the next request, milliseconds.
    pub inter_request_ms: Option<u64>,
    /// Largest block read the model accepts, registers.
    pub max_regs_per_read: Option<u16>,
}

/// One point as written in a profile or a device override: every field optional, so an
/// override can name only what it changes. [`PointSpec::resolve`] checks the merged whole.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointSpec {
    /// Read function: 1 coils, 2 discrete inputs, 3 holding registers, 4 input registers.
    pub fc: Option<Fc>,
    /// 0-based wire (PDU) address.
    pub address: Option<u16>,
    /// How the registers encode the value (`type` in files): `f32`, `i32_fraction`, ...
    #[serde(rename = "type")]
    pub data_type: Option<DataType>,
    /// Byte/word order; default `ABCD`.
    pub order: Option<ByteOrder>,
    /// value = raw × scale + offset (in `unit`); default 1.
    pub scale: Option<f64>,
    /// Default 0.
    pub offset: Option<f64>,
    /// Unit of the scaled value; required for flow, total and level, default `1` otherwise.
    pub unit: Option<Unit>,
    /// `i32_fraction` (required) and `i32_f32_fraction` (default 1): weight of the fraction.
    pub fraction_scale: Option<f64>,
    /// `f32_overflow` and `f32_u16_rollover` (required): weight of the overflow part.
    pub overflow_factor: Option<f64>,
    /// `f32_u16_rollover` (required): address of the u16 rollover counter, same fc.
    pub overflow_address: Option<u16>,
    /// For counters: the value (in `unit`) at which the register wraps to zero, the modulus
    /// (4294967296 for a u32 counter, not its largest value 4294967295).
    pub rollover_at: Option<f64>,
    /// A level in a pressure unit: density of the water above the probe, kg/m³; default 1000.
    pub water_density_kg_m3: Option<f64>,
    /// A level in a pressure unit from an absolute cell: the site's altitude, m; the standard
    /// atmosphere's pressure there is subtracted. Excludes `barometric_bar`.
    pub altitude_m: Option<f64>,
    /// A level in a pressure unit from an absolute cell: the air pressure measured on site,
    /// bar, subtracted. Excludes `altitude_m`. Neither: a vented cell, nothing subtracted.
    pub barometric_bar: Option<f64>,
    /// In a profile: `unit` is a guess to confirm against the meter's display. `check-config`
    /// warns on a device that uses it without stating `unit` itself.
    pub unit_assumed: Option<bool>,
    /// `false` drops the point (e.g. a profile's level on a site without a level sensor).
    pub enabled: Option<bool>,
}

impl PointSpec {
    /// Field names, as written in files.
    pub const FIELDS: &'static [&'static str] = &[
        "fc",
        "address",
        "type",
        "order",
        "scale",
        "offset",
        "unit",
        "fraction_scale",
        "overflow_factor",
        "overflow_address",
        "rollover_at",
        "water_density_kg_m3",
        "altitude_m",
        "barometric_bar",
        "unit_assumed",
        "enabled",
    ];

    /// Sets the fields named in `table` (a device's `[points.<channel>]` override).
    pub fn merge(&mut self, channel: &str, table: &toml::Table) -> Result<(), Vec<PointError>> {
        let mut errors = Vec::new();
        for (field, value) in table {
            if let Err(e) = self.set(channel, field, value) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn set(&mut self, channel: &str, field: &str, value: &toml::Value) -> Result<(), PointError> {
        fn parse<T: DeserializeOwned>(
            channel: &str,
            field: &str,
            value: &toml::Value,
        ) -> Result<Option<T>, PointError> {
            value
                .clone()
                .try_into()
                .map(Some)
                .map_err(|e: toml::de::Error| PointError::BadValue {
                    channel: channel.to_string(),
                    field: field.to_string(),
                    message: e.message().to_string(),
                })
        }
        match field {
            "fc" => self.fc = parse(channel, field, value)?,
            "address" => self.address = parse(channel, field, value)?,
            "type" => self.data_type = parse(channel, field, value)?,
            "order" => self.order = parse(channel, field, value)?,
            "scale" => self.scale = parse(channel, field, value)?,
            "offset" => self.offset = parse(channel, field, value)?,
            "unit" => self.unit = parse(channel, field, value)?,
            "fraction_scale" => self.fraction_scale = parse(channel, field, value)?,
            "overflow_factor" => self.overflow_factor = parse(channel, field, value)?,
            "overflow_address" => self.overflow_address = parse(channel, field, value)?,
            "rollover_at" => self.rollover_at = parse(channel, field, value)?,
            "water_density_kg_m3" => self.water_density_kg_m3 = parse(channel, field, value)?,
            "altitude_m" => self.altitude_m = parse(channel, field, value)?,
            "barometric_bar" => self.barometric_bar = parse(channel, field, value)?,
            "unit_assumed" => self.unit_assumed = parse(channel, field, value)?,
            "enabled" => self.enabled = parse(channel, field, value)?,
            _ => {
                return Err(PointError::UnknownField {
                    channel: channel.to_string(),
                    field: field.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Validates the spec into a [`Point`] for `channel`; `None` when `enabled = false`.
    /// Returns every problem, not only the first.
    pub fn resolve(&self, channel: &str) -> Result<Option<Point>, Vec<PointError>> {
        if self.enabled == Some(false) {
            return Ok(None);
        }
        let mut errors = Vec::new();
        let ch = channel.to_string();
        if !valid_channel_name(channel) {
            errors.push(PointError::BadChannelName {
                channel: ch.clone(),
            });
        }
        let missing = |field: &'static str| PointError::Missing {
            channel: ch.clone(),
            field,
            why: "every point needs fc, address and type",
        };
        let (Some(fc), Some(address), Some(data_type)) = (self.fc, self.address, self.data_type)
        else {
            for (field, absent) in [
                ("fc", self.fc.is_none()),
                ("address", self.address.is_none()),
                ("type", self.data_type.is_none()),
            ] {
                if absent {
                    errors.push(missing(field));
                }
            }
            return Err(errors);
        };

        if fc.is_bits() && data_type != DataType::Bool {
            errors.push(PointError::BitsNeedBool {
                channel: ch.clone(),
                fc,
                data_type,
            });
        }
        let registers = data_type.registers();
        if u32::from(address) + u32::from(registers) > 0x1_0000 {
            errors.push(PointError::DoesNotFit {
                channel: ch.clone(),
                field: "address",
                address,
                registers,
            });
        }

        let composite = |field: &'static str, needed_by: &'static [DataType]| {
            (field, needed_by.contains(&data_type))
        };
        let fraction_types = &[DataType::I32Fraction, DataType::I32F32Fraction];
        let overflow_types = &[DataType::F32Overflow, DataType::F32U16Rollover];
        let rollover_types = &[DataType::F32U16Rollover];
        for ((field, applies), present) in [
            (
                composite("fraction_scale", fraction_types),
                self.fraction_scale.is_some(),
            ),
            (
                composite("overflow_factor", overflow_types),
                self.overflow_factor.is_some(),
            ),
            (
                composite("overflow_address", rollover_types),
                self.overflow_address.is_some(),
            ),
        ] {
            if present && !applies {
                errors.push(PointError::NotApplicable {
                    channel: ch.clone(),
                    field,
                    data_type,
                });
            }
        }
        let required = |field: &'static str, why: &'static str| PointError::Missing {
            channel: ch.clone(),
            field,
            why,
        };
        match data_type {
            DataType::I32Fraction if self.fraction_scale.is_none() => errors.push(required(
                "fraction_scale",
                "an i32_fraction total is int + frac × fraction_scale (1e-9 on a MAG 8000)",
            )),
            DataType::F32Overflow if self.overflow_factor.is_none() => errors.push(required(
                "overflow_factor",
                "an f32_overflow total is value + overflow × overflow_factor",
            )),
            DataType::F32U16Rollover => {
                if self.overflow_factor.is_none() {
                    errors.push(required(
                        "overflow_factor",
                        "an f32_u16_rollover total is value + counter × overflow_factor",
                    ));
                }
                if self.overflow_address.is_none() {
                    errors.push(required(
                        "overflow_address",
                        "an f32_u16_rollover total reads its rollover counter there",
                    ));
                }
            }
            _ => {}
        }
        if let Some(oa) = self.overflow_address
            && data_type == DataType::F32U16Rollover
            && oa >= address
            && u32::from(oa) < u32::from(address) + u32::from(registers)
        {
            errors.push(PointError::Overlaps {
                channel: ch.clone(),
                overflow_address: oa,
                address,
            });
        }

        let scale = self.scale.unwrap_or(1.0);
        let offset = self.offset.unwrap_or(0.0);
        let fraction_scale = self.fraction_scale.unwrap_or(1.0);
        let overflow_factor = self.overflow_factor.unwrap_or(1.0);
        for (field, value, ok, expected) in [
            (
                "scale",
                scale,
                scale.is_finite() && scale != 0.0,
                "finite and not 0",
            ),
            ("offset", offset, offset.is_finite(), "finite"),
            (
                "fraction_scale",
                fraction_scale,
                fraction_scale.is_finite() && fraction_scale > 0.0,
                "finite and above 0",
            ),
            (
                "overflow_factor",
                overflow_factor,
                overflow_factor.is_finite() && overflow_factor > 0.0,
                "finite and above 0",
            ),
        ] {
            if !ok {
                errors.push(PointError::OutOfRange {
                    channel: ch.clone(),
                    field,
                    value,
                    expected,
                });
            }
        }

        let channel_kind = Channel::parse(channel);
        if let Some(r) = self.rollover_at {
            if matches!(
                channel_kind,
                Channel::Flow | Channel::Level | Channel::Direction
            ) {
                errors.push(PointError::RolloverNotCounter {
                    channel: ch.clone(),
                });
            } else if !(r.is_finite() && r > 0.0) {
                errors.push(PointError::OutOfRange {
                    channel: ch.clone(),
                    field: "rollover_at",
                    value: r,
                    expected: "finite and above 0",
                });
            }
        }

        let needed = match channel_kind {
            Channel::Flow => Some(Dimension::Flow),
            Channel::Total => Some(Dimension::Volume),
            Channel::Level => Some(Dimension::Length),
            Channel::Direction => Some(Dimension::Other),
            Channel::Extra(_) => None,
        };
        let unit = match (self.unit, needed) {
            (Some(u), Some(dim)) if u.dimension() != dim => {
                errors.push(PointError::UnitDimension {
                    channel: ch.clone(),
                    unit: u,
                    expected: dim,
                });
                u
            }
            (Some(u), _) => u,
            (None, Some(Dimension::Other) | None) => Unit::Dimensionless,
            (None, Some(dim)) => {
                errors.push(PointError::UnitRequired {
                    channel: ch.clone(),
                    expected: dim,
                });
                Unit::Dimensionless
            }
        };

        let water_column = self.water_column(&ch, &channel_kind, unit, &mut errors);

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Some(Point {
            channel: channel_kind,
            fc,
            address,
            data_type,
            order: self.order.unwrap_or_default(),
            scale,
            offset,
            unit,
            fraction_scale,
            overflow_factor,
            overflow_address: self.overflow_address,
            rollover_at: self.rollover_at,
            water_column,
        }))
    }

    /// How a level in a pressure unit becomes a water column (`None` for every other point),
    /// with the density and air-pressure settings checked: only on such a level, in range, and
    /// at most one air pressure.
    fn water_column(
        &self,
        ch: &str,
        channel: &Channel,
        unit: Unit,
        errors: &mut Vec<PointError>,
    ) -> Option<WaterColumn> {
        let settings = [
            ("water_density_kg_m3", self.water_density_kg_m3),
            ("altitude_m", self.altitude_m),
            ("barometric_bar", self.barometric_bar),
        ];
        let pressure_level = *channel == Channel::Level && is_pressure(unit);
        if !pressure_level {
            for (field, value) in settings {
                if value.is_some() {
                    errors.push(PointError::NeedsPressureLevel {
                        channel: ch.to_string(),
                        field,
                        unit,
                    });
                }
            }
            return None;
        }
        for ((field, value), (range, expected)) in settings.into_iter().zip([
            (900.0..=1300.0, "900-1300 kg/m³ (fresh water is 1000)"),
            (-500.0..=6000.0, "-500-6000 m"),
            (0.4..=1.1, "0.4-1.1 bar"),
        ]) {
            if let Some(v) = value
                && !range.contains(&v)
            {
                errors.push(PointError::OutOfRange {
                    channel: ch.to_string(),
                    field,
                    value: v,
                    expected,
                });
            }
        }
        let air = match (self.altitude_m, self.barometric_bar) {
            (Some(_), Some(_)) => {
                errors.push(PointError::Excludes {
                    channel: ch.to_string(),
                    field: "barometric_bar",
                    other: "altitude_m",
                });
                Atmosphere::Vented
            }
            (Some(h), None) => Atmosphere::Altitude(h),
            (None, Some(b)) => Atmosphere::Barometric(b),
            (None, None) => Atmosphere::Vented,
        };
        Some(WaterColumn {
            density_kg_m3: self.water_density_kg_m3.unwrap_or(FRESH_WATER_DENSITY),
            air,
        })
    }
}

/// Channel names appear in readings and metrics: keep them short and plain.
fn valid_channel_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn dimension_needs(d: Dimension) -> &'static str {
    match d {
        Dimension::Flow => "a flow unit (L/s, m3/h, ...)",
        Dimension::Volume => "a volume unit (m3, L, ...)",
        Dimension::Length => "a length or pressure unit (m, cm, bar, mH2O, ...)",
        Dimension::Other => "a unit without dimension (`1`)",
    }
}

/// A point that cannot be read as written. Each names the channel and, where one field is at
/// fault, the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PointError {
    #[error(
        "point `{channel}`: unknown field `{field}`; known fields: {known}",
        known = PointSpec::FIELDS.join(", ")
    )]
    UnknownField { channel: String, field: String },
    #[error("point `{channel}`: `{field}`: {message}")]
    BadValue {
        channel: String,
        field: String,
        message: String,
    },
    #[error("point `{channel}`: `{field}` is missing ({why})")]
    Missing {
        channel: String,
        field: &'static str,
        why: &'static str,
    },
    #[error("point `{channel}`: `{field}` does not apply to type {data_type}")]
    NotApplicable {
        channel: String,
        field: &'static str,
        data_type: DataType,
    },
    #[error(
        "point `{channel}`: address {address} + {registers} registers runs past 65535 (addresses are 0-based PDU addresses)"
    )]
    DoesNotFit {
        channel: String,
        field: &'static str,
        address: u16,
        registers: u16,
    },
    #[error(
        "point `{channel}`: overflow_address {overflow_address} lies inside the value registers starting at {address}"
    )]
    Overlaps {
        channel: String,
        overflow_address: u16,
        address: u16,
    },
    #[error("point `{channel}`: {fc} reads bits; type must be bool, not {data_type}")]
    BitsNeedBool {
        channel: String,
        fc: Fc,
        data_type: DataType,
    },
    #[error("point `{channel}`: `{field}` = {value} must be {expected}")]
    OutOfRange {
        channel: String,
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("point `{channel}`: rollover_at only applies to counters (total or an extra)")]
    RolloverNotCounter { channel: String },
    #[error("point `{channel}`: unit `{unit}` does not fit the channel; it needs {}", dimension_needs(*.expected))]
    UnitDimension {
        channel: String,
        unit: Unit,
        expected: Dimension,
    },
    #[error("point `{channel}`: `unit` is missing; the channel needs {}", dimension_needs(*.expected))]
    UnitRequired {
        channel: String,
        expected: Dimension,
    },
    #[error("point `{channel}`: channel names use lowercase letters, digits and '_' (at most 32)")]
    BadChannelName { channel: String },
    #[error(
        "point `{channel}`: `{field}` only applies to a level read in a pressure unit (bar, mbar, kPa, MPa, psi, mH2O, cmH2O, mmH2O), not to `{channel}` in `{unit}`"
    )]
    NeedsPressureLevel {
        channel: String,
        field: &'static str,
        unit: Unit,
    },
    #[error(
        "point `{channel}`: `{field}` belongs in a profile; a device confirms the profile's unit by setting `unit`"
    )]
    ProfileOnly {
        channel: String,
        field: &'static str,
    },
    #[error("point `{channel}`: `{field}` and `{other}` exclude each other; give one air pressure")]
    Excludes {
        channel: String,
        field: &'static str,
        other: &'static str,
    },
}

impl PointError {
    /// The channel the error is about.
    pub fn channel(&self) -> &str {
        match self {
            PointError::UnknownField { channel, .. }
            | PointError::BadValue { channel, .. }
            | PointError::Missing { channel, .. }
            | PointError::NotApplicable { channel, .. }
            | PointError::DoesNotFit { channel, .. }
            | PointError::Overlaps { channel, .. }
            | PointError::BitsNeedBool { channel, .. }
            | PointError::OutOfRange { channel, .. }
            | PointError::RolloverNotCounter { channel }
            | PointError::UnitDimension { channel, .. }
            | PointError::UnitRequired { channel, .. }
            | PointError::BadChannelName { channel }
            | PointError::NeedsPressureLevel { channel, .. }
            | PointError::Excludes { channel, .. }
            | PointError::ProfileOnly { channel, .. } => channel,
        }
    }

    /// The field at fault, when one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            PointError::UnknownField { field, .. } | PointError::BadValue { field, .. } => {
                Some(field)
            }
            PointError::Missing { field, .. }
            | PointError::NotApplicable { field, .. }
            | PointError::DoesNotFit { field, .. }
            | PointError::OutOfRange { field, .. }
            | PointError::NeedsPressureLevel { field, .. }
            | PointError::Excludes { field, .. }
            | PointError::ProfileOnly { field, .. } => Some(field),
            PointError::Overlaps { .. } => Some("overflow_address"),
            PointError::BitsNeedBool { .. } => Some("type"),
            PointError::RolloverNotCounter { .. } => Some("rollover_at"),
            PointError::UnitDimension { .. } | PointError::UnitRequired { .. } => Some("unit"),
            PointError::BadChannelName { .. } => None,
        }
    }
}

/// Where a profile came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileOrigin {
    /// Compiled into the binary from `config/profiles/<file>`.
    BuiltIn(&'static str),
    /// Read from a profile directory.
    File(PathBuf),
}

impl ProfileOrigin {
    /// The name errors use for the file.
    pub fn path(&self) -> PathBuf {
        match self {
            ProfileOrigin::BuiltIn(file) => Path::new("<built-in>").join(file),
            ProfileOrigin::File(p) => p.clone(),
        }
    }
}

impl fmt::Display for ProfileOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.path().display(), f)
    }
}

/// A profile that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{}: cannot read profiles: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax, unknown key, wrong type or missing key in a profile file.
    #[error("{at}: {message}")]
    Parse { at: Location, message: String },
    /// A point that cannot be read as written.
    #[error("{at}: profile `{id}`: {error}")]
    Point {
        at: Location,
        id: String,
        error: PointError,
    },
    /// A profile-level setting out of range (id, timing, serial, no points).
    #[error("{at}: profile `{id}`: {message}")]
    Invalid {
        at: Location,
        id: String,
        message: String,
    },
    /// Two files in one directory define the same id.
    #[error("profile id `{id}` is defined twice: in {} and in {}", first.display(), second.display())]
    Duplicate {
        id: String,
        first: PathBuf,
        second: PathBuf,
    },
}

/// A device names a profile nobody defines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown profile `{id}`{}; known profiles: {}",
    suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default(),
    known.join(", ")
)]
pub struct UnknownProfile {
    pub id: String,
    pub suggestion: Option<String>,
    pub known: Vec<String>,
}

impl ProfileError {
    /// Where the error is, when it is in a file.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ProfileError::Parse { at, .. }
            | ProfileError::Point { at, .. }
            | ProfileError::Invalid { at, .. } => Some(at),
            ProfileError::Io { .. } | ProfileError::Duplicate { .. } => None,
        }
    }
}

impl Profile {
    /// Parses and validates one profile file. `source` names the file in errors.
    pub fn parse(source: &SourceText) -> Result<Profile, Vec<ProfileError>> {
        let profile: Profile = toml::from_str(source.text()).map_err(|e| {
            let (at, message) = source.toml_error(&e);
            vec![ProfileError::Parse { at, message }]
        })?;
        let errors = profile.validate(source);
        if errors.is_empty() {
            Ok(profile)
        } else {
            Err(errors)
        }
    }

    fn validate(&self, source: &SourceText) -> Vec<ProfileError> {
        let mut errors = Vec::new();
        let invalid = |key: &[&str], message: String| ProfileError::Invalid {
            at: source.locate_keys(key),
            id: self.id.clone(),
            message,
        };
        if self.id.is_empty()
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            errors.push(invalid(
                &["id"],
                "ids use lowercase letters, digits, '-' and '_'".into(),
            ));
        }
        if self.points.is_empty() {
            errors.push(invalid(
                &["points"],
                "a profile needs at least one point".into(),
            ));
        }
        if self.timing.timeout_ms == Some(0) {
            errors.push(invalid(
                &["timing", "timeout_ms"],
                "timeout_ms must be above 0".into(),
            ));
        }
        if let Some(m) = self.timing.max_regs_per_read
            && !(1..=MAX_REGISTERS_PER_READ).contains(&m)
        {
            errors.push(invalid(
                &["timing", "max_regs_per_read"],
                format!("max_regs_per_read = {m} must be 1..={MAX_REGISTERS_PER_READ}"),
            ));
        }
        if let Some(b) = self.serial.data_bits
            && !(7..=8).contains(&b)
        {
            errors.push(invalid(
                &["serial", "data_bits"],
                format!("data_bits = {b} must be 7 or 8"),
            ));
        }
        if let Some(s) = self.serial.stop_bits
            && !(1..=2).contains(&s)
        {
            errors.push(invalid(
                &["serial", "stop_bits"],
                format!("stop_bits = {s} must be 1 or 2"),
            ));
        }
        if self.serial.baud == Some(0) {
            errors.push(invalid(&["serial", "baud"], "baud must be above 0".into()));
        }
        for (channel, spec) in &self.points {
            match spec.resolve(channel) {
                Ok(Some(point)) => {
                    if let Some(max) = self.timing.max_regs_per_read
                        && !point.fc.is_bits()
                        && point.data_type.smallest_read() > max
                    {
                        errors.push(invalid(
                            &["timing", "max_regs_per_read"],
                            format!(
                                "point `{channel}` ({}) needs {} registers in one read, more than max_regs_per_read = {max}",
                                point.data_type,
                                point.data_type.smallest_read()
                            ),
                        ));
                    }
                }
                Ok(None) => {}
                Err(point_errors) => {
                    for error in point_errors {
                        let mut key = vec!["points", channel.as_str()];
                        if let Some(f) = error.field() {
                            key.push(f);
                        }
                        errors.push(ProfileError::Point {
                            at: source.locate_keys(&key),
                            id: self.id.clone(),
                            error,
                        });
                    }
                }
            }
        }
        errors
    }

    /// The profile's points with a device's overrides applied (`overrides` maps a channel to
    /// the fields it changes; a channel the profile lacks is a new point and needs fc, address
    /// and type). Points come out in channel order: flow, total, level, direction, extras.
    pub fn resolve(
        &self,
        overrides: &BTreeMap<String, toml::Table>,
    ) -> Result<Vec<Point>, Vec<PointError>> {
        let mut specs = self.points.clone();
        let mut errors = Vec::new();
        for (channel, table) in overrides {
            let spec = specs.entry(channel.clone()).or_default();
            if let Err(e) = spec.merge(channel, table) {
                errors.extend(e);
            }
            // A device confirms a guessed unit by stating `unit`, not by unmarking it.
            if table.contains_key("unit_assumed") {
                errors.push(PointError::ProfileOnly {
                    channel: channel.clone(),
                    field: "unit_assumed",
                });
            }
        }
        let mut points = Vec::new();
        for (channel, spec) in &specs {
            match spec.resolve(channel) {
                Ok(Some(p)) => points.push(p),
                Ok(None) => {}
                Err(e) => errors.extend(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        points.sort_by(|a, b| a.channel.cmp(&b.channel));
        Ok(points)
    }
}

impl Profile {
    /// The points whose unit the profile only assumed (`unit_assumed = true`) and a device with
    /// these `overrides` still reads in that unit: the device neither states `unit` for the
    /// point nor disables it. (channel, assumed unit), in channel order.
    pub fn assumed_units(&self, overrides: &BTreeMap<String, toml::Table>) -> Vec<(String, Unit)> {
        self.points
            .iter()
            .filter(|(_, spec)| spec.unit_assumed == Some(true))
            .filter_map(|(channel, spec)| {
                let own = overrides.get(channel);
                let stated = own.is_some_and(|t| t.contains_key("unit"));
                let disabled = own
                    .and_then(|t| t.get("enabled"))
                    .and_then(toml::Value::as_bool)
                    .unwrap_or(spec.enabled.unwrap_or(true))
                    .not();
                match spec.unit {
                    Some(unit) if !stated && !disabled => Some((channel.clone(), unit)),
                    _ => None,
                }
            })
            .collect()
    }
}

struct Entry {
    profile: Profile,
    origin: ProfileOrigin,
}

/// Every profile the agent knows: those in the configured directories, then the built-ins.
pub struct ProfileSet {
    profiles: BTreeMap<String, Entry>,
}

impl fmt::Debug for ProfileSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.profiles
                    .iter()
                    .map(|(id, e)| (id, e.origin.to_string())),
            )
            .finish()
    }
}

impl ProfileSet {
    /// The profiles compiled into the binary.
    pub fn builtin() -> Result<ProfileSet, Vec<ProfileError>> {
        ProfileSet::load(&[])
    }

    /// Profiles from `dirs` (each `*.toml` file, in the order given; the first directory that
    /// defines an id wins), then every built-in id not already defined. Two files in one
    /// directory defining the same id is an error naming both. Collects every error.
    pub fn load(dirs: &[PathBuf]) -> Result<ProfileSet, Vec<ProfileError>> {
        let mut set = ProfileSet {
            profiles: BTreeMap::new(),
        };
        let mut errors = Vec::new();
        for dir in dirs {
            let files = match profile_files(dir) {
                Ok(f) => f,
                Err(source) => {
                    errors.push(ProfileError::Io {
                        path: dir.clone(),
                        source,
                    });
                    continue;
                }
            };
            let mut in_this_dir: BTreeMap<String, PathBuf> = BTreeMap::new();
            for path in files {
                let text = match std::fs::read_to_string(&path) {
                    Ok(t) => t,
                    Err(source) => {
                        errors.push(ProfileError::Io { path, source });
                        continue;
                    }
                };
                let source = SourceText::new(path.clone(), text);
                let profile = match Profile::parse(&source) {
                    Ok(p) => p,
                    Err(e) => {
                        errors.extend(e);
                        continue;
                    }
                };
                if let Some(first) = in_this_dir.get(&profile.id) {
                    errors.push(ProfileError::Duplicate {
                        id: profile.id.clone(),
                        first: first.clone(),
                        second: path,
                    });
                    continue;
                }
                in_this_dir.insert(profile.id.clone(), path.clone());
                if let Some(earlier) = set.profiles.get(&profile.id) {
                    tracing::info!(
                        profile = %profile.id,
                        used = %earlier.origin,
                        ignored = %path.display(),
                        "profile defined in an earlier directory; later one ignored"
                    );
                    continue;
                }
                set.profiles.insert(
                    profile.id.clone(),
                    Entry {
                        profile,
                        origin: ProfileOrigin::File(path),
                    },
                );
            }
        }
        for (file, text) in BUILTIN {
            let origin = ProfileOrigin::BuiltIn(file);
            let source = SourceText::new(origin.path(), (*text).to_string());
            let profile = match Profile::parse(&source) {
                Ok(p) => p,
                Err(e) => {
                    errors.extend(e);
                    continue;
                }
            };
            if let Some(shadow) = set.profiles.get(&profile.id) {
                tracing::info!(profile = %profile.id, file = %shadow.origin, "profile shadows the built-in one");
                continue;
            }
            set.profiles
                .insert(profile.id.clone(), Entry { profile, origin });
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors)
        }
    }

    /// The profile with this id, or an error listing the known ids with a suggestion.
    pub fn get(&self, id: &str) -> Result<&Profile, UnknownProfile> {
        if let Some(e) = self.profiles.get(id) {
            return Ok(&e.profile);
        }
        Err(UnknownProfile {
            id: id.to_string(),
            suggestion: closest(id, self.profiles.keys().map(String::as_str)),
            known: self.profiles.keys().cloned().collect(),
        })
    }

    /// Where the profile with this id was loaded from.
    pub fn origin(&self, id: &str) -> Option<&ProfileOrigin> {
        self.profiles.get(id).map(|e| &e.origin)
    }

    /// Known ids, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    /// Every profile, sorted by id.
    pub fn iter(&self) -> impl Iterator<Item = (&Profile, &ProfileOrigin)> {
        self.profiles.values().map(|e| (&e.profile, &e.origin))
    }

    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }
}

/// The `*.toml` files of a directory, sorted so errors and precedence do not depend on the
/// file system's listing order.
fn profile_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "toml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The known id nearest to `id`: a small edit distance, or one containing the other
/// (`mag8000` → `siemens-mag8000`).
fn closest<'a>(id: &str, known: impl Iterator<Item = &'a str>) -> Option<String> {
    let id = id.to_ascii_lowercase();
    known
        .filter_map(|k| {
            let d = edit_distance(&id, k);
            let contained = !id.is_empty() && (k.contains(&id) || id.contains(k));
            let close = d <= (id.len() / 3).max(2);
            (close || contained).then_some((if close { d } else { usize::MAX / 2 }, k))
        })
        .min()
        .map(|(_, k)| k.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(row[j + 1])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(fc: u8, address: u16, t: DataType) -> PointSpec {
        PointSpec {
            fc: Fc::from_code(fc),
            address: Some(address),
            data_type: Some(t),
            ..PointSpec::default()
        }
    }

    #[test]
    fn builtins_load_and_are_named_after_their_files() {
        let set = ProfileSet::builtin().unwrap();
        assert_eq!(set.len(), BUILTIN.len());
        for (profile, origin) in set.iter() {
            assert_eq!(
                origin.path(),
                Path::new("<built-in>").join(format!("{}.toml", profile.id))
            );
        }
    }

    #[test]
    fn suggests_the_nearest_id() {
        let set = ProfileSet::builtin().unwrap();
        let e = set.get("siemens-mag800").unwrap_err();
        assert_eq!(e.suggestion.as_deref(), Some("siemens-mag8000"));
        let e = set.get("mag8000").unwrap_err();
        assert_eq!(e.suggestion.as_deref(), Some("siemens-mag8000"));
        let e = set.get("xylem-magflux").unwrap_err();
        assert_eq!(e.suggestion, None);
        assert!(
            e.to_string().contains("known profiles: abb-aquamaster3"),
            "{e}"
        );
    }

    #[test]
    fn composite_types_need_their_fields() {
        let e = spec(3, 3017, DataType::I32Fraction)
            .resolve("total")
            .unwrap_err();
        assert!(
            e.iter().any(|e| e.field() == Some("fraction_scale")),
            "{e:?}"
        );
        let e = spec(3, 207, DataType::F32U16Rollover)
            .resolve("total")
            .unwrap_err();
        let fields: Vec<_> = e.iter().filter_map(PointError::field).collect();
        assert!(fields.contains(&"overflow_address") && fields.contains(&"overflow_factor"));
    }

    #[test]
    fn overflow_address_only_on_rollover_totals() {
        let mut s = spec(3, 0, DataType::F32);
        s.unit = Some(Unit::CubicMetre);
        s.overflow_address = Some(10);
        let e = s.resolve("total").unwrap_err();
        assert!(matches!(
            &e[..],
            [PointError::NotApplicable {
                field: "overflow_address",
                ..
            }]
        ));
    }

    #[test]
    fn registers_must_fit_the_address_space() {
        let mut s = spec(3, 65534, DataType::F64);
        s.unit = Some(Unit::CubicMetre);
        let e = s.resolve("total").unwrap_err();
        assert!(matches!(
            &e[..],
            [PointError::DoesNotFit { registers: 4, .. }]
        ));
        let mut s = spec(3, 65534, DataType::F32);
        s.unit = Some(Unit::CubicMetre);
        assert!(s.resolve("total").is_ok());
    }

    #[test]
    fn units_must_match_the_channel() {
        let mut s = spec(3, 0, DataType::F32);
        s.unit = Some(Unit::CubicMetre);
        let e = s.resolve("flow").unwrap_err();
        assert!(matches!(
            &e[..],
            [PointError::UnitDimension {
                expected: Dimension::Flow,
                ..
            }]
        ));
        s.unit = Some(Unit::Bar);
        assert_eq!(s.resolve("level").unwrap().unwrap().unit, Unit::Bar);
        s.unit = None;
        assert!(matches!(
            &s.resolve("level").unwrap_err()[..],
            [PointError::UnitRequired { .. }]
        ));
        assert_eq!(
            s.resolve("battery_pct").unwrap().unwrap().unit,
            Unit::Dimensionless
        );
    }

    #[test]
    fn bit_functions_read_bools() {
        let e = spec(1, 0, DataType::U16).resolve("pump_on").unwrap_err();
        assert!(matches!(&e[..], [PointError::BitsNeedBool { .. }]));
        assert!(spec(2, 0, DataType::Bool).resolve("pump_on").is_ok());
    }

    #[test]
    fn override_unknown_field_and_bad_value_are_named() {
        let mut s = spec(3, 0, DataType::F32);
        let t: toml::Table = toml::from_str("adress = 4\norder = \"ABDC\"").unwrap();
        let e = s.merge("flow", &t).unwrap_err();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].field(), Some("adress"));
        assert!(
            e[0].to_string().contains("known fields: fc, address"),
            "{}",
            e[0]
        );
        assert_eq!(e[1].field(), Some("order"));
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("tuf2000", "tuf2000"), 0);
    }
}
