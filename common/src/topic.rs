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

/// Who publishes on a kind's topics; the other side only subscribes to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publisher {
    /// The site's agent: `telemetry`, `status`, `command/result`.
    Agent,
    /// The cloud: `ack`, `command`, `config/desired`.
    Cloud,
}

impl TopicKind {
    /// Who publishes on this kind's topics (`docs/protocol.md`).
    pub fn publisher(self) -> Publisher {
        match self {
            TopicKind::Telemetry | TopicKind::Status | TopicKind::CommandResult => Publisher::Agent,
            TopicKind::Ack | TopicKind::Command | TopicKind::DesiredConfig => Publisher::Cloud,
        }
    }
}

/// Why a site's login may not publish on a topic or subscribe to a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("not a {PREFIX} topic of a known kind")]
    Foreign,
    #[error("the topic is another site's")]
    OtherSite,
    #[error("only the cloud publishes on {0:?} topics")]
    CloudOnly(&'static str),
    #[error("only the site's agent publishes on {0:?} topics; the cloud reads them")]
    AgentOnly(&'static str),
    #[error("a site subscribes to its own topics by name, without wildcards")]
    Wildcard,
}

impl Denied {
    /// A short name for metric labels: `foreign`, `other_site`, `cloud_only`, `agent_only`,
    /// `wildcard`.
    pub fn label(self) -> &'static str {
        match self {
            Denied::Foreign => "foreign",
            Denied::OtherSite => "other_site",
            Denied::CloudOnly(_) => "cloud_only",
            Denied::AgentOnly(_) => "agent_only",
            Denied::Wildcard => "wildcard",
        }
    }
}

/// Whether the login of `site` (its MQTT username) may publish on `topic`: only on its own
/// topics that its agent publishes ([`Publisher::Agent`]). The cloud's own login may publish
/// anywhere and is not checked here.
pub fn site_may_publish(site: &str, topic: &str) -> Result<TopicKind, Denied> {
    let t = own_topic(site, topic)?;
    match t.kind.publisher() {
        Publisher::Agent => Ok(t.kind),
        Publisher::Cloud => Err(Denied::CloudOnly(t.kind.suffix())),
    }
}

/// Whether the login of `site` may subscribe to `filter`: only to its own topics that the cloud
/// publishes ([`Publisher::Cloud`]), each by its full name (no `+`, `#` or `$share/`), so what
/// a site can read is exactly what the cloud sends it.
pub fn site_may_subscribe(site: &str, filter: &str) -> Result<TopicKind, Denied> {
    if filter.contains(['+', '#']) || filter.starts_with('$') {
        return Err(Denied::Wildcard);
    }
    let t = own_topic(site, filter)?;
    match t.kind.publisher() {
        Publisher::Cloud => Ok(t.kind),
        Publisher::Agent => Err(Denied::AgentOnly(t.kind.suffix())),
    }
}

fn own_topic(site: &str, topic: &str) -> Result<Topic, Denied> {
    let t = Topic::parse(topic).map_err(|_| Denied::Foreign)?;
    if t.site.as_str() != site {
        return Err(Denied::OtherSite);
    }
    Ok(t)
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

    #[test]
    fn a_site_publishes_and_reads_only_its_own_topics() {
        let own = |k| topic(&SiteId::new("pozo-a").expect("valid"), k);
        for k in TopicKind::ALL.iter().copied() {
            let agent = k.publisher() == Publisher::Agent;
            assert_eq!(site_may_publish("pozo-a", &own(k)).is_ok(), agent, "{k:?}");
            assert_eq!(
                site_may_subscribe("pozo-a", &own(k)).is_ok(),
                !agent,
                "{k:?}"
            );
            let other = topic(&SiteId::new("pozo-b").expect("valid"), k);
            assert_eq!(site_may_publish("pozo-a", &other), Err(Denied::OtherSite));
            assert_eq!(site_may_subscribe("pozo-a", &other), Err(Denied::OtherSite));
        }
        assert_eq!(
            site_may_publish("pozo-a", "caudal/v1/pozo-a/ack"),
            Err(Denied::CloudOnly("ack"))
        );
        for f in [
            "caudal/v1/#",
            "caudal/v1/+/ack",
            "caudal/v1/pozo-a/#",
            "$share/g/caudal/v1/pozo-a/ack",
        ] {
            assert_eq!(
                site_may_subscribe("pozo-a", f),
                Err(Denied::Wildcard),
                "{f}"
            );
        }
        for t in [
            "x",
            "caudal/v1/pozo-a",
            "caudal/v1/pozo-a/ack/x",
            "caudal/v1/pozo-a/",
        ] {
            assert_eq!(site_may_publish("pozo-a", t), Err(Denied::Foreign), "{t}");
        }
        // A site id is a whole path segment: no prefix tricks.
        assert_eq!(
            site_may_publish("pozo", "caudal/v1/pozo-a/telemetry"),
            Err(Denied::OtherSite)
        );
    }
}
