//! Technician tools against the meter simulator over real loopback sockets: probing registers,
//! probing a configured device through its profile, and scanning a bus for unit ids.

use caudal_agent::config::{Device, LimitsConfig, Link};
use caudal_agent::probe::{ScanOutcome, probe, probe_device, scan, scan_with_progress};
use caudal_agent::register::{ByteOrder, Channel, DataType, Fc, Point, RawValue};
use caudal_agent::simulator::{Fault, Framing, Model, SimulatedMeter, Simulator};
use caudal_common::DeviceId;
use caudal_common::units::Unit;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_millis(200);

fn point(
    channel: Channel,
    address: u16,
    data_type: DataType,
    order: ByteOrder,
    unit: Unit,
) -> Point {
    Point {
        channel,
        fc: Fc::Holding,
        address,
        data_type,
        order,
        scale: 1.0,
        offset: 0.0,
        unit,
        fraction_scale: 1e-9,
        overflow_factor: 1.0,
        overflow_address: None,
        rollover_at: None,
        water_column: None,
    }
}

/// TUF-2000-like: flow REAL4 m3/h word-swapped at 0, totalizer LONG + REAL4 fraction at 8.
fn tuf2000() -> Vec<Point> {
    vec![
        point(
            Channel::Flow,
            0,
            DataType::F32,
            ByteOrder::CDAB,
            Unit::CubicMetrePerHour,
        ),
        point(
            Channel::Total,
            8,
            DataType::I32F32Fraction,
            ByteOrder::CDAB,
            Unit::CubicMetre,
        ),
    ]
}

fn link(framing: Framing, addr: std::net::SocketAddr) -> Link {
    match framing {
        Framing::Tcp => Link::Tcp {
            address: addr.to_string(),
        },
        Framing::Rtu => Link::RtuOverTcp {
            address: addr.to_string(),
        },
    }
}

#[tokio::test]
async fn probe_shows_the_value_in_every_type_and_order() {
    // 12.5 m3/h = 3.472 L/s; served word-swapped, so only f32 CDAB reads 12.5.
    let sim = Simulator::new()
        .with_unit(
            1,
            SimulatedMeter::new(tuf2000(), Model::steady(12.5 / 3.6, 0.0, 0.0)),
        )
        .start()
        .await
        .unwrap();
    let report = probe(&link(Framing::Tcp, sim.addr), 1, Fc::Holding, 0, 2, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(report.registers, [0x0000, 0x4148]);
    let f32s: Vec<_> = report
        .interpretations
        .iter()
        .filter(|i| i.data_type == DataType::F32)
        .map(|i| (i.order, i.value, i.flag))
        .collect();
    assert!(
        f32s.contains(&(ByteOrder::CDAB, RawValue::F32(12.5), None)),
        "{f32s:?}"
    );
    assert!(
        f32s.iter()
            .any(|(o, _, flag)| *o == ByteOrder::ABCD && flag.is_some())
    );
    let text = report.to_string();
    println!("{text}");
    assert!(text.contains("unit 1  fc 03  address 0  count 2"), "{text}");
    assert!(text.contains("0x4148"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("f32  CDAB") && l.contains("12.5")),
        "{text}"
    );

    // Bits print as bits.
    let err = probe(&link(Framing::Tcp, sim.addr), 1, Fc::Coils, 0, 1, TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(err.exception_code(), Some(2), "no coils on this meter");
}

#[tokio::test]
async fn probe_device_prints_each_point_in_its_unit_and_canonically() {
    for framing in [Framing::Tcp, Framing::Rtu] {
        let sim = Simulator::new()
            .framing(framing)
            .with_unit(
                9,
                SimulatedMeter::new(tuf2000(), Model::steady(10.0, 1500.25, 0.0)),
            )
            .start()
            .await
            .unwrap();
        let mut points = tuf2000();
        points.push(point(
            Channel::Level,
            40,
            DataType::F32,
            ByteOrder::ABCD,
            Unit::Metre,
        ));
        let device = Device {
            id: DeviceId::new("pozo-1-caudal").unwrap(),
            unit: 9,
            profile: "tuf-2000m".into(),
            period: Duration::from_secs(60),
            timeout: TIMEOUT,
            retries: 0,
            max_regs_per_read: 125,
            points,
            limits: LimitsConfig::default(),
        };
        let report = probe_device(&link(framing, sim.addr), &device, TIMEOUT)
            .await
            .unwrap();
        let (flow_in_unit, flow) = report.points[0].value.clone().unwrap();
        assert!(
            (flow_in_unit - 36.0).abs() < 1e-4 && (flow - 10.0).abs() < 1e-5,
            "{report}"
        );
        let (_, total) = report.points[1].value.clone().unwrap();
        assert!((1500.25..1500.3).contains(&total), "{report}");
        // The level point is not on the meter: its read fails and says why.
        let level = report.points[2].value.clone().unwrap_err();
        assert!(level.contains("illegal data address"), "{level}");
        let text = report.to_string();
        println!("{text}");
        assert!(
            text.contains("device pozo-1-caudal  unit 9  profile tuf-2000m"),
            "{text}"
        );
        assert!(text.contains("m3/h = 10"), "{text}");
    }
}

#[tokio::test]
async fn scan_finds_exactly_the_configured_units() {
    let meter = || SimulatedMeter::new(tuf2000(), Model::default());
    for framing in [Framing::Tcp, Framing::Rtu] {
        let sim = Simulator::new()
            .framing(framing)
            .with_unit(1, meter())
            .with_unit(5, meter())
            .with_unit(12, meter())
            .start()
            .await
            .unwrap();
        // A device answering with an exception is there all the same.
        sim.handle.set_fault(5, Fault::Exception(0x04));
        let mut seen = Vec::new();
        let report = scan_with_progress(
            &link(framing, sim.addr),
            1..=14,
            Fc::Holding,
            0,
            Duration::from_millis(150),
            |l| seen.push(l.unit),
        )
        .await
        .unwrap();
        assert_eq!(report.found(), [1, 5, 12], "{framing:?}: {report}");
        assert_eq!(seen, (1..=14).collect::<Vec<u8>>());
        assert_eq!(report.lines[4].outcome, ScanOutcome::Exception(0x04));
        assert!(matches!(report.lines[0].outcome, ScanOutcome::Answered(_)));
        assert_eq!(report.lines[1].outcome, ScanOutcome::Absent);
        let text = report.to_string();
        println!("{text}");
        assert!(text.contains("found 3 of 14 unit ids: 1, 5, 12"), "{text}");
    }
}

#[tokio::test]
async fn scan_through_a_gateway_does_not_count_its_no_device_exception() {
    let sim = Simulator::new()
        .with_unit(2, SimulatedMeter::new(tuf2000(), Model::default()))
        .unknown_units_answer(0x0B)
        .start()
        .await
        .unwrap();
    let report = scan(
        &link(Framing::Tcp, sim.addr),
        1..=4,
        Fc::Holding,
        0,
        TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(report.found(), [2], "{report}");
}
