//! Codec tests: examples from `docs/protocol.md`, round-trips and arbitrary input.

use super::*;
use crate::quality::Flag;
use chrono::TimeZone;
use proptest::prelude::*;

fn site() -> SiteId {
    SiteId::new("pozo-norte").expect("valid")
}

fn reading(seq: u64) -> Reading {
    Reading {
        seq: Seq(seq),
        device: DeviceId::new("fm1").expect("valid"),
        ts: Utc
            .with_ymd_and_hms(2026, 11, 28, 19, 0, 0)
            .single()
            .expect("valid"),
        q: Quality::GOOD,
        flow_lps: Some(12.5),
        total_m3: Some(123_456.789_012),
        level_m: None,
        extra: BTreeMap::new(),
    }
}

#[test]
fn documented_batch_example_decodes() {
    let json = include_str!("../../../docs/examples/batch.json");
    let b: Batch = decode(json.as_bytes()).expect("docs example must decode");
    assert_eq!(b.readings.len(), 2);
    assert_eq!(b.gaps.len(), 1);
    assert!(b.readings[1].q.has(Flag::ClockUnsynced));
}

#[test]
fn documented_ack_and_status_examples_decode() {
    let a: Ack = decode(include_bytes!("../../../docs/examples/ack.json")).expect("ack");
    assert_eq!(a.status, AckStatus::Accepted);
    let s: Status = decode(include_bytes!("../../../docs/examples/status.json")).expect("status");
    assert!(s.online);
    let c: Command = decode(include_bytes!("../../../docs/examples/command.json")).expect("cmd");
    assert!(matches!(c.kind, CommandKind::PollNow { .. }));
}

#[test]
fn version_is_checked_first() {
    let err = decode::<Batch>(br#"{"v":2,"whatever":true}"#).expect_err("v2");
    assert!(matches!(err, DecodeError::UnsupportedVersion(2)), "{err}");
    let err = decode::<Batch>(b"not json").expect_err("garbage");
    assert!(matches!(err, DecodeError::NoVersion(_)), "{err}");
}

#[test]
fn unknown_fields_are_named() {
    let mut v = serde_json::to_value(reading(1)).expect("to value");
    v["flow_lpm"] = serde_json::json!(3.0);
    let b = serde_json::json!({"v":1,"site":"s","batch":"b","sent_at":"2026-11-28T19:00:00Z","readings":[v]});
    let err = decode::<Batch>(b.to_string().as_bytes()).expect_err("unknown field");
    assert!(err.to_string().contains("flow_lpm"), "{err}");
}

#[test]
fn an_event_wrap_must_be_finite_and_positive() {
    let event = |wrap: &str| {
        format!(
            r#"{{"v":1,"site":"s","batch":"b","sent_at":"2026-11-28T19:00:00Z","events":[{{"seq":7,"ts":"2026-11-28T19:00:00Z","kind":"totalizer_rollover","wrap":{wrap}}}]}}"#
        )
    };
    let b: Batch = decode(event("4294967.296").as_bytes()).expect("a wrap");
    assert_eq!(b.events[0].wrap, Some(4_294_967.296));
    for bad in ["0", "-1"] {
        let err = decode::<Batch>(event(bad).as_bytes()).expect_err(bad);
        assert!(
            err.to_string()
                .contains("wrap is not a finite positive number"),
            "{err}"
        );
    }
    let old: Batch = decode(
        br#"{"v":1,"site":"s","batch":"b","sent_at":"2026-11-28T19:00:00Z","events":[{"seq":7,"ts":"2026-11-28T19:00:00Z","kind":"totalizer_rollover"}]}"#,
    )
    .expect("without a wrap, as agents before the field send");
    assert_eq!(old.events[0].wrap, None);
}

#[test]
fn raw_batch_equals_typed_encoding() {
    let r1 = reading(1);
    let r2 = Reading {
        q: Quality::GOOD.with(Flag::Frozen),
        ..reading(2)
    };
    let g = Gap {
        seq: Seq(3),
        device: Some(DeviceId::new("fm1").expect("valid")),
        from: r1.ts,
        to: r2.ts,
        seqs: Some(SeqRange {
            from: Seq(10),
            to: Seq(20),
        }),
        count: 11,
        cause: GapCause::Evicted,
    };
    let mut raw = RawBatch::new();
    for r in [&r1, &r2] {
        raw.push(
            RecordKind::Reading,
            &serde_json::to_string(r).expect("json"),
        );
    }
    raw.push(RecordKind::Gap, &serde_json::to_string(&g).expect("json"));
    let bytes = raw.finish(&site(), "b-1", r1.ts);
    let b: Batch = decode(&bytes).expect("raw batch decodes");
    assert_eq!(b.readings, vec![r1, r2]);
    assert_eq!(b.gaps, vec![g]);
    assert!(b.events.is_empty());
    assert_eq!(b.seqs(), vec![Seq(1), Seq(2), Seq(3)]);
}

fn arb_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |x| x.is_finite()),
        -1e9..1e9f64
    ]
}

fn arb_reading() -> impl Strategy<Value = Reading> {
    (
        0u64..(1 << 63),
        "[a-z0-9-]{1,16}",
        0i64..4_000_000_000_000,
        any::<u16>(),
        proptest::option::of(arb_f64()),
        proptest::option::of(arb_f64()),
        proptest::option::of(arb_f64()),
        proptest::collection::btree_map("[a-z_]{1,12}", arb_f64(), 0..4),
    )
        .prop_map(|(seq, dev, ms, q, flow, total, level, extra)| Reading {
            seq: Seq(seq),
            device: DeviceId::new(dev).expect("regex yields valid ids"),
            ts: Utc.timestamp_millis_opt(ms).single().expect("in range"),
            q: Quality::from_bits(q & ((1 << Flag::ALL.len()) - 1)),
            flow_lps: flow,
            total_m3: total,
            level_m: level,
            extra,
        })
}

proptest! {
    #[test]
    fn batch_round_trips(readings in proptest::collection::vec(arb_reading(), 0..20)) {
        let b = Batch {
            v: SCHEMA_VERSION,
            site: site(),
            batch: "b".into(),
            sent_at: Utc.timestamp_millis_opt(1_764_000_000_000).single().expect("valid"),
            readings,
            events: vec![],
            gaps: vec![],
        };
        let back: Batch = decode(&b.encode()).expect("round trip");
        prop_assert_eq!(back, b);
    }

    #[test]
    fn decoders_never_panic_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<Batch>(&bytes);
        let _ = decode::<Ack>(&bytes);
        let _ = decode::<Status>(&bytes);
        let _ = decode::<Command>(&bytes);
        let _ = decode::<DesiredConfig>(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_near_valid_json(s in r#"\{"v":1,"site":"[a-z]{0,3}","batch":"[^"]{0,3}","sent_at":"[0-9TZ:-]{0,22}","readings":\[\{"seq":-?[0-9]{1,21},"device":"[a-z+/]{0,3}","ts":"[0-9TZ:.-]{0,26}","total_m3":[0-9eE.+-]{1,8}\}\]\}"#) {
        let _ = decode::<Batch>(s.as_bytes());
    }
}
