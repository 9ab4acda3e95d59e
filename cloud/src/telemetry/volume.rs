//! Extracted volume from totalizer readings: the arithmetic of consecutive totals of one device,
//! reset-, replacement- and rollover-aware, so a counter that starts again never yields a
//! negative or a made-up volume.
//!
//! Each reading's totalizer is compared with the previous one of the same device, and the
//! difference (a *step*) belongs to the later reading. What a step counts:
//!
//! | case | counted | the next step starts from |
//! |---|---|---|
//! | first total seen | nothing | this total |
//! | `cur ≥ prev`, no flag below | `cur − prev` | this total |
//! | rollover (`totalizer_rollover` flag) with the wrap value known from the agent's event | `(wrap − prev) + cur` | this total |
//! | rollover whose wrap is not known | nothing (as a reset) | this total |
//! | reset (`totalizer_reset`) or replacement (`meter_replaced`), whichever way it moved | nothing | this total |
//! | reverse flow (`reverse_flow`: a net counter running back) | nothing | the previous high: water that went back and comes forward again is not counted twice (a rise that stays below the high counts nothing) |
//! | any other decrease (`totalizer_backwards` or none) | nothing | this total |
//!
//! A step is never negative, and a step that is not finite counts nothing and starts again. The
//! volume between a reset and the first reading after it (what was counted from zero) is not
//! known to the cloud and is not invented.

use caudal_common::{Flag, Quality};

/// Why a step counted nothing and the count started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Break {
    /// The agent flagged a reset.
    Reset,
    /// The agent flagged a meter replacement.
    Replaced,
    /// A rollover without a known wrap value.
    RolloverUnknownWrap,
    /// The total went down (without reverse flow).
    Decrease,
    /// The arithmetic did not give a finite number.
    NotFinite,
}

/// What one step of a totalizer counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// The first total: nothing to compare with.
    First,
    /// Counted volume, m³ (≥ 0, finite).
    Volume(f64),
    /// Counted across a wrap, m³ (≥ 0, finite).
    Rollover(f64),
    /// A net counter ran back; nothing counted, the high mark is kept.
    Reverse,
    /// Nothing counted; the count starts again from the new total.
    Break(Break),
}

impl Step {
    /// The volume this step adds, m³ (0 unless counted).
    pub fn volume(self) -> f64 {
        match self {
            Step::Volume(v) | Step::Rollover(v) => v,
            _ => 0.0,
        }
    }
}

/// The running state of one device's totalizer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totalizer {
    /// The total counting resumes above: the last total, or the earlier high while a net
    /// counter is below it after running back.
    base: Option<f64>,
    /// The last total seen, which tells the direction of the next step.
    last: Option<f64>,
}

impl Totalizer {
    pub fn new() -> Self {
        Totalizer::default()
    }

    /// Starts from a known total (the last reading before the queried range).
    pub fn from_total(total: f64) -> Self {
        let t = total.is_finite().then_some(total);
        Totalizer { base: t, last: t }
    }

    fn restart(&mut self, cur: f64, b: Break) -> Step {
        self.base = Some(cur);
        self.last = Some(cur);
        Step::Break(b)
    }

    /// Takes the next total of the device (`quality` is that reading's flags; `wrap` the
    /// register's wrap value in m³ when a rollover event named it).
    pub fn step(&mut self, cur: f64, quality: Quality, wrap: Option<f64>) -> Step {
        if !cur.is_finite() {
            return Step::Break(Break::NotFinite);
        }
        let (Some(base), Some(last)) = (self.base, self.last) else {
            self.base = Some(cur);
            self.last = Some(cur);
            return Step::First;
        };
        if quality.has(Flag::MeterReplaced) {
            return self.restart(cur, Break::Replaced);
        }
        if quality.has(Flag::TotalizerReset) {
            return self.restart(cur, Break::Reset);
        }
        if quality.has(Flag::TotalizerRollover) {
            return match wrap.map(|w| (w - base) + cur) {
                Some(v) if v.is_finite() && v >= 0.0 && cur >= 0.0 => {
                    self.base = Some(cur);
                    self.last = Some(cur);
                    Step::Rollover(v)
                }
                _ => self.restart(cur, Break::RolloverUnknownWrap),
            };
        }
        if cur >= last {
            // Below the high mark after running back, nothing is new yet.
            let v = (cur - base).max(0.0);
            if !v.is_finite() {
                return self.restart(cur, Break::NotFinite);
            }
            self.base = Some(base.max(cur));
            self.last = Some(cur);
            return Step::Volume(v);
        }
        if quality.has(Flag::ReverseFlow) {
            // Keep the high mark: counting resumes once the counter passes it again.
            self.last = Some(cur);
            return Step::Reverse;
        }
        self.restart(cur, Break::Decrease)
    }
}

/// The wrap value an agent's `totalizer_rollover` event message names ("total wrapped at W m³:
/// …"), when it names a finite positive one.
pub fn wrap_from_message(message: &str) -> Option<f64> {
    let rest = message.split_once("wrapped at ")?.1;
    let number = rest.split_whitespace().next()?;
    number
        .parse::<f64>()
        .ok()
        .filter(|w| w.is_finite() && *w > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(flags: &[Flag]) -> Quality {
        flags.iter().fold(Quality::GOOD, |q, f| q.with(*f))
    }

    fn sum(t: &mut Totalizer, steps: &[(f64, Quality, Option<f64>)]) -> f64 {
        steps
            .iter()
            .map(|(c, q, w)| t.step(*c, *q, *w).volume())
            .sum()
    }

    #[test]
    fn counts_forward_and_starts_again_after_a_reset() {
        let g = Quality::GOOD;
        let mut t = Totalizer::new();
        let v = sum(
            &mut t,
            &[
                (100.0, g, None),
                (110.0, g, None),
                (2.0, q(&[Flag::TotalizerReset]), None),
                (5.0, g, None),
            ],
        );
        assert_eq!(v, 13.0);
    }

    #[test]
    fn rollover_adds_the_wrap_when_known() {
        let mut t = Totalizer::from_total(99_990.0);
        let s = t.step(5.0, q(&[Flag::TotalizerRollover]), Some(100_000.0));
        assert_eq!(s, Step::Rollover(15.0));
        assert_eq!(t.step(7.0, Quality::GOOD, None), Step::Volume(2.0));
        let mut t = Totalizer::from_total(99_990.0);
        assert_eq!(
            t.step(5.0, q(&[Flag::TotalizerRollover]), None),
            Step::Break(Break::RolloverUnknownWrap)
        );
    }

    #[test]
    fn a_replacement_upwards_counts_nothing() {
        let mut t = Totalizer::from_total(10.0);
        assert_eq!(
            t.step(5_000_000.0, q(&[Flag::MeterReplaced]), None),
            Step::Break(Break::Replaced)
        );
        assert_eq!(t.step(5_000_001.0, Quality::GOOD, None), Step::Volume(1.0));
    }

    #[test]
    fn reverse_flow_is_not_counted_twice() {
        let mut t = Totalizer::from_total(100.0);
        let r = q(&[Flag::ReverseFlow]);
        let v = sum(
            &mut t,
            &[
                (98.0, r, None),
                (97.0, r, None),
                (99.0, Quality::GOOD, None),
                (103.0, Quality::GOOD, None),
            ],
        );
        assert_eq!(v, 3.0);
        // A decrease without reverse flow after running back starts again.
        assert_eq!(
            t.step(50.0, Quality::GOOD, None),
            Step::Break(Break::Decrease)
        );
        assert_eq!(t.step(51.0, Quality::GOOD, None), Step::Volume(1.0));
    }

    #[test]
    fn wrap_is_read_from_the_agents_message() {
        assert_eq!(
            wrap_from_message("total wrapped at 100000 m³: 99990 → 5 m³, 15.000 m³ counted"),
            Some(100_000.0)
        );
        assert_eq!(wrap_from_message("total wrapped at NaN m³: 1 → 2"), None);
        assert_eq!(wrap_from_message("counter reset"), None);
    }

    fn flags() -> impl Strategy<Value = Quality> {
        prop_oneof![
            4 => Just(Quality::GOOD),
            1 => Just(q(&[Flag::TotalizerReset])),
            1 => Just(q(&[Flag::MeterReplaced])),
            1 => Just(q(&[Flag::TotalizerRollover])),
            1 => Just(q(&[Flag::ReverseFlow])),
            1 => Just(q(&[Flag::TotalizerBackwards])),
        ]
    }

    proptest! {
        #[test]
        fn volume_is_never_negative_nor_infinite(
            steps in proptest::collection::vec(
                (-1e12f64..1e12, flags(), proptest::option::of(1.0f64..1e12)), 0..60)
        ) {
            let mut t = Totalizer::new();
            for (c, q, w) in steps {
                let v = t.step(c, q, w).volume();
                prop_assert!(v >= 0.0 && v.is_finite(), "{v}");
            }
        }

        #[test]
        fn a_net_counter_counts_its_high_mark_once(
            start in 0.0f64..1e6,
            moves in proptest::collection::vec(-100.0f64..100.0, 1..60),
        ) {
            let mut t = Totalizer::new();
            let mut cur = start;
            let mut high = start;
            let mut v = t.step(start, Quality::GOOD, None).volume();
            for m in moves {
                let next = cur + m;
                let q = if next < cur { q(&[Flag::ReverseFlow]) } else { Quality::GOOD };
                v += t.step(next, q, None).volume();
                cur = next;
                high = high.max(cur);
            }
            prop_assert!((v - (high - start)).abs() <= 1e-6, "{v} vs {}", high - start);
        }

        #[test]
        fn monotonic_totals_give_last_minus_first(
            start in 0.0f64..1e9,
            incs in proptest::collection::vec(0.0f64..1e4, 1..60),
        ) {
            let mut totals = vec![start];
            for i in incs {
                let next = totals[totals.len() - 1] + i;
                totals.push(next);
            }
            let mut t = Totalizer::new();
            let v: f64 = totals.iter().map(|c| t.step(*c, Quality::GOOD, None).volume()).sum();
            let expected = totals[totals.len() - 1] - totals[0];
            prop_assert!((v - expected).abs() <= 1e-6 * expected.max(1.0), "{v} vs {expected}");
        }
    }
}
