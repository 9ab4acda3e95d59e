//! Validation at the edge: what the agent notices about a device's values, without changing them.
//!
//! Nothing is silently dropped or corrected. A suspicious value is kept in the reading, the reading
//! carries a quality [`Flag`], and an [`EventDraft`] tells the story (which channel, which values).
//! The only value that does not reach the reading is a non-finite one (NaN, ±inf): JSON cannot
//! carry it, so that channel becomes `null` with [`Flag::NotFinite`].
//!
//! A [`Validator`] lives as long as the poller of one device and keeps what it needs across polls:
//! the last finite totalizer and flow, the highest flow seen, and how long each value has been
//! bit-identical. A restarted agent seeds it with the last reading it kept
//! ([`Validator::seed`]), so a totalizer reset that happens while the agent is down is still seen.
//!
//! # Rules
//! - **Not finite**: the channel becomes `None`, [`Flag::NotFinite`]; one event when a channel
//!   starts reading non-finite values (E+H sends NaN for as long as a fault lasts).
//! - **Missing** channels (registers that could not be read this cycle): [`Flag::Partial`].
//! - **Out of range**: |flow| above `flow_max_lps`, level outside `[level_min_m, level_max_m]`:
//!   [`Flag::OutOfRange`] on every such reading, one event when the channel leaves its range. A
//!   totalizer step above `total_max_step_m3`: flag and an event for every such step.
//! - **Frozen**: flow, totalizer or level bit-identical for longer than `frozen_after_s`
//!   ([`Flag::Frozen`]); flow only while non-zero (a stopped pump reads 0), the totalizer only
//!   while forward flow is read (it stands still when the pump does). One event when the value
//!   freezes, and one more [`EventKind::Frozen`] event, whose message starts with "ended", when
//!   it moves again. Extra channels are not judged: a battery voltage may sit still for weeks.
//! - **Totalizer changes** are told apart by the volume that can have passed between two
//!   readings, `flow × elapsed × (1 + FLOW_VOLUME_TOLERANCE) + slack`. In this order:
//!   1. *forward* (cur ≥ prev): normal, unless the increase exceeds every plausible volume and
//!      [`JUMP_MIN_M3`] ([`Flag::MeterReplaced`]), or a net counter ran backwards below zero
//!      through its wrap while reverse flow is read ([`Flag::ReverseFlow`]);
//!   2. *rollover*: the register has a wrap value and `(wrap − prev) + cur` is a plausible volume
//!      ([`Flag::TotalizerRollover`]); the volume continues across the wrap;
//!   3. *reverse flow*: flow negative or the direction channel non-zero, and the decrease is no
//!      more than the sampled flow can explain ([`Flag::ReverseFlow`]; one event per run);
//!   4. *reset*: the current value is within what can have been counted since zero and the drop
//!      is larger than that ([`Flag::TotalizerReset`]);
//!   5. *meter replaced*: a drop larger than any plausible volume and [`JUMP_MIN_M3`]
//!      ([`Flag::MeterReplaced`]);
//!   6. otherwise [`Flag::TotalizerBackwards`].
//!
//!   After each of these the validator continues from the new value.
//!
//! Elapsed time comes from `CLOCK_BOOTTIME` when both readings carry it (so a wall-clock step at
//! NTP sync is not mistaken for hours), else from the timestamps. When time went backwards the
//! elapsed time is unknown and only the rules that do not need it apply.

use crate::config::LimitsConfig;
use crate::metrics::{FlagLabels, Metrics};
use crate::register::Channel;
use caudal_common::{DeviceId, Event, EventKind, Flag, Quality, Reading, Seq};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet};

/// Relative tolerance on a volume computed from flow × elapsed time. Flow is sampled at two
/// instants only, and pumps ramp and pulse between them.
pub const FLOW_VOLUME_TOLERANCE: f64 = 0.5;

/// Absolute slack added to every volume bound, m³: display resolution of integer counters and the
/// jitter of the poll instant.
pub const VOLUME_SLACK_M3: f64 = 0.1;

/// Relative resolution of a float32 totalizer (2⁻²³). The slack also grows by twice this fraction
/// of the totalizer, so a float32 total near 1e7 m³ (steps of 1 m³) is not judged to the litre.
pub const F32_RELATIVE_RESOLUTION: f64 = f32::EPSILON as f64;

/// Without `flow_max_lps`, the highest flow the pump can reach is taken as this many times the
/// highest |flow| the validator has seen.
pub const OBSERVED_FLOW_HEADROOM: f64 = 2.0;

/// A counter restarted from zero is "near zero" up to this many m³ when no volume bound is known
/// (and at least this many when one is).
pub const RESET_ZERO_M3: f64 = 1.0;

/// Without a volume bound (no flow information or unknown elapsed time), a rollover is accepted
/// when `(wrap − prev) + cur` is at most this fraction of the wrap value.
pub const ROLLOVER_FALLBACK_FRACTION: f64 = 0.01;

/// A totalizer change that nothing explains is a different counter (a replaced meter) only when
/// it is at least this large, m³; smaller unexplained decreases are plain "backwards".
pub const JUMP_MIN_M3: f64 = 10.0;

/// Why a validator refused input.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("validator of device {expected} cannot be seeded with a reading of device {got}")]
    WrongDevice { expected: DeviceId, got: DeviceId },
}

/// The values read from one device in one poll cycle, in canonical units.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// When the device was read (the reading's timestamp).
    pub ts: DateTime<Utc>,
    /// `CLOCK_BOOTTIME` of the read, in milliseconds (the `ClockStamp`'s). When the previous
    /// reading has it too, elapsed time is taken from it rather than from `ts`.
    pub boottime_ms: Option<u64>,
    /// Channels read this cycle. A channel listed twice keeps its last value.
    pub values: Vec<(Channel, f64)>,
    /// Channels whose registers could not be read this cycle.
    pub missing: Vec<Channel>,
}

/// An event the validator wants recorded; the poller turns it into an [`Event`].
#[derive(Debug, Clone, PartialEq)]
pub struct EventDraft {
    pub kind: EventKind,
    /// Names the channel and the values involved.
    pub message: String,
    /// The value before (e.g. the last totalizer), canonical units.
    pub previous: Option<f64>,
    /// The value that triggered the event, canonical units.
    pub current: Option<f64>,
    /// For a rollover: the total at which the register wraps, canonical units.
    pub wrap: Option<f64>,
}

impl EventDraft {
    /// The event for `device` at `ts`. Its `seq` is a placeholder: the outbox assigns it.
    pub fn into_event(self, device: &DeviceId, ts: DateTime<Utc>) -> Event {
        Event {
            seq: Seq(0),
            ts,
            device: Some(device.clone()),
            kind: self.kind,
            message: self.message,
            previous: self.previous,
            current: self.current,
            wrap: self.wrap,
        }
    }
}

/// What validation made of one [`Sample`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Verdict {
    pub quality: Quality,
    /// L/s, finite or `None`.
    pub flow_lps: Option<f64>,
    /// m³ as read (a wrapped counter stays wrapped), finite or `None`.
    pub total_m3: Option<f64>,
    /// m, finite or `None`.
    pub level_m: Option<f64>,
    /// Extra channels and the direction indicator (key `direction`), finite values only.
    pub extra: BTreeMap<String, f64>,
    /// Volume counted since the previous totalizer reading, m³, finite: continues across a
    /// rollover, negative when a net counter ran backwards. `None` on the first reading and after
    /// a reset, a replacement or an unexplained decrease.
    pub volume_m3: Option<f64>,
    pub events: Vec<EventDraft>,
}

impl Verdict {
    /// The reading and events of `device` at `ts` (sequence numbers are left to the outbox).
    pub fn into_records(self, device: &DeviceId, ts: DateTime<Utc>) -> (Reading, Vec<Event>) {
        let reading = Reading {
            seq: Seq(0),
            device: device.clone(),
            ts,
            q: self.quality,
            flow_lps: self.flow_lps,
            total_m3: self.total_m3,
            level_m: self.level_m,
            extra: self.extra,
        };
        let events = self
            .events
            .into_iter()
            .map(|e| e.into_event(device, ts))
            .collect();
        (reading, events)
    }

    /// Counts the verdict's flags in `caudal_agent_quality_flags`.
    pub fn count(&self, device: &DeviceId, metrics: &Metrics) {
        for f in self.quality.iter() {
            metrics
                .flags
                .get_or_create(&FlagLabels {
                    device: device.to_string(),
                    flag: f.name().to_string(),
                })
                .inc();
        }
    }
}

/// A point in time of a reading.
#[derive(Debug, Clone, Copy, PartialEq)]
struct At {
    wall: DateTime<Utc>,
    boot_ms: Option<u64>,
}

impl At {
    /// Seconds from `self` to `later`, `None` when time went backwards.
    fn secs_until(self, later: At) -> Option<f64> {
        if let (Some(a), Some(b)) = (self.boot_ms, later.boot_ms) {
            return b.checked_sub(a).map(|ms| ms as f64 / 1000.0);
        }
        let ms = later
            .wall
            .signed_duration_since(self.wall)
            .num_milliseconds();
        (ms >= 0).then(|| ms as f64 / 1000.0)
    }
}

#[derive(Debug, Clone, Copy)]
struct Prev {
    value: f64,
    at: At,
}

/// How long one channel has held the same bits.
#[derive(Debug, Clone, Copy)]
struct Hold {
    bits: u64,
    since: At,
    frozen: bool,
}

/// What a totalizer did between two readings.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TotalStep {
    Forward {
        volume: f64,
    },
    Rollover {
        volume: f64,
    },
    /// `volume` is negative: what the net counter ran back.
    Reverse {
        volume: f64,
    },
    Reset,
    Replaced,
    Backwards,
}

/// What the totalizer rules know about one interval.
#[derive(Debug, Clone, Copy)]
struct Interval {
    prev: f64,
    cur: f64,
    /// Seconds, `None` when time went backwards.
    elapsed: Option<f64>,
    /// Highest |flow| sampled at either end, L/s.
    flow_lps: Option<f64>,
    /// Highest flow the pump can reach, L/s.
    ceiling_lps: Option<f64>,
    /// Either end read reverse flow.
    reverse: bool,
    /// The register's wrap value, m³.
    wrap: Option<f64>,
}

impl Interval {
    /// The most volume `lps` can have moved in the interval, m³.
    fn bound(&self, lps: f64) -> Option<f64> {
        let slack =
            VOLUME_SLACK_M3 + 2.0 * F32_RELATIVE_RESOLUTION * self.prev.abs().max(self.cur.abs());
        self.elapsed
            .map(|s| lps * s / 1000.0 * (1.0 + FLOW_VOLUME_TOLERANCE) + slack)
    }

    fn classify(&self) -> TotalStep {
        let (prev, cur) = (self.prev, self.cur);
        let plausible = self.ceiling_lps.and_then(|c| self.bound(c));
        let reverse_bound = if self.reverse {
            self.flow_lps.and_then(|f| self.bound(f))
        } else {
            None
        };
        let jump = plausible.map_or(JUMP_MIN_M3, |p| p.max(JUMP_MIN_M3));

        if cur >= prev {
            let step = cur - prev;
            // An unsigned net counter running backwards from near zero wraps to the top (Arad
            // "net unsigned"): taken when going back through the wrap is the shorter way.
            if let (Some(w), Some(rb)) = (self.wrap, reverse_bound) {
                let back = prev + (w - cur);
                if (0.0..=rb).contains(&back) && back < step {
                    return TotalStep::Reverse { volume: -back };
                }
            }
            if plausible.is_some() && step > jump {
                return TotalStep::Replaced;
            }
            return TotalStep::Forward { volume: step };
        }

        let drop = prev - cur;
        if let Some(w) = self.wrap {
            let wrapped = (w - prev) + cur;
            let window = plausible.unwrap_or(w * ROLLOVER_FALLBACK_FRACTION);
            if cur >= 0.0 && (0.0..=window).contains(&wrapped) {
                return TotalStep::Rollover { volume: wrapped };
            }
        }
        if let Some(rb) = reverse_bound
            && drop <= rb
        {
            return TotalStep::Reverse { volume: -drop };
        }
        let zero = plausible.map_or(RESET_ZERO_M3, |p| p.max(RESET_ZERO_M3));
        if cur.abs() <= zero && drop > zero {
            return TotalStep::Reset;
        }
        if drop > jump {
            return TotalStep::Replaced;
        }
        TotalStep::Backwards
    }
}

/// The frozen-value watch of one channel.
#[derive(Debug)]
struct Stillness {
    channel: &'static str,
    unit: &'static str,
    hold: Option<Hold>,
}

/// Validates the readings of one device, keeping state across polls.
#[derive(Debug)]
pub struct Validator {
    device: DeviceId,
    limits: LimitsConfig,
    /// Finite and positive, m³.
    rollover_at: Option<f64>,
    total: Option<Prev>,
    flow: Option<Prev>,
    /// The last reading indicated reverse flow.
    reverse: bool,
    /// Inside a run of readings flagged reverse flow (one event per run).
    in_reverse_run: bool,
    /// Highest |flow| seen, L/s.
    flow_seen_lps: f64,
    /// Frozen-value watches of flow, totalizer and level.
    still: [Stillness; 3],
    /// Channels whose last value was not finite.
    not_finite: BTreeSet<Channel>,
    /// Channels whose last value was out of range.
    out_of_range: BTreeSet<Channel>,
}

impl Validator {
    /// A validator for `device`. `rollover_at` is the totalizer register's wrap value in m³
    /// (e.g. 4 294 967.295 for a u32 counter of litres); a non-finite or non-positive value is
    /// ignored.
    pub fn new(device: DeviceId, limits: LimitsConfig, rollover_at: Option<f64>) -> Self {
        Validator {
            device,
            limits,
            rollover_at: rollover_at.filter(|w| w.is_finite() && *w > 0.0),
            total: None,
            flow: None,
            reverse: false,
            in_reverse_run: false,
            flow_seen_lps: 0.0,
            still: [
                Stillness::new("flow", "L/s"),
                Stillness::new("total", "m³"),
                Stillness::new("level", "m"),
            ],
            not_finite: BTreeSet::new(),
            out_of_range: BTreeSet::new(),
        }
    }

    /// The device this validator judges.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// Continues from the last reading a previous run kept (the outbox's device status), so the
    /// first reading after a restart is compared with it. Call before the first [`check`].
    ///
    /// [`check`]: Validator::check
    pub fn seed(&mut self, last: &Reading) -> Result<(), ValidationError> {
        if last.device != self.device {
            return Err(ValidationError::WrongDevice {
                expected: self.device.clone(),
                got: last.device.clone(),
            });
        }
        // The previous run's boot time means nothing in this one: elapsed time comes from `ts`.
        let at = At {
            wall: last.ts,
            boot_ms: None,
        };
        if let Some(t) = last.total_m3.filter(|t| t.is_finite()) {
            self.total = Some(Prev { value: t, at });
        }
        if let Some(f) = last.flow_lps.filter(|f| f.is_finite()) {
            self.flow = Some(Prev { value: f, at });
            self.flow_seen_lps = self.flow_seen_lps.max(f.abs());
        }
        let direction = last.extra.get(Channel::Direction.name()).copied();
        self.reverse = is_reverse(last.flow_lps, direction);
        Ok(())
    }

    /// Judges one poll cycle's values.
    pub fn check(&mut self, sample: Sample) -> Verdict {
        let now = At {
            wall: sample.ts,
            boot_ms: sample.boottime_ms,
        };
        let mut v = Verdict::default();
        if !sample.missing.is_empty() {
            v.quality.set(Flag::Partial);
        }

        let (mut flow, mut total, mut level, mut direction) = (None, None, None, None);
        for (ch, x) in sample.values {
            let value = x.is_finite().then_some(x);
            if value.is_none() {
                v.quality.set(Flag::NotFinite);
                if self.not_finite.insert(ch.clone()) {
                    v.events.push(EventDraft {
                        kind: EventKind::NotFinite,
                        message: format!("{ch} read {x}; the reading carries no {ch} value"),
                        previous: None,
                        current: None,
                        wrap: None,
                    });
                }
            } else {
                self.not_finite.remove(&ch);
            }
            match ch {
                Channel::Flow => flow = value,
                Channel::Total => total = value,
                Channel::Level => level = value,
                Channel::Direction => direction = value,
                Channel::Extra(name) => set_extra(&mut v.extra, name, value),
            }
        }
        set_extra(
            &mut v.extra,
            Channel::Direction.name().to_string(),
            direction,
        );
        let reverse_now = is_reverse(flow, direction);

        if let Some(f) = flow {
            let max = self.limits.flow_max_lps;
            let out = max.is_some_and(|m| f.abs() > m);
            self.range(&mut v, Channel::Flow, f, out, || {
                format!("flow {f} L/s is beyond ±{} L/s", max.unwrap_or(f64::NAN))
            });
            self.flow_seen_lps = self.flow_seen_lps.max(f.abs());
        }
        if let Some(l) = level {
            let (lo, hi) = (self.limits.level_min_m, self.limits.level_max_m);
            let out = lo.is_some_and(|m| l < m) || hi.is_some_and(|m| l > m);
            self.range(&mut v, Channel::Level, l, out, || {
                format!(
                    "level {l} m is outside [{}, {}] m",
                    lo.map_or("-inf".into(), |x| x.to_string()),
                    hi.map_or("inf".into(), |x| x.to_string())
                )
            });
        }

        if let Some(cur) = total {
            if let Some(prev) = self.total {
                self.judge_total(&mut v, prev, cur, now, flow, reverse_now);
            }
            self.total = Some(Prev {
                value: cur,
                at: now,
            });
        }

        if let Some(after) = self.limits.frozen_after_s {
            let after = after as f64;
            let forward = flow.is_some_and(|f| f > 0.0) && !reverse_now;
            let flowing = flow.is_some_and(|f| f != 0.0);
            let [f, t, l] = &mut self.still;
            f.observe(&mut v, flow, flowing, now, after);
            t.observe(&mut v, total, forward, now, after);
            l.observe(&mut v, level, true, now, after);
        }

        if let Some(f) = flow {
            self.flow = Some(Prev { value: f, at: now });
        }
        if flow.is_some() || direction.is_some() {
            self.reverse = reverse_now;
        }
        v.flow_lps = flow;
        v.total_m3 = total;
        v.level_m = level;
        v
    }

    /// Flags an out-of-range value; one event when the channel leaves its range.
    fn range(
        &mut self,
        v: &mut Verdict,
        ch: Channel,
        value: f64,
        out: bool,
        message: impl FnOnce() -> String,
    ) {
        if !out {
            self.out_of_range.remove(&ch);
            return;
        }
        v.quality.set(Flag::OutOfRange);
        if self.out_of_range.insert(ch) {
            v.events.push(EventDraft {
                kind: EventKind::OutOfRange,
                message: message(),
                previous: None,
                current: Some(value),
                wrap: None,
            });
        }
    }

    /// The highest flow the pump can reach, L/s.
    fn ceiling_lps(&self) -> Option<f64> {
        self.limits
            .flow_max_lps
            .filter(|m| m.is_finite() && *m > 0.0)
            .or_else(|| {
                (self.flow_seen_lps > 0.0).then_some(self.flow_seen_lps * OBSERVED_FLOW_HEADROOM)
            })
    }

    fn judge_total(
        &mut self,
        v: &mut Verdict,
        prev: Prev,
        cur: f64,
        now: At,
        flow: Option<f64>,
        reverse_now: bool,
    ) {
        let sampled = [self.flow.map(|p| p.value), flow]
            .into_iter()
            .flatten()
            .map(f64::abs)
            .reduce(f64::max);
        let interval = Interval {
            prev: prev.value,
            cur,
            elapsed: prev.at.secs_until(now),
            flow_lps: sampled,
            ceiling_lps: self.ceiling_lps(),
            reverse: self.reverse || reverse_now,
            wrap: self.rollover_at,
        };
        let p = prev.value;
        let secs = interval
            .elapsed
            .map_or("an unknown time".to_string(), |s| format!("{s} s"));
        let mut event = |kind, message: String| {
            v.events.push(EventDraft {
                kind,
                message,
                previous: Some(p),
                current: Some(cur),
                wrap: None,
            });
        };
        let mut step = interval.classify();
        // Two finite totals can still be a non-finite volume apart (±1e308).
        if let TotalStep::Forward { volume }
        | TotalStep::Rollover { volume }
        | TotalStep::Reverse { volume } = step
            && !volume.is_finite()
        {
            step = TotalStep::Replaced;
        }
        if !matches!(step, TotalStep::Reverse { .. }) {
            self.in_reverse_run = false;
        }
        match step {
            TotalStep::Forward { volume } => v.volume_m3 = Some(volume),
            TotalStep::Rollover { volume } => {
                v.quality.set(Flag::TotalizerRollover);
                v.volume_m3 = Some(volume);
                event(
                    EventKind::TotalizerRollover,
                    format!(
                        "total wrapped at {} m³: {p} → {cur} m³, {volume:.3} m³ counted across the wrap in {secs}",
                        self.rollover_at.unwrap_or(f64::NAN)
                    ),
                );
                if let Some(e) = v.events.last_mut() {
                    e.wrap = self.rollover_at.filter(|w| w.is_finite() && *w > 0.0);
                }
            }
            TotalStep::Reverse { volume } => {
                v.quality.set(Flag::ReverseFlow);
                v.volume_m3 = Some(volume);
                if !self.in_reverse_run {
                    self.in_reverse_run = true;
                    event(
                        EventKind::ReverseFlow,
                        format!(
                            "total ran back {:.3} m³ ({p} → {cur} m³) in {secs} with reverse flow read: net counter",
                            -volume
                        ),
                    );
                }
            }
            TotalStep::Reset => {
                v.quality.set(Flag::TotalizerReset);
                event(
                    EventKind::TotalizerReset,
                    format!(
                        "total went back to near zero: {p} → {cur} m³ in {secs}; counter reset"
                    ),
                );
            }
            TotalStep::Replaced => {
                v.quality.set(Flag::MeterReplaced);
                event(
                    EventKind::MeterReplaced,
                    format!(
                        "total jumped {p} → {cur} m³ in {secs}, more than the flow can explain and not a reset or wrap: meter replaced?"
                    ),
                );
            }
            TotalStep::Backwards => {
                v.quality.set(Flag::TotalizerBackwards);
                event(
                    EventKind::TotalizerBackwards,
                    format!(
                        "total went back {:.3} m³ ({p} → {cur} m³) in {secs} without reverse flow, reset or wrap",
                        p - cur
                    ),
                );
            }
        }
        if let (Some(volume), Some(max)) = (v.volume_m3, self.limits.total_max_step_m3)
            && volume > max
        {
            v.quality.set(Flag::OutOfRange);
            v.events.push(EventDraft {
                kind: EventKind::OutOfRange,
                message: format!(
                    "total rose {volume:.3} m³ in {secs} ({p} → {cur} m³), more than the {max} m³ allowed per poll"
                ),
                previous: Some(p),
                current: Some(cur),
                wrap: None,
            });
        }
    }
}

impl Stillness {
    fn new(channel: &'static str, unit: &'static str) -> Self {
        Stillness {
            channel,
            unit,
            hold: None,
        }
    }

    /// Tracks how long `value` has been bit-identical; `eligible` says whether standing still
    /// is suspicious right now.
    fn observe(
        &mut self,
        v: &mut Verdict,
        value: Option<f64>,
        eligible: bool,
        now: At,
        after_s: f64,
    ) {
        let (ch, unit) = (self.channel, self.unit);
        // Missing or non-finite: nothing learnt about the value this cycle.
        let Some(x) = value else { return };
        let bits = x.to_bits();
        let fresh = Hold {
            bits,
            since: now,
            frozen: false,
        };
        let Some(h) = self.hold.as_mut() else {
            self.hold = Some(fresh);
            return;
        };
        let held = h.since.secs_until(now);
        let held_text = held.map_or("an unknown time".to_string(), |s| format!("{s} s"));
        if h.bits != bits {
            if h.frozen {
                let old = f64::from_bits(h.bits);
                v.events.push(EventDraft {
                    kind: EventKind::Frozen,
                    message: format!(
                        "ended: {ch} moves again ({old} → {x} {unit}) after {held_text}"
                    ),
                    previous: Some(old),
                    current: Some(x),
                    wrap: None,
                });
            }
            *h = fresh;
            return;
        }
        if !eligible {
            if h.frozen {
                v.events.push(EventDraft {
                    kind: EventKind::Frozen,
                    message: format!(
                        "ended: {ch} at {x} {unit} after {held_text}, no longer expected to move"
                    ),
                    previous: Some(x),
                    current: Some(x),
                    wrap: None,
                });
            }
            *h = fresh;
            return;
        }
        if h.frozen {
            v.quality.set(Flag::Frozen);
            return;
        }
        match held {
            Some(s) if s > after_s => {
                h.frozen = true;
                v.quality.set(Flag::Frozen);
                v.events.push(EventDraft {
                    kind: EventKind::Frozen,
                    message: format!(
                        "{ch} unchanged at {x} {unit} for {s} s (frozen after {after_s} s)"
                    ),
                    previous: Some(x),
                    current: Some(x),
                    wrap: None,
                });
            }
            Some(_) => {}
            // Time went backwards: start the window again from here.
            None => h.since = now,
        }
    }
}

fn is_reverse(flow: Option<f64>, direction: Option<f64>) -> bool {
    flow.is_some_and(|f| f < 0.0) || direction.is_some_and(|d| d != 0.0)
}

fn set_extra(extra: &mut BTreeMap<String, f64>, name: String, value: Option<f64>) {
    match value {
        Some(x) => {
            extra.insert(name, x);
        }
        None => {
            extra.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests;
