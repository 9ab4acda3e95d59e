//! Record identity: a per-site sequence number that never repeats.
//!
//! A [`Seq`] is a `u64` below 2^63 (so it fits a signed 64-bit database column) made of two
//! parts:
//!
//! ```text
//!  63 | 62 ........... 32 | 31 ........... 0
//!   0 |  epoch (31 bits)  |  counter (32 bits)
//! ```
//!
//! The **epoch** is chosen when an agent creates its outbox database and again whenever the
//! counter would overflow. With a trustworthy clock it is the number of seconds since
//! 2024-01-01T00:00:00Z (values below 2^30, good until 2058), so a recreated database (lost flash,
//! new board) always starts a later epoch. Without a trustworthy clock it is drawn at random from
//! the upper half `[2^30, 2^31)`, which time-based epochs never reach; a collision needs the same
//! draw out of ~10^9 for the same site. The **counter** starts at 1 and increases by one for
//! every record the agent commits, so within an epoch the cloud can find holes by counting.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Unix time of the Caudal epoch origin, 2024-01-01T00:00:00Z.
pub const EPOCH_ORIGIN_UNIX: i64 = 1_704_067_200;
const COUNTER_BITS: u32 = 32;
const RANDOM_EPOCH_BASE: u32 = 1 << 30;
const EPOCH_MASK: u32 = (1 << 31) - 1;

/// The identity of one record (reading, event or gap) within a site.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// Builds a sequence number from its parts. `epoch` is truncated to 31 bits.
    pub fn new(epoch: u32, counter: u32) -> Self {
        Seq((u64::from(epoch & EPOCH_MASK) << COUNTER_BITS) | u64::from(counter))
    }
    pub fn epoch(self) -> u32 {
        (self.0 >> COUNTER_BITS) as u32
    }
    pub fn counter(self) -> u32 {
        self.0 as u32
    }
    /// The sequence number after this one within the same epoch, if the counter has room.
    pub fn next_in_epoch(self) -> Option<Seq> {
        self.counter()
            .checked_add(1)
            .map(|c| Seq::new(self.epoch(), c))
    }
    /// `true` when the number fits the layout (bit 63 clear).
    pub fn is_valid(self) -> bool {
        self.0 >> 63 == 0
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch(), self.counter())
    }
}

/// An epoch derived from a trustworthy wall clock (`unix_secs` in seconds). Returns `None` when
/// the time is before the origin or beyond the time-based range (so the caller falls back to a
/// random epoch).
pub fn time_epoch(unix_secs: i64) -> Option<u32> {
    let e = unix_secs.checked_sub(EPOCH_ORIGIN_UNIX)?;
    (1..i64::from(RANDOM_EPOCH_BASE))
        .contains(&e)
        .then_some(e as u32)
}

/// An epoch for a clock that cannot be trusted, from 32 random bits.
pub fn random_epoch(random: u32) -> u32 {
    RANDOM_EPOCH_BASE | (random & (RANDOM_EPOCH_BASE - 1))
}

/// An inclusive range of sequence numbers, `[from, to]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRange {
    pub from: Seq,
    pub to: Seq,
}

impl SeqRange {
    pub fn contains(&self, s: Seq) -> bool {
        self.from <= s && s <= self.to
    }

    /// Compacts ascending sequence numbers into ranges of consecutive values. Input that is not
    /// ascending still yields correct (if more) ranges.
    pub fn compact(seqs: impl IntoIterator<Item = Seq>) -> Vec<SeqRange> {
        let mut out: Vec<SeqRange> = Vec::new();
        for s in seqs {
            match out.last_mut() {
                Some(r) if r.to.0.checked_add(1) == Some(s.0) => r.to = s,
                Some(r) if r.contains(s) => {}
                _ => out.push(SeqRange { from: s, to: s }),
            }
        }
        out
    }

    /// Number of sequence numbers in the range.
    pub fn len(&self) -> u64 {
        self.to.0.saturating_sub(self.from.0) + 1
    }

    pub fn is_empty(&self) -> bool {
        self.to < self.from
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parts_round_trip() {
        let s = Seq::new(123_456, 789);
        assert_eq!((s.epoch(), s.counter()), (123_456, 789));
        assert!(s.is_valid());
        assert!(Seq::new(u32::MAX, u32::MAX).is_valid());
    }

    #[test]
    fn time_epochs_and_random_epochs_never_meet() {
        let t = time_epoch(EPOCH_ORIGIN_UNIX + 86_400 * 365 * 30).expect("2054 is in range");
        assert!(t < RANDOM_EPOCH_BASE);
        assert!(random_epoch(0) >= RANDOM_EPOCH_BASE);
        assert!(random_epoch(u32::MAX) <= EPOCH_MASK);
        assert_eq!(time_epoch(0), None, "1970 is not a usable epoch");
    }

    #[test]
    fn later_epoch_orders_after_any_counter_of_an_earlier_one() {
        assert!(Seq::new(10, u32::MAX) < Seq::new(11, 1));
        assert_eq!(Seq::new(10, u32::MAX).next_in_epoch(), None);
    }

    #[test]
    fn compact_merges_consecutive_values() {
        let r = SeqRange::compact([1, 2, 3, 5, 6, 9].map(Seq));
        assert_eq!(
            r,
            vec![
                SeqRange {
                    from: Seq(1),
                    to: Seq(3)
                },
                SeqRange {
                    from: Seq(5),
                    to: Seq(6)
                },
                SeqRange {
                    from: Seq(9),
                    to: Seq(9)
                },
            ]
        );
        assert_eq!(r.iter().map(SeqRange::len).sum::<u64>(), 6);
    }

    proptest! {
        #[test]
        fn compact_covers_exactly_its_input(mut v in proptest::collection::vec(0u64..500, 0..200)) {
            v.sort_unstable();
            v.dedup();
            let ranges = SeqRange::compact(v.iter().copied().map(Seq));
            let total: u64 = ranges.iter().map(SeqRange::len).sum();
            prop_assert_eq!(total, v.len() as u64);
            for s in &v {
                prop_assert!(ranges.iter().any(|r| r.contains(Seq(*s))));
            }
        }
    }
}
