//! Register points: where a value lives on a Modbus device and how its words become a number.
//!
//! A [`Point`] names the function code, the 0-based wire (PDU) address, the data type, the
//! byte/word order, scale, offset and unit of one value, and the [`Channel`] it feeds. Decoding
//! turns the raw registers of a point into an `f64` in canonical units; encoding (for the meter
//! simulator and tests) does the reverse. Byte orders use A = most significant byte, as gateways
//! and the research notes do: `ABCD` big-endian, `CDAB` word-swapped (low word first), `BADC`
//! bytes swapped in each word, `DCBA` fully little-endian; for 64-bit types the same four
//! patterns extend to eight bytes (`ABCD` = ABCDEFGH, `DCBA` = HGFEDCBA, `CDAB` = GHEFCDAB,
//! `BADC` = BADCFEHG).

use caudal_common::units::Unit;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The Modbus read function a point is read with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fc {
    /// 01 read coils (status bits).
    Coils = 1,
    /// 02 read discrete inputs (status bits).
    DiscreteInputs = 2,
    /// 03 read holding registers.
    Holding = 3,
    /// 04 read input registers.
    Input = 4,
}

impl Fc {
    pub fn code(self) -> u8 {
        self as u8
    }
    pub fn from_code(code: u8) -> Option<Fc> {
        match code {
            1 => Some(Fc::Coils),
            2 => Some(Fc::DiscreteInputs),
            3 => Some(Fc::Holding),
            4 => Some(Fc::Input),
            _ => None,
        }
    }
    /// Bit functions (01/02) address single bits; register functions (03/04) 16-bit words.
    pub fn is_bits(self) -> bool {
        matches!(self, Fc::Coils | Fc::DiscreteInputs)
    }
}

impl Serialize for Fc {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.code())
    }
}

impl<'de> Deserialize<'de> for Fc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let c = u8::deserialize(d)?;
        Fc::from_code(c).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "function code {c} is not a read function; use 1, 2, 3 or 4"
            ))
        })
    }
}

impl fmt::Display for Fc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fc {:02}", self.code())
    }
}

/// Byte/word order of a multi-register value (A = most significant byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ByteOrder {
    #[default]
    ABCD,
    CDAB,
    BADC,
    DCBA,
}

impl ByteOrder {
    pub const ALL: [ByteOrder; 4] = [
        ByteOrder::ABCD,
        ByteOrder::CDAB,
        ByteOrder::BADC,
        ByteOrder::DCBA,
    ];
}

/// How the registers of a point encode its value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// One bit (fc 01/02), or bit 0 of a register.
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// Totalizer as an int32 integer part followed by an int32 fraction (Siemens MAG 8000:
    /// value = int + frac × 1e-9). Four registers; `fraction_scale` on the point.
    I32Fraction,
    /// Totalizer as an int32 integer part followed by a float32 fraction (TUF-2000: LONG + REAL4).
    /// Four registers.
    I32F32Fraction,
    /// Totalizer as a float32 value followed by a float32 overflow (E+H Proline: SUM + OVERFLOW).
    /// Four registers; total = value + overflow × `overflow_factor`.
    F32Overflow,
    /// Totalizer as a float32 value plus a separate u16 rollover counter at `overflow_address`
    /// (Badger M2000): total = value + counter × `overflow_factor`.
    F32U16Rollover,
}

impl DataType {
    /// Registers (or bits, for [`DataType::Bool`] on fc 01/02) one value occupies at its
    /// address. [`DataType::F32U16Rollover`] also reads one register at `overflow_address`.
    pub fn registers(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 | DataType::F32U16Rollover => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::I32Fraction | DataType::I32F32Fraction | DataType::F32Overflow => 4,
        }
    }
}

/// Which quantity of a reading a point feeds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// Instantaneous flow; converted to L/s.
    Flow,
    /// Totalizer; converted to m³.
    Total,
    /// Level; converted to m.
    Level,
    /// Reverse-flow indicator (non-zero = reverse), used by totalizer validation.
    Direction,
    /// Any other named value, kept in the reading's `extra` map in the unit it is read in.
    Extra(String),
}

impl Channel {
    pub fn name(&self) -> &str {
        match self {
            Channel::Flow => "flow",
            Channel::Total => "total",
            Channel::Level => "level",
            Channel::Direction => "direction",
            Channel::Extra(s) => s,
        }
    }
    pub fn parse(s: &str) -> Channel {
        match s {
            "flow" => Channel::Flow,
            "total" => Channel::Total,
            "level" => Channel::Level,
            "direction" => Channel::Direction,
            other => Channel::Extra(other.to_string()),
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One value on a device: fully resolved (profile plus site overrides).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub channel: Channel,
    pub fc: Fc,
    /// 0-based wire (PDU) address.
    pub address: u16,
    pub data_type: DataType,
    pub order: ByteOrder,
    /// value = raw × scale + offset, then converted from `unit` to the canonical unit.
    pub scale: f64,
    pub offset: f64,
    pub unit: Unit,
    /// For [`DataType::I32Fraction`]: the fraction's weight (1e-9 on a MAG 8000).
    pub fraction_scale: f64,
    /// For [`DataType::F32Overflow`] and [`DataType::F32U16Rollover`]: weight of the overflow.
    pub overflow_factor: f64,
    /// For [`DataType::F32U16Rollover`]: where the rollover counter lives (same fc).
    pub overflow_address: Option<u16>,
    /// For totalizers: the value at which the register wraps to zero, in `unit` (e.g.
    /// 4 294 967 295 × scale for a u32 counter). Used to tell a rollover from a reset.
    pub rollover_at: Option<f64>,
}
