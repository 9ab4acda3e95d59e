//! The process's Prometheus registry, served on `/metrics`.
//!
//! Each module registers its own counters into the registry while the process is wired (see
//! `lib.rs`), then the registry is frozen into [`Metrics`] and shared with the HTTP server.
//! Every name starts with `caudal_cloud_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels naming a kind (record kind, rejection reason, outcome...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

impl KindLabels {
    pub fn new(kind: &str) -> Self {
        KindLabels {
            kind: kind.to_string(),
        }
    }
}

/// Labels of a rejection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

impl ReasonLabels {
    pub fn new(reason: &str) -> Self {
        ReasonLabels {
            reason: reason.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: String,
    services: String,
}

/// A registry under construction, with the `caudal_cloud_` prefix and the process's info gauge.
pub fn registry(services: &str) -> Registry {
    let mut r = Registry::with_prefix("caudal_cloud");
    let info = Family::<InfoLabels, Gauge>::default();
    info.get_or_create(&InfoLabels {
        version: env!("CARGO_PKG_VERSION").to_string(),
        services: services.to_string(),
    })
    .set(1);
    r.register(
        "info",
        "Version and services of this process (always 1)",
        info,
    );
    r
}

/// Every metric of the process, frozen once the process is wired.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(registry: Registry) -> Self {
        Metrics { registry }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
