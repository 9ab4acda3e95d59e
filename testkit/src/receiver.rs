//! A test "cloud": receives telemetry batches, stores every record in a real SQLite file, and
//! only after the commit publishes the acknowledgement, as the real ingest does.
//!
//! It subscribes to `caudal/v1/+/telemetry`, decodes each batch with
//! [`caudal_common::payload::decode`] (a signed one after verifying it), inserts every `(site, seq)` once (a record sent twice is
//! stored once), commits, then publishes an [`Ack`] listing the stored sequence ranges on
//! `caudal/v1/{site}/ack`. An [`AckMode`] makes it misbehave on purpose: stop acknowledging,
//! acknowledge twice, store without acknowledging, or reject. What it stored can be read back
//! decoded ([`Receiver::readings`], [`Receiver::events`], [`Receiver::gaps`]), so a scenario can
//! check values, events and gap records as the cloud would see them.

use caudal_common::payload::decode;
use caudal_common::signed::{self, Purpose};
use caudal_common::topic::{self, Topic, TopicKind};
use caudal_common::{Ack, AckStatus, Batch, Event as RecordEvent, Gap, Reading, SeqRange};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use rusqlite::{Connection, params};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Why the receiver did not start, or what it stored could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("receiver database {}: {source}", path.display())]
    Database {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("receiver: no SUBACK within 10 s")]
    NotSubscribed,
    #[error("receiver stopped")]
    Stopped,
    #[error("receiver: stored {kind} {json}: {source}")]
    Stored {
        kind: &'static str,
        json: String,
        source: serde_json::Error,
    },
    #[error("receiver stored {stored} records within {within:?}, expected {expected}")]
    TooFew {
        stored: u64,
        expected: u64,
        within: Duration,
    },
}

/// How the receiver answers a batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AckMode {
    /// Store, commit, acknowledge.
    #[default]
    Normal,
    /// Neither store nor acknowledge (the ingest is down); batches are only counted.
    Paused,
    /// Store, commit, and publish the acknowledgement twice.
    Twice,
    /// Store and commit, but never publish the acknowledgement (it is lost).
    DropAcks,
    /// Store nothing and publish a `rejected` acknowledgement with this reason.
    Reject(String),
}

/// One batch as it arrived.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub site: String,
    pub batch: String,
    /// The batch's sequence numbers, ascending.
    pub seqs: Vec<u64>,
    pub at: Instant,
    /// Whether it was stored (not paused or rejected).
    pub stored: bool,
}

#[derive(Debug, Default)]
struct Shared {
    mode: Mutex<AckMode>,
    arrivals: Mutex<Vec<Arrival>>,
    batches: AtomicU64,
    bad: AtomicU64,
    acks: AtomicU64,
}

/// A running receiver. Dropping it stops it.
#[derive(Debug)]
pub struct Receiver {
    shared: Arc<Shared>,
    stored: watch::Receiver<u64>,
    db: PathBuf,
    tasks: Vec<JoinHandle<()>>,
}

impl Receiver {
    /// Connects to the broker at `broker` (MQTT v4, no credentials), subscribes, and returns once
    /// the subscription is acknowledged. Records go to the SQLite file `db` (created if absent).
    pub async fn start(broker: SocketAddr, db: &Path) -> Result<Receiver, ReceiverError> {
        let conn = open(db)?;
        let shared = Arc::new(Shared::default());
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let mut opts = MqttOptions::new(
            format!(
                "caudal-test-receiver-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            broker.ip().to_string(),
            broker.port(),
        );
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, eventloop) = AsyncClient::new(opts, 1024);
        let (batch_tx, batch_rx) = mpsc::channel(256);
        let (sub_tx, mut sub_rx) = watch::channel(0u64);
        // The running total starts from what the file already holds (a receiver restarted on
        // it); each batch then adds what it newly stored, without counting the table again.
        let already: i64 = conn
            .query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))
            .map_err(|source| database(db, source))?;
        let (stored_tx, stored) = watch::channel(already as u64);
        let events = tokio::spawn(drive(eventloop, client.clone(), batch_tx, sub_tx));
        let handler = tokio::spawn(handle(conn, client, batch_rx, shared.clone(), stored_tx));
        let r = Receiver {
            shared,
            stored,
            db: db.to_path_buf(),
            tasks: vec![events, handler],
        };
        tokio::time::timeout(Duration::from_secs(10), sub_rx.wait_for(|n| *n > 0))
            .await
            .map_err(|_| ReceiverError::NotSubscribed)?
            .map_err(|_| ReceiverError::Stopped)?;
        Ok(r)
    }

    /// Changes how the following batches are answered.
    pub fn set_mode(&self, mode: AckMode) {
        *lock(&self.shared.mode) = mode;
    }

    /// Every batch received so far, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.shared.arrivals).clone()
    }

    /// Batches received (stored or not), including undecodable ones.
    pub fn batches_received(&self) -> u64 {
        self.shared.batches.load(Ordering::Relaxed)
    }

    /// Payloads on the telemetry topic that were not valid batches.
    pub fn bad_batches(&self) -> u64 {
        self.shared.bad.load(Ordering::Relaxed)
    }

    /// Acknowledgements published (a doubled one counts twice).
    pub fn acks_published(&self) -> u64 {
        self.shared.acks.load(Ordering::Relaxed)
    }

    /// Distinct records stored, all sites.
    pub fn stored_count(&self) -> u64 {
        *self.stored.borrow()
    }

    /// The sequence numbers stored for `site`, read back from the SQLite file.
    pub fn stored_seqs(&self, site: &str) -> Result<BTreeSet<u64>, ReceiverError> {
        let read = || -> rusqlite::Result<BTreeSet<u64>> {
            let conn = Connection::open(&self.db)?;
            let mut st = conn.prepare("SELECT seq FROM records WHERE site = ?1")?;
            let rows = st.query_map(params![site], |r| r.get::<_, i64>(0))?;
            rows.map(|r| r.map(|s| s as u64)).collect()
        };
        read().map_err(|source| database(&self.db, source))
    }

    /// The readings stored for `site`, ascending by seq.
    pub fn readings(&self, site: &str) -> Result<Vec<Reading>, ReceiverError> {
        self.decoded(site, "reading")
    }

    /// The events stored for `site`, ascending by seq.
    pub fn events(&self, site: &str) -> Result<Vec<RecordEvent>, ReceiverError> {
        self.decoded(site, "event")
    }

    /// The gap records stored for `site`, ascending by seq.
    pub fn gaps(&self, site: &str) -> Result<Vec<Gap>, ReceiverError> {
        self.decoded(site, "gap")
    }

    /// Every record of `kind` stored for `site`, decoded from its wire JSON, ascending by seq.
    fn decoded<T: serde::de::DeserializeOwned>(
        &self,
        site: &str,
        kind: &'static str,
    ) -> Result<Vec<T>, ReceiverError> {
        let read = || -> rusqlite::Result<Vec<String>> {
            let conn = Connection::open(&self.db)?;
            let mut st = conn
                .prepare("SELECT json FROM records WHERE site = ?1 AND kind = ?2 ORDER BY seq")?;
            let rows = st.query_map(params![site, kind], |r| r.get::<_, String>(0))?;
            rows.collect()
        };
        read()
            .map_err(|source| database(&self.db, source))?
            .into_iter()
            .map(|json| {
                serde_json::from_str(&json).map_err(|source| ReceiverError::Stored {
                    kind,
                    json,
                    source,
                })
            })
            .collect()
    }

    /// Waits until at least `n` distinct records are stored.
    pub async fn wait_stored(&self, n: u64, within: Duration) -> Result<(), ReceiverError> {
        let mut rx = self.stored.clone();
        match tokio::time::timeout(within, rx.wait_for(|s| *s >= n)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ReceiverError::Stopped),
            Err(_) => Err(ReceiverError::TooFew {
                stored: self.stored_count(),
                expected: n,
                within,
            }),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn database(path: &Path, source: rusqlite::Error) -> ReceiverError {
    ReceiverError::Database {
        path: path.to_path_buf(),
        source,
    }
}

fn open(db: &Path) -> Result<Connection, ReceiverError> {
    let conn = Connection::open(db).map_err(|source| database(db, source))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS records (
             site TEXT NOT NULL,
             seq INTEGER NOT NULL,
             kind TEXT NOT NULL,
             batch TEXT NOT NULL,
             json TEXT NOT NULL,
             PRIMARY KEY (site, seq)
         );",
    )
    .map_err(|source| database(db, source))?;
    Ok(conn)
}

/// Polls the event loop forever, reconnecting after errors and subscribing again after each
/// CONNACK (the session is clean).
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    batches: mpsc::Sender<(String, Vec<u8>)>,
    subscribed: watch::Sender<u64>,
) {
    let filter = topic::all_sites(TopicKind::Telemetry);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    tracing::warn!(error = %e, "receiver: subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subscribed.send_modify(|n| *n += 1);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if batches.send((p.topic, p.payload.to_vec())).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "receiver: connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    conn: Connection,
    client: AsyncClient,
    mut batches: mpsc::Receiver<(String, Vec<u8>)>,
    shared: Arc<Shared>,
    stored: watch::Sender<u64>,
) {
    while let Some((t, payload)) = batches.recv().await {
        shared.batches.fetch_add(1, Ordering::Relaxed);
        // A signed batch (v2) is verified as the cloud does, then its body decoded; which key
        // signed is not checked here (the receiver enrolls none).
        let body = if signed::version_of(&payload) == Some(signed::SIGNED_VERSION) {
            match signed::open(&payload, Purpose::Batch) {
                Ok(o) => o.body,
                Err(e) => {
                    tracing::warn!(error = %e, "receiver: bad signature");
                    shared.bad.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        } else {
            &payload[..]
        };
        let batch = match (Topic::parse(&t), decode::<Batch>(body)) {
            (Ok(t), Ok(b)) if t.site == b.site => b,
            (t, b) => {
                tracing::warn!(topic = ?t, batch = ?b.err(), "receiver: bad batch");
                shared.bad.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let mode = lock(&shared.mode).clone();
        let seqs = batch.seqs();
        let store = matches!(mode, AckMode::Normal | AckMode::Twice | AckMode::DropAcks);
        if store {
            match insert(&conn, &batch) {
                Ok(new) => {
                    stored.send_modify(|total| *total += new);
                }
                Err(e) => {
                    tracing::error!(error = %e, "receiver: insert");
                    continue;
                }
            }
        }
        lock(&shared.arrivals).push(Arrival {
            site: batch.site.to_string(),
            batch: batch.batch.clone(),
            seqs: seqs.iter().map(|s| s.0).collect(),
            at: Instant::now(),
            stored: store,
        });
        let ack = |status, seqs, reason| Ack {
            v: caudal_common::SCHEMA_VERSION,
            site: batch.site.clone(),
            batch: batch.batch.clone(),
            status,
            seqs,
            reason,
        };
        let (ack, times) = match mode {
            AckMode::Paused | AckMode::DropAcks => continue,
            AckMode::Normal => (ack(AckStatus::Accepted, SeqRange::compact(seqs), None), 1),
            AckMode::Twice => (ack(AckStatus::Accepted, SeqRange::compact(seqs), None), 2),
            AckMode::Reject(reason) => (ack(AckStatus::Rejected, Vec::new(), Some(reason)), 1),
        };
        let bytes = caudal_common::payload::Payload::encode(&ack);
        let to = topic::topic(&batch.site, TopicKind::Ack);
        for _ in 0..times {
            if client
                .publish(to.clone(), QoS::AtLeastOnce, false, bytes.clone())
                .await
                .is_err()
            {
                return;
            }
            shared.acks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Inserts the batch's records once each and commits; returns how many were new.
fn insert(conn: &Connection, b: &Batch) -> rusqlite::Result<u64> {
    let tx = conn.unchecked_transaction()?;
    let mut new = 0u64;
    {
        let mut st = tx.prepare_cached(
            "INSERT OR IGNORE INTO records (site, seq, kind, batch, json) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let site = b.site.as_str();
        for r in &b.readings {
            new += st.execute(params![
                site,
                r.seq.0 as i64,
                "reading",
                b.batch,
                serde_json::to_string(r).unwrap_or_default()
            ])? as u64;
        }
        for e in &b.events {
            new += st.execute(params![
                site,
                e.seq.0 as i64,
                "event",
                b.batch,
                serde_json::to_string(e).unwrap_or_default()
            ])? as u64;
        }
        for g in &b.gaps {
            new += st.execute(params![
                site,
                g.seq.0 as i64,
                "gap",
                b.batch,
                serde_json::to_string(g).unwrap_or_default()
            ])? as u64;
        }
    }
    tx.commit()?;
    Ok(new)
}
