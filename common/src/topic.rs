//! MQTT topic layout, version 1.
//!
//! Every topic is `caudal/v1/{site}/{kind}`. The version in the path lets a v2 contract run next
//! to v1 on one broker during a migration. See `docs/protocol.md` for who publishes what, with
//! which QoS and retain flag.

use crate::id::{IdError, SiteId};
use std::fmt;

/// The topic prefix shared by every v1 topic.
pub const PREFIX: &str = "caudal/v1";

/// What a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// Agent → cloud: [`crate::Batch`] of readings, events and gaps. QoS 1, not retained.
    Telemetry,
    /// Cloud → agent: [`crate::Ack`] for a batch, sent after the cloud committed it. QoS 1.
    Ack,
    /// Agent → cloud: retained [`crate::Status`]; the last will sets it offline. QoS 1, retained.
    Status,
    /// Cloud → agent: a [`crate::Command`]. QoS 1.
    Command,
    /// Agent → cloud: a [`crate::CommandResult`]. QoS 1.
    CommandResult,
    /// Cloud → agent: retained [`crate::DesiredConfig`]. QoS 1, retained.
    DesiredConfig,
}

impl TopicKind {
    pub const ALL: &'static [TopicKind] = &[
        TopicKind::Telemetry,
        TopicKind::Ack,
        TopicKind::Status,
        TopicKind::Command,
        TopicKind::CommandResult,
        TopicKind::DesiredConfig,
    ];

    /// The topic suffix after `caudal/v1/{site}/`.
    pub fn suffix(self) -> &'static str {
        match self {
            TopicKind::Telemetry => "telemetry",
            TopicKind::Ack => "ack",
            TopicKind::Status => "status",
            TopicKind::Command => "command",
            TopicKind::CommandResult => "command/result",
            TopicKind::DesiredConfig => "config/desired",
        }
    }
}

/// The topic of `kind` for `site`.
pub fn topic(site: &SiteId, kind: TopicKind) -> String {
    format!("{PREFIX}/{site}/{}", kind.suffix())
}

/// A filter matching `kind` for every site, e.g. `caudal/v1/+/telemetry`.
pub fn all_sites(kind: TopicKind) -> String {
    format!("{PREFIX}/+/{}", kind.suffix())
}

/// An MQTT v5 shared-subscription filter: processes subscribed with the same `group` split the
/// messages of `kind` among themselves, e.g. `$share/caudal-ingest/caudal/v1/+/telemetry`.
pub fn shared(group: &str, kind: TopicKind) -> String {
    format!("$share/{group}/{}", all_sites(kind))
}

/// Why a topic is not a Caudal v1 topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic {0:?} does not start with {PREFIX}/")]
    Prefix(String),
    #[error("topic {0:?} has a site that is not valid: {1}")]
    Site(String, IdError),
    #[error("topic {0:?} has an unknown kind")]
    Kind(String),
}

/// A parsed v1 topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub site: SiteId,
    pub kind: TopicKind,
}

impl Topic {
    pub fn parse(topic: &str) -> Result<Topic, TopicError> {
        let rest = topic
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| TopicError::Prefix(topic.to_string()))?;
        let (site, suffix) = rest
            .split_once('/')
            .ok_or_else(|| TopicError::Kind(topic.to_string()))?;
        let site = SiteId::new(site).map_err(|e| TopicError::Site(topic.to_string(), e))?;
        let kind = TopicKind::ALL
            .iter()
            .copied()
            .find(|k| k.suffix() == suffix)
            .ok_or_else(|| TopicError::Kind(topic.to_string()))?;
        Ok(Topic { site, kind })
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&topic(&self.site, self.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        let site = SiteId::new("pozo-1").expect("valid");
        for k in TopicKind::ALL {
            let t = topic(&site, *k);
            assert_eq!(
                Topic::parse(&t),
                Ok(Topic {
                    site: site.clone(),
                    kind: *k
                })
            );
        }
    }

    #[test]
    fn foreign_topics_are_refused() {
        assert!(matches!(
            Topic::parse("other/v1/a/telemetry"),
            Err(TopicError::Prefix(_))
        ));
        assert!(matches!(
            Topic::parse("caudal/v1/a/bogus"),
            Err(TopicError::Kind(_))
        ));
        assert!(matches!(
            Topic::parse("caudal/v1/a+b/ack"),
            Err(TopicError::Site(..))
        ));
        assert!(matches!(
            Topic::parse("caudal/v1/site"),
            Err(TopicError::Kind(_))
        ));
    }

    #[test]
    fn shared_filter() {
        assert_eq!(
            shared("ingest", TopicKind::Telemetry),
            "$share/ingest/caudal/v1/+/telemetry"
        );
    }
}
