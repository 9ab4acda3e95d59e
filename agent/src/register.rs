//! Register points: where a value lives on a Modbus device and how its words become a number.
//!
//! A [`Point`] names the function code, the 0-based wire (PDU) address, the data type, the
//! byte/word order, scale, offset and unit of one value, and the [`Channel`] it feeds. Decoding
//! turns the raw registers of a point into the `f64` the agent stores: flow, total and level in
//! canonical units (L/s, m³, m; a level read as pressure becomes a water column at the point's
//! [`WaterColumn`] density, less its air pressure), every other channel exactly as read (raw ×
//! scale + offset, in the point's unit). Encoding (for the meter simulator and tests) does the
//! reverse. Byte orders use A = most significant byte, as gateways
//! and the research notes do: `ABCD` big-endian, `CDAB` word-swapped (low word first), `BADC`
//! bytes swapped in each word, `DCBA` fully little-endian; for 64-bit types the same four
//! patterns extend to eight bytes (`ABCD` = ABCDEFGH, `DCBA` = HGFEDCBA, `CDAB` = GHEFCDAB,
//! `BADC` = BADCFEHG). 16-bit values only honour the byte swap (`BADC`, `DCBA`).
//!
//! Totals are composed and scaled in `f64` (integer parts in `i32`/`i64`), never through `f32`.
//! NaN and infinities decode as such: validation, not decoding, decides they are no data.
//! [`plan_reads`] groups a device's points into as few requests as the meter allows, and
//! [`assemble`] puts each point's words back together from the replies.

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
    /// Flow, total and level are stored in canonical units (L/s, m³, m); every other channel is
    /// kept as read, in the unit its profile names.
    pub fn is_canonical(&self) -> bool {
        matches!(self, Channel::Flow | Channel::Total | Channel::Level)
    }
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
    /// value = raw × scale + offset, in `unit`; flow, total and level are then converted to
    /// their canonical unit, other channels stored as they are.
    pub scale: f64,
    pub offset: f64,
    pub unit: Unit,
    /// For [`DataType::I32Fraction`]: the fraction's weight (1e-9 on a MAG 8000).
    pub fraction_scale: f64,
    /// For [`DataType::F32Overflow`] and [`DataType::F32U16Rollover`]: weight of the overflow.
    pub overflow_factor: f64,
    /// For [`DataType::F32U16Rollover`]: where the rollover counter lives (same fc).
    pub overflow_address: Option<u16>,
    /// For totalizers: the value at which the register wraps to zero, in `unit`: the modulus,
    /// one count above the largest value it holds (2^32 = 4 294 967 296 × scale for a u32
    /// counter). Used to tell a rollover from a reset.
    pub rollover_at: Option<f64>,
    /// For a level read in a pressure unit: how pressure becomes a water column. `None` for
    /// every other point (a level in a length unit is already a column).
    pub water_column: Option<WaterColumn>,
}

/// Standard gravity, m/s²: the value [`Unit::to_canonical`] turns pressure into a water column
/// with.
pub const STANDARD_GRAVITY: f64 = 9.806_65;

/// The water density [`Unit::to_canonical`] turns pressure into a water column with (fresh
/// water), kg/m³; a [`WaterColumn`] states its own.
pub const FRESH_WATER_DENSITY: f64 = 1000.0;

/// Sea-level pressure of the standard atmosphere (ISO 2533), bar.
pub const SEA_LEVEL_BAR: f64 = 1.013_25;

/// How a level read in a pressure unit becomes the height of water above the probe:
/// column = (pressure − air pressure) / (density × g).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WaterColumn {
    /// Density of the water above the probe, kg/m³ ([`FRESH_WATER_DENSITY`] unless set).
    pub density_kg_m3: f64,
    /// What the cell reads besides the water.
    pub air: Atmosphere,
}

impl Default for WaterColumn {
    fn default() -> Self {
        WaterColumn {
            density_kg_m3: FRESH_WATER_DENSITY,
            air: Atmosphere::Vented,
        }
    }
}

/// The air pressure a level probe's cell reads on top of the water.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Atmosphere {
    /// A vented (gauge, PR) cell: the air pressure is already taken out.
    Vented,
    /// An absolute (PAA) cell at this altitude, m: the standard atmosphere's pressure there is
    /// subtracted ([`Atmosphere::bar`]).
    Altitude(f64),
    /// An absolute cell with the air pressure measured on site, bar.
    Barometric(f64),
}

impl Atmosphere {
    /// The air pressure subtracted, bar: 0 for a vented cell; at an altitude h the ISO 2533
    /// standard atmosphere's 1.01325 × (1 − 2.25577e-5 × h)^5.25588 (0.9546 bar at 500 m,
    /// where sea-level pressure would leave 0.6 m of air in the level).
    pub fn bar(self) -> f64 {
        match self {
            Atmosphere::Vented => 0.0,
            Atmosphere::Altitude(h) => SEA_LEVEL_BAR * (1.0 - 2.255_77e-5 * h).powf(5.255_88),
            Atmosphere::Barometric(b) => b,
        }
    }
}

impl WaterColumn {
    /// Metres of water above the probe from `pressure` in `unit` (a pressure unit).
    fn metres(&self, unit: Unit, pressure: f64) -> f64 {
        let pascal = pressure * pascal_per(unit) - self.air.bar() * pascal_per(Unit::Bar);
        pascal / (self.density_kg_m3 * STANDARD_GRAVITY)
    }

    /// The pressure in `unit` that [`WaterColumn::metres`] turns into `metres`.
    fn pressure(&self, unit: Unit, metres: f64) -> f64 {
        let pascal =
            metres * self.density_kg_m3 * STANDARD_GRAVITY + self.air.bar() * pascal_per(Unit::Bar);
        pascal / pascal_per(unit)
    }
}

/// Pascal per `unit` for a pressure unit: [`Unit::to_canonical`] gives the column of fresh
/// water, which times [`FRESH_WATER_DENSITY`] × g is the pressure again.
fn pascal_per(unit: Unit) -> f64 {
    unit.to_canonical(1.0) * FRESH_WATER_DENSITY * STANDARD_GRAVITY
}

/// Whether `unit` measures pressure (what a level probe reads), not a length: bar, mbar, kPa,
/// MPa, psi and the conventional water-column units (mH2O = 9 806.65 Pa).
pub fn is_pressure(unit: Unit) -> bool {
    matches!(
        unit,
        Unit::Bar
            | Unit::Millibar
            | Unit::Kilopascal
            | Unit::Megapascal
            | Unit::Psi
            | Unit::MetreWaterColumn
            | Unit::CentimetreWaterColumn
            | Unit::MillimetreWaterColumn
    )
}

// ---- Byte orders ----

/// Registers travel as big-endian 16-bit words; a byte order says how the value's bytes (most
/// significant first) are laid over them. `CDAB`/`DCBA` put the least significant word first,
/// `BADC`/`DCBA` swap the two bytes inside every word. A 16-bit value has one word, so only the
/// byte swap applies to it.
impl ByteOrder {
    fn words_reversed(self) -> bool {
        matches!(self, ByteOrder::CDAB | ByteOrder::DCBA)
    }
    fn bytes_swapped(self) -> bool {
        matches!(self, ByteOrder::BADC | ByteOrder::DCBA)
    }

    /// The value's bytes, most significant first, from its registers as they came off the wire.
    fn msb_bytes(self, words: &[u16], out: &mut [u8]) {
        let n = words.len();
        for i in 0..n {
            let word = if self.words_reversed() {
                words[n - 1 - i]
            } else {
                words[i]
            };
            let [hi, lo] = word.to_be_bytes();
            let (first, second) = if self.bytes_swapped() {
                (lo, hi)
            } else {
                (hi, lo)
            };
            out[2 * i] = first;
            out[2 * i + 1] = second;
        }
    }

    /// The registers that carry `bytes` (most significant first): the inverse of decoding.
    fn wire_words(self, bytes: &[u8], out: &mut [u16]) {
        let n = out.len();
        for i in 0..n {
            let (hi, lo) = if self.bytes_swapped() {
                (bytes[2 * i + 1], bytes[2 * i])
            } else {
                (bytes[2 * i], bytes[2 * i + 1])
            };
            let at = if self.words_reversed() { n - 1 - i } else { i };
            out[at] = u16::from_be_bytes([hi, lo]);
        }
    }

    fn bytes2(self, w: &[u16]) -> [u8; 2] {
        let mut b = [0; 2];
        self.msb_bytes(&w[..1], &mut b);
        b
    }
    fn bytes4(self, w: &[u16]) -> [u8; 4] {
        let mut b = [0; 4];
        self.msb_bytes(&w[..2], &mut b);
        b
    }
    fn bytes8(self, w: &[u16]) -> [u8; 8] {
        let mut b = [0; 8];
        self.msb_bytes(&w[..4], &mut b);
        b
    }
    fn words<const N: usize>(self, bytes: &[u8]) -> [u16; N] {
        let mut w = [0; N];
        self.wire_words(bytes, &mut w);
        w
    }
}

impl fmt::Display for ByteOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl DataType {
    /// The plain (non-composite) types a technician can try on unknown registers.
    pub const PRIMITIVES: [DataType; 8] = [
        DataType::U16,
        DataType::I16,
        DataType::U32,
        DataType::I32,
        DataType::U64,
        DataType::I64,
        DataType::F32,
        DataType::F64,
    ];

    /// The type's name in profiles (`f32`, `i32_fraction`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::I32Fraction => "i32_fraction",
            DataType::I32F32Fraction => "i32_f32_fraction",
            DataType::F32Overflow => "f32_overflow",
            DataType::F32U16Rollover => "f32_u16_rollover",
        }
    }

    /// Composite totalizers are two 32-bit halves that may be read separately when a meter
    /// refuses 4-register reads.
    pub fn is_composite(self) -> bool {
        matches!(
            self,
            DataType::I32Fraction | DataType::I32F32Fraction | DataType::F32Overflow
        )
    }

    /// The fewest registers one request must carry to read this type: a composite totalizer
    /// can be read in its two 2-register halves ([`plan_reads`]), every other value needs all
    /// its registers at once.
    pub fn smallest_read(self) -> u16 {
        if self.is_composite() {
            2
        } else {
            self.registers()
        }
    }

    /// For a composite totalizer: where (0 or 2, in words) its half that changes only when the
    /// other wraps starts: the overflow of an `f32_overflow` total, the integer part of an
    /// `i32_fraction` or `i32_f32_fraction` one.
    pub fn steady_half(self) -> u16 {
        match self {
            DataType::F32Overflow => 2,
            _ => 0,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---- Raw values ----

/// A primitive value as its registers hold it, before scale, offset and unit. Integers stay
/// integers so a technician sees the exact count a meter shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RawValue {
    Unsigned(u64),
    Signed(i64),
    F32(f32),
    F64(f64),
}

impl RawValue {
    /// Decodes `words` as the primitive `data_type` in `order`. `None` when the word count does
    /// not match the type or the type is a composite totalizer ([`Point::decode_raw`] handles
    /// those); [`DataType::Bool`] yields bit 0.
    pub fn decode(data_type: DataType, order: ByteOrder, words: &[u16]) -> Option<RawValue> {
        let expect = match data_type {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            _ => return None,
        };
        if words.len() != expect {
            return None;
        }
        Some(match data_type {
            DataType::Bool => {
                RawValue::Unsigned(u64::from(u16::from_be_bytes(order.bytes2(words)) & 1))
            }
            DataType::U16 => RawValue::Unsigned(u16::from_be_bytes(order.bytes2(words)).into()),
            DataType::I16 => RawValue::Signed(i16::from_be_bytes(order.bytes2(words)).into()),
            DataType::U32 => RawValue::Unsigned(u32::from_be_bytes(order.bytes4(words)).into()),
            DataType::I32 => RawValue::Signed(i32::from_be_bytes(order.bytes4(words)).into()),
            DataType::F32 => RawValue::F32(f32::from_be_bytes(order.bytes4(words))),
            DataType::U64 => RawValue::Unsigned(u64::from_be_bytes(order.bytes8(words))),
            DataType::I64 => RawValue::Signed(i64::from_be_bytes(order.bytes8(words))),
            DataType::F64 => RawValue::F64(f64::from_be_bytes(order.bytes8(words))),
            _ => return None,
        })
    }

    /// The value as `f64` (integers above 2^53 round to the nearest representable value).
    pub fn to_f64(self) -> f64 {
        match self {
            RawValue::Unsigned(v) => v as f64,
            RawValue::Signed(v) => v as f64,
            RawValue::F32(v) => f64::from(v),
            RawValue::F64(v) => v,
        }
    }

    /// A float that no meter would mean: NaN, infinite, subnormal, or outside ±1e15 / inside
    /// ±1e-15 (what a wrong byte order typically produces). Integers are never implausible on
    /// their own.
    pub fn implausibility(self) -> Option<&'static str> {
        let (v, subnormal) = match self {
            RawValue::F32(v) => (f64::from(v), v.is_subnormal()),
            RawValue::F64(v) => (v, v.is_subnormal()),
            RawValue::Unsigned(_) | RawValue::Signed(_) => return None,
        };
        if v.is_nan() {
            Some("NaN")
        } else if v.is_infinite() {
            Some("infinite")
        } else if subnormal {
            Some("denormal")
        } else if v != 0.0 && !(1e-15..=1e15).contains(&v.abs()) {
            Some("absurd")
        } else {
            None
        }
    }
}

impl fmt::Display for RawValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawValue::Unsigned(v) => write!(f, "{v}"),
            RawValue::Signed(v) => write!(f, "{v}"),
            RawValue::F32(v) => write!(f, "{v:?}"),
            RawValue::F64(v) => write!(f, "{v:?}"),
        }
    }
}

// ---- Decoding and encoding points ----

/// A point's registers could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "{channel} at {fc} address {address}: {data_type} in {order} needs {expected} words, got {got}"
    )]
    WrongLength {
        channel: Channel,
        fc: Fc,
        address: u16,
        data_type: DataType,
        order: ByteOrder,
        expected: usize,
        got: usize,
    },
}

/// A value could not be put into a point's registers (simulator and tests).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("{channel} at {fc} address {address}: {value} does not fit {data_type}")]
    OutOfRange {
        channel: Channel,
        fc: Fc,
        address: u16,
        data_type: DataType,
        value: f64,
    },
    #[error("{channel} at {fc} address {address}: scale {scale} cannot be inverted")]
    ZeroScale {
        channel: Channel,
        fc: Fc,
        address: u16,
        scale: f64,
    },
}

/// Where an [`DataType::F32Overflow`] total is split when encoding: the E+H manual shows two
/// overflows read as 2E7, i.e. the value wraps every 1e7 units.
const F32_OVERFLOW_WRAP: f64 = 1e7;

impl Point {
    /// Words [`Point::decode`] takes: the point's registers at `address`, followed for
    /// [`DataType::F32U16Rollover`] by the counter register at `overflow_address`.
    pub fn word_count(&self) -> u16 {
        match self.data_type {
            DataType::F32U16Rollover => 3,
            t => t.registers(),
        }
    }

    /// The value as its registers hold it, composites composed, before scale, offset and unit.
    /// NaN and infinities are returned, not rejected: validation flags them.
    pub fn decode_raw(&self, words: &[u16]) -> Result<f64, DecodeError> {
        let expected = usize::from(self.word_count());
        let wrong_length = || DecodeError::WrongLength {
            channel: self.channel.clone(),
            fc: self.fc,
            address: self.address,
            data_type: self.data_type,
            order: self.order,
            expected,
            got: words.len(),
        };
        if words.len() != expected {
            return Err(wrong_length());
        }
        let o = self.order;
        let i32_at = |at: usize| f64::from(i32::from_be_bytes(o.bytes4(&words[at..at + 2])));
        let f32_at = |at: usize| f64::from(f32::from_be_bytes(o.bytes4(&words[at..at + 2])));
        Ok(match self.data_type {
            DataType::I32Fraction => i32_at(0) + i32_at(2) * self.fraction_scale,
            DataType::I32F32Fraction => i32_at(0) + f32_at(2),
            DataType::F32Overflow => f32_at(0) + f32_at(2) * self.overflow_factor,
            DataType::F32U16Rollover => {
                let counter = u16::from_be_bytes(o.bytes2(&words[2..3]));
                f32_at(0) + f64::from(counter) * self.overflow_factor
            }
            t => RawValue::decode(t, o, words)
                .ok_or_else(wrong_length)?
                .to_f64(),
        })
    }

    /// The value in the point's own unit (raw × scale + offset): what the meter's display shows.
    pub fn decode_in_unit(&self, words: &[u16]) -> Result<f64, DecodeError> {
        Ok(self.decode_raw(words)? * self.scale + self.offset)
    }

    /// The value as the agent stores it ([`Point::to_stored`] of [`Point::decode_in_unit`]).
    pub fn decode(&self, words: &[u16]) -> Result<f64, DecodeError> {
        Ok(self.to_stored(self.decode_in_unit(words)?))
    }

    /// The value the agent stores for `in_unit` (the point's scaled value in its unit): flow,
    /// total and level in the canonical unit of their dimension (a pressure level as a water
    /// column, [`WaterColumn`]); every other channel exactly as read, in its own unit. The
    /// field-fidelity rule "extras are kept as read" is enforced here: a `bar` extra stays bar.
    pub fn to_stored(&self, in_unit: f64) -> f64 {
        if !self.channel.is_canonical() {
            return in_unit;
        }
        match &self.water_column {
            Some(w) if is_pressure(self.unit) => w.metres(self.unit, in_unit),
            _ => self.unit.to_canonical(in_unit),
        }
    }

    /// The value in the point's unit that [`Point::to_stored`] turns into `stored`.
    pub fn from_stored(&self, stored: f64) -> f64 {
        if !self.channel.is_canonical() {
            return stored;
        }
        match &self.water_column {
            Some(w) if is_pressure(self.unit) => w.pressure(self.unit, stored),
            _ => self.unit.from_canonical(stored),
        }
    }

    /// The words that [`Point::decode`] turns back into `canonical` (the stored value, within
    /// the type's resolution). Integers round to nearest; composites split as the meter would: an
    /// [`DataType::F32Overflow`] total wraps its value every 1e7 units, an
    /// [`DataType::F32U16Rollover`] total every `overflow_factor` units.
    pub fn encode(&self, canonical: f64) -> Result<Vec<u16>, EncodeError> {
        if self.scale == 0.0 || !self.scale.is_finite() {
            return Err(EncodeError::ZeroScale {
                channel: self.channel.clone(),
                fc: self.fc,
                address: self.address,
                scale: self.scale,
            });
        }
        let raw = (self.from_stored(canonical) - self.offset) / self.scale;
        let out_of_range = || EncodeError::OutOfRange {
            channel: self.channel.clone(),
            fc: self.fc,
            address: self.address,
            data_type: self.data_type,
            value: canonical,
        };
        let o = self.order;
        let int = |min: f64, max: f64| -> Result<f64, EncodeError> {
            let r = raw.round();
            if r.is_finite() && r >= min && r <= max {
                Ok(r)
            } else {
                Err(out_of_range())
            }
        };
        let f32_words = |v: f64| o.words::<2>(&(v as f32).to_be_bytes());
        let i32_words = |v: i32| o.words::<2>(&v.to_be_bytes());
        let words: Vec<u16> = match self.data_type {
            DataType::Bool => {
                let bit = u16::from(raw != 0.0 && !raw.is_nan());
                o.words::<1>(&bit.to_be_bytes()).to_vec()
            }
            DataType::U16 => {
                let v = int(0.0, f64::from(u16::MAX))? as u16;
                o.words::<1>(&v.to_be_bytes()).to_vec()
            }
            DataType::I16 => {
                let v = int(f64::from(i16::MIN), f64::from(i16::MAX))? as i16;
                o.words::<1>(&v.to_be_bytes()).to_vec()
            }
            DataType::U32 => {
                let v = int(0.0, f64::from(u32::MAX))? as u32;
                o.words::<2>(&v.to_be_bytes()).to_vec()
            }
            DataType::I32 => {
                let v = int(f64::from(i32::MIN), f64::from(i32::MAX))? as i32;
                i32_words(v).to_vec()
            }
            // 2^64 itself is not a u64; the largest f64 below it is.
            DataType::U64 => {
                let v = int(0.0, 18_446_744_073_709_549_568.0)? as u64;
                o.words::<4>(&v.to_be_bytes()).to_vec()
            }
            DataType::I64 => {
                let v = int(-9_223_372_036_854_775_808.0, 9_223_372_036_854_774_784.0)? as i64;
                o.words::<4>(&v.to_be_bytes()).to_vec()
            }
            DataType::F32 => {
                if raw.is_finite() && raw.abs() > f64::from(f32::MAX) {
                    return Err(out_of_range());
                }
                f32_words(raw).to_vec()
            }
            DataType::F64 => o.words::<4>(&raw.to_be_bytes()).to_vec(),
            DataType::I32Fraction => {
                let (i, f) = split_fraction(raw, self.fraction_scale).ok_or_else(out_of_range)?;
                [i32_words(i), i32_words(f)].concat()
            }
            DataType::I32F32Fraction => {
                let whole = raw.trunc();
                if !(f64::from(i32::MIN)..=f64::from(i32::MAX)).contains(&whole) {
                    return Err(out_of_range());
                }
                [i32_words(whole as i32), f32_words(raw - whole)].concat()
            }
            DataType::F32Overflow => {
                let (value, wraps) = split_wraps(raw, F32_OVERFLOW_WRAP);
                let overflow = if self.overflow_factor == 0.0 {
                    0.0
                } else {
                    wraps * F32_OVERFLOW_WRAP / self.overflow_factor
                };
                if self.overflow_factor == 0.0 && wraps != 0.0 {
                    return Err(out_of_range());
                }
                [f32_words(value), f32_words(overflow)].concat()
            }
            DataType::F32U16Rollover => {
                let (value, wraps) = if self.overflow_factor > 0.0 {
                    split_wraps(raw, self.overflow_factor)
                } else {
                    (raw, 0.0)
                };
                if !(0.0..=f64::from(u16::MAX)).contains(&wraps) {
                    return Err(out_of_range());
                }
                let counter = o.words::<1>(&(wraps as u16).to_be_bytes());
                [f32_words(value).as_slice(), counter.as_slice()].concat()
            }
        };
        Ok(words)
    }
}

/// `raw` as whole wraps of `wrap` plus a remainder in `[0, wrap)`; non-finite values keep no
/// wraps so NaN and infinities reach the registers unchanged.
fn split_wraps(raw: f64, wrap: f64) -> (f64, f64) {
    if !raw.is_finite() {
        return (raw, 0.0);
    }
    let wraps = (raw / wrap).floor();
    (raw - wraps * wrap, wraps)
}

/// `raw` as an int32 integer part and an int32 fraction count of `fraction_scale`, both with the
/// sign of `raw`; `None` when either part does not fit an int32.
fn split_fraction(raw: f64, fraction_scale: f64) -> Option<(i32, i32)> {
    if !raw.is_finite() {
        return None;
    }
    let mut whole = raw.trunc();
    let mut frac = if fraction_scale > 0.0 && fraction_scale.is_finite() {
        ((raw - whole) / fraction_scale).round()
    } else {
        0.0
    };
    // Rounding the fraction up to a whole unit carries into the integer part.
    if fraction_scale > 0.0 && (frac * fraction_scale).abs() >= 1.0 {
        whole += raw.signum();
        frac = 0.0;
    }
    let range = f64::from(i32::MIN)..=f64::from(i32::MAX);
    (range.contains(&whole) && range.contains(&frac)).then_some((whole as i32, frac as i32))
}

// ---- Read planning ----

/// Unread registers a block may carry between two points to save a request. Meters answer
/// holes inside their map with filler (Krohne documents one for this purpose); a larger gap
/// costs more bus time than a second request.
pub const MAX_HOLE: u16 = 8;

/// Most registers one fc 03/04 request may ask for (Modbus application protocol, §6.3).
pub const MAX_REGISTERS_PER_READ: u16 = 125;

/// Most bits one fc 01/02 request may ask for (Modbus application protocol, §6.1).
pub const MAX_BITS_PER_READ: u16 = 2000;

/// One read request of a poll: `count` registers (or bits) of one function code from
/// `address`, and the points (or parts of points) it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBlock {
    pub fc: Fc,
    pub address: u16,
    pub count: u16,
    pub pieces: Vec<Piece>,
}

/// Words of one point carried by a [`ReadBlock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index of the point in the slice given to [`plan_reads`].
    pub point: usize,
    /// Where the piece starts in the block's reply.
    pub offset: u16,
    pub len: u16,
    /// Where the piece goes in the point's words (see [`Point::word_count`]). Two pieces of one
    /// point with the same `at` read the same registers twice and must agree ([`assemble`]).
    pub at: u16,
}

/// Groups `points` into as few read requests as the meter allows.
///
/// Points of the same fc are sorted by address and merged while the next one starts at most
/// [`MAX_HOLE`] registers after the block's end and the block stays within
/// `max_regs_per_read` (itself capped at [`MAX_REGISTERS_PER_READ`]; bit reads use
/// [`MAX_BITS_PER_READ`]). A value is never split: all words of a 16/32/64-bit value come from
/// one request, so a value larger than the limit gets a block of its own size. The rollover
/// counter of an [`DataType::F32U16Rollover`] point joins whichever block is near it; when
/// that is not its value's block, the counter is read a second time on the value's other side
/// and the two reads must agree (no wrap between them), as for a composite read in halves.
///
/// The one exception is a composite totalizer (two 32-bit halves) on a meter that reads fewer
/// than 4 registers at a time (Promag 800). Its halves come from separate requests, and a total
/// read in halves can tear: if the low half wraps between the two reads, value and overflow
/// belong to different instants and the total is off by a whole wrap (1e7 on an E+H). So the
/// half that changes only at a wrap ([`DataType::steady_half`]: the overflow, or the integer
/// part) is read before and again after the other half, in three requests of their own, in that
/// order; [`assemble`] keeps the total only when both reads of it agree, which proves no wrap
/// fell between them.
pub fn plan_reads(points: &[Point], max_regs_per_read: u16) -> Vec<ReadBlock> {
    plan(points, max_regs_per_read, MAX_HOLE)
}

/// Like [`plan_reads`], but never across a hole: only points whose registers touch are read
/// together. For a device that refuses (exception 02) a read spanning registers it does not
/// map, although the points themselves exist.
pub fn plan_reads_apart(points: &[Point], max_regs_per_read: u16) -> Vec<ReadBlock> {
    plan(points, max_regs_per_read, 0)
}

fn plan(points: &[Point], max_regs_per_read: u16, max_hole: u16) -> Vec<ReadBlock> {
    struct Span {
        fc: Fc,
        start: u32,
        len: u16,
        point: usize,
        at: u16,
    }
    let reg_limit = max_regs_per_read.clamp(1, MAX_REGISTERS_PER_READ);
    let mut spans = Vec::with_capacity(points.len() + 1);
    let mut halves = Vec::new();
    for (i, p) in points.iter().enumerate() {
        let start = u32::from(p.address);
        let regs = p.data_type.registers();
        if p.data_type.is_composite() && !p.fc.is_bits() && reg_limit < regs {
            let steady = p.data_type.steady_half();
            let moving = 2 - steady;
            // Steady, moving, steady again: the order the poller sends them in.
            for at in [steady, moving, steady] {
                halves.push(ReadBlock {
                    fc: p.fc,
                    address: p.address.saturating_add(at),
                    count: 2,
                    pieces: vec![Piece {
                        point: i,
                        offset: 0,
                        len: 2,
                        at,
                    }],
                });
            }
        } else {
            spans.push(Span {
                fc: p.fc,
                start,
                len: regs,
                point: i,
                at: 0,
            });
        }
        if let (DataType::F32U16Rollover, Some(counter)) = (p.data_type, p.overflow_address) {
            spans.push(Span {
                fc: p.fc,
                start: u32::from(counter),
                len: 1,
                point: i,
                at: 2,
            });
        }
    }
    spans.sort_by_key(|s| (s.fc, s.start, std::cmp::Reverse(s.len)));

    struct Open {
        fc: Fc,
        start: u32,
        end: u32,
        pieces: Vec<(usize, u32, u16, u16)>,
    }
    let mut open: Vec<Open> = Vec::new();
    for s in spans {
        let limit = u32::from(if s.fc.is_bits() {
            MAX_BITS_PER_READ
        } else {
            reg_limit
        });
        let end = s.start + u32::from(s.len);
        let joins = open.last().is_some_and(|b| {
            b.fc == s.fc
                && s.start <= b.end + u32::from(max_hole)
                && b.end.max(end) - b.start <= limit
        });
        match open.last_mut() {
            Some(b) if joins => {
                b.end = b.end.max(end);
                b.pieces.push((s.point, s.start, s.len, s.at));
            }
            _ => open.push(Open {
                fc: s.fc,
                start: s.start,
                end,
                pieces: vec![(s.point, s.start, s.len, s.at)],
            }),
        }
    }
    let mut blocks: Vec<ReadBlock> = open
        .into_iter()
        .map(|b| ReadBlock {
            fc: b.fc,
            // Spans start at a u16 address; only the end may pass 65535, and a block reaching
            // past the address space is still asked for so the meter's exception names it.
            address: b.start as u16,
            count: (b.end - b.start).min(u32::from(u16::MAX)) as u16,
            pieces: b
                .pieces
                .into_iter()
                .map(|(point, start, len, at)| Piece {
                    point,
                    offset: (start - b.start) as u16,
                    len,
                    at,
                })
                .collect(),
        })
        .collect();
    recheck_rollover_counters(points, &mut blocks);
    blocks.extend(halves);
    blocks
}

/// A rollover counter read in another request than its value can tear: if the value wraps
/// between the two requests, the counter and the value belong to different sides of the wrap
/// and the total is off by a whole `overflow_factor`. So when they are in different blocks,
/// the counter is read once more on its own, on the other side of the value's block (first
/// when its own block comes after the value's, last otherwise); [`assemble`] keeps the total
/// only when both reads of the counter agree, which proves no wrap fell between them.
fn recheck_rollover_counters(points: &[Point], blocks: &mut Vec<ReadBlock>) {
    let mut before = Vec::new();
    for (i, p) in points.iter().enumerate() {
        let (DataType::F32U16Rollover, Some(counter)) = (p.data_type, p.overflow_address) else {
            continue;
        };
        let holding = |at: u16| {
            blocks
                .iter()
                .position(|b| b.pieces.iter().any(|pc| pc.point == i && pc.at == at))
        };
        let (Some(value), Some(count)) = (holding(0), holding(2)) else {
            continue;
        };
        if value == count {
            continue;
        }
        let again = ReadBlock {
            fc: p.fc,
            address: counter,
            count: 1,
            pieces: vec![Piece {
                point: i,
                offset: 0,
                len: 1,
                at: 2,
            }],
        };
        if count > value {
            before.push(again);
        } else {
            blocks.push(again);
        }
    }
    blocks.splice(0..0, before);
}

/// Puts each point's words together from the replies to its blocks (`replies[i]` answers
/// `blocks[i]`; `None` for a failed read). A point is `None` when any block it needs failed or
/// answered short, or when two pieces for the same words (a composite's steady half, read
/// before and after its other half) disagree: the total is torn and no total is better than a
/// wrong one. Otherwise it gets the words [`Point::decode`] takes (fewer if its profile lacks
/// an `overflow_address`, which decoding then reports).
pub fn assemble(
    point_count: usize,
    blocks: &[ReadBlock],
    replies: &[Option<Vec<u16>>],
) -> Vec<Option<Vec<u16>>> {
    let mut words: Vec<Option<Vec<u16>>> = vec![Some(Vec::new()); point_count];
    let mut parts: Vec<Vec<(u16, &[u16])>> = vec![Vec::new(); point_count];
    for (block, reply) in blocks
        .iter()
        .zip(replies.iter().chain(std::iter::repeat(&None)))
    {
        for piece in &block.pieces {
            let Some(slot) = words.get_mut(piece.point) else {
                continue;
            };
            let range =
                usize::from(piece.offset)..usize::from(piece.offset) + usize::from(piece.len);
            match reply.as_deref().and_then(|r| r.get(range)) {
                Some(w) => parts[piece.point].push((piece.at, w)),
                None => *slot = None,
            }
        }
    }
    for (slot, mut p) in words.iter_mut().zip(parts) {
        // Stable: the two reads of a steady half stay in read order, side by side.
        p.sort_by_key(|(at, _)| *at);
        let torn = p
            .windows(2)
            .any(|pair| pair[0].0 == pair[1].0 && pair[0].1 != pair[1].1);
        if torn {
            *slot = None;
        }
        if let Some(w) = slot {
            p.dedup_by_key(|(at, _)| *at);
            for (_, part) in p {
                w.extend_from_slice(part);
            }
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn point(data_type: DataType, order: ByteOrder) -> Point {
        Point {
            channel: Channel::Total,
            fc: Fc::Holding,
            address: 3017,
            data_type,
            order,
            scale: 1.0,
            offset: 0.0,
            unit: Unit::CubicMetre,
            fraction_scale: 1e-9,
            overflow_factor: 1.0,
            overflow_address: (data_type == DataType::F32U16Rollover).then_some(231),
            rollover_at: None,
            water_column: None,
        }
    }

    const ALL_TYPES: [DataType; 13] = [
        DataType::Bool,
        DataType::U16,
        DataType::I16,
        DataType::U32,
        DataType::I32,
        DataType::U64,
        DataType::I64,
        DataType::F32,
        DataType::F64,
        DataType::I32Fraction,
        DataType::I32F32Fraction,
        DataType::F32Overflow,
        DataType::F32U16Rollover,
    ];

    #[test]
    fn f32_known_vectors_in_every_order() {
        // 12.5 = 0x41480000
        let cases = [
            (ByteOrder::ABCD, [0x4148, 0x0000]),
            (ByteOrder::CDAB, [0x0000, 0x4148]),
            (ByteOrder::BADC, [0x4841, 0x0000]),
            (ByteOrder::DCBA, [0x0000, 0x4841]),
        ];
        for (order, words) in cases {
            let p = point(DataType::F32, order);
            assert_eq!(p.decode(&words), Ok(12.5), "{order}");
            assert_eq!(p.encode(12.5).unwrap(), words, "{order}");
        }
    }

    #[test]
    fn sixty_four_bit_orders_follow_the_eight_byte_patterns() {
        // Bytes A..H = 01 02 03 04 05 06 07 08.
        let value = 0x0102_0304_0506_0708_u64;
        let cases = [
            (ByteOrder::ABCD, [0x0102, 0x0304, 0x0506, 0x0708]), // ABCDEFGH
            (ByteOrder::DCBA, [0x0807, 0x0605, 0x0403, 0x0201]), // HGFEDCBA
            (ByteOrder::CDAB, [0x0708, 0x0506, 0x0304, 0x0102]), // GHEFCDAB
            (ByteOrder::BADC, [0x0201, 0x0403, 0x0605, 0x0807]), // BADCFEHG
        ];
        for (order, words) in cases {
            assert_eq!(
                RawValue::decode(DataType::U64, order, &words),
                Some(RawValue::Unsigned(value)),
                "{order}"
            );
        }
        // Siemens MAG 6000 totalizer: f64 big-endian.
        let words = DataType::F64;
        let p = point(words, ByteOrder::ABCD);
        let enc = p.encode(1234.5678).unwrap();
        assert_eq!(enc, [0x4093, 0x4A45, 0x6D5C, 0xFAAD]);
        // Arad Octave: f64 fully reversed.
        let p = point(DataType::F64, ByteOrder::DCBA);
        assert_eq!(p.decode(&[0xADFA, 0x5C6D, 0x454A, 0x9340]), Ok(1234.5678));
    }

    #[test]
    fn sixteen_bit_values_only_honour_the_byte_swap() {
        for (order, expect) in [
            (ByteOrder::ABCD, 0x1234),
            (ByteOrder::CDAB, 0x1234),
            (ByteOrder::BADC, 0x3412),
            (ByteOrder::DCBA, 0x3412),
        ] {
            assert_eq!(
                RawValue::decode(DataType::U16, order, &[0x1234]),
                Some(RawValue::Unsigned(expect))
            );
        }
        assert_eq!(
            RawValue::decode(DataType::I16, ByteOrder::ABCD, &[0xFFFE]),
            Some(RawValue::Signed(-2))
        );
    }

    #[test]
    fn mag8000_int_plus_fraction_totalizer() {
        let p = point(DataType::I32Fraction, ByteOrder::ABCD);
        // 123456 = 0x0001E240, 789000000 = 0x2F072F40
        let words = [0x0001, 0xE240, 0x2F07, 0x2F40];
        let v = p.decode(&words).unwrap();
        assert!((v - 123_456.789).abs() < 1e-9, "{v}");
        assert_eq!(p.encode(123_456.789).unwrap(), words);
    }

    #[test]
    fn tuf2000_long_plus_real4_fraction_low_word_first() {
        let p = Point {
            unit: Unit::Litre,
            ..point(DataType::I32F32Fraction, ByteOrder::CDAB)
        };
        // LONG 1500 = 0x000005DC -> [0x05DC, 0x0000]; REAL4 0.25 = 0x3E800000 -> [0x0000, 0x3E80]
        let words = [0x05DC, 0x0000, 0x0000, 0x3E80];
        assert_eq!(p.decode_in_unit(&words), Ok(1500.25));
        assert_eq!(p.decode(&words), Ok(1.50025));
        assert_eq!(p.encode(1.50025).unwrap(), words);
    }

    #[test]
    fn endress_sum_plus_overflow() {
        let p = point(DataType::F32Overflow, ByteOrder::CDAB);
        // SUM 1234.5 = 0x449A5000, OVERFLOW 2e7 = 0x4B989680, word-swapped.
        let words = [0x5000, 0x449A, 0x9680, 0x4B98];
        assert_eq!(p.decode(&words), Ok(20_001_234.5));
        assert_eq!(p.encode(20_001_234.5).unwrap(), words);
        // The same total with an overflow register that counts wraps.
        let counting = Point {
            overflow_factor: 1e7,
            ..p.clone()
        };
        let enc = counting.encode(20_001_234.5).unwrap();
        assert_eq!(
            RawValue::decode(DataType::F32, ByteOrder::CDAB, &enc[2..]),
            Some(RawValue::F32(2.0))
        );
        assert_eq!(counting.decode(&enc), Ok(20_001_234.5));
    }

    #[test]
    fn badger_float_plus_rollover_counter() {
        let p = Point {
            overflow_factor: 1e6,
            ..point(DataType::F32U16Rollover, ByteOrder::ABCD)
        };
        // 3 rollovers of 1e6 plus 12.5.
        let words = [0x4148, 0x0000, 3];
        assert_eq!(p.decode(&words), Ok(3_000_012.5));
        assert_eq!(p.encode(3_000_012.5).unwrap(), words);
        assert!(matches!(
            p.decode(&words[..2]),
            Err(DecodeError::WrongLength {
                expected: 3,
                got: 2,
                ..
            })
        ));
    }

    #[test]
    fn scale_offset_and_unit_apply_in_that_order() {
        // Arkon MAGS1: longint x 0.001 m3/h.
        let p = Point {
            channel: Channel::Flow,
            scale: 0.001,
            unit: Unit::CubicMetrePerHour,
            ..point(DataType::I32, ByteOrder::ABCD)
        };
        let words = p.encode(10.0).unwrap(); // 10 L/s = 36 m3/h = 36000 counts
        assert_eq!(words, [0x0000, 36_000]);
        assert!((p.decode(&words).unwrap() - 10.0).abs() < 1e-12);
        // Keller-style offset in bar.
        let p = Point {
            channel: Channel::Level,
            offset: -1.0,
            unit: Unit::Bar,
            ..point(DataType::F32, ByteOrder::ABCD)
        };
        let v = p.decode(&[0x4000, 0x0000]).unwrap(); // 2.0 bar - 1.0 = 1 bar of water
        assert!((v - 10.197_162).abs() < 1e-6, "{v}");
    }

    #[test]
    fn nan_is_decoded_not_rejected() {
        let p = point(DataType::F32, ByteOrder::ABCD);
        assert!(p.decode(&[0x7FC0, 0x0000]).unwrap().is_nan());
        assert!(p.decode(&[0x7F80, 0x0000]).unwrap().is_infinite());
        assert!(p.decode(&p.encode(f64::NAN).unwrap()).unwrap().is_nan());
    }

    #[test]
    fn bool_from_bits_and_from_bit_zero_of_a_register() {
        let p = Point {
            channel: Channel::Direction,
            fc: Fc::DiscreteInputs,
            ..point(DataType::Bool, ByteOrder::ABCD)
        };
        assert_eq!(p.decode(&[1]), Ok(1.0));
        assert_eq!(p.decode(&[0]), Ok(0.0));
        let r = Point {
            fc: Fc::Holding,
            ..p.clone()
        };
        assert_eq!(r.decode(&[0x8003]), Ok(1.0));
        assert_eq!(r.decode(&[0x8002]), Ok(0.0));
        assert_eq!(r.encode(1.0).unwrap(), [1]);
    }

    #[test]
    fn encode_rejects_what_does_not_fit() {
        let p = point(DataType::U16, ByteOrder::ABCD);
        assert!(matches!(
            p.encode(65_536.0),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            p.encode(-1.0),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            p.encode(f64::NAN),
            Err(EncodeError::OutOfRange { .. })
        ));
        let z = Point {
            scale: 0.0,
            ..p.clone()
        };
        assert!(matches!(z.encode(1.0), Err(EncodeError::ZeroScale { .. })));
        let err = p.encode(1e9).unwrap_err().to_string();
        assert!(err.contains("fc 03 address 3017"), "{err}");
    }

    #[test]
    fn type_names_are_the_profile_names() {
        for t in ALL_TYPES {
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                format!("\"{}\"", t.name())
            );
        }
    }

    #[test]
    fn wrong_length_names_the_register() {
        let p = point(DataType::F64, ByteOrder::ABCD);
        let err = p.decode(&[1, 2]).unwrap_err().to_string();
        assert!(
            err.contains("fc 03 address 3017") && err.contains("total"),
            "{err}"
        );
    }

    /// Largest difference decode(encode(v)) may have from v, in raw units.
    fn resolution(t: DataType, v: f64) -> f64 {
        let f32_ulp = |x: f64| (x.abs().max(1.0) * f64::from(f32::EPSILON)).max(1e-30);
        match t {
            DataType::Bool => f64::INFINITY,
            DataType::U16 | DataType::I16 | DataType::U32 | DataType::I32 => 0.5,
            DataType::U64 | DataType::I64 => 0.5 + v.abs() * f64::EPSILON,
            DataType::F32 | DataType::I32F32Fraction => f32_ulp(v),
            DataType::F64 => v.abs() * f64::EPSILON,
            DataType::I32Fraction => 1e-9 + v.abs() * f64::EPSILON * 2.0,
            DataType::F32Overflow | DataType::F32U16Rollover => f32_ulp(F32_OVERFLOW_WRAP),
        }
    }

    fn range(t: DataType) -> std::ops::RangeInclusive<f64> {
        match t {
            DataType::Bool => 0.0..=1.0,
            DataType::U16 => 0.0..=65_535.0,
            DataType::I16 => -32_768.0..=32_767.0,
            DataType::U32 => 0.0..=4_294_967_295.0,
            DataType::I32 | DataType::I32Fraction | DataType::I32F32Fraction => {
                -2_147_483_000.0..=2_147_483_000.0
            }
            DataType::U64 => 0.0..=1.8e19,
            DataType::I64 => -9.2e18..=9.2e18,
            DataType::F32 => -3e38..=3e38,
            DataType::F64 => -1e300..=1e300,
            // The overflow register holds n × 1e7 as f32: exact while n < 2^24 / 78125.
            DataType::F32Overflow => 0.0..=2e9,
            DataType::F32U16Rollover => 0.0..=6.5e10,
        }
    }

    proptest! {
        #[test]
        fn encode_then_decode_round_trips(
            t in proptest::sample::select(ALL_TYPES.to_vec()),
            order in proptest::sample::select(ByteOrder::ALL.to_vec()),
            unit_fraction in 0.0f64..=1.0,
        ) {
            let r = range(t);
            let v = r.start() + (r.end() - r.start()) * unit_fraction;
            let v = if t == DataType::Bool { v.round() } else { v };
            let p = Point { overflow_factor: if t == DataType::F32U16Rollover { 1e6 } else { 1.0 }, ..point(t, order) };
            let words = p.encode(v).unwrap();
            prop_assert_eq!(words.len(), usize::from(p.word_count()));
            let back = p.decode(&words).unwrap();
            prop_assert!((back - v).abs() <= resolution(t, v), "{t} {order}: {v} -> {words:?} -> {back}");
        }

        #[test]
        fn decode_never_panics(
            t in proptest::sample::select(ALL_TYPES.to_vec()),
            order in proptest::sample::select(ByteOrder::ALL.to_vec()),
            words in proptest::collection::vec(any::<u16>(), 0..6),
            scale in any::<f64>(),
        ) {
            let p = Point { scale, ..point(t, order) };
            let _ = p.decode(&words);
            for t in DataType::PRIMITIVES {
                if let Some(v) = RawValue::decode(t, order, &words) {
                    let _ = (v.to_string(), v.implausibility());
                }
            }
        }

        #[test]
        fn raw_words_survive_decode_then_encode(
            order in proptest::sample::select(ByteOrder::ALL.to_vec()),
            words in proptest::collection::vec(any::<u16>(), 4),
        ) {
            for t in [DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::F64] {
                let p = point(t, order);
                let w = &words[..usize::from(t.registers())];
                let v = p.decode(w).unwrap();
                if v.is_finite() {
                    prop_assert_eq!(p.encode(v).unwrap(), w.to_vec(), "{} {}", t, order);
                }
            }
        }

        #[test]
        fn plans_cover_every_point_within_the_limit(
            addrs in proptest::collection::vec((0u16..200, 0usize..13, any::<bool>()), 1..20),
            limit in 1u16..130,
        ) {
            let points: Vec<Point> = addrs.iter().map(|&(a, t, input)| Point {
                address: a,
                fc: if input { Fc::Input } else { Fc::Holding },
                overflow_address: Some(a.wrapping_add(300)),
                ..point(ALL_TYPES[t], ByteOrder::ABCD)
            }).collect();
            let blocks = plan_reads(&points, limit);
            for b in &blocks {
                let largest_piece = b.pieces.iter().map(|p| p.len).max().unwrap_or(0);
                prop_assert!(b.count <= limit.min(MAX_REGISTERS_PER_READ).max(largest_piece));
                for piece in &b.pieces {
                    let p = &points[piece.point];
                    prop_assert_eq!(p.fc, b.fc);
                    prop_assert!(piece.offset + piece.len <= b.count);
                }
            }
            // Reading the registers as a meter would and assembling gives every point its words.
            let image = |fc: Fc, a: u32| (a as u16) ^ if fc == Fc::Input { 0xAAAA } else { 0 };
            let replies: Vec<_> = blocks.iter().map(|b| {
                Some((0..b.count).map(|i| image(b.fc, u32::from(b.address) + u32::from(i))).collect())
            }).collect();
            let words = assemble(points.len(), &blocks, &replies);
            for (p, w) in points.iter().zip(&words) {
                let w = w.as_ref().unwrap();
                prop_assert_eq!(w.len(), usize::from(p.word_count()));
                for (i, word) in w.iter().enumerate().take(usize::from(p.data_type.registers())) {
                    prop_assert_eq!(*word, image(p.fc, u32::from(p.address) + i as u32));
                }
            }
        }
    }

    #[test]
    fn plan_merges_near_points_and_leaves_far_ones_alone() {
        let at = |a: u16, t: DataType| Point {
            address: a,
            ..point(t, ByteOrder::ABCD)
        };
        // MAG 8000: flow 3002 f32, status 3016 u16, total 3017 i32_fraction.
        let points = [
            at(3002, DataType::F32),
            at(3016, DataType::U16),
            at(3017, DataType::I32Fraction),
            at(3030, DataType::U16),
        ];
        let blocks = plan_reads(&points, 125);
        let spans: Vec<_> = blocks.iter().map(|b| (b.address, b.count)).collect();
        // 3004..3016 is a 12-register hole: too big. 3021..3030 is a 9-register hole: too big.
        assert_eq!(spans, [(3002, 2), (3016, 5), (3030, 1)]);

        let blocks = plan_reads(&[at(0, DataType::F32), at(10, DataType::F32)], 125);
        assert_eq!(blocks.len(), 1, "an 8-register hole is read through");
        assert_eq!((blocks[0].count, blocks[0].pieces[1].offset), (12, 10));
    }

    #[test]
    fn two_register_limit_reads_every_float_alone_and_splits_composites() {
        // Promag 800: flow f32 at 2008, totalizer f32_overflow at 2609.
        let flow = Point {
            channel: Channel::Flow,
            address: 2008,
            ..point(DataType::F32, ByteOrder::CDAB)
        };
        let total = Point {
            address: 2609,
            ..point(DataType::F32Overflow, ByteOrder::CDAB)
        };
        let f64_point = Point {
            address: 100,
            ..point(DataType::F64, ByteOrder::CDAB)
        };
        let points = [flow, total.clone(), f64_point];
        let blocks = plan_reads(&points, 2);
        let spans: Vec<_> = blocks.iter().map(|b| (b.address, b.count)).collect();
        // The overflow (2611) is read before and after the value (2609).
        assert_eq!(
            spans,
            [(100, 4), (2008, 2), (2611, 2), (2609, 2), (2611, 2)]
        );

        let enc = total.encode(20_000_001.0).unwrap();
        let replies = vec![
            Some(vec![0; 4]),
            Some(vec![0, 0]),
            Some(enc[2..].to_vec()),
            Some(enc[..2].to_vec()),
            Some(enc[2..].to_vec()),
        ];
        let words = assemble(points.len(), &blocks, &replies);
        assert_eq!(total.decode(words[1].as_ref().unwrap()), Ok(20_000_001.0));

        // A failed half leaves the whole point without words.
        let mut failed = replies.clone();
        failed[3] = None;
        assert_eq!(assemble(points.len(), &blocks, &failed)[1], None);
    }

    #[test]
    fn a_total_read_in_halves_across_a_wrap_is_torn_not_wrong() {
        // E+H: SUM wraps from just below 1e7 to 0 while OVERFLOW steps 1e7 -> 2e7.
        let total = Point {
            address: 2609,
            ..point(DataType::F32Overflow, ByteOrder::CDAB)
        };
        let blocks = plan_reads(std::slice::from_ref(&total), 2);
        let before = total.encode(19_999_999.0).unwrap();
        let after = total.encode(20_000_000.5).unwrap();
        // OVERFLOW before the wrap, SUM after it: 1e7 + 0.5 would lose a whole wrap.
        let torn = [
            Some(before[2..].to_vec()),
            Some(after[..2].to_vec()),
            Some(after[2..].to_vec()),
        ];
        assert_eq!(assemble(1, &blocks, &torn), [None]);
        // No wrap between the two reads of OVERFLOW: the value read between them is its own.
        let whole = [
            Some(after[2..].to_vec()),
            Some(after[..2].to_vec()),
            Some(after[2..].to_vec()),
        ];
        let words = assemble(1, &blocks, &whole);
        assert_eq!(total.decode(words[0].as_ref().unwrap()), Ok(20_000_000.5));

        // MAG 8000 int + fraction: the integer part is the steady half, read first and last.
        let mag = Point {
            address: 3017,
            ..point(DataType::I32Fraction, ByteOrder::ABCD)
        };
        let blocks = plan_reads(std::slice::from_ref(&mag), 3);
        let spans: Vec<_> = blocks.iter().map(|b| (b.address, b.count)).collect();
        assert_eq!(spans, [(3017, 2), (3019, 2), (3017, 2)]);
        // Four registers at once are never split.
        assert_eq!(plan_reads(&[mag], 4).len(), 1);
    }

    #[test]
    fn extras_are_stored_as_read_and_only_flow_total_level_are_canonical() {
        let extra = |unit: Unit| Point {
            channel: Channel::Extra("pressure".into()),
            unit,
            ..point(DataType::F32, ByteOrder::ABCD)
        };
        // 2.5 bar = 0x40200000.
        assert_eq!(extra(Unit::Bar).decode(&[0x4020, 0x0000]), Ok(2.5));
        assert_eq!(extra(Unit::Bar).encode(2.5), Ok(vec![0x4020, 0x0000]));
        assert_eq!(
            extra(Unit::CubicMetrePerHour).decode(&[0x4020, 0x0000]),
            Ok(2.5)
        );
        let direction = Point {
            channel: Channel::Direction,
            ..extra(Unit::Percent)
        };
        assert_eq!(direction.decode(&[0x3F80, 0x0000]), Ok(1.0));
        let level = Point {
            channel: Channel::Level,
            ..extra(Unit::Bar)
        };
        let column = level.decode(&[0x4020, 0x0000]).unwrap();
        assert!((column - 25.492_9).abs() < 1e-4, "{column}");
    }

    #[test]
    fn a_pressure_level_uses_its_density_and_air_pressure() {
        let level = |water_column: WaterColumn| Point {
            channel: Channel::Level,
            unit: Unit::Bar,
            water_column: Some(water_column),
            ..point(DataType::F32, ByteOrder::ABCD)
        };
        // The default is fresh water on a vented cell: what Unit::to_canonical gives.
        let vented = level(WaterColumn::default());
        let p = 2.0_f64; // bar, 0x40000000
        assert_eq!(vented.decode(&[0x4000, 0]), Ok(Unit::Bar.to_canonical(p)));
        assert!((Unit::Bar.to_canonical(1.0) - 1e5 / (1000.0 * 9.80665)).abs() < 1e-12);
        // Brackish water at 1025 kg/m3 stands lower for the same pressure.
        let brackish = level(WaterColumn {
            density_kg_m3: 1025.0,
            ..WaterColumn::default()
        });
        let m = brackish.decode(&[0x4000, 0]).unwrap();
        assert!((m - 2e5 / (1025.0 * 9.80665)).abs() < 1e-9, "{m}");
        // An absolute cell at 500 m reads 0.9546 bar of air; sea level would leave 0.6 m.
        assert!((Atmosphere::Altitude(500.0).bar() - 0.954_61).abs() < 1e-5);
        assert!((Atmosphere::Altitude(0.0).bar() - SEA_LEVEL_BAR).abs() < 1e-12);
        let at_500 = level(WaterColumn {
            density_kg_m3: 1000.0,
            air: Atmosphere::Altitude(500.0),
        });
        let sea_level = level(WaterColumn {
            density_kg_m3: 1000.0,
            air: Atmosphere::Barometric(SEA_LEVEL_BAR),
        });
        let words = [0x4000, 0];
        let gap = at_500.decode(&words).unwrap() - sea_level.decode(&words).unwrap();
        assert!((gap - 0.598).abs() < 1e-3, "{gap}");
        let m = at_500.decode(&words).unwrap();
        assert!(
            (m - (2.0 - 0.954_61) * 1e5 / (1000.0 * 9.80665)).abs() < 1e-3,
            "{m}"
        );
        // Encoding is the inverse, so the simulator serves what the probe would read.
        let enc = at_500.encode(10.0).unwrap();
        assert!((at_500.decode(&enc).unwrap() - 10.0).abs() < 1e-5);
    }

    #[test]
    fn rollover_counter_joins_a_nearby_block_and_is_read_twice_across_requests() {
        // Badger M2000: T+ f32 at 207, its rollover counter at 231, flow at 237.
        let total = Point {
            address: 207,
            overflow_address: Some(231),
            overflow_factor: 1e6,
            ..point(DataType::F32U16Rollover, ByteOrder::ABCD)
        };
        let flow = Point {
            channel: Channel::Flow,
            address: 237,
            ..point(DataType::F32, ByteOrder::ABCD)
        };
        let points = [total.clone(), flow];
        let blocks = plan_reads(&points, 125);
        let spans: Vec<_> = blocks.iter().map(|b| (b.address, b.count)).collect();
        // The counter is in another request than the value: read before it, and again after.
        assert_eq!(spans, [(231, 1), (207, 2), (231, 8)]);
        let enc = total.encode(2_000_100.0).unwrap();
        let mut second = vec![0u16; 8];
        second[0] = enc[2];
        let words = assemble(
            2,
            &blocks,
            &[
                Some(vec![enc[2]]),
                Some(enc[..2].to_vec()),
                Some(second.clone()),
            ],
        );
        assert_eq!(total.decode(words[0].as_ref().unwrap()), Ok(2_000_100.0));
        assert!(words[1].is_some(), "the flow is read as ever");

        // The value wrapped between the two reads of the counter: no total rather than a
        // total off by 1e6.
        let before_wrap = vec![enc[2] - 1];
        let words = assemble(
            2,
            &blocks,
            &[Some(before_wrap), Some(enc[..2].to_vec()), Some(second)],
        );
        assert_eq!(words[0], None, "torn total refused");
        assert!(words[1].is_some());

        // Counter next to its value: one request, nothing read twice.
        let near = Point {
            overflow_address: Some(209),
            ..total
        };
        let blocks = plan_reads(&[near], 125);
        let spans: Vec<_> = blocks.iter().map(|b| (b.address, b.count)).collect();
        assert_eq!(spans, [(207, 3)]);
    }

    #[test]
    fn bits_plan_separately_from_registers() {
        let bit = |a: u16| Point {
            channel: Channel::Direction,
            fc: Fc::Coils,
            address: a,
            ..point(DataType::Bool, ByteOrder::ABCD)
        };
        let reg = Point {
            address: 0,
            ..point(DataType::U16, ByteOrder::ABCD)
        };
        let blocks = plan_reads(&[bit(0), bit(5), reg, bit(100)], 1);
        let spans: Vec<_> = blocks.iter().map(|b| (b.fc, b.address, b.count)).collect();
        assert_eq!(
            spans,
            [(Fc::Coils, 0, 6), (Fc::Coils, 100, 1), (Fc::Holding, 0, 1)]
        );
    }
}
