//! Tests of the validation rules with figures from real meters.

use super::*;
use caudal_common::payload::{Batch, Payload, decode};
use caudal_common::{SCHEMA_VERSION, SiteId};
use proptest::prelude::*;

/// AquaMaster 3: a u32 counter of litres read with scale 0.001. It holds at most 4 294 967 295
/// and the next count is 0, so it wraps at 2^32 counts: 4 294 967.296 m³.
const AQUAMASTER_WRAP_M3: f64 = 4_294_967_296.0 * 0.001;

fn dev() -> DeviceId {
    DeviceId::new("fm1").expect("device id")
}

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_790_000_000 + secs, 0).expect("timestamp")
}

/// A sample `secs` after the start, with a boot clock that agrees with the wall clock.
fn at(secs: i64, values: &[(Channel, f64)]) -> Sample {
    Sample {
        ts: t(secs),
        boottime_ms: u64::try_from(3_600_000 + secs * 1000).ok(),
        values: values.to_vec(),
        missing: Vec::new(),
    }
}

fn ft(flow: f64, total: f64) -> Vec<(Channel, f64)> {
    vec![(Channel::Flow, flow), (Channel::Total, total)]
}

fn validator(limits: LimitsConfig, wrap: Option<f64>) -> Validator {
    Validator::new(dev(), limits, wrap)
}

fn kinds(v: &Verdict) -> Vec<EventKind> {
    v.events.iter().map(|e| e.kind).collect()
}

fn flags(v: &Verdict) -> Vec<Flag> {
    v.quality.iter().collect()
}

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-6)
}

#[test]
fn a_good_reading_passes_through_unchanged() {
    let mut val = validator(LimitsConfig::default(), None);
    let first = val.check(at(
        0,
        &[
            (Channel::Flow, 18.4),
            (Channel::Total, 52_011.25),
            (Channel::Level, 41.7),
            (Channel::Extra("temperature".into()), 16.5),
        ],
    ));
    assert!(first.quality.is_good());
    assert!(first.events.is_empty());
    assert_eq!(
        first.volume_m3, None,
        "nothing to compare the first total with"
    );
    assert_eq!(first.flow_lps, Some(18.4));
    assert_eq!(first.total_m3, Some(52_011.25));
    assert_eq!(first.level_m, Some(41.7));
    assert_eq!(first.extra.get("temperature"), Some(&16.5));

    let next = val.check(at(60, &ft(18.4, 52_012.354)));
    assert!(next.quality.is_good());
    assert!(close(next.volume_m3, 1.104));
}

#[test]
fn nan_from_an_e_h_fault_becomes_null_with_one_event_per_fault() {
    let mut val = validator(LimitsConfig::default(), None);
    let mut events = Vec::new();
    for s in 0..3 {
        let v = val.check(at(s * 60, &ft(f64::NAN, 1000.0)));
        assert_eq!(v.flow_lps, None);
        assert_eq!(v.total_m3, Some(1000.0), "the other channels are kept");
        assert!(v.quality.has(Flag::NotFinite));
        events.extend(v.events);
    }
    assert_eq!(
        events.len(),
        1,
        "one event while the fault lasts: {events:?}"
    );
    assert_eq!(events[0].kind, EventKind::NotFinite);
    assert!(
        events[0].message.contains("flow read NaN"),
        "{}",
        events[0].message
    );

    let ok = val.check(at(180, &ft(12.0, 1000.7)));
    assert!(ok.quality.is_good());
    let again = val.check(at(240, &ft(f64::NEG_INFINITY, 1001.4)));
    assert_eq!(kinds(&again), vec![EventKind::NotFinite], "a new fault");
    assert!(again.events[0].message.contains("-inf"));
}

#[test]
fn a_non_finite_extra_channel_is_left_out_of_the_reading() {
    let mut val = validator(LimitsConfig::default(), None);
    let v = val.check(at(
        0,
        &[
            (Channel::Extra("battery".into()), f64::INFINITY),
            (Channel::Extra("temperature".into()), 15.0),
        ],
    ));
    assert!(!v.extra.contains_key("battery"));
    assert_eq!(v.extra.get("temperature"), Some(&15.0));
    assert_eq!(flags(&v), vec![Flag::NotFinite]);
    assert!(v.events[0].message.contains("battery"));
}

#[test]
fn a_channel_that_could_not_be_read_makes_the_reading_partial() {
    let mut val = validator(LimitsConfig::default(), None);
    let mut s = at(0, &[(Channel::Flow, 3.0)]);
    s.missing = vec![Channel::Total];
    let v = val.check(s);
    assert_eq!(flags(&v), vec![Flag::Partial]);
    assert_eq!(v.total_m3, None);
    assert_eq!(v.flow_lps, Some(3.0));
    assert!(v.events.is_empty(), "the poller reports the failed read");
}

#[test]
fn flow_beyond_the_limit_is_kept_and_flagged_with_one_event() {
    let limits = LimitsConfig {
        flow_max_lps: Some(80.0),
        ..Default::default()
    };
    let mut val = validator(limits, None);
    let a = val.check(at(0, &[(Channel::Flow, -96.5)]));
    assert_eq!(a.flow_lps, Some(-96.5), "kept as read");
    assert_eq!(flags(&a), vec![Flag::OutOfRange]);
    assert_eq!(kinds(&a), vec![EventKind::OutOfRange]);
    assert_eq!(a.events[0].current, Some(-96.5));
    let b = val.check(at(60, &[(Channel::Flow, 120.0)]));
    assert_eq!(flags(&b), vec![Flag::OutOfRange]);
    assert!(b.events.is_empty(), "still out of range: no new event");
    let c = val.check(at(120, &[(Channel::Flow, 79.9)]));
    assert!(c.quality.is_good());
    let d = val.check(at(180, &[(Channel::Flow, 81.0)]));
    assert_eq!(
        kinds(&d),
        vec![EventKind::OutOfRange],
        "left its range again"
    );
}

#[test]
fn level_outside_its_range_is_flagged() {
    let limits = LimitsConfig {
        level_min_m: Some(0.0),
        level_max_m: Some(120.0),
        ..Default::default()
    };
    let mut val = validator(limits, None);
    let low = val.check(at(0, &[(Channel::Level, -0.4)]));
    assert_eq!(low.level_m, Some(-0.4));
    assert_eq!(flags(&low), vec![Flag::OutOfRange]);
    assert!(low.events[0].message.contains("outside [0, 120]"));
    assert!(
        val.check(at(60, &[(Channel::Level, 0.0)]))
            .quality
            .is_good()
    );
    let high = val.check(at(120, &[(Channel::Level, 120.5)]));
    assert_eq!(kinds(&high), vec![EventKind::OutOfRange]);
}

#[test]
fn every_totalizer_step_above_the_limit_is_an_event() {
    let limits = LimitsConfig {
        total_max_step_m3: Some(5.0),
        ..Default::default()
    };
    let mut val = validator(limits, None);
    val.check(at(0, &ft(25.0, 1000.0)));
    for (i, total) in [1007.5, 1015.0].into_iter().enumerate() {
        let v = val.check(at(300 * (i as i64 + 1), &ft(25.0, total)));
        assert_eq!(flags(&v), vec![Flag::OutOfRange]);
        assert_eq!(kinds(&v), vec![EventKind::OutOfRange]);
        assert!(close(v.volume_m3, 7.5));
    }
    let small = val.check(at(900, &ft(10.0, 1018.0)));
    assert!(small.quality.is_good());
}

fn frozen_limits() -> LimitsConfig {
    LimitsConfig {
        frozen_after_s: Some(600),
        ..Default::default()
    }
}

#[test]
fn a_flow_stuck_at_a_non_zero_value_is_frozen_once_then_ends() {
    let mut val = validator(frozen_limits(), None);
    let mut total = 500.0;
    let mut poll = |val: &mut Validator, s: i64, flow: f64| {
        total += 0.75;
        val.check(at(s, &ft(flow, total)))
    };
    for s in (0..=600).step_by(60) {
        let v = poll(&mut val, s, 12.5);
        assert!(
            v.quality.is_good(),
            "600 s is not longer than 600 s (at {s})"
        );
    }
    let start = poll(&mut val, 660, 12.5);
    assert_eq!(flags(&start), vec![Flag::Frozen]);
    assert_eq!(kinds(&start), vec![EventKind::Frozen]);
    assert!(
        start.events[0]
            .message
            .starts_with("flow unchanged at 12.5")
    );
    let during = poll(&mut val, 720, 12.5);
    assert_eq!(flags(&during), vec![Flag::Frozen]);
    assert!(during.events.is_empty(), "one event when it starts");
    let end = poll(&mut val, 780, 12.6);
    assert!(end.quality.is_good());
    assert_eq!(kinds(&end), vec![EventKind::Frozen]);
    assert!(end.events[0].message.starts_with("ended: flow moves again"));
    assert_eq!(end.events[0].previous, Some(12.5));
    assert_eq!(end.events[0].current, Some(12.6));
}

#[test]
fn a_stopped_pump_is_not_frozen() {
    let mut val = validator(frozen_limits(), None);
    for s in (0..7200).step_by(60) {
        let v = val.check(at(s, &ft(0.0, 500.0)));
        assert!(v.quality.is_good(), "flow 0 and a still total at {s}");
    }
}

#[test]
fn a_totalizer_still_while_water_flows_is_frozen() {
    let mut val = validator(frozen_limits(), None);
    let mut first_flag = None;
    for (i, s) in (0..=900).step_by(60).enumerate() {
        let flow = 12.0 + i as f64 * 0.1;
        let v = val.check(at(s, &ft(flow, 500.0)));
        if v.quality.has(Flag::Frozen) && first_flag.is_none() {
            first_flag = Some(s);
            assert!(v.events[0].message.starts_with("total unchanged"));
        }
    }
    assert_eq!(first_flag, Some(660));
    // The pump stops: a still total is expected again, and the frozen state ends.
    let stop = val.check(at(960, &ft(0.0, 500.0)));
    assert!(stop.quality.is_good());
    assert!(stop.events[0].message.starts_with("ended: total at 500"));
}

#[test]
fn a_still_level_is_frozen() {
    let mut val = validator(frozen_limits(), None);
    val.check(at(0, &[(Channel::Level, 37.25)]));
    assert!(
        val.check(at(600, &[(Channel::Level, 37.25)]))
            .quality
            .is_good()
    );
    let v = val.check(at(601, &[(Channel::Level, 37.25)]));
    assert_eq!(flags(&v), vec![Flag::Frozen]);
}

#[test]
fn frozen_time_comes_from_the_boot_clock_when_the_wall_clock_steps() {
    let mut val = validator(frozen_limits(), None);
    let mut s = at(0, &[(Channel::Flow, 7.0)]);
    s.ts = DateTime::from_timestamp(5, 0).expect("1970");
    val.check(s);
    // NTP sync steps the wall clock by decades; only 60 s passed.
    let v = val.check(at(60, &[(Channel::Flow, 7.0)]));
    assert!(v.quality.is_good());

    // Without the boot clock the same step would look like decades of a still value.
    let mut val = validator(frozen_limits(), None);
    let mut s = at(0, &[(Channel::Flow, 7.0)]);
    (s.ts, s.boottime_ms) = (DateTime::from_timestamp(5, 0).expect("1970"), None);
    val.check(s);
    let mut s = at(60, &[(Channel::Flow, 7.0)]);
    s.boottime_ms = None;
    assert!(val.check(s).quality.has(Flag::Frozen));
}

#[test]
fn an_aquamaster_u32_counter_rolls_over_and_the_volume_continues() {
    let mut val = validator(LimitsConfig::default(), Some(AQUAMASTER_WRAP_M3));
    val.check(at(0, &ft(25.0, 4_294_955.600)));
    let before = val.check(at(300, &ft(25.0, 4_294_963.100)));
    assert!(before.quality.is_good());
    // 25 L/s for 300 s is 7.5 m³: 4.196 m³ to the wrap, 3.304 m³ after it.
    let wrap = val.check(at(600, &ft(25.0, 3.304)));
    assert_eq!(flags(&wrap), vec![Flag::TotalizerRollover]);
    assert_eq!(kinds(&wrap), vec![EventKind::TotalizerRollover]);
    assert_eq!(wrap.total_m3, Some(3.304), "the value is kept as read");
    assert!(close(wrap.volume_m3, 7.5), "{:?}", wrap.volume_m3);
    assert_eq!(wrap.events[0].previous, Some(4_294_963.100));
    assert_eq!(wrap.events[0].current, Some(3.304));
    assert_eq!(
        wrap.events[0].wrap,
        Some(AQUAMASTER_WRAP_M3),
        "the wrap travels in its own field"
    );
    let after = val.check(at(900, &ft(25.0, 10.804)));
    assert!(after.quality.is_good(), "continues from the new value");
    assert!(close(after.volume_m3, 7.5));
}

#[test]
fn a_rollover_without_flow_information_uses_a_fraction_of_the_wrap() {
    let mut val = validator(LimitsConfig::default(), Some(AQUAMASTER_WRAP_M3));
    val.check(at(0, &[(Channel::Total, 4_294_000.0)]));
    let v = val.check(at(86_400, &[(Channel::Total, 1_500.0)]));
    assert_eq!(flags(&v), vec![Flag::TotalizerRollover]);
    assert!(close(v.volume_m3, 2_467.296), "{:?}", v.volume_m3);
}

#[test]
fn an_e_h_keypad_reset_while_the_pump_is_stopped() {
    let mut val = validator(LimitsConfig::default(), None);
    val.check(at(0, &ft(0.0, 128_734.562)));
    let v = val.check(at(60, &ft(0.0, 0.0)));
    assert_eq!(flags(&v), vec![Flag::TotalizerReset]);
    assert_eq!(kinds(&v), vec![EventKind::TotalizerReset]);
    assert_eq!(v.volume_m3, None, "the volume across a reset is unknown");
    assert_eq!(v.total_m3, Some(0.0));
    let next = val.check(at(120, &ft(0.0, 0.0)));
    assert!(next.quality.is_good(), "continues from zero");
}

#[test]
fn an_e_h_reset_while_pumping_counts_up_from_zero() {
    let mut val = validator(LimitsConfig::default(), None);
    val.check(at(0, &ft(12.0, 128_734.562)));
    // Reset during the minute: 0.41 m³ counted since, within 24 L/s × 60 s × 1.5.
    let v = val.check(at(60, &ft(12.0, 0.41)));
    assert_eq!(kinds(&v), vec![EventKind::TotalizerReset]);
    let next = val.check(at(120, &ft(12.0, 1.13)));
    assert!(next.quality.is_good());
    assert!(close(next.volume_m3, 0.72));
}

#[test]
fn a_mag_8000_net_totalizer_runs_back_with_reverse_flow() {
    let mut val = validator(LimitsConfig::default(), None);
    val.check(at(0, &ft(-3.2, 15_234.125)));
    // 3.2 L/s back for 60 s is 0.192 m³.
    let first = val.check(at(60, &ft(-3.2, 15_233.933)));
    assert_eq!(flags(&first), vec![Flag::ReverseFlow]);
    assert_eq!(kinds(&first), vec![EventKind::ReverseFlow]);
    assert!(close(first.volume_m3, -0.192));
    let second = val.check(at(120, &ft(-3.2, 15_233.741)));
    assert_eq!(flags(&second), vec![Flag::ReverseFlow]);
    assert!(
        second.events.is_empty(),
        "one event per run of reverse flow"
    );
    let forward = val.check(at(180, &ft(5.0, 15_234.041)));
    assert!(forward.quality.is_good());
    assert!(close(forward.volume_m3, 0.3));
    let back_again = val.check(at(240, &ft(-2.0, 15_233.961)));
    assert_eq!(
        kinds(&back_again),
        vec![EventKind::ReverseFlow],
        "a new run"
    );
}

#[test]
fn absolute_flow_with_a_direction_channel_counts_as_reverse() {
    let mut val = validator(LimitsConfig::default(), None);
    let reverse = |flow, total| {
        vec![
            (Channel::Flow, flow),
            (Channel::Direction, 1.0),
            (Channel::Total, total),
        ]
    };
    val.check(at(0, &reverse(4.0, 8_100.0)));
    let v = val.check(at(60, &reverse(4.0, 8_099.8)));
    assert_eq!(flags(&v), vec![Flag::ReverseFlow]);
    assert_eq!(v.extra.get("direction"), Some(&1.0), "kept in the reading");
}

#[test]
fn a_decrease_larger_than_the_reverse_flow_explains_is_backwards() {
    let mut val = validator(LimitsConfig::default(), None);
    val.check(at(0, &ft(-3.2, 15_234.125)));
    // 5 m³ in a minute at 3.2 L/s is impossible; too small to be another meter.
    let v = val.check(at(60, &ft(-3.2, 15_229.125)));
    assert_eq!(flags(&v), vec![Flag::TotalizerBackwards]);
    assert_eq!(kinds(&v), vec![EventKind::TotalizerBackwards]);
}

#[test]
fn an_unsigned_net_counter_running_back_below_zero_wraps_to_the_top() {
    // Arad "net unsigned" counts down from zero through the top of its u32 range.
    let mut val = validator(LimitsConfig::default(), Some(AQUAMASTER_WRAP_M3));
    let rev = |total| {
        vec![
            (Channel::Flow, 2.0),
            (Channel::Direction, 1.0),
            (Channel::Total, total),
        ]
    };
    val.check(at(0, &rev(0.2)));
    let v = val.check(at(60, &rev(4_294_967.196)));
    assert_eq!(flags(&v), vec![Flag::ReverseFlow]);
    assert!(close(v.volume_m3, -0.3), "{:?}", v.volume_m3);
}

#[test]
fn a_replaced_meter_jumps_to_an_unrelated_value() {
    let mut val = validator(LimitsConfig::default(), None);
    val.check(at(0, &ft(20.0, 84_211.7)));
    let v = val.check(at(300, &ft(20.0, 3_517.25)));
    assert_eq!(flags(&v), vec![Flag::MeterReplaced]);
    assert_eq!(kinds(&v), vec![EventKind::MeterReplaced]);
    let next = val.check(at(600, &ft(20.0, 3_523.25)));
    assert!(next.quality.is_good(), "continues from the new meter");
    assert!(close(next.volume_m3, 6.0));
}

#[test]
fn an_increase_the_pump_cannot_deliver_is_a_replaced_meter() {
    let limits = LimitsConfig {
        flow_max_lps: Some(50.0),
        ..Default::default()
    };
    let mut val = validator(limits, None);
    val.check(at(0, &ft(20.0, 1_520.3)));
    // At most 50 L/s × 300 s × 1.5 ≈ 22.6 m³ can pass in five minutes.
    let v = val.check(at(300, &ft(20.0, 98_114.0)));
    assert_eq!(flags(&v), vec![Flag::MeterReplaced]);
    assert_eq!(v.volume_m3, None);
    let next = val.check(at(600, &ft(20.0, 98_120.0)));
    assert!(next.quality.is_good());
}

#[test]
fn a_small_unexplained_decrease_is_totalizer_backwards() {
    let mut val = validator(LimitsConfig::default(), None);
    val.check(at(0, &ft(10.0, 1_520.30)));
    let v = val.check(at(60, &ft(10.0, 1_519.80)));
    assert_eq!(flags(&v), vec![Flag::TotalizerBackwards]);
    assert_eq!(v.events[0].previous, Some(1_520.30));
    assert_eq!(v.events[0].current, Some(1_519.80));
    let next = val.check(at(120, &ft(10.0, 1_520.40)));
    assert!(next.quality.is_good(), "continues from 1519.80");
    assert!(close(next.volume_m3, 0.6));
}

#[test]
fn a_small_drop_towards_zero_is_backwards_not_a_reset() {
    let mut val = validator(LimitsConfig::default(), None);
    val.check(at(0, &ft(10.0, 2.0)));
    // 0.5 m³ is near zero (≤ 20 L/s × 60 s × 1.5 + slack ≈ 1.9 m³), but so is 2.0: the drop
    // does not show the counter went back to zero.
    let v = val.check(at(60, &ft(10.0, 0.5)));
    assert_eq!(flags(&v), vec![Flag::TotalizerBackwards]);
}

fn last_reading(ts: DateTime<Utc>, flow: f64, total: f64) -> Reading {
    Reading {
        seq: Seq(7),
        device: dev(),
        ts,
        q: Quality::GOOD,
        flow_lps: Some(flow),
        total_m3: Some(total),
        level_m: None,
        extra: BTreeMap::new(),
    }
}

#[test]
fn a_reset_while_the_agent_was_down_is_seen_after_seeding() {
    let mut val = validator(LimitsConfig::default(), None);
    val.seed(&last_reading(t(-7200), 0.0, 128_734.562))
        .expect("seed");
    let v = val.check(at(0, &ft(0.0, 0.3)));
    assert_eq!(kinds(&v), vec![EventKind::TotalizerReset]);
}

#[test]
fn a_long_downtime_explains_a_large_increase_after_seeding() {
    let mut val = validator(LimitsConfig::default(), None);
    val.seed(&last_reading(t(-3 * 86_400), 20.0, 1_520.3))
        .expect("seed");
    let v = val.check(at(0, &ft(20.0, 6_704.3)));
    assert!(v.quality.is_good(), "{v:?}");
    assert!(close(v.volume_m3, 5_184.0));
}

#[test]
fn seeding_with_another_devices_reading_is_refused() {
    let mut val = validator(LimitsConfig::default(), None);
    let mut r = last_reading(t(0), 1.0, 2.0);
    r.device = DeviceId::new("fm2").expect("id");
    let err = val.seed(&r).expect_err("wrong device");
    assert!(err.to_string().contains("fm1") && err.to_string().contains("fm2"));
}

#[test]
fn timestamps_going_backwards_make_elapsed_time_unknown() {
    let mut val = validator(frozen_limits(), None);
    let mut s = at(0, &ft(10.0, 100.0));
    s.boottime_ms = None;
    val.check(s);
    let mut s = at(-3600, &ft(10.0, 200.0));
    s.boottime_ms = None;
    let v = val.check(s);
    assert!(
        v.quality.is_good(),
        "no flow judgement without elapsed time"
    );
    assert!(close(v.volume_m3, 100.0));
}

#[test]
fn a_verdict_becomes_a_reading_and_events() {
    let mut val = validator(LimitsConfig::default(), None);
    val.check(at(0, &ft(0.0, 128_734.562)));
    let v = val.check(at(60, &ft(0.0, 0.0)));
    let metrics = Metrics::new();
    v.count(&dev(), &metrics);
    assert!(
        metrics
            .encode()
            .contains(r#"caudal_agent_quality_flags_total{device="fm1",flag="totalizer_reset"} 1"#),
        "{}",
        metrics.encode()
    );
    let (reading, events) = v.into_records(&dev(), t(60));
    assert_eq!(reading.device, dev());
    assert_eq!(reading.ts, t(60));
    assert!(reading.q.has(Flag::TotalizerReset));
    assert_eq!(reading.total_m3, Some(0.0));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].device, Some(dev()));
    assert_eq!(events[0].ts, t(60));
    assert_eq!(events[0].previous, Some(128_734.562));
}

fn any_channel() -> impl Strategy<Value = Channel> {
    prop_oneof![
        Just(Channel::Flow),
        Just(Channel::Total),
        Just(Channel::Level),
        Just(Channel::Direction),
        Just(Channel::Extra("battery".into())),
    ]
}

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        proptest::num::f64::ANY,
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::MIN_POSITIVE / 2.0),
        Just(f64::MAX),
        Just(0.0),
        -1e6..1e7f64,
    ]
}

fn any_ts() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![
        (-8_000_000_000_000i64..8_000_000_000_000)
            .prop_map(|secs| DateTime::from_timestamp(secs, 0).unwrap_or_default()),
        Just(DateTime::<Utc>::MIN_UTC),
        Just(DateTime::<Utc>::MAX_UTC),
        Just(DateTime::<Utc>::UNIX_EPOCH),
    ]
}

fn any_sample() -> impl Strategy<Value = Sample> {
    (
        any_ts(),
        proptest::option::of(any::<u64>()),
        proptest::collection::vec((any_channel(), any_f64()), 0..6),
        proptest::collection::vec(any_channel(), 0..2),
    )
        .prop_map(|(ts, boot, values, missing)| Sample {
            ts,
            boottime_ms: boot,
            values,
            missing,
        })
}

fn any_limits() -> impl Strategy<Value = LimitsConfig> {
    (
        proptest::option::of(any_f64()),
        proptest::option::of(any_f64()),
        proptest::option::of(any_f64()),
        proptest::option::of(any_f64()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(flow, lo, hi, step, frozen)| LimitsConfig {
            flow_max_lps: flow,
            level_min_m: lo,
            level_max_m: hi,
            total_max_step_m3: step,
            frozen_after_s: frozen,
        })
}

fn finite(x: Option<f64>) -> bool {
    x.is_none_or(f64::is_finite)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the meter sends and however the clock moves, `check` returns, and what it
    /// returns can go on the wire.
    #[test]
    fn check_never_panics_and_never_emits_non_finite_values(
        limits in any_limits(),
        wrap in proptest::option::of(any_f64()),
        seed in proptest::option::of((any_f64(), any_f64(), any_ts())),
        samples in proptest::collection::vec(any_sample(), 1..12),
    ) {
        let mut val = Validator::new(dev(), limits, wrap);
        if let Some((flow, total, ts)) = seed {
            let mut r = last_reading(ts, flow, total);
            r.extra.insert("direction".into(), flow);
            val.seed(&r).expect("same device");
        }
        for s in samples {
            let ts = s.ts;
            let v = val.check(s);
            prop_assert!(finite(v.flow_lps) && finite(v.total_m3) && finite(v.level_m));
            prop_assert!(finite(v.volume_m3));
            prop_assert!(v.extra.values().all(|x| x.is_finite()));
            for e in &v.events {
                prop_assert!(finite(e.previous) && finite(e.current), "{e:?}");
            }
            let (reading, events) = v.into_records(&dev(), ts);
            let batch = Batch {
                v: SCHEMA_VERSION,
                site: SiteId::new("s1").expect("site"),
                batch: "b".into(),
                sent_at: ts,
                readings: vec![reading],
                events,
                gaps: vec![],
            };
            let back = decode::<Batch>(&batch.encode());
            prop_assert!(back.is_ok(), "{back:?}");
        }
    }
}

#[test]
fn the_reverse_flow_bound_is_flow_times_elapsed_with_tolerance_and_slack() {
    // 3.2 L/s × 60 s = 0.192 m³; × 1.5 = 0.288; + 0.1 slack + 2 × 2⁻²³ × 15 234 ≈ 0.3916 m³.
    for (drop, expected) in [(0.39, Flag::ReverseFlow), (0.40, Flag::TotalizerBackwards)] {
        let mut val = validator(LimitsConfig::default(), None);
        val.check(at(0, &ft(-3.2, 15_234.125)));
        let v = val.check(at(60, &ft(-3.2, 15_234.125 - drop)));
        assert_eq!(flags(&v), vec![expected], "a drop of {drop} m³");
    }
}

#[test]
fn a_counter_far_below_its_wrap_that_falls_to_near_zero_is_a_reset() {
    let mut val = validator(LimitsConfig::default(), Some(AQUAMASTER_WRAP_M3));
    val.check(at(0, &ft(25.0, 4_294_900.0)));
    // Wrapping would mean 70.6 m³ in 300 s, beyond 50 L/s × 300 s × 1.5 + slack ≈ 23.6 m³.
    let v = val.check(at(300, &ft(25.0, 3.3)));
    assert_eq!(flags(&v), vec![Flag::TotalizerReset]);
}
