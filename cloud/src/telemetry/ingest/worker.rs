//! A worker: stores the messages of the sites that hash to it, a group of what waits in its
//! queue at a time, and answers each batch (an ack after the commit, or a rejection).

use super::Message;
use super::metrics::{IngestMetrics, RecordLabels};
use crate::core::db::Db;
use crate::core::metrics::{KindLabels, ReasonLabels};
use crate::telemetry::dead_letter::{self, RefusedSites};
use crate::telemetry::store::{self, StoreError};
use caudal_common::payload::{self, Payload};
use caudal_common::topic::{self, Topic, TopicKind};
use caudal_common::{Ack, AckStatus, Batch, DecodeError, SeqRange, SiteId, Status};
use chrono::{DateTime, Utc};
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tracing::Instrument;

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
    /// A record arrived under a stored record's `(site, seq)` with other content.
    #[error("{0}")]
    SeqConflict(String),
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
            Rejection::SeqConflict(_) => "seq_conflict",
        }
    }
}

/// Identifiers that tie a batch's log lines together: a random prefix per process and a counter.
#[derive(Debug)]
pub(super) struct IngestIds {
    prefix: u32,
    next: AtomicU64,
}

impl IngestIds {
    pub(super) fn new() -> Self {
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
pub(super) struct Worker {
    pub(super) rx: mpsc::Receiver<Message>,
    /// Payload bytes after which a group takes no more messages.
    pub(super) group_bytes: usize,
    /// Most messages in one group.
    pub(super) group_max: usize,
    pub(super) db: Db,
    pub(super) client: AsyncClient,
    pub(super) metrics: IngestMetrics,
    pub(super) ids: Arc<IngestIds>,
    /// Shared by the workers: how often a refused site's refusals are written.
    pub(super) refused_sites: Arc<RefusedSites>,
    pub(super) dead_letter_max_payload: usize,
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
    pub(super) async fn run(mut self) {
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
        let refused = if batch.site != site {
            Some(Rejection::SiteMismatch {
                topic: site.clone(),
                payload: batch.site.clone(),
            })
        } else {
            // The decoder judged each record on its own; the rules across records and of
            // storage are checked here, so a refused batch gets its reason before the store.
            batch.check().err().map(|e| Rejection::Rule(e.to_string()))
        };
        if let Some(r) = refused {
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
            Err(StoreError::SeqConflict(c)) => {
                tracing::error!(batch = %batch.batch, seq = %c.seq, stored = c.stored,
                    arrived = c.arrived, "seq conflict: batch refused, dead-lettered and alerted");
                Rejection::SeqConflict(c.to_string())
            }
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
            // A status carries no records; kept exhaustive so a new refusal is handled here.
            Err(StoreError::SeqConflict(c)) => {
                let r = Rejection::SeqConflict(c.to_string());
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
        // A site the cloud does not accept gets one dead letter and one log line per interval,
        // standing for the refusals between (dead_letter's boundedness rule).
        let summarised = matches!(why, Rejection::UnknownSite(_) | Rejection::InactiveSite(_))
            .then(|| why.reason());
        let count = match (summarised, site) {
            (Some(_), Some(s)) => self.refused_sites.admit(s, std::time::Instant::now()),
            _ => Some(1),
        };
        if let Some(count) = count {
            tracing::warn!(
                topic,
                batch,
                reason = %reason,
                bytes = msg.publish.payload.len(),
                count,
                "message refused"
            );
            let refused = dead_letter::Refused {
                topic,
                site,
                payload: &msg.publish.payload,
                reason: &reason,
                summarised,
                received_at: msg.received_at,
                count,
            };
            if let Err(e) = dead_letter::keep(&self.db, refused, self.dead_letter_max_payload).await
            {
                m.dead_letter_errors.inc();
                tracing::error!(topic, error = %e, "refused message not written to dead_letters");
            }
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
