//! Canonical units and conversion into them.
//!
//! Every reading leaves the agent in canonical units: flow in litres per second, totalizer in
//! cubic metres, level in metres. Meters speak many units (`m3/s` on a MAG 6000, `m3/h` on a
//! TUF-2000, `mm3` on a MagFlux totalizer, `bar` on a level probe); the profile names the unit
//! a register is in, and [`Unit::to_canonical`] converts. Pressure units convert to a fresh-water
//! column height (1000 kg/m³, g = 9.80665 m/s²) so a pressure probe gives a level in metres.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What a unit measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// Volume per time; canonical L/s.
    Flow,
    /// Volume; canonical m³.
    Volume,
    /// Length (or water column); canonical m.
    Length,
    /// Anything else (temperature, velocity, percent, ...): kept as read, times 1.
    Other,
}

const WATER_COLUMN_M_PER_PA: f64 = 1.0 / (1000.0 * 9.80665);

macro_rules! units {
    ($($v:ident = $name:literal, $dim:ident, $factor:expr;)*) => {
        /// A unit a register may be expressed in.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Unit { $($v,)* }

        impl Unit {
            pub const ALL: &'static [Unit] = &[$(Unit::$v),*];
            /// The unit's name in profiles and configuration.
            pub fn name(self) -> &'static str {
                match self { $(Unit::$v => $name,)* }
            }
            pub fn dimension(self) -> Dimension {
                match self { $(Unit::$v => Dimension::$dim,)* }
            }
            /// Multiply a value in this unit by this factor to get the canonical unit.
            pub fn factor(self) -> f64 {
                match self { $(Unit::$v => $factor,)* }
            }
        }
    };
}

units! {
    LitrePerSecond = "L/s", Flow, 1.0;
    LitrePerMinute = "L/min", Flow, 1.0 / 60.0;
    LitrePerHour = "L/h", Flow, 1.0 / 3600.0;
    CubicMetrePerSecond = "m3/s", Flow, 1000.0;
    CubicMetrePerMinute = "m3/min", Flow, 1000.0 / 60.0;
    CubicMetrePerHour = "m3/h", Flow, 1000.0 / 3600.0;
    CubicMetrePerDay = "m3/d", Flow, 1000.0 / 86_400.0;
    UsGallonPerMinute = "gal/min", Flow, 3.785_411_784 / 60.0;
    CubicMetre = "m3", Volume, 1.0;
    Litre = "L", Volume, 0.001;
    Kilolitre = "kL", Volume, 1.0;
    Megalitre = "ML", Volume, 1000.0;
    CubicMillimetre = "mm3", Volume, 1e-9;
    UsGallon = "gal", Volume, 0.003_785_411_784;
    Metre = "m", Length, 1.0;
    Centimetre = "cm", Length, 0.01;
    Millimetre = "mm", Length, 0.001;
    Foot = "ft", Length, 0.3048;
    MetreWaterColumn = "mH2O", Length, 1.0;
    CentimetreWaterColumn = "cmH2O", Length, 0.01;
    MillimetreWaterColumn = "mmH2O", Length, 0.001;
    Bar = "bar", Length, 1e5 * WATER_COLUMN_M_PER_PA;
    Millibar = "mbar", Length, 100.0 * WATER_COLUMN_M_PER_PA;
    Kilopascal = "kPa", Length, 1000.0 * WATER_COLUMN_M_PER_PA;
    Megapascal = "MPa", Length, 1e6 * WATER_COLUMN_M_PER_PA;
    Psi = "psi", Length, 6_894.757_293_168 * WATER_COLUMN_M_PER_PA;
    MetrePerSecond = "m/s", Other, 1.0;
    DegreeCelsius = "degC", Other, 1.0;
    Percent = "%", Other, 1.0;
    Volt = "V", Other, 1.0;
    SiemensPerMetre = "S/m", Other, 1.0;
    Dimensionless = "1", Other, 1.0;
}

impl Unit {
    /// Converts `value` in this unit to the canonical unit of its dimension.
    pub fn to_canonical(self, value: f64) -> f64 {
        value * self.factor()
    }
    /// Converts `value` in the canonical unit back to this unit (used by the meter simulator).
    pub fn from_canonical(self, value: f64) -> f64 {
        value / self.factor()
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown unit name, with the names that are known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown unit {0:?}; known units: {known}", known = Unit::ALL.iter().map(|u| u.name()).collect::<Vec<_>>().join(", "))]
pub struct UnknownUnit(pub String);

impl FromStr for Unit {
    type Err = UnknownUnit;
    fn from_str(s: &str) -> Result<Self, UnknownUnit> {
        Unit::ALL
            .iter()
            .copied()
            .find(|u| u.name() == s || u.name().eq_ignore_ascii_case(s) && !is_case_sensitive(s))
            .ok_or_else(|| UnknownUnit(s.to_string()))
    }
}

/// "ML" (megalitre) and "mL" would differ; so would "mbar"/"Mbar". Only accept exact case for
/// names where case carries meaning.
fn is_case_sensitive(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "ml" | "mbar" | "mpa" | "mm3"
    )
}

impl Serialize for Unit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Unit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_conversions() {
        assert_eq!(Unit::CubicMetrePerSecond.to_canonical(0.012), 12.0);
        assert!((Unit::CubicMetrePerHour.to_canonical(36.0) - 10.0).abs() < 1e-12);
        assert!((Unit::LitrePerMinute.to_canonical(600.0) - 10.0).abs() < 1e-12);
    }

    #[test]
    fn volume_and_level_conversions() {
        assert_eq!(Unit::Litre.to_canonical(1500.0), 1.5);
        assert!((Unit::Bar.to_canonical(1.0) - 10.197_162).abs() < 1e-6);
        assert_eq!(Unit::Centimetre.to_canonical(250.0), 2.5);
    }

    #[test]
    fn names_parse_back() {
        for u in Unit::ALL {
            assert_eq!(u.name().parse::<Unit>(), Ok(*u), "{u}");
        }
        assert_eq!("m3/H".parse::<Unit>(), Ok(Unit::CubicMetrePerHour));
        assert!("mL".parse::<Unit>().is_err(), "millilitre is not megalitre");
        assert!("furlong/fortnight".parse::<Unit>().is_err());
    }

    #[test]
    fn from_canonical_inverts() {
        for u in Unit::ALL {
            let v = 123.456;
            assert!(
                (u.to_canonical(u.from_canonical(v)) - v).abs() < 1e-9,
                "{u}"
            );
        }
    }
}
