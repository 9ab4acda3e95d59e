//! The dispatcher: hands each received message to the worker of its site, and the inbound
//! budget that bounds, in bytes, what waits for it.

use super::Message;
use super::metrics::IngestMetrics;
use rumqttc::v5::mqttbytes::v5::Publish;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;

/// Hands each received message to the worker of its site, in arrival order. When that worker's
/// queue is full it waits for room: the messages behind wait in the inbound channel while the
/// event loop keeps running, and the broker stops sending once the receive window is used up.
pub(super) async fn dispatch(
    mut inbound: mpsc::Receiver<Message>,
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

/// Bytes of messages waiting between the event loop and the dispatcher, against
/// `ingest.inbound_bytes`.
#[derive(Debug)]
pub(super) struct InboundBudget {
    held: AtomicUsize,
    budget: usize,
}

impl InboundBudget {
    pub(super) fn new(budget: usize) -> Self {
        InboundBudget {
            held: AtomicUsize::new(0),
            budget,
        }
    }

    /// Takes `size` bytes of the budget, or returns what is held when they do not fit. A
    /// message alone always fits, however large (the broker's packet limit bounds it).
    pub(super) fn admit(&self, size: usize) -> Result<(), usize> {
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

    /// The most messages the budget holds at once, each costing at least [`HELD_OVERHEAD`]:
    /// the capacity of the inbound channel, which therefore has room whenever the budget does.
    pub(super) fn most_messages(&self) -> usize {
        self.budget / HELD_OVERHEAD + 1
    }

    /// Bytes held now.
    pub(super) fn bytes(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Gives back what [`InboundBudget::admit`] took.
    pub(super) fn release(&self, size: usize) {
        self.held.fetch_sub(size, Ordering::SeqCst);
    }
}

/// What every message costs the inbound budget beyond its payload and topic: a fixed share for
/// the rest of what is kept of it.
const HELD_OVERHEAD: usize = 256;

/// What a message costs the inbound budget: its payload and topic, and [`HELD_OVERHEAD`].
pub(super) fn held_size(p: &Publish) -> usize {
    p.payload.len() + p.topic.len() + HELD_OVERHEAD
}

/// The worker for a topic: by its site (`caudal/v1/{site}/...`), so one site always maps to the
/// same worker.
fn worker_for(topic: &[u8], workers: usize) -> usize {
    let site = topic.split(|b| *b == b'/').nth(2).unwrap_or(topic);
    let mut h = DefaultHasher::new();
    site.hash(&mut h);
    (h.finish() % workers.max(1) as u64) as usize
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
    fn the_inbound_channel_holds_whatever_the_budget_admits() {
        for budget in [0, 1, 255, 256, 1000, 64 << 20] {
            let b = InboundBudget::new(budget);
            let mut admitted = 0;
            while b.admit(HELD_OVERHEAD).is_ok() {
                admitted += 1;
            }
            assert!(admitted <= b.most_messages(), "{budget}: {admitted}");
        }
    }

    #[test]
    fn one_site_always_maps_to_one_worker() {
        let a = worker_for(b"caudal/v1/pozo-1/telemetry", 4);
        assert_eq!(a, worker_for(b"caudal/v1/pozo-1/status", 4));
        assert!(worker_for(b"garbage", 4) < 4);
        assert_eq!(worker_for(b"", 1), 0);
    }
}
