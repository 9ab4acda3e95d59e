//! Quality flags attached to a reading: what the edge noticed about a value without changing it.
//!
//! The agent never drops or "corrects" a suspicious value. It keeps the reading and sets flags;
//! the matching [`crate::EventKind`] event tells the story (e.g. which totalizer went backwards
//! and by how much). On the wire a [`Quality`] is a JSON array of flag names; an empty array
//! means "good".

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

macro_rules! flags {
    ($($(#[$m:meta])* $v:ident = $bit:expr, $name:literal;)*) => {
        /// One quality flag.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum Flag {
            $($(#[$m])* $v = 1 << $bit,)*
        }

        impl Flag {
            pub const ALL: &'static [Flag] = &[$(Flag::$v),*];
            /// The flag's wire name.
            pub fn name(self) -> &'static str {
                match self { $(Flag::$v => $name,)* }
            }
            pub fn from_name(s: &str) -> Option<Flag> {
                match s { $($name => Some(Flag::$v),)* _ => None }
            }
        }
    };
}

flags! {
    /// A channel read NaN or infinity (E+H sends NaN on a fault); that channel is `null`.
    NotFinite = 0, "not_finite";
    /// A value outside the device's configured plausible range.
    OutOfRange = 1, "out_of_range";
    /// The value has not changed for longer than the configured frozen window while it should.
    Frozen = 2, "frozen";
    /// The totalizer decreased and the cause could not be told apart.
    TotalizerBackwards = 3, "totalizer_backwards";
    /// The totalizer wrapped around at the top of its register range.
    TotalizerRollover = 4, "totalizer_rollover";
    /// The totalizer went back to (near) zero: reset from the keypad or over Modbus.
    TotalizerReset = 5, "totalizer_reset";
    /// The totalizer jumped to an unrelated value: likely a meter replacement.
    MeterReplaced = 6, "meter_replaced";
    /// The totalizer decreased while the meter reports reverse flow.
    ReverseFlow = 7, "reverse_flow";
    /// Taken while the system clock was not trustworthy.
    ClockUnsynced = 8, "clock_unsynced";
    /// The timestamp was recomputed from the monotonic clock once the wall clock became trustworthy.
    Restamped = 9, "restamped";
    /// Taken in an earlier boot whose clock never became trustworthy: `ts` is only an upper bound.
    TimeUnknown = 10, "time_unknown";
    /// Some registers of the device could not be read this cycle; the missing channels are `null`.
    Partial = 11, "partial";
    /// The poll slipped past its slot: the device was read at or after the next slot boundary
    /// of its period (a slow or dead device ahead of it on the bus, a busy outbox). `ts` is
    /// still when it was read.
    Late = 12, "late";
}

/// A set of [`Flag`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Quality(u16);

impl Quality {
    pub const GOOD: Quality = Quality(0);

    pub fn from_bits(bits: u16) -> Self {
        Quality(bits)
    }
    pub fn bits(self) -> u16 {
        self.0
    }
    // By reference so serde's `skip_serializing_if` can call it.
    pub fn is_good(&self) -> bool {
        self.0 == 0
    }
    pub fn set(&mut self, f: Flag) {
        self.0 |= f as u16;
    }
    pub fn clear(&mut self, f: Flag) {
        self.0 &= !(f as u16);
    }
    pub fn with(mut self, f: Flag) -> Self {
        self.set(f);
        self
    }
    pub fn has(self, f: Flag) -> bool {
        self.0 & f as u16 != 0
    }
    pub fn iter(self) -> impl Iterator<Item = Flag> {
        Flag::ALL.iter().copied().filter(move |f| self.has(*f))
    }
}

impl fmt::Display for Quality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_good() {
            return f.write_str("good");
        }
        let names: Vec<&str> = self.iter().map(Flag::name).collect();
        f.write_str(&names.join(","))
    }
}

impl Serialize for Quality {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(Flag::name))
    }
}

impl<'de> Deserialize<'de> for Quality {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let mut q = Quality::GOOD;
        for n in names {
            let f = Flag::from_name(&n)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown quality flag {n:?}")))?;
            q.set(f);
        }
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Flag::ALL {
            assert_eq!(Flag::from_name(f.name()), Some(*f));
        }
        let q = Quality::GOOD.with(Flag::Frozen).with(Flag::ClockUnsynced);
        let json = serde_json::to_string(&q).expect("serialize");
        assert_eq!(json, r#"["frozen","clock_unsynced"]"#);
        assert_eq!(serde_json::from_str::<Quality>(&json).expect("parse"), q);
    }

    #[test]
    fn unknown_flag_is_an_error() {
        assert!(serde_json::from_str::<Quality>(r#"["bogus"]"#).is_err());
    }
}
