//! The batches this uplink has published and not yet seen settled, by batch id: what an
//! acknowledgement may delete.
//!
//! **Safety rule.** An `accepted` ack deletes only the intersection of the seqs it lists with
//! the seqs of the batch it names, as recorded here when the batch was published. An ack naming
//! a batch this uplink never published (or one forgotten, see below) deletes nothing; seqs it
//! lists beyond its batch are ignored. Either way the ack is counted and logged. The outbox is
//! never asked to delete a seq that did not leave in the named batch.
//!
//! The ledger outlives a connection and a timed-out batch, so the cloud's late ack of a batch
//! sent before a reconnect, or re-sent under a new id, still deletes what it stored. It is
//! bounded: past its capacity the oldest is forgotten; its late ack then deletes
//! nothing and its records are sent again, which the cloud stores once.

use caudal_common::{Seq, SeqRange};
use std::collections::{HashMap, VecDeque};

/// Batches published and not yet acknowledged or rejected, oldest first.
#[derive(Debug)]
pub(super) struct Ledger {
    cap: usize,
    order: VecDeque<String>,
    batches: HashMap<String, Vec<Seq>>,
    /// Ids of batches settled lately (at most `cap`), so a repeated ack is told from a foreign
    /// one.
    settled: VecDeque<String>,
}

/// What an `accepted` ack may delete, checked against the ledger.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Checked {
    /// The batch is not in the ledger: nothing may be deleted.
    UnknownBatch,
    /// The batch was settled already (the ack is repeated): nothing more may be deleted.
    Settled,
    /// The seqs both listed by the ack and carried by the batch, and whether the ack also
    /// listed seqs the batch did not carry.
    Known {
        delete: Vec<SeqRange>,
        outside: bool,
    },
}

impl Ledger {
    /// A ledger that remembers at most `cap` batches (at least one).
    pub fn new(cap: usize) -> Ledger {
        Ledger {
            cap: cap.max(1),
            order: VecDeque::new(),
            batches: HashMap::new(),
            settled: VecDeque::new(),
        }
    }

    /// Records that batch `id` carried `seqs`.
    pub fn sent(&mut self, id: String, seqs: Vec<Seq>) {
        while self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.batches.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.batches.insert(id, seqs);
    }

    /// Forgets batch `id` (acknowledged or rejected) and returns its seqs.
    pub fn take(&mut self, id: &str) -> Option<Vec<Seq>> {
        let seqs = self.batches.remove(id)?;
        self.order.retain(|o| o != id);
        if self.settled.len() >= self.cap {
            self.settled.pop_front();
        }
        self.settled.push_back(id.to_string());
        Some(seqs)
    }

    /// Settles batch `id` against the ranges an `accepted` ack lists and returns what may be
    /// deleted. The batch is forgotten when the ack listed some of its seqs; an ack listing
    /// none of them settles nothing, so the batch's real ack still can.
    pub fn accept(&mut self, id: &str, listed: &[SeqRange]) -> Checked {
        let Some(seqs) = self.batches.get(id) else {
            if self.settled.iter().any(|s| s == id) {
                return Checked::Settled;
            }
            return Checked::UnknownBatch;
        };
        let mut both: Vec<Seq> = seqs
            .iter()
            .copied()
            .filter(|s| listed.iter().any(|r| r.contains(*s)))
            .collect();
        both.sort_unstable();
        both.dedup();
        if !both.is_empty() {
            self.take(id);
        }
        let listed_total = listed
            .iter()
            .filter(|r| !r.is_empty())
            .fold(0u64, |n, r| n.saturating_add(r.len()));
        Checked::Known {
            outside: listed_total > both.len() as u64,
            delete: SeqRange::compact(both),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(from: u64, to: u64) -> SeqRange {
        SeqRange {
            from: Seq(from),
            to: Seq(to),
        }
    }

    #[test]
    fn an_ack_deletes_only_what_its_batch_carried() {
        let mut l = Ledger::new(4);
        l.sent("b1".into(), [3, 4, 5, 9].map(Seq).to_vec());
        assert_eq!(
            l.accept("b1", &[range(0, (1 << 63) - 1)]),
            Checked::Known {
                delete: vec![range(3, 5), range(9, 9)],
                outside: true
            }
        );
        assert_eq!(
            l.accept("b1", &[range(3, 5)]),
            Checked::Settled,
            "a batch is settled once"
        );
    }

    #[test]
    fn an_exact_ack_is_not_outside_and_a_partial_one_deletes_its_part() {
        let mut l = Ledger::new(4);
        l.sent("b1".into(), [1, 2, 3].map(Seq).to_vec());
        l.sent("b2".into(), [4, 5].map(Seq).to_vec());
        assert_eq!(
            l.accept("b1", &[range(1, 3)]),
            Checked::Known {
                delete: vec![range(1, 3)],
                outside: false
            }
        );
        assert_eq!(
            l.accept("b2", &[range(5, 5)]),
            Checked::Known {
                delete: vec![range(5, 5)],
                outside: false
            }
        );
    }

    #[test]
    fn an_ack_listing_none_of_its_batch_settles_nothing() {
        let mut l = Ledger::new(4);
        l.sent("b1".into(), [1, 2].map(Seq).to_vec());
        assert_eq!(
            l.accept("b1", &[range(7, 8)]),
            Checked::Known {
                delete: vec![],
                outside: true
            }
        );
        assert_eq!(
            l.accept("b1", &[range(1, 2)]),
            Checked::Known {
                delete: vec![range(1, 2)],
                outside: false
            }
        );
    }

    #[test]
    fn an_unknown_batch_deletes_nothing_and_the_oldest_is_forgotten_past_the_cap() {
        let mut l = Ledger::new(2);
        l.sent("b1".into(), vec![Seq(1)]);
        l.sent("b2".into(), vec![Seq(2)]);
        l.sent("b3".into(), vec![Seq(3)]);
        assert_eq!(l.accept("forged", &[range(0, 10)]), Checked::UnknownBatch);
        assert_eq!(l.accept("b1", &[range(1, 1)]), Checked::UnknownBatch);
        assert_eq!(l.take("b2"), Some(vec![Seq(2)]));
        assert_eq!(l.take("b3"), Some(vec![Seq(3)]));
    }
}
