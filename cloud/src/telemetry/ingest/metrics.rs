//! The ingest's counters and gauges.

use crate::core::metrics::{KindLabels, ReasonLabels};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RecordLabels {
    pub(super) kind: &'static str,
    /// `stored` or `duplicate`.
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct SiteReasonLabels {
    pub(super) site: String,
    pub(super) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct SiteLabels {
    pub(super) site: String,
}

/// The ingest's counters.
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    /// Batches by outcome: `accepted`, `rejected`, `failed` (database error, no ack).
    pub(super) batches: Family<KindLabels, Counter>,
    pub(super) records: Family<RecordLabels, Counter>,
    pub(super) rejected: Family<ReasonLabels, Counter>,
    /// Batches refused for their signature, per site and reason (`bad_signature`,
    /// `unknown_key`, `unsigned`, `malformed_envelope`).
    pub(super) signature_refused: Family<SiteReasonLabels, Counter>,
    /// Batches accepted from a site without an enrolled key (`ingest.accept_unsigned`).
    pub(super) unsigned_accepted: Family<SiteLabels, Counter>,
    pub(super) store_errors: Counter,
    pub(super) group_splits: Counter,
    pub(super) group_batches: Histogram,
    pub(super) dead_letter_errors: Counter,
    pub(super) statuses: Counter,
    pub(super) acks: Family<KindLabels, Counter>,
    pub(super) ack_errors: Counter,
    pub(super) backpressure: Counter,
    pub(super) overflow: Counter,
    pub(super) unacked: Gauge,
    pub(super) batch_seconds: Histogram,
    pub(super) connected: Gauge,
    pub(super) subscribed: Gauge,
    /// Topic filters the broker refused in a SUBACK.
    pub(super) subscriptions_refused: Counter,
    pub(super) connections: Family<KindLabels, Counter>,
}

impl IngestMetrics {
    /// Creates the counters and registers them.
    pub fn register(r: &mut Registry) -> IngestMetrics {
        let m = IngestMetrics {
            batches: Family::default(),
            records: Family::default(),
            rejected: Family::default(),
            signature_refused: Family::default(),
            unsigned_accepted: Family::default(),
            store_errors: Counter::default(),
            group_splits: Counter::default(),
            group_batches: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            dead_letter_errors: Counter::default(),
            statuses: Counter::default(),
            acks: Family::default(),
            ack_errors: Counter::default(),
            backpressure: Counter::default(),
            overflow: Counter::default(),
            unacked: Gauge::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            connected: Gauge::default(),
            subscribed: Gauge::default(),
            subscriptions_refused: Counter::default(),
            connections: Family::default(),
        };
        r.register(
            "ingest_batches",
            "Batches by outcome (accepted, rejected, failed)",
            m.batches.clone(),
        );
        r.register(
            "ingest_records",
            "Records received in accepted batches, by kind and outcome (stored, duplicate)",
            m.records.clone(),
        );
        r.register(
            "ingest_rejected",
            "Messages refused and dead-lettered, by reason",
            m.rejected.clone(),
        );
        r.register(
            "ingest_signature_refused",
            "Batches refused for their signature, by site and reason (bad_signature, \
             unknown_key, unsigned, malformed_envelope)",
            m.signature_refused.clone(),
        );
        r.register(
            "ingest_unsigned_accepted",
            "Batches accepted from a site without an enrolled key (ingest.accept_unsigned)",
            m.unsigned_accepted.clone(),
        );
        r.register(
            "ingest_store_errors",
            "Batches or statuses not stored because of a database error",
            m.store_errors.clone(),
        );
        r.register(
            "ingest_group_splits",
            "Groups of batches that failed together and were stored again one batch at a time",
            m.group_splits.clone(),
        );
        r.register(
            "ingest_group_batches",
            "Batches stored together in one transaction",
            m.group_batches.clone(),
        );
        r.register(
            "ingest_dead_letter_errors",
            "Refused messages that could not be written to dead_letters",
            m.dead_letter_errors.clone(),
        );
        r.register(
            "ingest_statuses",
            "Agent statuses stored",
            m.statuses.clone(),
        );
        r.register("ingest_acks", "Acks published, by status", m.acks.clone());
        r.register(
            "ingest_ack_errors",
            "Acks that could not be handed to the MQTT client",
            m.ack_errors.clone(),
        );
        r.register(
            "ingest_backpressure_waits",
            "Times the dispatcher waited for room in a worker's queue",
            m.backpressure.clone(),
        );
        r.register(
            "ingest_overflow_dropped",
            "Messages dropped because the broker sent beyond the receive maximum and past the \
             inbound budget (ingest.inbound_bytes)",
            m.overflow.clone(),
        );
        r.register(
            "ingest_unacked",
            "Messages received from the broker and not yet PUBACKed (held by the ingest)",
            m.unacked.clone(),
        );
        r.register(
            "ingest_batch_seconds",
            "Time from receiving a batch to publishing its ack",
            m.batch_seconds.clone(),
        );
        r.register(
            "mqtt_connected",
            "1 while the ingest is connected to the broker",
            m.connected.clone(),
        );
        r.register(
            "ingest_subscribed",
            "1 once the broker accepted the ingest's subscriptions on this connection",
            m.subscribed.clone(),
        );
        r.register(
            "ingest_subscriptions_refused",
            "Topic filters the broker refused to subscribe (SUBACK failure): that telemetry will not arrive",
            m.subscriptions_refused.clone(),
        );
        r.register(
            "mqtt_connections",
            "Ingest connection attempts by result (ok, error)",
            m.connections.clone(),
        );
        m
    }
}
