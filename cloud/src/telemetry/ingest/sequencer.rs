//! The PUBACK sequencer: acknowledges each message to the broker once the ingest is done with
//! it, in the order the messages arrived.
//!
//! Its channel is the cloud's one unbounded channel (ARCHITECTURE.md, invariants), and must
//! stay so: its senders may neither wait (the event loop sends `Received` and `Reset` and must
//! always be polled; a [`Delivery`] sends `Done` from `Drop`, which cannot wait) nor drop an
//! entry (a lost `Received` or `Done` would hold back every later PUBACK for good). What it
//! holds is bounded by what feeds it: two entries per message received and not yet PUBACKed
//! (`ingest_unacked`, at most the receive maximum for a broker that honours it) and one per
//! reconnect; the sequencer takes them as they come, waiting only for room in the MQTT client's
//! request channel, which the event loop drains.

use prometheus_client::metrics::gauge::Gauge;
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::v5::Publish;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

/// What the PUBACK sequencer hears: a message received (its token, the connection it came on,
/// its publish without payload), a message the ingest is done with, or a new connection.
#[derive(Debug)]
pub(super) enum Seq {
    Received(u64, u64, Box<Publish>),
    Done(u64),
    Reset,
}

/// Where a message stands in the PUBACK order. Dropping it tells the sequencer the ingest is
/// done with the message, whatever became of it (acked, rejected, not stored, dropped).
#[derive(Debug)]
pub(super) struct Delivery {
    pub(super) token: u64,
    pub(super) tx: mpsc::UnboundedSender<Seq>,
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
pub(super) async fn sequence_pubacks(
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
