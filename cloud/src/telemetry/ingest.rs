//! MQTT ingest: receives agents' batches and statuses, stores them, then acknowledges.
//!
//! ```text
//!  broker ──v5──▶ [event loop] ──inbound──▶ [dispatcher] ──mpsc (one per worker)──▶ [worker × N]
//!   ▲  ▲  always polled   (bounded)         site → hash → worker                  decode, check,
//!   │  └── PUBACK in arrival order ◀── [sequencer] ◀── done with the message ──── store group
//!   └──────────── ack (QoS 1) after commit ◀───────────────────────────────────── (1 tx), ack
//!   subscriptions: $share/{group}/caudal/v1/+/telemetry, caudal/v1/+/status
//! ```
//!
//! - One task polls the MQTT event loop without ever waiting on anything else, so the workers'
//!   acks always leave. It hands each message to the dispatcher, which hands it to a worker
//!   chosen by its site, so one site's messages are handled in arrival order while different
//!   sites are stored concurrently.
//! - Back-pressure is MQTT flow control. The ingest acknowledges messages itself (manual
//!   PUBACKs) and asks for a receive maximum (see [`receive_window`]): the broker sends no more
//!   unacknowledged QoS 1 messages than that. A message is PUBACKed only once the ingest is done
//!   with it (its batch committed and its ack published, or it was refused, or the database did
//!   not take it), and in arrival order, as MQTT requires; so when the workers fall behind the
//!   window fills and the broker holds the rest. When a worker's queue is full the dispatcher
//!   waits for room (counted in `ingest_backpressure_waits_total`) while the event loop goes on.
//!   Some brokers send beyond the window under load (Mosquitto 2.0.11 was seen 50 messages
//!   over): the inbound channel holds such messages too, up to `ingest.inbound_bytes` of them.
//!   Only a message past that budget is dropped, PUBACKed and counted
//!   (`ingest_overflow_dropped_total`); no ack reaches its agent, which re-sends it.
//!   `ingest_unacked` is how many messages the ingest holds unacknowledged.
//! - A worker takes the message at the head of its queue and whatever else is already waiting
//!   there (up to `ingest.group_bytes` of payload, at most `ingest.queue` more messages): a
//!   group. Each batch of the group is decoded and checked on its own; a refused payload is kept
//!   in `dead_letters` with the reason, counted by reason, and answered with a `rejected` ack
//!   when its site and batch id can be read. The batches that pass are stored in one
//!   transaction, and each gets its [`Ack`] only after that commit. Under load a worker's queue
//!   fills while it commits, so groups grow and the commit (the WAL flush) is paid once for many
//!   batches; an idle ingest stores each batch alone, as it arrives.
//! - A database error stores nothing and sends no ack: the agents re-send after their ack
//!   timeout. When a group of several batches fails, each batch is stored again in its own
//!   transaction (`ingest_group_splits_total`), so one batch the database cannot take never
//!   holds back the acks of the others.
//! - A status message ends the group before it, so a site's batches and statuses are stored in
//!   arrival order.
//! - Nothing in a payload can stop the loop: every failure is a value handled per message.
//! - The MQTT session is clean: after a reconnect the ingest subscribes again and owes no
//!   PUBACK for the last connection's messages (the sequencer forgets them); batches in flight
//!   during the outage are re-sent by their agents, and the store takes each once.

use crate::core::Shutdown;
use crate::core::config::{IngestConfig, MqttConfig};
use crate::core::db::Db;
use crate::core::metrics::{KindLabels, ReasonLabels};
use crate::telemetry::store::{self, StoreError};
use caudal_common::payload::{self, Payload};
use caudal_common::topic::{self, Topic, TopicKind};
use caudal_common::{Ack, AckStatus, Batch, DecodeError, SeqRange, SiteId, Status};
use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rumqttc::Transport;
use rumqttc::tokio_rustls::rustls::crypto::aws_lc_rs;
use rumqttc::tokio_rustls::rustls::pki_types::pem::PemObject;
use rumqttc::tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rumqttc::tokio_rustls::rustls::{ClientConfig, RootCertStore};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

/// Largest MQTT packet the ingest accepts; a v5 broker discards larger messages for this client
/// instead of sending them.
const MAX_INCOMING_PACKET: u32 = 16 << 20;
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Smallest receive maximum the ingest asks for. The embedded broker (rumqttd) ignores the
/// client's receive maximum and keeps up to 100 QoS 1 messages in flight to each client; a
/// window at least that large keeps what the ingest asks for true of what it gets.
const MIN_WINDOW: u16 = 128;
/// How long shutdown waits for workers to finish what they hold.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the ingest could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("mqtt.url {0:?}: expected mqtt://host:port or mqtts://host:port")]
    Url(String),
    #[error("{key} {path}: {source}")]
    File {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {path}: {reason}")]
    Pem {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS for the broker: {0}")]
    Tls(String),
}

/// Why a message was refused. Its [`Rejection::reason`] labels the rejection counter; its text
/// goes to the dead letter and to the `rejected` ack.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("topic {0:?} is not a Caudal v1 telemetry or status topic")]
    Topic(String),
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("payload names site {payload} but came on the topic of site {topic}")]
    SiteMismatch { topic: SiteId, payload: SiteId },
    #[error("invalid v1 payload: {0}")]
    Rule(String),
    #[error("site {0} is not registered")]
    UnknownSite(SiteId),
    #[error("site {0} is not active")]
    InactiveSite(SiteId),
}

impl Rejection {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Topic(_) => "bad_topic",
            Rejection::Decode(DecodeError::NoVersion(_)) => "not_json",
            Rejection::Decode(DecodeError::UnsupportedVersion(_)) => "unsupported_version",
            Rejection::Decode(DecodeError::Invalid(_)) => "invalid",
            Rejection::Decode(DecodeError::Rule(_) | DecodeError::Batch(_))
            | Rejection::Rule(_) => "rule",
            Rejection::SiteMismatch { .. } => "site_mismatch",
            Rejection::UnknownSite(_) => "unknown_site",
            Rejection::InactiveSite(_) => "inactive_site",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecordLabels {
    kind: &'static str,
    /// `stored` or `duplicate`.
    outcome: &'static str,
}

/// The ingest's counters.
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    /// Batches by outcome: `accepted`, `rejected`, `failed` (database error, no ack).
    batches: Family<KindLabels, Counter>,
    records: Family<RecordLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    store_errors: Counter,
    group_splits: Counter,
    group_batches: Histogram,
    dead_letter_errors: Counter,
    statuses: Counter,
    acks: Family<KindLabels, Counter>,
    ack_errors: Counter,
    backpressure: Counter,
    overflow: Counter,
    unacked: Gauge,
    batch_seconds: Histogram,
    connected: Gauge,
    subscribed: Gauge,
    connections: Family<KindLabels, Counter>,
}

impl IngestMetrics {
    /// Creates the counters and registers them.
    pub fn register(r: &mut Registry) -> IngestMetrics {
        let m = IngestMetrics {
            batches: Family::default(),
            records: Family::default(),
            rejected: Family::default(),
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
            "mqtt_connections",
            "Ingest connection attempts by result (ok, error)",
            m.connections.clone(),
        );
        m
    }
}

/// Client options for the broker at `url` (`mqtt://host:port`, `mqtts://host:port`).
pub fn mqtt_options(url: &str, cfg: &MqttConfig) -> Result<MqttOptions, IngestError> {
    let (tls, rest) = match url.strip_prefix("mqtts://") {
        Some(rest) => (true, rest),
        None => (
            false,
            url.strip_prefix("mqtt://")
                .ok_or_else(|| IngestError::Url(url.to_string()))?,
        ),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| IngestError::Url(url.to_string()))?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(IngestError::Url(url.to_string()));
    }
    let id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("caudal-cloud-{:08x}", fastrand::u32(..)));
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(u64::from(cfg.keep_alive_s.max(5))))
        .set_clean_start(true)
        .set_max_packet_size(Some(MAX_INCOMING_PACKET));
    if let Some(user) = &cfg.username {
        let pass = cfg
            .password
            .as_ref()
            .map(|p| p.expose())
            .unwrap_or_default();
        o.set_credentials(user.clone(), pass.to_string());
    }
    if tls {
        let config = tls_config(cfg)?;
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
    }
    Ok(o)
}

/// The TLS client configuration for an `mqtts://` broker: `mqtt.ca_file` as the only trusted
/// roots and, for mutual TLS, `mqtt.client_cert` with `mqtt.client_key`. The crypto provider is
/// named here: left to the process default, rustls panics when, as in this binary, more than
/// one is compiled in.
fn tls_config(cfg: &MqttConfig) -> Result<ClientConfig, IngestError> {
    let read = |key: &'static str, path: &Option<PathBuf>| -> Result<_, IngestError> {
        let path = path
            .clone()
            .ok_or_else(|| IngestError::Tls(format!("{key} is not set")))?;
        let bytes = std::fs::read(&path).map_err(|source| IngestError::File {
            key,
            path: path.clone(),
            source,
        })?;
        Ok((bytes, path))
    };
    let pem_certs = |key: &'static str, (pem, path): &(Vec<u8>, PathBuf)| {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| IngestError::Pem {
                key,
                path: path.clone(),
                reason: e.to_string(),
            })?;
        match certs.is_empty() {
            true => Err(IngestError::Pem {
                key,
                path: path.clone(),
                reason: "no PEM certificate in the file".into(),
            }),
            false => Ok(certs),
        }
    };
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(pem_certs(
        "mqtt.ca_file",
        &read("mqtt.ca_file", &cfg.ca_file)?,
    )?);
    if added == 0 {
        return Err(IngestError::Tls(
            "mqtt.ca_file holds no usable CA certificate".into(),
        ));
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| IngestError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    if cfg.client_cert.is_none() && cfg.client_key.is_none() {
        return Ok(builder.with_no_client_auth());
    }
    let chain = pem_certs(
        "mqtt.client_cert",
        &read("mqtt.client_cert", &cfg.client_cert)?,
    )?;
    let (key_pem, key_path) = read("mqtt.client_key", &cfg.client_key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| IngestError::Pem {
        key: "mqtt.client_key",
        path: key_path,
        reason: format!("no private key: {e}"),
    })?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| IngestError::Tls(format!("mqtt.client_cert with mqtt.client_key: {e}")))
}

/// The ingest: one dispatcher and its workers.
pub struct Ingest {
    options: MqttOptions,
    cfg: IngestConfig,
    db: Db,
    metrics: IngestMetrics,
}

impl Ingest {
    pub fn new(options: MqttOptions, cfg: IngestConfig, db: Db, metrics: IngestMetrics) -> Self {
        Ingest {
            options,
            cfg,
            db,
            metrics,
        }
    }

    /// Runs until `shutdown`, then lets the workers finish what they hold (their acks still go
    /// out) for at most [`DRAIN_TIMEOUT`].
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let workers = self.cfg.workers.max(1);
        let queue = self.cfg.queue.max(1);
        let window = receive_window(workers, queue);
        self.options
            .set_manual_acks(true)
            .set_receive_maximum(Some(window));
        let window = usize::from(window);
        // Worker acks, the sequencer's PUBACKs and subscriptions; the event loop drains it
        // continuously, so its size only smooths bursts.
        let (client, mut eventloop) = AsyncClient::new(self.options, window + 16);
        let ids = Arc::new(IngestIds::new());
        let (seq_tx, seq_rx) = mpsc::unbounded_channel();
        let mut senders = Vec::with_capacity(workers);
        let mut tasks = JoinSet::new();
        for _ in 0..workers {
            let (tx, rx) = mpsc::channel(queue);
            senders.push(tx);
            let w = Worker {
                rx,
                group_bytes: self.cfg.group_bytes,
                group_max: queue + 1,
                db: self.db.clone(),
                client: client.clone(),
                metrics: self.metrics.clone(),
                ids: ids.clone(),
            };
            tasks.spawn(w.run());
        }
        // Bounded in bytes, not messages: every message a broker that honours the receive
        // maximum may send fits, and so do those of a broker that sends more, up to the budget.
        let (inbound, inbound_rx) = mpsc::unbounded_channel();
        let held = Arc::new(InboundBudget::new(self.cfg.inbound_bytes));
        tasks.spawn(dispatch(
            inbound_rx,
            held.clone(),
            senders,
            self.metrics.clone(),
        ));
        // Which connection is current: a PUBACK is sent only on the connection its message came
        // on (rumqttd drops a connection that acknowledges a packet id it did not send).
        let connection = Arc::new(AtomicU64::new(0));
        let sequencer = tokio::spawn(sequence_pubacks(
            seq_rx,
            client.clone(),
            connection.clone(),
            self.metrics.unacked.clone(),
        ));
        let filters = [
            topic::shared(&self.cfg.group, TopicKind::Telemetry),
            topic::all_sites(TopicKind::Status),
        ];
        let m = &self.metrics;
        let mut backoff = MIN_BACKOFF;
        let mut token = 0u64;
        loop {
            let ev = tokio::select! {
                _ = shutdown.wait() => break,
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // A new connection owes nothing for the messages of the last one.
                    connection.fetch_add(1, Ordering::SeqCst);
                    let _ = seq_tx.send(Seq::Reset);
                    m.connected.set(1);
                    m.connections.get_or_create(&KindLabels::new("ok")).inc();
                    backoff = MIN_BACKOFF;
                    tracing::info!(filters = ?filters, "connected to the MQTT broker; subscribing");
                    for f in &filters {
                        if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                            tracing::error!(filter = %f, error = %e, "cannot subscribe");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused: Vec<_> = ack
                        .return_codes
                        .iter()
                        .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                        .collect();
                    if refused.is_empty() {
                        m.subscribed.set(1);
                    } else {
                        tracing::error!(
                            codes = ?refused,
                            "the broker refused a subscription; that telemetry will not arrive"
                        );
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    token += 1;
                    let mut header = p.clone();
                    header.payload = Default::default();
                    let on = connection.load(Ordering::SeqCst);
                    m.unacked.inc();
                    let _ = seq_tx.send(Seq::Received(token, on, Box::new(header)));
                    let size = held_size(&p);
                    let msg = Message {
                        size,
                        publish: p,
                        received_at: Utc::now(),
                        started: Instant::now(),
                        _delivery: Delivery {
                            token,
                            tx: seq_tx.clone(),
                        },
                    };
                    if let Err(before) = held.admit(size) {
                        // Only a broker that sends far beyond the receive maximum gets here.
                        // The message is dropped (and so PUBACKed, keeping the acks in order
                        // and the connection read); no ack goes to its agent, which re-sends it.
                        m.overflow.inc();
                        tracing::warn!(
                            topic = %String::from_utf8_lossy(&msg.publish.topic),
                            window,
                            unacked = m.unacked.get(),
                            held_bytes = before,
                            "the broker sent beyond the receive maximum and the inbound budget \
                             (ingest.inbound_bytes) is full; message dropped"
                        );
                        drop(msg);
                    } else if inbound.send(msg).is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    m.connected.set(0);
                    m.subscribed.set(0);
                    tracing::warn!(reason = ?d.reason_code, "the broker closed the connection");
                }
                Ok(_) => {}
                Err(e) => {
                    connection.fetch_add(1, Ordering::SeqCst);
                    let _ = seq_tx.send(Seq::Reset);
                    m.connected.set(0);
                    m.subscribed.set(0);
                    m.connections.get_or_create(&KindLabels::new("error")).inc();
                    tracing::warn!(error = %e, retry_in = ?backoff, "MQTT connection failed");
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }

        // Let the dispatcher and workers finish what they hold; keep polling so their acks and
        // PUBACKs reach the broker.
        drop(inbound);
        drop(seq_tx);
        let deadline = tokio::time::sleep(DRAIN_TIMEOUT);
        tokio::pin!(deadline);
        let mut polling = true;
        loop {
            tokio::select! {
                r = tasks.join_next() => if r.is_none() { break },
                _ = &mut deadline => {
                    tracing::warn!("ingest workers did not finish in time; abandoning their batches");
                    tasks.abort_all();
                    break;
                }
                ev = eventloop.poll(), if polling => if ev.is_err() { polling = false },
            }
        }
        // The workers are gone, so the sequencer's channel closes once it has sent what it can.
        let flushed = async {
            tokio::pin!(sequencer);
            loop {
                tokio::select! {
                    _ = &mut sequencer => break,
                    ev = eventloop.poll(), if polling => if ev.is_err() { polling = false },
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), flushed).await;
        let _ = client.try_disconnect();
        let flush = async {
            while let Ok(ev) = eventloop.poll().await {
                if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
        m.connected.set(0);
        m.subscribed.set(0);
        tracing::info!("ingest stopped");
    }
}

/// The MQTT v5 receive maximum the ingest asks for: every message the workers can hold (each a
/// group of `queue + 1` and a full queue) plus one waiting in the dispatcher, and never less than
/// [`MIN_WINDOW`]. The broker sends no more unacknowledged QoS 1 messages than this, which bounds
/// what the ingest holds.
fn receive_window(workers: usize, queue: usize) -> u16 {
    let n = workers.saturating_mul(queue.saturating_mul(2).saturating_add(1));
    u16::try_from(n.saturating_add(1))
        .unwrap_or(u16::MAX)
        .max(MIN_WINDOW)
}

/// Hands each received message to the worker of its site, in arrival order. When that worker's
/// queue is full it waits for room: the messages behind wait in the inbound channel while the
/// event loop keeps running, and the broker stops sending once the receive window is used up.
async fn dispatch(
    mut inbound: mpsc::UnboundedReceiver<Message>,
    held: Arc<InboundBudget>,
    senders: Vec<mpsc::Sender<Message>>,
    metrics: IngestMetrics,
) {
    while let Some(msg) = inbound.recv().await {
        held.release(msg.size);
        let tx = &senders[worker_for(&msg.publish.topic, senders.len())];
        let msg = match tx.try_send(msg) {
            Ok(()) => continue,
            Err(mpsc::error::TrySendError::Full(msg)) => msg,
            Err(mpsc::error::TrySendError::Closed(_)) => break,
        };
        metrics.backpressure.inc();
        if tx.send(msg).await.is_err() {
            break;
        }
    }
}

/// What the PUBACK sequencer hears: a message received (its token, the connection it came on,
/// its publish without payload), a message the ingest is done with, or a new connection.
#[derive(Debug)]
enum Seq {
    Received(u64, u64, Box<Publish>),
    Done(u64),
    Reset,
}

/// Where a message stands in the PUBACK order. Dropping it tells the sequencer the ingest is
/// done with the message, whatever became of it (acked, rejected, not stored, dropped).
#[derive(Debug)]
struct Delivery {
    token: u64,
    tx: mpsc::UnboundedSender<Seq>,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        let _ = self.tx.send(Seq::Done(self.token));
    }
}

/// Sends PUBACKs in the order the messages arrived, each once the ingest is done with its
/// message. MQTT requires a client to acknowledge QoS 1 messages in arrival order (some brokers
/// drop a connection that does not), while the workers finish them out of order. A message not
/// yet done holds back the PUBACKs behind it, so the broker's window is what bounds the ingest.
///
/// A connection lost while a PUBACK is on its way can still let that PUBACK out on the next
/// connection (the client's request channel cannot be recalled): the broker then ignores it or,
/// rumqttd, drops the connection once more; either way the ingest still handles the message, and
/// what it loses its agent re-sends.
async fn sequence_pubacks(
    mut rx: mpsc::UnboundedReceiver<Seq>,
    client: AsyncClient,
    connection: Arc<AtomicU64>,
    unacked: Gauge,
) {
    let mut first = 0u64;
    let mut waiting: VecDeque<(u64, Box<Publish>, bool)> = VecDeque::new();
    while let Some(s) = rx.recv().await {
        match s {
            Seq::Received(token, on, publish) => {
                if waiting.is_empty() {
                    first = token;
                }
                waiting.push_back((on, publish, false));
            }
            Seq::Done(token) => {
                // A token from before the last reconnect is not waiting any more.
                let slot = token
                    .checked_sub(first)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| waiting.get_mut(i));
                if let Some(slot) = slot {
                    slot.2 = true;
                }
            }
            Seq::Reset => {
                unacked.dec_by(i64::try_from(waiting.len()).unwrap_or(i64::MAX));
                waiting.clear();
            }
        }
        while waiting.front().is_some_and(|(_, _, done)| *done) {
            if let Some((on, publish, _)) = waiting.pop_front() {
                first += 1;
                unacked.dec();
                if on != connection.load(Ordering::SeqCst) {
                    continue;
                }
                // Waits only for room in the request channel, which the event loop drains.
                if client.ack(&publish).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Bytes of messages waiting between the event loop and the dispatcher, against
/// `ingest.inbound_bytes`.
#[derive(Debug)]
struct InboundBudget {
    held: AtomicUsize,
    budget: usize,
}

impl InboundBudget {
    fn new(budget: usize) -> Self {
        InboundBudget {
            held: AtomicUsize::new(0),
            budget,
        }
    }

    /// Takes `size` bytes of the budget, or returns what is held when they do not fit. A
    /// message alone always fits, however large (the broker's packet limit bounds it).
    fn admit(&self, size: usize) -> Result<(), usize> {
        let mut held = self.held.load(Ordering::SeqCst);
        loop {
            if held > 0 && held.saturating_add(size) > self.budget {
                return Err(held);
            }
            match self.held.compare_exchange_weak(
                held,
                held + size,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => held = now,
            }
        }
    }

    /// Gives back what [`InboundBudget::admit`] took.
    fn release(&self, size: usize) {
        self.held.fetch_sub(size, Ordering::SeqCst);
    }
}

/// What a message costs the inbound budget: its payload and topic, and a fixed share for the
/// rest of what is kept of it.
fn held_size(p: &Publish) -> usize {
    p.payload.len() + p.topic.len() + 256
}

/// One received MQTT message.
#[derive(Debug)]
struct Message {
    /// [`held_size`] of the publish.
    size: usize,
    publish: Publish,
    received_at: DateTime<Utc>,
    started: Instant,
    /// Never read: dropping it PUBACKs the message.
    _delivery: Delivery,
}

/// The worker for a topic: by its site (`caudal/v1/{site}/...`), so one site always maps to the
/// same worker.
fn worker_for(topic: &[u8], workers: usize) -> usize {
    let site = topic.split(|b| *b == b'/').nth(2).unwrap_or(topic);
    let mut h = DefaultHasher::new();
    site.hash(&mut h);
    (h.finish() % workers.max(1) as u64) as usize
}

/// Identifiers that tie a batch's log lines together: a random prefix per process and a counter.
#[derive(Debug)]
struct IngestIds {
    prefix: u32,
    next: AtomicU64,
}

impl IngestIds {
    fn new() -> Self {
        IngestIds {
            prefix: fastrand::u32(..),
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> String {
        format!(
            "{:08x}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// Stores the messages of the sites that hash to it, in groups of what is waiting.
struct Worker {
    rx: mpsc::Receiver<Message>,
    /// Payload bytes after which a group takes no more messages.
    group_bytes: usize,
    /// Most messages in one group.
    group_max: usize,
    db: Db,
    client: AsyncClient,
    metrics: IngestMetrics,
    ids: Arc<IngestIds>,
}

/// A batch that was decoded and passed the checks, waiting to be stored with its group.
struct Pending {
    id: String,
    topic: String,
    site: SiteId,
    batch: Batch,
    msg: Message,
}

impl Worker {
    async fn run(mut self) {
        let mut group = Vec::with_capacity(self.group_max);
        while let Some(first) = self.rx.recv().await {
            let mut bytes = first.publish.payload.len();
            group.push(first);
            while bytes < self.group_bytes && group.len() < self.group_max {
                match self.rx.try_recv() {
                    Ok(msg) => {
                        bytes += msg.publish.payload.len();
                        group.push(msg);
                    }
                    Err(_) => break,
                }
            }
            self.handle_group(&mut group).await;
        }
    }

    /// Checks each message of a group on its own, stores the batches that pass together, and
    /// handles a status after the batches that arrived before it.
    async fn handle_group(&self, group: &mut Vec<Message>) {
        let mut pending = Vec::with_capacity(group.len());
        for msg in group.drain(..) {
            let id = self.ids.next();
            let span = tracing::info_span!("ingest", id = %id, site = tracing::field::Empty);
            let topic = String::from_utf8_lossy(&msg.publish.topic).into_owned();
            match Topic::parse(&topic) {
                Ok(Topic {
                    site,
                    kind: TopicKind::Telemetry,
                }) => {
                    if let Some(p) = self.check(id, topic, site, msg).instrument(span).await {
                        pending.push(p);
                    }
                }
                Ok(Topic {
                    site,
                    kind: TopicKind::Status,
                }) => {
                    self.store_group(std::mem::take(&mut pending)).await;
                    self.status(&topic, site, &msg).instrument(span).await;
                }
                Ok(Topic { site, .. }) => {
                    let r = Rejection::Topic(topic.clone());
                    self.reject(&topic, Some(&site), None, &msg, r)
                        .instrument(span)
                        .await
                }
                Err(_) => {
                    let r = Rejection::Topic(topic.clone());
                    self.reject(&topic, None, None, &msg, r)
                        .instrument(span)
                        .await
                }
            }
        }
        self.store_group(pending).await;
    }

    /// Decodes and checks a batch; a refused one is dead-lettered and answered here.
    async fn check(
        &self,
        id: String,
        topic: String,
        site: SiteId,
        msg: Message,
    ) -> Option<Pending> {
        let span = tracing::Span::current();
        span.record("site", site.as_str());
        let batch = match payload::decode::<Batch>(&msg.publish.payload) {
            Ok(b) => b,
            Err(e) => {
                let batch = loose_batch_id(&msg.publish.payload);
                self.reject(&topic, Some(&site), batch.as_deref(), &msg, e.into())
                    .await;
                return None;
            }
        };
        if batch.site != site {
            let r = Rejection::SiteMismatch {
                topic: site.clone(),
                payload: batch.site.clone(),
            };
            self.reject(&topic, Some(&site), Some(&batch.batch), &msg, r)
                .await;
            return None;
        }
        Some(Pending {
            id,
            topic,
            site,
            batch,
            msg,
        })
    }

    /// Stores a group in one transaction and answers each batch. When a group of several fails,
    /// each batch is tried again alone, so only a batch the database cannot take goes unanswered.
    async fn store_group(&self, group: Vec<Pending>) {
        if group.is_empty() {
            return;
        }
        match self.store(&group).await {
            Ok(()) => {}
            Err(e) if group.len() > 1 => {
                self.metrics.group_splits.inc();
                tracing::warn!(
                    batches = group.len(),
                    error = %e,
                    "a group of batches was not stored; storing each on its own"
                );
                for p in &group {
                    if let Err(e) = self.store(std::slice::from_ref(p)).await {
                        self.failed(p, &e);
                    }
                }
            }
            Err(e) => self.failed(&group[0], &e),
        }
    }

    /// One transaction for `group`, then the acks (accepted, or rejected for a batch whose site
    /// is unknown or inactive). `Err`: a database error; nothing was stored or answered.
    async fn store(&self, group: &[Pending]) -> Result<(), sqlx::Error> {
        let input: Vec<(&Batch, DateTime<Utc>)> = group
            .iter()
            .map(|p| (&p.batch, p.msg.received_at))
            .collect();
        let stored = store::store_batches(&self.db, &input).await?;
        let m = &self.metrics;
        m.group_batches.observe(group.len() as f64);
        let mut totals = [0u64; 3];
        for (p, outcome) in group.iter().zip(&stored.outcomes) {
            if outcome.is_ok() {
                totals[0] += p.batch.readings.len() as u64;
                totals[1] += p.batch.events.len() as u64;
                totals[2] += p.batch.gaps.len() as u64;
            }
        }
        let new = stored.stored;
        for (kind, total, new) in [
            ("reading", totals[0], new.readings),
            ("event", totals[1], new.events),
            ("gap", totals[2], new.gaps),
        ] {
            let dup = total.saturating_sub(new);
            if new > 0 {
                m.records
                    .get_or_create(&RecordLabels {
                        kind,
                        outcome: "stored",
                    })
                    .inc_by(new);
            }
            if dup > 0 {
                m.records
                    .get_or_create(&RecordLabels {
                        kind,
                        outcome: "duplicate",
                    })
                    .inc_by(dup);
            }
        }
        for (p, outcome) in group.iter().zip(stored.outcomes) {
            let span = tracing::info_span!("ingest", id = %p.id, site = %p.site);
            self.answer(p, outcome).instrument(span).await;
        }
        Ok(())
    }

    /// Answers one batch of a committed group.
    async fn answer(&self, p: &Pending, outcome: Result<(), StoreError>) {
        let batch = &p.batch;
        let why = match outcome {
            Ok(()) => {
                let m = &self.metrics;
                m.batches.get_or_create(&KindLabels::new("accepted")).inc();
                let ack = Ack {
                    v: caudal_common::SCHEMA_VERSION,
                    site: p.site.clone(),
                    batch: batch.batch.clone(),
                    status: AckStatus::Accepted,
                    seqs: SeqRange::compact(batch.seqs()),
                    reason: None,
                };
                self.ack(&ack).await;
                m.batch_seconds
                    .observe(p.msg.started.elapsed().as_secs_f64());
                tracing::debug!(
                    batch = %batch.batch,
                    records = batch.len(),
                    "batch stored and acknowledged"
                );
                return;
            }
            Err(StoreError::UnknownSite(s)) => Rejection::UnknownSite(s),
            Err(StoreError::InactiveSite(s)) => Rejection::InactiveSite(s),
            Err(StoreError::Batch(rule)) => Rejection::Rule(rule.to_string()),
            Err(StoreError::Invalid(rule)) => Rejection::Rule(rule),
            Err(StoreError::Database(e)) => return self.failed(p, &e),
        };
        self.reject(&p.topic, Some(&p.site), Some(&batch.batch), &p.msg, why)
            .await
    }

    /// A batch the database did not store: counted, logged, not answered (its agent re-sends).
    fn failed(&self, p: &Pending, e: &sqlx::Error) {
        self.metrics.store_errors.inc();
        self.metrics
            .batches
            .get_or_create(&KindLabels::new("failed"))
            .inc();
        tracing::error!(
            id = %p.id,
            site = %p.site,
            batch = %p.batch.batch,
            error = %e,
            "batch not stored; no ack, the agent will re-send it"
        );
    }

    async fn status(&self, topic: &str, site: SiteId, msg: &Message) {
        // A retained status is cleared with an empty payload; there is nothing to store.
        if msg.publish.payload.is_empty() {
            return;
        }
        let status = match payload::decode::<Status>(&msg.publish.payload) {
            Ok(s) => s,
            Err(e) => return self.reject(topic, Some(&site), None, msg, e.into()).await,
        };
        if status.site != site {
            let r = Rejection::SiteMismatch {
                topic: site.clone(),
                payload: status.site.clone(),
            };
            return self.reject(topic, Some(&site), None, msg, r).await;
        }
        match store::store_status(&self.db, &status, msg.received_at).await {
            Ok(()) => {
                self.metrics.statuses.inc();
                tracing::debug!(site = %site, online = status.online, "status stored");
            }
            Err(StoreError::UnknownSite(s)) => {
                self.reject(topic, Some(&site), None, msg, Rejection::UnknownSite(s))
                    .await
            }
            Err(StoreError::InactiveSite(s)) => {
                self.reject(topic, Some(&site), None, msg, Rejection::InactiveSite(s))
                    .await
            }
            Err(StoreError::Invalid(rule)) => {
                self.reject(topic, Some(&site), None, msg, Rejection::Rule(rule))
                    .await
            }
            Err(StoreError::Batch(rule)) => {
                let r = Rejection::Rule(rule.to_string());
                self.reject(topic, Some(&site), None, msg, r).await
            }
            Err(StoreError::Database(e)) => {
                self.metrics.store_errors.inc();
                tracing::error!(site = %site, error = %e, "status not stored");
            }
        }
    }

    /// Dead-letters a refused message, counts it, and answers a batch with a `rejected` ack when
    /// its site and batch id are known.
    async fn reject(
        &self,
        topic: &str,
        site: Option<&SiteId>,
        batch: Option<&str>,
        msg: &Message,
        why: Rejection,
    ) {
        let m = &self.metrics;
        let reason = why.to_string();
        m.rejected
            .get_or_create(&ReasonLabels::new(why.reason()))
            .inc();
        tracing::warn!(
            topic,
            batch,
            reason = %reason,
            bytes = msg.publish.payload.len(),
            "message refused"
        );
        if let Err(e) = store::dead_letter(
            &self.db,
            topic,
            site,
            &msg.publish.payload,
            &reason,
            msg.received_at,
        )
        .await
        {
            m.dead_letter_errors.inc();
            tracing::error!(topic, error = %e, "refused message not written to dead_letters");
        }
        let is_batch = topic.ends_with(TopicKind::Telemetry.suffix());
        if is_batch {
            m.batches.get_or_create(&KindLabels::new("rejected")).inc();
        }
        if let (true, Some(site), Some(batch)) = (is_batch, site, batch) {
            let ack = Ack {
                v: caudal_common::SCHEMA_VERSION,
                site: site.clone(),
                batch: batch.to_string(),
                status: AckStatus::Rejected,
                seqs: Vec::new(),
                reason: Some(reason),
            };
            self.ack(&ack).await;
        }
    }

    async fn ack(&self, ack: &Ack) {
        let status = match ack.status {
            AckStatus::Accepted => "accepted",
            AckStatus::Rejected => "rejected",
        };
        let t = topic::topic(&ack.site, TopicKind::Ack);
        // Waits only for room in the request channel, which the event loop drains continuously.
        let sent = self
            .client
            .publish(t, QoS::AtLeastOnce, false, ack.encode())
            .await;
        match sent {
            Ok(()) => {
                self.metrics
                    .acks
                    .get_or_create(&KindLabels::new(status))
                    .inc();
            }
            Err(e) => {
                self.metrics.ack_errors.inc();
                tracing::warn!(site = %ack.site, batch = %ack.batch, error = %e, "ack not sent");
            }
        }
    }
}

/// The `batch` field of a payload that did not decode, when it has one.
fn loose_batch_id(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v.get("batch")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbound_budget_holds_up_to_its_bytes() {
        let b = InboundBudget::new(1000);
        assert_eq!(b.admit(5000), Ok(()), "one message alone always fits");
        assert_eq!(b.admit(1), Err(5000));
        b.release(5000);
        assert_eq!(b.admit(600), Ok(()));
        assert_eq!(b.admit(400), Ok(()), "up to the budget exactly");
        assert_eq!(b.admit(1), Err(1000));
        b.release(600);
        assert_eq!(b.admit(600), Ok(()), "released bytes are free again");
    }

    #[test]
    fn one_site_always_maps_to_one_worker() {
        let a = worker_for(b"caudal/v1/pozo-1/telemetry", 4);
        assert_eq!(a, worker_for(b"caudal/v1/pozo-1/status", 4));
        assert!(worker_for(b"garbage", 4) < 4);
        assert_eq!(worker_for(b"", 1), 0);
    }

    #[test]
    fn broker_urls() {
        let cfg = MqttConfig::default();
        let o = mqtt_options("mqtt://broker.example:1999", &cfg).expect("valid");
        assert_eq!(o.broker_address(), ("broker.example".to_string(), 1999));
        let o = mqtt_options("mqtt://10.0.0.1", &cfg).expect("valid");
        assert_eq!(o.broker_address().1, 1883);
        let o = mqtt_options("mqtt://[::1]:1884", &cfg).expect("valid");
        assert_eq!(o.broker_address(), ("::1".to_string(), 1884));
        assert!(mqtt_options("tcp://x:1", &cfg).is_err());
        assert!(mqtt_options("mqtt://x:notaport", &cfg).is_err());
        assert!(mqtt_options("mqtt://", &cfg).is_err());
    }
}
