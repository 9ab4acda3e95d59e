//! An in-memory [`Spool`] for the uplink's tests: committed, held and acknowledged records, and
//! the faults a real outbox can have (a failed read or delete, a stopped worker), on demand and
//! without SQLite.
//!
//! It keeps the contract the uplink relies on: `pending` returns only sendable records in seq
//! order, a record leaves only through `ack`, held records count in `committed` but are not
//! sendable until released, and a release changes the generation.

use super::{OutboxError, Pending, Spool, SpoolState, Stats};
use caudal_common::payload::RecordKind;
use caudal_common::{DeviceId, Reading, Seq, SeqRange};
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// A [`Spool`] operation, to inject a fault into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Pending,
    Ack,
    Stats,
}

#[derive(Debug, Default)]
struct Inner {
    sendable: BTreeMap<Seq, Pending>,
    held: BTreeMap<Seq, Pending>,
    last: u64,
    /// Faults to return, each once, by the next call of its operation.
    faults: VecDeque<(Op, OutboxError)>,
    stopped: bool,
    acked: u64,
}

/// The double. Clones share the same records.
#[derive(Debug, Clone)]
pub(crate) struct MemorySpool {
    inner: Arc<Mutex<Inner>>,
    state: Arc<watch::Sender<SpoolState>>,
}

impl MemorySpool {
    pub fn new() -> MemorySpool {
        MemorySpool {
            inner: Arc::default(),
            state: Arc::new(watch::channel(SpoolState::default()).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock has failed already.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits `n` sendable readings; returns their seqs.
    pub fn commit(&self, n: usize) -> Vec<Seq> {
        self.add(n, false)
    }

    /// Commits `n` readings taken under an untrusted clock: held until [`MemorySpool::release`].
    pub fn commit_held(&self, n: usize) -> Vec<Seq> {
        self.add(n, true)
    }

    fn add(&self, n: usize, held: bool) -> Vec<Seq> {
        let mut inner = self.lock();
        let mut seqs = Vec::with_capacity(n);
        for _ in 0..n {
            inner.last += 1;
            let seq = Seq(inner.last);
            let p = pending(seq);
            if held {
                inner.held.insert(seq, p);
            } else {
                inner.sendable.insert(seq, p);
            }
            seqs.push(seq);
        }
        let committed = Seq(inner.last);
        drop(inner);
        self.state.send_modify(|s| s.committed = committed);
        seqs
    }

    /// The clock became trusted: held records become sendable and the generation changes.
    pub fn release(&self) {
        let mut inner = self.lock();
        let held = std::mem::take(&mut inner.held);
        inner.sendable.extend(held);
        drop(inner);
        self.state.send_modify(|s| s.generation += 1);
    }

    /// The next call of `op` fails with `error`.
    pub fn fail_next(&self, op: Op, error: OutboxError) {
        self.lock().faults.push_back((op, error));
    }

    /// Every call from now on fails with [`OutboxError::Stopped`], as when the worker is gone.
    pub fn stop(&self) {
        self.lock().stopped = true;
    }

    /// Seqs not yet acknowledged, sendable or held.
    pub fn remaining(&self) -> Vec<Seq> {
        let inner = self.lock();
        let mut seqs: Vec<Seq> = inner
            .sendable
            .keys()
            .chain(inner.held.keys())
            .copied()
            .collect();
        seqs.sort();
        seqs
    }

    /// Records deleted by acknowledgements so far.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// The fault due for `op`, if any.
    fn call(&self, op: Op) -> Result<(), OutboxError> {
        let mut inner = self.lock();
        if inner.stopped {
            return Err(OutboxError::Stopped);
        }
        match inner.faults.iter().position(|(o, _)| *o == op) {
            Some(i) => match inner.faults.remove(i) {
                Some((_, e)) => Err(e),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }
}

/// A reading numbered `seq`, as the outbox would hold it.
fn pending(seq: Seq) -> Pending {
    let ts = chrono::DateTime::UNIX_EPOCH + chrono::TimeDelta::seconds(seq.0 as i64);
    let reading = Reading {
        seq,
        device: DeviceId::new("fm1").expect("valid device id"),
        ts,
        q: Default::default(),
        flow_lps: Some(12.5),
        total_m3: Some(seq.0 as f64 * 0.1),
        level_m: None,
        extra: BTreeMap::new(),
    };
    Pending {
        seq,
        kind: RecordKind::Reading,
        json: serde_json::to_string(&reading).unwrap_or_default(),
        ts,
    }
}

impl Spool for MemorySpool {
    async fn pending(
        &self,
        after: Seq,
        upto: Option<Seq>,
        limit: usize,
    ) -> Result<Vec<Pending>, OutboxError> {
        self.call(Op::Pending)?;
        let inner = self.lock();
        Ok(inner
            .sendable
            .range((Bound::Excluded(after), Bound::Unbounded))
            .take_while(|(s, _)| upto.is_none_or(|u| **s <= u))
            .take(limit)
            .map(|(_, p)| p.clone())
            .collect())
    }

    async fn ack(&self, ranges: Vec<SeqRange>) -> Result<u64, OutboxError> {
        self.call(Op::Ack)?;
        let mut inner = self.lock();
        let mut deleted = 0;
        for r in ranges.iter().filter(|r| r.from <= r.to) {
            let seqs: Vec<Seq> = inner
                .sendable
                .range(r.from..=r.to)
                .map(|(s, _)| *s)
                .collect();
            for s in seqs {
                inner.sendable.remove(&s);
                deleted += 1;
            }
        }
        inner.acked += deleted;
        Ok(deleted)
    }

    async fn stats(&self) -> Result<Stats, OutboxError> {
        self.call(Op::Stats)?;
        let inner = self.lock();
        Ok(Stats {
            backlog: (inner.sendable.len() + inner.held.len()) as u64,
            oldest: inner.sendable.values().next().map(|p| p.ts),
            bytes: inner
                .sendable
                .values()
                .chain(inner.held.values())
                .map(|p| p.json.len() as u64)
                .sum(),
            evicted_total: 0,
            held: inner.held.len() as u64,
        })
    }

    fn watch(&self) -> watch::Receiver<SpoolState> {
        self.state.subscribe()
    }
}
