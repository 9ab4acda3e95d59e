//! Identifiers of sites and devices: short, topic-safe names chosen by people.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a site or device identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("identifier is empty")]
    Empty,
    #[error("identifier is {0} characters long; at most 64 are allowed")]
    TooLong(usize),
    #[error(
        "identifier {0:?} contains {1:?}; only ASCII letters, digits, '-', '_' and '.' are allowed"
    )]
    BadChar(String, char),
}

fn check(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > 64 {
        return Err(IdError::TooLong(s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(IdError::BadChar(s.to_string(), c));
    }
    Ok(())
}

macro_rules! ident {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an identifier.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check(&s)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

ident!(
    /// A site: one agent, one MQTT identity, one sequence space. Appears in topics, so it is
    /// limited to `[A-Za-z0-9._-]{1,64}`.
    SiteId
);
ident!(
    /// A device (meter or sensor) within a site, e.g. `fm1` or `level-1`.
    DeviceId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_topic_safe_names() {
        assert!(SiteId::new("pozo-norte_1.a").is_ok());
    }

    #[test]
    fn refuses_topic_wildcards_and_separators() {
        for bad in ["a/b", "a+b", "a#", "", "a b", "ñ"] {
            assert!(SiteId::new(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(SiteId::new("x".repeat(65)), Err(IdError::TooLong(65)));
    }
}
