//! The accounting every end-to-end proof rests on. An agent allocates seqs inside the commit,
//! so within an epoch they have no holes, and every start opens a new epoch whose closed
//! predecessors the outbox lists with their last counter: the records it committed are exactly
//! `(epoch, 1..=last)` for each of its epochs ([`committed_all`]). Each of them must be stored at the receiving end, or covered by an
//! eviction gap's seq range, or — only when committed after the last observed empty backlog —
//! still waiting in the outbox for the agent's next start. Anything else was lost.

use caudal_common::{Seq, SeqRange};
use std::collections::BTreeSet;

/// How the committed seqs of one site are accounted for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounting {
    /// Committed seqs stored at the receiving end.
    pub stored: u64,
    /// Committed seqs not stored but covered by an eviction gap.
    pub evicted: u64,
    /// Committed after the last drain and still in the outbox for the next start.
    pub left_in_outbox: u64,
    /// Committed seqs accounted for by nothing: lost.
    pub missing: Vec<Seq>,
}

/// Every seq committed in `epoch` up to `last`: `(epoch, 1..=last)`.
pub fn committed(epoch: u32, last: Seq) -> BTreeSet<u64> {
    (1..=last.counter()).map(|c| Seq::new(epoch, c).0).collect()
}

/// Every seq committed over an outbox's life: `(e, 1..=n)` for each closed epoch `(e, n)`, and
/// the current `epoch` up to `last` (nothing of it when `last` is in an earlier epoch).
pub fn committed_all(closed: &[(u32, u32)], epoch: u32, last: Seq) -> BTreeSet<u64> {
    let mut all: BTreeSet<u64> = closed
        .iter()
        .flat_map(|&(e, n)| (1..=n).map(move |c| Seq::new(e, c).0))
        .collect();
    if last.epoch() == epoch {
        all.extend(committed(epoch, last));
    }
    all
}

/// Accounts for each of `committed`: stored (`is_stored`), else evicted (in one of `evicted`),
/// else left in the outbox (in `waiting` and after `drained`, the last seq of an observed empty
/// backlog), else missing.
pub fn account(
    committed: &BTreeSet<u64>,
    is_stored: impl Fn(u64) -> bool,
    evicted: &[SeqRange],
    waiting: &BTreeSet<u64>,
    drained: Seq,
) -> Accounting {
    let mut a = Accounting::default();
    for &s in committed {
        if is_stored(s) {
            a.stored += 1;
        } else if evicted.iter().any(|r| r.contains(Seq(s))) {
            a.evicted += 1;
        } else if s > drained.0 && waiting.contains(&s) {
            a.left_in_outbox += 1;
        } else {
            a.missing.push(Seq(s));
        }
    }
    a
}
