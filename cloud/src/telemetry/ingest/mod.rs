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
//!   over): the inbound channel holds such messages too, up to `ingest.inbound_bytes` of them
//!   (its bound: its capacity in messages is what that budget can hold at once).
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
//!
//! Its parts, one per task or concern: the event loop and the wiring of the others are here
//! ([`Ingest::run`]); [`connection`] sets up the client for the broker (URL, TLS); [`dispatch`]
//! hands messages to workers by site, within the inbound budget; [`worker`] decodes, checks,
//! stores and answers; [`sequencer`] sends the PUBACKs in arrival order; [`metrics`] counts.

mod connection;
mod dispatch;
mod metrics;
mod sequencer;
mod worker;

pub use connection::mqtt_options;
pub use metrics::IngestMetrics;
pub use worker::Rejection;

use crate::core::Shutdown;
use crate::core::config::IngestConfig;
use crate::core::db::Db;
use crate::core::metrics::KindLabels;
use caudal_common::topic::{self, TopicKind};
use chrono::{DateTime, Utc};
use dispatch::{InboundBudget, dispatch, held_size};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use sequencer::{Delivery, Seq, sequence_pubacks};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use worker::{IngestIds, Worker};

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
        // Unbounded on purpose, and bounded by what feeds it: see the sequencer's module doc.
        let (seq_tx, seq_rx) = mpsc::unbounded_channel();
        let mut senders = Vec::with_capacity(workers);
        let mut tasks = JoinSet::new();
        let refused_sites = Arc::new(crate::telemetry::dead_letter::RefusedSites::new(
            std::time::Duration::from_secs(self.cfg.refused_site_interval_s),
        ));
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
                refused_sites: refused_sites.clone(),
                dead_letter_max_payload: self.cfg.dead_letter_max_payload_bytes,
            };
            tasks.spawn(w.run());
        }
        // Bounded in bytes by the budget every message passes before it is sent: every message
        // a broker that honours the receive maximum may send fits, and so do those of a broker
        // that sends more, up to the budget. The channel's capacity is what the budget can hold
        // at once, so it has room whenever the budget had; the event loop never waits on it.
        let held = Arc::new(InboundBudget::new(self.cfg.inbound_bytes));
        let (inbound, inbound_rx) = mpsc::channel(held.most_messages());
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
                    let refused = match held.admit(size) {
                        Err(before) => Some((msg, before)),
                        Ok(()) => match inbound.try_send(msg) {
                            Ok(()) => None,
                            // Not while the capacity is what the budget holds; should it
                            // happen, the message is treated as one past the budget.
                            Err(mpsc::error::TrySendError::Full(msg)) => {
                                held.release(size);
                                Some((msg, held.bytes()))
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => break,
                        },
                    };
                    if let Some((msg, before)) = refused {
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
