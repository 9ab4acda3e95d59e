//! The agent's counters and gauges, and the local `/metrics` + `/healthz` endpoint.
//!
//! Every component gets an `Arc<Metrics>` and counts what it received, stored, sent, dropped
//! and failed. The endpoint serves the Prometheus text format on the configured local address.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};
use tokio::net::TcpListener;

/// Labels of per-device poll counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollLabels {
    pub bus: String,
    pub device: String,
    /// `ok`, `timeout`, `exception`, `bad_frame`, `io`, `backoff`.
    pub result: String,
}

/// Labels of bytes discarded on a bus instead of taken as a reply.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiscardLabels {
    pub bus: String,
    /// `stale`, `other_unit`, `other_function`, `noise` (see `modbus::rtu::Discard`).
    pub cause: String,
}

/// Labels naming a device.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device: String,
}

/// Labels naming a kind (record kind, flag, error kind...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Labels naming why something was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Labels naming a kind of message and why it was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindReasonLabels {
    pub kind: String,
    pub reason: String,
}

/// Labels of validation flags.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlagLabels {
    pub device: String,
    pub flag: String,
}

/// All of the agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Polls by bus, device and result.
    pub polls: Family<PollLabels, Counter>,
    /// Seconds one device poll took (all its register reads).
    pub poll_duration: Histogram,
    /// Received bytes thrown away on RTU lines instead of taken as a reply, by bus and cause.
    pub discarded: Family<DiscardLabels, Counter>,
    /// Quality flags raised by validation.
    pub flags: Family<FlagLabels, Counter>,
    /// Records committed to the outbox, by kind (reading, event, gap).
    pub stored: Family<KindLabels, Counter>,
    /// Outbox write failures by kind (disk_full, io, ...).
    pub store_errors: Family<KindLabels, Counter>,
    /// Records evicted from the outbox because of the disk budget.
    pub evicted: Counter,
    /// Records published in a batch (a record sent twice counts twice).
    pub sent: Counter,
    /// Records the cloud acknowledged and the outbox deleted.
    pub acked: Counter,
    /// Batches the cloud rejected.
    pub rejected_batches: Counter,
    /// Topic filters the broker refused in a SUBACK (acks, commands or desired configuration
    /// would not arrive).
    pub subscriptions_refused: Counter,
    /// Incoming MQTT payloads that could not be decoded, by topic kind.
    pub bad_payloads: Family<KindLabels, Counter>,
    /// `accepted` acks that named records the agent did not send in that batch, by reason
    /// (`unknown_batch`, `outside_batch`, `other_site`); only the intersection was deleted.
    pub acks_refused: Family<ReasonLabels, Counter>,
    /// Acks, commands and desired configurations refused for their signature, by kind (`ack`,
    /// `command`, `desired_config`) and reason (`unsigned`, `unknown_key`, `bad_signature`).
    pub cloud_refused: Family<KindReasonLabels, Counter>,
    /// Records in the outbox not yet acknowledged.
    pub backlog: Gauge,
    /// Age in seconds of the oldest record not yet acknowledged.
    pub backlog_age_seconds: Gauge<i64, AtomicI64>,
    /// Bytes of record payload held by the outbox.
    pub outbox_bytes: Gauge,
    /// Seconds from publishing a batch to receiving its acknowledgement.
    pub ack_latency: Histogram,
    /// MQTT connection attempts by result (ok, refused, error).
    pub connects: Family<KindLabels, Counter>,
    /// 1 while connected to the broker.
    pub connected: Gauge,
    /// 1 while the wall clock is trusted.
    pub clock_trusted: Gauge,
    /// Readings re-stamped after the clock became trustworthy.
    pub restamped: Counter<u64, AtomicU64>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("caudal_agent");
        let m = Metrics {
            polls: Family::default(),
            poll_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            discarded: Family::default(),
            flags: Family::default(),
            stored: Family::default(),
            store_errors: Family::default(),
            evicted: Counter::default(),
            sent: Counter::default(),
            acked: Counter::default(),
            rejected_batches: Counter::default(),
            subscriptions_refused: Counter::default(),
            bad_payloads: Family::default(),
            acks_refused: Family::default(),
            cloud_refused: Family::default(),
            backlog: Gauge::default(),
            backlog_age_seconds: Gauge::default(),
            outbox_bytes: Gauge::default(),
            ack_latency: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            connects: Family::default(),
            connected: Gauge::default(),
            clock_trusted: Gauge::default(),
            restamped: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("polls", "Device polls by result", m.polls.clone());
        registry.register(
            "rtu_discarded",
            "Received bytes discarded on RTU lines instead of taken as a reply, by cause",
            m.discarded.clone(),
        );
        registry.register(
            "poll_duration_seconds",
            "Duration of one device poll",
            m.poll_duration.clone(),
        );
        registry.register(
            "quality_flags",
            "Quality flags raised by validation",
            m.flags.clone(),
        );
        registry.register(
            "records_stored",
            "Records committed to the outbox",
            m.stored.clone(),
        );
        registry.register(
            "store_errors",
            "Outbox write failures",
            m.store_errors.clone(),
        );
        registry.register(
            "records_evicted",
            "Records evicted by the disk budget",
            m.evicted.clone(),
        );
        registry.register(
            "records_sent",
            "Records published in batches",
            m.sent.clone(),
        );
        registry.register(
            "records_acked",
            "Records acknowledged by the cloud",
            m.acked.clone(),
        );
        registry.register(
            "batches_rejected",
            "Batches rejected by the cloud",
            m.rejected_batches.clone(),
        );
        registry.register(
            "subscriptions_refused",
            "Topic filters the broker refused to subscribe (SUBACK failure)",
            m.subscriptions_refused.clone(),
        );
        registry.register(
            "bad_payloads",
            "Undecodable incoming payloads",
            m.bad_payloads.clone(),
        );
        registry.register(
            "acks_refused",
            "Acks refused wholly or in part: unknown batch, seqs outside the batch, another site, \
             not signed by the cloud's key",
            m.acks_refused.clone(),
        );
        registry.register(
            "cloud_messages_refused",
            "Messages from the cloud refused for their signature, by kind and reason",
            m.cloud_refused.clone(),
        );
        registry.register(
            "backlog_records",
            "Records not yet acknowledged",
            m.backlog.clone(),
        );
        registry.register(
            "backlog_age_seconds",
            "Age of the oldest unacknowledged record",
            m.backlog_age_seconds.clone(),
        );
        registry.register(
            "outbox_bytes",
            "Bytes of records in the outbox",
            m.outbox_bytes.clone(),
        );
        registry.register(
            "ack_latency_seconds",
            "Publish to acknowledgement latency",
            m.ack_latency.clone(),
        );
        registry.register(
            "mqtt_connects",
            "MQTT connection attempts by result",
            m.connects.clone(),
        );
        registry.register(
            "mqtt_connected",
            "1 while connected to the broker",
            m.connected.clone(),
        );
        registry.register(
            "clock_trusted",
            "1 while the wall clock is trusted",
            m.clock_trusted.clone(),
        );
        registry.register(
            "readings_restamped",
            "Readings re-stamped after clock sync",
            m.restamped.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn kind(kind: &str) -> KindLabels {
        KindLabels {
            kind: kind.to_string(),
        }
    }

    pub fn kind_reason(kind: &str, reason: &str) -> KindReasonLabels {
        KindReasonLabels {
            kind: kind.to_string(),
            reason: reason.to_string(),
        }
    }

    pub fn reason(reason: &str) -> ReasonLabels {
        ReasonLabels {
            reason: reason.to_string(),
        }
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get({
                let m = metrics.clone();
                move || async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(|| async { (StatusCode::OK, "ok\n").into_response() }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics address; a clear error names it when it is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
