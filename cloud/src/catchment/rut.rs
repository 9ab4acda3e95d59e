//! The Chilean RUT (Rol Único Tributario) as the DGA's MEE API takes it: the informante's
//! `rutUsuario` (and the Centro de Control's `rutEmpresa`) in every transmission.
//!
//! Form, from the Manual Técnico N° 1/2025 examples (`20999888-7`): the number without dots or
//! leading zeros, a hyphen, and the check digit `0`–`9` or `K`. The check digit is the mod-11
//! checksum of the number (weights 2, 3, 4, 5, 6, 7 repeating from the right; 11 − sum mod 11,
//! with 11 → `0` and 10 → `K`). A lower-case `k` is accepted and stored as `K`, the form the DGA
//! examples use; dots and spaces are refused rather than stripped, so what is stored is exactly
//! what will be sent.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;

/// A RUT with a valid check digit, in the form `NNNNNNNN-D`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, pattern = "^[1-9][0-9]{0,7}-[0-9Kk]$", example = "76086428-5")]
pub struct Rut(String);

/// Why a RUT was refused; the message quotes the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rut:?} is not a RUT (NNNNNNNN-D, no dots, e.g. 76086428-5): {reason}")]
pub struct RutError {
    pub rut: String,
    pub reason: String,
}

/// The check digit of a RUT number.
pub fn check_digit(mut number: u32) -> char {
    let mut sum = 0u32;
    let mut weight = 2u32;
    while number > 0 {
        sum += (number % 10) * weight;
        number /= 10;
        weight = if weight == 7 { 2 } else { weight + 1 };
    }
    match 11 - sum % 11 {
        11 => '0',
        10 => 'K',
        d => char::from_digit(d, 10).unwrap_or('0'),
    }
}

impl Rut {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Rut {
    type Err = RutError;

    fn from_str(s: &str) -> Result<Rut, RutError> {
        let bad = |reason: String| RutError {
            rut: s.to_string(),
            reason,
        };
        let Some((body, dv)) = s.split_once('-') else {
            return Err(bad("the check digit must follow a hyphen".into()));
        };
        if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the number must be digits only, without dots".into()));
        }
        if body.starts_with('0') {
            return Err(bad("the number has no leading zeros".into()));
        }
        if body.len() > 8 {
            return Err(bad("the number has at most 8 digits".into()));
        }
        let dv = match dv {
            "k" | "K" => 'K',
            d if d.len() == 1 && d.as_bytes()[0].is_ascii_digit() => d.as_bytes()[0] as char,
            _ => return Err(bad("the check digit is one digit or K".into())),
        };
        let number: u32 = body
            .parse()
            .map_err(|_| bad("the number is too large".into()))?;
        let expected = check_digit(number);
        if dv != expected {
            return Err(bad(format!(
                "the check digit is {dv} but {number} has check digit {expected}"
            )));
        }
        Ok(Rut(format!("{body}-{dv}")))
    }
}

impl TryFrom<String> for Rut {
    type Error = RutError;
    fn try_from(s: String) -> Result<Rut, RutError> {
        s.parse()
    }
}

impl From<Rut> for String {
    fn from(r: Rut) -> String {
        r.0
    }
}

impl fmt::Display for Rut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_ruts_parse() {
        // The Servicio de Impuestos Internos' own RUT, and a K check digit.
        assert_eq!(
            "60803000-K".parse::<Rut>().expect("SII").as_str(),
            "60803000-K"
        );
        assert_eq!(
            "60803000-k".parse::<Rut>().expect("lower k").as_str(),
            "60803000-K"
        );
        assert_eq!(check_digit(76086428), '5');
        assert!("76086428-5".parse::<Rut>().is_ok());
        assert!("1-9".parse::<Rut>().is_ok());
    }

    #[test]
    fn malformed_ruts_are_refused_with_a_reason() {
        for bad in [
            "",
            "76086428",
            "76086428-4",
            "76.086.428-5",
            "076086428-5",
            "-5",
            "76086428-",
            "76086428-55",
            "76086428-X",
            " 76086428-5",
            "123456789-0",
        ] {
            let e = bad.parse::<Rut>().expect_err(bad);
            assert!(e.to_string().contains("NNNNNNNN-D"), "{e}");
        }
    }

    proptest! {
        #[test]
        fn every_number_with_its_check_digit_parses(n in 1u32..100_000_000) {
            let s = format!("{n}-{}", check_digit(n));
            let r: Rut = s.parse().expect("valid");
            prop_assert_eq!(r.as_str(), s.as_str());
        }

        #[test]
        fn parsing_never_panics(s in ".{0,16}") {
            let _ = s.parse::<Rut>();
        }
    }
}
