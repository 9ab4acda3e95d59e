//! The DGA's código de obra: the identity the regulator gives each catchment work, which every
//! measurement sent to it carries (header `codigoObra` of the MEE API).
//!
//! Format, from Res. DGA Ex. N° 2.170 (2025), Manual Técnico N° 1/2025 §5.2: three parts joined
//! by `-`:
//!
//! 1. `OB` (obra de captación, a catchment) or `OR` (obra de restitución, a return work);
//! 2. four digits `RRPP`: the DGA region code (2 digits) then the province code within it
//!    (2 digits), zero-padded;
//! 3. a correlative integer ≥ 1, of variable length.
//!
//! Example: `OB-0602-7`, the 7th obra of O'Higgins (region 06), Colchagua (province 02). Codes are
//! case-sensitive and have no spaces (production validators use `^O[BR]-\d{4}-\d+$`). Beyond
//! that pattern this parser refuses what cannot be a real code: region 00 or above 16 (Chile has
//! 16 regions), province 00, and a correlative of 0 or with leading zeros.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;

/// Highest DGA region code (XVI, Ñuble).
pub const MAX_REGION: u8 = 16;

/// A valid código de obra: `OB` or `OR`, the region (01–16) and province codes, a correlative
/// from 1 (the schema's pattern accepts exactly what the parser does).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, pattern = "^O[BR]-(0[1-9]|1[0-6])(0[1-9]|[1-9][0-9])-[1-9][0-9]{0,8}$", example = "OB-0602-7")]
pub struct ObraCode(String);

/// What a código de obra is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObraKind {
    /// `OB`: obra de captación.
    Captacion,
    /// `OR`: obra de restitución.
    Restitucion,
}

/// Why a código de obra was refused; the message quotes the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?} is not a DGA código de obra (OB|OR-RRPP-n, e.g. OB-0602-7): {reason}")]
pub struct ObraCodeError {
    pub code: String,
    pub reason: &'static str,
}

impl ObraCode {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn kind(&self) -> ObraKind {
        if self.0.starts_with("OB") {
            ObraKind::Captacion
        } else {
            ObraKind::Restitucion
        }
    }

    /// The DGA region code (1–16).
    pub fn region(&self) -> u8 {
        self.0[3..5].parse().unwrap_or_default()
    }

    /// The province code within the region.
    pub fn province(&self) -> u8 {
        self.0[5..7].parse().unwrap_or_default()
    }
}

impl FromStr for ObraCode {
    type Err = ObraCodeError;

    fn from_str(s: &str) -> Result<ObraCode, ObraCodeError> {
        let bad = |reason| ObraCodeError {
            code: s.to_string(),
            reason,
        };
        let mut parts = s.split('-');
        let (Some(kind), Some(rrpp), Some(n), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("it needs exactly three parts separated by '-'"));
        };
        if kind != "OB" && kind != "OR" {
            return Err(bad(
                "the first part must be OB (captación) or OR (restitución)",
            ));
        }
        if rrpp.len() != 4 || !rrpp.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the second part must be 4 digits: region and province"));
        }
        let region: u8 = rrpp[..2]
            .parse()
            .map_err(|_| bad("region is not a number"))?;
        if !(1..=MAX_REGION).contains(&region) {
            return Err(bad("the region code must be 01 to 16"));
        }
        if &rrpp[2..] == "00" {
            return Err(bad("the province code must not be 00"));
        }
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the third part must be a number"));
        }
        if n.starts_with('0') {
            return Err(bad("the correlative starts at 1 and has no leading zeros"));
        }
        if n.len() > 9 {
            return Err(bad("the correlative is longer than 9 digits"));
        }
        Ok(ObraCode(s.to_string()))
    }
}

impl TryFrom<String> for ObraCode {
    type Error = ObraCodeError;
    fn try_from(s: String) -> Result<ObraCode, ObraCodeError> {
        s.parse()
    }
}

impl From<ObraCode> for String {
    fn from(c: ObraCode) -> String {
        c.0
    }
}

impl fmt::Display for ObraCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn manual_examples_parse() {
        let c: ObraCode = "OB-0602-7".parse().expect("the manual's example");
        assert_eq!(
            (c.kind(), c.region(), c.province()),
            (ObraKind::Captacion, 6, 2)
        );
        let c: ObraCode = "OR-1301-1234".parse().expect("a return work");
        assert_eq!(
            (c.kind(), c.region(), c.province()),
            (ObraKind::Restitucion, 13, 1)
        );
        assert!("OB-0101-114".parse::<ObraCode>().is_ok());
    }

    #[test]
    fn malformed_codes_are_refused_with_a_reason() {
        for bad in [
            "",
            "OB",
            "OB-0602",
            "OB-0602-7-1",
            "ob-0602-7",
            "OX-0602-7",
            " OB-0602-7",
            "OB-602-7",
            "OB-06022-7",
            "OB-06a2-7",
            "OB-0002-7",
            "OB-1702-7",
            "OB-0600-7",
            "OB-0602-0",
            "OB-0602-07",
            "OB-0602-",
            "OB-0602-x",
            "OB-0602-1234567890",
        ] {
            let e = bad.parse::<ObraCode>().expect_err(bad);
            assert!(e.to_string().contains("OB|OR-RRPP-n"), "{e}");
        }
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<ObraCode>("\"OB-0602-7\"").is_ok());
        assert!(serde_json::from_str::<ObraCode>("\"OB-0602-0\"").is_err());
    }

    proptest! {
        #[test]
        fn every_well_formed_code_round_trips(
            ob in proptest::bool::ANY, region in 1u8..=16, province in 1u8..=99, n in 1u32..1_000_000
        ) {
            let s = format!("{}-{region:02}{province:02}-{n}", if ob { "OB" } else { "OR" });
            let c: ObraCode = s.parse().expect("well formed");
            prop_assert_eq!(c.as_str(), s.as_str());
            prop_assert_eq!((c.region(), c.province()), (region, province));
        }

        #[test]
        fn parsing_never_panics(s in ".{0,20}") {
            let _ = s.parse::<ObraCode>();
        }
    }
}
