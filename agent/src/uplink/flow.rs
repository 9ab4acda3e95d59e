//! What the uplink sends next while connected: live records first, the backlog behind them at a
//! bounded rate, at most `max_inflight_batches` batches awaiting the cloud's acknowledgement, and
//! records the cloud rejected held back for a while.
//!
//! A [`Flow`] lives for one connection (and is rebuilt when the outbox asks for a rescan). When
//! it starts it takes the outbox's highest committed seq as the *boundary*: records above it are
//! live and go out as they arrive, batched by count and age; records at or below it are the
//! backlog and drain oldest-first through a token bucket. Batches whose acknowledgement does not
//! come within `ack_timeout` are fetched again from the outbox (so only what is still pending is
//! re-sent) and charged to the same bucket as the backlog, since they are old by then.
//!
//! Nothing here deletes anything: a record leaves the outbox only through `Spool::ack`, called
//! by the uplink for an `accepted` acknowledgement.

use super::options::MAX_BATCH_BYTES;
use crate::outbox::{OutboxError, Pending, Spool};
use caudal_common::{Seq, SeqRange};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// Bytes a batch needs beyond its records' JSON (envelope, list names, commas).
const BATCH_OVERHEAD: usize = 256;

/// The knobs of a [`Flow`], from `[uplink]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct FlowConfig {
    pub max_records: usize,
    pub max_age: Duration,
    /// Backlog records per second (at least 1).
    pub rate: u32,
    pub max_inflight: usize,
    pub ack_timeout: Duration,
}

impl FlowConfig {
    /// Tokens a backlog batch waits for: up to one second's worth, at most a full batch.
    fn want(&self) -> usize {
        (self.rate.max(1) as usize).min(self.max_records).max(1)
    }
}

/// Where the records of a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// Committed after the flow started.
    Live,
    /// Sent before and not acknowledged in time, or held back after a rejection.
    Redo,
    /// Committed before the flow started.
    Backlog,
}

impl Class {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Class::Live => "live",
            Class::Redo => "redo",
            Class::Backlog => "backlog",
        }
    }
}

/// A batch published and not yet acknowledged.
#[derive(Debug, Clone)]
pub(super) struct InFlight {
    pub seqs: Vec<Seq>,
    pub sent: Instant,
    pub class: Class,
}

/// Sequence ranges the cloud rejected, and until when they are not sent again. Kept across
/// connections: a rejection is about the records, not the link.
#[derive(Debug, Default)]
pub(super) struct Holds {
    ranges: Vec<(SeqRange, Instant)>,
}

impl Holds {
    pub fn hold(&mut self, ranges: impl IntoIterator<Item = SeqRange>, until: Instant) {
        self.ranges.extend(ranges.into_iter().map(|r| (r, until)));
    }

    /// Whether `seq` is held back at `now`.
    pub fn holds(&self, seq: Seq, now: Instant) -> bool {
        self.ranges
            .iter()
            .any(|(r, until)| r.contains(seq) && now < *until)
    }

    /// Removes and returns the ranges whose hold has ended.
    pub fn due(&mut self, now: Instant) -> Vec<SeqRange> {
        let mut out = Vec::new();
        self.ranges.retain(|(r, until)| {
            let due = *until <= now;
            if due {
                out.push(*r);
            }
            !due
        });
        out
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        self.ranges.iter().map(|(_, u)| *u).min()
    }
}

/// A token bucket for backlog records.
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    rate: f64,
    cap: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket of `cap` tokens refilled at `rate` per second.
    pub fn new(rate: u32, cap: usize, now: Instant) -> Bucket {
        Bucket {
            rate: f64::from(rate.max(1)),
            cap: cap as f64,
            tokens: cap as f64,
            at: now,
        }
    }

    pub fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.cap);
        self.at = now;
    }

    /// Whole tokens available.
    pub fn available(&self) -> usize {
        self.tokens.floor() as usize
    }

    pub fn take(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }

    /// When `want` tokens will be available.
    pub fn ready_at(&self, want: usize) -> Instant {
        let missing = (want as f64 - self.tokens).max(0.0);
        self.at + Duration::from_secs_f64(missing / self.rate)
    }
}

/// The records of the next batch.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub records: Vec<Pending>,
    pub class: Class,
}

/// The sending state of one connection.
#[derive(Debug)]
pub(super) struct Flow {
    cfg: FlowConfig,
    /// Records with a seq at or below the boundary are backlog.
    boundary: Seq,
    /// Highest seq fetched into `live`.
    live_after: Seq,
    /// Live records fetched and not yet sent, with when they were fetched.
    live: VecDeque<(Pending, Instant)>,
    /// Highest backlog seq taken so far.
    backlog_after: Seq,
    backlog_done: bool,
    redo: VecDeque<SeqRange>,
    inflight: HashMap<String, InFlight>,
    inflight_seqs: HashSet<Seq>,
    bucket: Bucket,
}

impl Flow {
    /// A flow for a connection that starts with `committed` as the outbox's highest seq.
    pub fn new(cfg: FlowConfig, committed: Seq, now: Instant) -> Flow {
        Flow {
            cfg,
            boundary: committed,
            live_after: committed,
            live: VecDeque::new(),
            backlog_after: Seq::default(),
            backlog_done: false,
            redo: VecDeque::new(),
            inflight: HashMap::new(),
            inflight_seqs: HashSet::new(),
            bucket: Bucket::new(cfg.rate, cfg.want(), now),
        }
    }

    /// Starts over from the beginning of the outbox with `committed` as the new boundary, keeping
    /// the batches in flight (their records are skipped until acknowledged or timed out).
    pub fn rescan(&mut self, committed: Seq) {
        self.boundary = committed;
        self.live_after = committed;
        self.live.clear();
        self.backlog_after = Seq::default();
        self.backlog_done = false;
        self.redo.clear();
    }

    pub fn boundary(&self) -> Seq {
        self.boundary
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Moves batches not acknowledged within the timeout, and holds that ended, to the redo
    /// queue. Returns the ids of the timed-out batches.
    pub fn expire(&mut self, holds: &mut Holds, now: Instant) -> Vec<String> {
        let timeout = self.cfg.ack_timeout;
        let late: Vec<String> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.sent + timeout <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &late {
            if let Some(f) = self.take(id) {
                self.redo.extend(SeqRange::compact(f.seqs));
            }
        }
        self.redo.extend(holds.due(now));
        late
    }

    /// The next batch to publish now, if any.
    pub async fn next<S: Spool>(
        &mut self,
        spool: &S,
        committed: Seq,
        holds: &Holds,
        now: Instant,
    ) -> Result<Option<Outgoing>, OutboxError> {
        if self.inflight.len() >= self.cfg.max_inflight {
            return Ok(None);
        }
        if let Some(out) = self.next_live(spool, committed, holds, now).await? {
            return Ok(Some(out));
        }
        self.bucket.refill(now);
        if self.bucket.available() < self.cfg.want() {
            return Ok(None);
        }
        let limit = self.bucket.available().min(self.cfg.max_records);
        while let Some(r) = self.redo.pop_front() {
            let got = spool
                .pending(Seq(r.from.0.saturating_sub(1)), Some(r.to), limit)
                .await?;
            let records = self.sendable(got.clone(), holds, now);
            let n = fit(&records);
            // Whatever this batch does not carry stays queued for the next one.
            let carried_to = match records.get(n.wrapping_sub(1)) {
                Some(last) => last.seq,
                None => got.last().map_or(r.to, |p| p.seq),
            };
            if carried_to < r.to && (got.len() == limit || n < records.len()) {
                self.redo.push_front(SeqRange {
                    from: Seq(carried_to.0 + 1),
                    to: r.to,
                });
            }
            if n > 0 {
                self.bucket.take(n);
                return Ok(Some(Outgoing {
                    records: records.into_iter().take(n).collect(),
                    class: Class::Redo,
                }));
            }
        }
        while !self.backlog_done {
            let got = spool
                .pending(self.backlog_after, Some(self.boundary), limit)
                .await?;
            let Some(last) = got.last() else {
                self.backlog_done = true;
                break;
            };
            let last = last.seq;
            let records = self.sendable(got, holds, now);
            let n = fit(&records);
            self.backlog_after = match n {
                0 => last,
                n if n < records.len() => records[n - 1].seq,
                _ => last,
            };
            if n > 0 {
                self.bucket.take(n);
                return Ok(Some(Outgoing {
                    records: records.into_iter().take(n).collect(),
                    class: Class::Backlog,
                }));
            }
        }
        Ok(None)
    }

    async fn next_live<S: Spool>(
        &mut self,
        spool: &S,
        committed: Seq,
        holds: &Holds,
        now: Instant,
    ) -> Result<Option<Outgoing>, OutboxError> {
        let room = self.cfg.max_records.saturating_sub(self.live.len());
        if committed > self.live_after && room > 0 {
            let got = spool.pending(self.live_after, None, room).await?;
            let full = got.len() == room;
            if let Some(last) = got.last() {
                self.live_after = last.seq;
            }
            if !full {
                // Everything sendable up to `committed` is in hand; what is missing is held back
                // by the outbox and comes with a rescan.
                self.live_after = self.live_after.max(committed);
            }
            for p in self.sendable(got, holds, now) {
                self.live.push_back((p, now));
            }
        }
        let Some((_, first)) = self.live.front() else {
            return Ok(None);
        };
        let bytes: usize = self.live.iter().map(|(p, _)| p.json.len() + 1).sum();
        let due = self.live.len() >= self.cfg.max_records
            || *first + self.cfg.max_age <= now
            || bytes + BATCH_OVERHEAD >= MAX_BATCH_BYTES;
        if !due {
            return Ok(None);
        }
        let records: Vec<Pending> = self.live.iter().map(|(p, _)| p.clone()).collect();
        let n = fit(&records).min(self.cfg.max_records);
        let records = self.live.drain(..n).map(|(p, _)| p).collect();
        Ok(Some(Outgoing {
            records,
            class: Class::Live,
        }))
    }

    /// Drops records already in flight or held back.
    fn sendable(&self, got: Vec<Pending>, holds: &Holds, now: Instant) -> Vec<Pending> {
        got.into_iter()
            .filter(|p| !self.inflight_seqs.contains(&p.seq) && !holds.holds(p.seq, now))
            .collect()
    }

    /// Records that a batch was published.
    pub fn sent(&mut self, id: String, records: &[Pending], class: Class, now: Instant) {
        let seqs: Vec<Seq> = records.iter().map(|p| p.seq).collect();
        self.inflight_seqs.extend(seqs.iter().copied());
        self.inflight.insert(
            id,
            InFlight {
                seqs,
                sent: now,
                class,
            },
        );
    }

    /// Gives back records whose batch could not be published; they go out again first.
    pub fn unsent(&mut self, records: &[Pending]) {
        for r in SeqRange::compact(records.iter().map(|p| p.seq))
            .into_iter()
            .rev()
        {
            self.redo.push_front(r);
        }
    }

    /// Queues ranges to be fetched and sent again (their acknowledgement could not be applied).
    pub fn requeue(&mut self, ranges: Vec<SeqRange>) {
        self.redo.extend(ranges);
    }

    /// Removes a batch from the in-flight set (acknowledged, rejected or timed out).
    pub fn take(&mut self, id: &str) -> Option<InFlight> {
        let f = self.inflight.remove(id)?;
        for s in &f.seqs {
            self.inflight_seqs.remove(s);
        }
        Some(f)
    }

    /// The next instant at which something becomes due: a live batch's age, an ack timeout, a
    /// hold's end, or enough tokens for the backlog. `None` when only an input can wake the flow.
    pub fn next_deadline(&self, holds: &Holds) -> Option<Instant> {
        let timeouts = self
            .inflight
            .values()
            .map(|f| f.sent + self.cfg.ack_timeout)
            .min();
        let mut due = [timeouts, holds.next_expiry()];
        let mut out = due.iter_mut().filter_map(|d| d.take()).min();
        if self.inflight.len() < self.cfg.max_inflight {
            let live = self.live.front().map(|(_, t)| *t + self.cfg.max_age);
            let tokens = (!self.redo.is_empty() || !self.backlog_done)
                .then(|| self.bucket.ready_at(self.cfg.want()));
            out = [out, live, tokens].into_iter().flatten().min();
        }
        out
    }
}

/// How many of `records` (at least one, when there is one) fit in one batch payload.
pub(super) fn fit(records: &[Pending]) -> usize {
    let mut bytes = BATCH_OVERHEAD;
    let mut n = 0;
    for r in records {
        bytes += r.json.len() + 1;
        if bytes > MAX_BATCH_BYTES && n > 0 {
            break;
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use caudal_common::payload::RecordKind;

    fn rec(seq: u64, bytes: usize) -> Pending {
        Pending {
            seq: Seq(seq),
            kind: RecordKind::Reading,
            json: "x".repeat(bytes),
            ts: chrono::DateTime::UNIX_EPOCH,
        }
    }

    // ---- A flow against the in-memory spool: what goes out, in which order, and what comes
    // back after a timeout, a failed read or a release, without SQLite or a broker ----

    use crate::outbox::memory::{MemorySpool, Op};
    use crate::outbox::{OutboxError, Spool};

    fn flow_cfg(max_records: usize, rate: u32, max_inflight: usize) -> FlowConfig {
        FlowConfig {
            max_records,
            max_age: Duration::from_millis(50),
            rate,
            max_inflight,
            ack_timeout: Duration::from_secs(2),
        }
    }

    fn committed(spool: &MemorySpool) -> Seq {
        spool.watch().borrow().committed
    }

    /// The next batch at `now`: its class and seqs.
    async fn next(
        flow: &mut Flow,
        spool: &MemorySpool,
        holds: &Holds,
        now: Instant,
    ) -> Option<(Class, Vec<u64>)> {
        let out = flow
            .next(spool, committed(spool), holds, now)
            .await
            .expect("the spool answers");
        out.map(|o| (o.class, o.records.iter().map(|p| p.seq.0).collect()))
    }

    /// Publishes the next batch as `id` at `now`.
    async fn send(
        flow: &mut Flow,
        spool: &MemorySpool,
        id: &str,
        now: Instant,
    ) -> (Class, Vec<u64>) {
        let out = flow
            .next(spool, committed(spool), &Holds::default(), now)
            .await
            .expect("the spool answers")
            .expect("a batch is due");
        flow.sent(id.into(), &out.records, out.class, now);
        (out.class, out.records.iter().map(|p| p.seq.0).collect())
    }

    fn range(from: u64, to: u64) -> SeqRange {
        SeqRange {
            from: Seq(from),
            to: Seq(to),
        }
    }

    #[tokio::test]
    async fn live_records_go_out_before_the_backlog_which_follows_at_its_rate() {
        let spool = MemorySpool::new();
        spool.commit(8);
        let t0 = Instant::now();
        let holds = Holds::default();
        let mut flow = Flow::new(flow_cfg(4, 4, 8), committed(&spool), t0);
        spool.commit(4);
        assert_eq!(
            next(&mut flow, &spool, &holds, t0).await,
            Some((Class::Live, vec![9, 10, 11, 12])),
            "a full live batch goes first although the backlog's tokens are there"
        );
        assert_eq!(
            next(&mut flow, &spool, &holds, t0).await,
            Some((Class::Backlog, vec![1, 2, 3, 4]))
        );
        assert_eq!(
            next(&mut flow, &spool, &holds, t0).await,
            None,
            "the bucket is empty"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            next(&mut flow, &spool, &holds, t1).await,
            Some((Class::Backlog, vec![5, 6, 7, 8]))
        );
    }

    #[tokio::test]
    async fn a_batch_not_acknowledged_in_time_is_sent_again_with_what_is_still_pending() {
        let spool = MemorySpool::new();
        spool.commit(4);
        let t0 = Instant::now();
        let mut holds = Holds::default();
        let mut flow = Flow::new(flow_cfg(4, 1000, 8), committed(&spool), t0);
        assert_eq!(
            send(&mut flow, &spool, "b1", t0).await,
            (Class::Backlog, vec![1, 2, 3, 4])
        );
        assert_eq!(next(&mut flow, &spool, &holds, t0).await, None);
        // An acknowledgement of an earlier copy deleted part of it meanwhile.
        assert_eq!(spool.ack(vec![range(1, 2)]).await.expect("acked"), 2);
        let late = t0 + Duration::from_secs(2);
        assert_eq!(flow.expire(&mut holds, late), vec!["b1".to_string()]);
        assert_eq!(
            next(&mut flow, &spool, &holds, late).await,
            Some((Class::Redo, vec![3, 4]))
        );
    }

    #[tokio::test]
    async fn a_failed_outbox_read_skips_nothing() {
        let spool = MemorySpool::new();
        spool.commit(3);
        let t0 = Instant::now();
        let holds = Holds::default();
        let mut flow = Flow::new(flow_cfg(4, 1000, 8), committed(&spool), t0);
        spool.fail_next(Op::Pending, OutboxError::Full);
        assert!(matches!(
            flow.next(&spool, committed(&spool), &holds, t0).await,
            Err(OutboxError::Full)
        ));
        assert_eq!(
            next(&mut flow, &spool, &holds, t0).await,
            Some((Class::Backlog, vec![1, 2, 3])),
            "the next read starts where the failed one did"
        );
    }

    #[tokio::test]
    async fn records_released_below_the_cursor_are_found_by_a_rescan() {
        let spool = MemorySpool::new();
        spool.commit(2);
        spool.commit_held(2);
        spool.commit(1);
        let t0 = Instant::now();
        let holds = Holds::default();
        let mut flow = Flow::new(flow_cfg(4, 1000, 8), committed(&spool), t0);
        assert_eq!(
            send(&mut flow, &spool, "b1", t0).await,
            (Class::Backlog, vec![1, 2, 5]),
            "held records are not sendable"
        );
        flow.take("b1");
        spool.ack(vec![range(1, 5)]).await.expect("acked");
        assert_eq!(next(&mut flow, &spool, &holds, t0).await, None);

        let mut state = spool.watch();
        spool.release();
        assert!(state.has_changed().expect("spool alive"));
        flow.rescan(state.borrow_and_update().committed);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            next(&mut flow, &spool, &holds, t1).await,
            Some((Class::Backlog, vec![3, 4]))
        );
    }

    #[tokio::test]
    async fn no_batch_beyond_the_in_flight_window() {
        let spool = MemorySpool::new();
        spool.commit(8);
        let t0 = Instant::now();
        let holds = Holds::default();
        let mut flow = Flow::new(flow_cfg(4, 1000, 1), committed(&spool), t0);
        assert_eq!(
            send(&mut flow, &spool, "b1", t0).await,
            (Class::Backlog, vec![1, 2, 3, 4])
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            next(&mut flow, &spool, &holds, t1).await,
            None,
            "window full"
        );
        flow.take("b1");
        assert_eq!(
            next(&mut flow, &spool, &holds, t1).await,
            Some((Class::Backlog, vec![5, 6, 7, 8]))
        );
    }

    #[test]
    fn bucket_refills_at_rate_up_to_its_capacity() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 50, t0);
        assert_eq!(b.available(), 50);
        b.take(50);
        b.refill(t0 + Duration::from_millis(200));
        assert_eq!(b.available(), 20);
        assert_eq!(b.ready_at(50), t0 + Duration::from_millis(500));
        b.refill(t0 + Duration::from_secs(10));
        assert_eq!(b.available(), 50, "capped");
    }

    #[test]
    fn want_is_a_second_of_backlog_at_most_a_batch() {
        let cfg = |rate, max_records| FlowConfig {
            max_records,
            max_age: Duration::from_secs(1),
            rate,
            max_inflight: 1,
            ack_timeout: Duration::from_secs(1),
        };
        assert_eq!(cfg(2000, 500).want(), 500);
        assert_eq!(cfg(10, 500).want(), 10);
        assert_eq!(cfg(0, 500).want(), 1);
    }

    #[test]
    fn holds_end_and_are_handed_back_once() {
        let t0 = Instant::now();
        let mut h = Holds::default();
        h.hold(
            [SeqRange {
                from: Seq(5),
                to: Seq(9),
            }],
            t0 + Duration::from_secs(60),
        );
        assert!(h.holds(Seq(7), t0));
        assert!(!h.holds(Seq(10), t0));
        assert!(h.due(t0).is_empty());
        let later = t0 + Duration::from_secs(60);
        assert!(!h.holds(Seq(7), later));
        assert_eq!(h.due(later).len(), 1);
        assert!(h.due(later).is_empty());
        assert_eq!(h.next_expiry(), None);
    }

    #[test]
    fn a_batch_stops_growing_at_the_byte_limit_but_carries_at_least_one_record() {
        let small: Vec<Pending> = (1..=10).map(|s| rec(s, 100)).collect();
        assert_eq!(fit(&small), 10);
        let big: Vec<Pending> = (1..=10).map(|s| rec(s, MAX_BATCH_BYTES / 4)).collect();
        assert_eq!(fit(&big), 3);
        assert_eq!(fit(&[rec(1, MAX_BATCH_BYTES * 2)]), 1);
        assert_eq!(fit(&[]), 0);
    }
}
