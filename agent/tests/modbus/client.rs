//! The bus client against the meter simulator over real loopback sockets: every read function
//! over Modbus TCP and RTU-over-TCP, every fault kind, and no desynchronisation after a
//! timeout, including through a converter that forwards late answers to the next connection.

use caudal_agent::config::Link;
use caudal_agent::modbus::rtu::Discard;
use caudal_agent::modbus::{BusClient, ModbusError};
use caudal_agent::register::{ByteOrder, Channel, DataType, Fc, Point, assemble, plan_reads};
use caudal_agent::simulator::{Fault, Framing, Model, SimulatedMeter, Simulator};
use caudal_common::units::Unit;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

const TIMEOUT: Duration = Duration::from_millis(300);

fn point(
    channel: Channel,
    fc: Fc,
    address: u16,
    data_type: DataType,
    order: ByteOrder,
    unit: Unit,
) -> Point {
    Point {
        channel,
        fc,
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

/// A meter using all four read functions: E+H-style word-swapped flow, a MAG 8000 totalizer,
/// a Keller-style level in bar on input registers, a direction coil and an alarm input.
fn profile() -> Vec<Point> {
    vec![
        point(
            Channel::Flow,
            Fc::Holding,
            2008,
            DataType::F32,
            ByteOrder::CDAB,
            Unit::CubicMetrePerHour,
        ),
        point(
            Channel::Total,
            Fc::Holding,
            3017,
            DataType::I32Fraction,
            ByteOrder::ABCD,
            Unit::CubicMetre,
        ),
        point(
            Channel::Level,
            Fc::Input,
            2,
            DataType::F32,
            ByteOrder::ABCD,
            Unit::Bar,
        ),
        point(
            Channel::Direction,
            Fc::Coils,
            0,
            DataType::Bool,
            ByteOrder::ABCD,
            Unit::Dimensionless,
        ),
        point(
            Channel::Extra("alarm".into()),
            Fc::DiscreteInputs,
            5,
            DataType::Bool,
            ByteOrder::ABCD,
            Unit::Dimensionless,
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

async fn start(
    framing: Framing,
    units: &[u8],
) -> (caudal_agent::simulator::RunningSimulator, Link) {
    let mut sim = Simulator::new().framing(framing);
    for &u in units {
        sim = sim.with_unit(
            u,
            SimulatedMeter::new(profile(), Model::steady(8.5, 123_456.789, 12.0)),
        );
    }
    let running = sim.start().await.unwrap();
    let link = link(framing, running.addr);
    (running, link)
}

async fn read_flow(client: &mut BusClient, unit: u8) -> Result<f64, ModbusError> {
    let p = &profile()[0];
    let words = client.read(unit, p.fc, p.address, 2, TIMEOUT).await?;
    Ok(p.decode(&words).unwrap())
}

#[tokio::test]
async fn every_read_function_over_tcp_and_rtu_over_tcp() {
    for framing in [Framing::Tcp, Framing::Rtu] {
        let (sim, link) = start(framing, &[1, 17]).await;
        let mut client = BusClient::connect("field", &link, TIMEOUT).await.unwrap();
        let points = profile();
        for unit in [1, 17] {
            let blocks = plan_reads(&points, 125);
            assert_eq!(blocks.len(), 5, "{blocks:?}");
            let mut replies = Vec::new();
            for b in &blocks {
                replies.push(Some(
                    client
                        .read(unit, b.fc, b.address, b.count, TIMEOUT)
                        .await
                        .unwrap(),
                ));
            }
            let words = assemble(points.len(), &blocks, &replies);
            let value = |i: usize| points[i].decode(words[i].as_ref().unwrap()).unwrap();
            assert!(
                (value(0) - 8.5).abs() < 1e-5,
                "{framing:?} flow {}",
                value(0)
            );
            let total = value(1);
            assert!(
                (123_456.789..123_457.0).contains(&total),
                "{framing:?} total {total}"
            );
            assert!(
                (value(2) - 12.0).abs() < 1e-5,
                "{framing:?} level {}",
                value(2)
            );
            assert_eq!((value(3), value(4)), (0.0, 0.0));
        }
        // Bits come back one word per bit, exactly as many as asked.
        let bits = client.read(1, Fc::Coils, 0, 1, TIMEOUT).await.unwrap();
        assert_eq!(bits, [0]);
        sim.handle.set_value(1, Channel::Direction, Some(1.0));
        assert_eq!(client.read(1, Fc::Coils, 0, 1, TIMEOUT).await.unwrap(), [1]);
        assert_eq!(
            client.reconnects(),
            0,
            "{framing:?}: no failure, no reconnect"
        );
    }
}

#[tokio::test]
async fn exceptions_name_the_register_and_keep_the_connection() {
    for framing in [Framing::Tcp, Framing::Rtu] {
        let (_sim, link) = start(framing, &[1]).await;
        let mut client = BusClient::connect("field", &link, TIMEOUT).await.unwrap();
        let err = client
            .read(1, Fc::Holding, 4000, 2, TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(
            (err.kind(), err.exception_code(), err.is_link_down()),
            ("exception", Some(2), false)
        );
        let text = err.to_string();
        assert!(
            text.contains("bus field: unit 1 fc 03 address 4000"),
            "{text}"
        );
        assert!(text.contains("illegal data address"), "{text}");
        assert!(read_flow(&mut client, 1).await.is_ok());
        assert_eq!(
            client.reconnects(),
            0,
            "an exception is a complete exchange"
        );
    }
}

/// Every fault gives its error kind, and the very next request on the same client works.
#[tokio::test]
async fn each_fault_gives_its_kind_and_the_next_read_works() {
    for framing in [Framing::Tcp, Framing::Rtu] {
        let (sim, link) = start(framing, &[3]).await;
        let mut client = BusClient::connect("field", &link, TIMEOUT).await.unwrap();
        let cases = [
            (Fault::Silent, "timeout"),
            (Fault::Exception(0x04), "exception"),
            (Fault::Garbage, "bad_frame"),
            (Fault::Delay(TIMEOUT * 2), "timeout"),
        ];
        for (fault, kind) in cases {
            sim.handle.set_fault(3, fault);
            let err = read_flow(&mut client, 3).await.unwrap_err();
            assert_eq!(err.kind(), kind, "{framing:?} {fault:?}: {err}");
            assert!(!err.is_link_down(), "{framing:?} {fault:?}");
            sim.handle.set_fault(3, Fault::None);
            let flow = read_flow(&mut client, 3).await;
            assert!(
                matches!(flow, Ok(f) if (f - 8.5).abs() < 1e-5),
                "{framing:?} after {fault:?}: {flow:?}"
            );
        }
        // A delay shorter than the timeout is just a slow meter.
        sim.handle.set_fault(3, Fault::Delay(TIMEOUT / 3));
        assert!(read_flow(&mut client, 3).await.is_ok());
    }
}

/// A transparent serial-to-Ethernet converter: whoever connects gets the same serial line
/// (here a persistent connection to the simulator), so an answer that comes after the client
/// gave up is forwarded to the client's next connection.
async fn converter(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let line = TcpStream::connect(upstream).await.unwrap();
    tokio::spawn(async move {
        let (mut line_rx, mut line_tx) = line.into_split();
        let mut line_rx_buf = vec![0u8; 512];
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let (mut client_rx, mut client_tx) = client.into_split();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut client_buf = vec![0u8; 512];
            loop {
                tokio::select! {
                    n = client_rx.read(&mut client_buf) => match n {
                        Ok(0) | Err(_) => break,
                        Ok(n) => line_tx.write_all(&client_buf[..n]).await.unwrap(),
                    },
                    n = line_rx.read(&mut line_rx_buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => { let _ = client_tx.write_all(&line_rx_buf[..n]).await; }
                    },
                }
            }
        }
    });
    addr
}

#[tokio::test]
async fn a_late_answer_through_a_converter_is_not_taken_for_the_next() {
    let (sim, _) = start(Framing::Rtu, &[1]).await;
    let conv = converter(sim.addr).await;
    let link = Link::RtuOverTcp {
        address: conv.to_string(),
    };
    let mut client = BusClient::connect("field", &link, TIMEOUT).await.unwrap();
    let flow_point = &profile()[0];

    // The flow is asked and answered late (100 L/s); then asked again (now 1 L/s). Without
    // resync the late answer, same unit, function and count, would be taken for the second.
    sim.handle.set_value(1, Channel::Flow, Some(100.0));
    sim.handle.set_fault(1, Fault::Delay(TIMEOUT + TIMEOUT / 2));
    let err = client
        .read(1, flow_point.fc, flow_point.address, 2, TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "timeout");
    sim.handle.set_fault(1, Fault::None);
    sim.handle.set_value(1, Channel::Flow, Some(1.0));
    let words = client
        .read(1, flow_point.fc, flow_point.address, 2, TIMEOUT)
        .await
        .unwrap();
    let v = flow_point.decode(&words).unwrap();
    assert!(
        (v - 1.0).abs() < 1e-6,
        "got {v}: the late answer was taken for this one"
    );
    // The line stays open across a timeout; the late answer was discarded and counted.
    assert_eq!(client.reconnects(), 0);
    assert_eq!(client.take_discards().get(Discard::Stale), 1);
    // And the one after that is in step too.
    sim.handle.set_value(1, Channel::Flow, Some(2.0));
    let v = read_flow(&mut client, 1).await.unwrap();
    assert!((v - 2.0).abs() < 1e-6, "{v}");
}

#[tokio::test]
async fn requests_outside_the_protocol_are_refused_before_sending() {
    let (sim, link) = start(Framing::Rtu, &[1]).await;
    let mut client = BusClient::connect("field", &link, TIMEOUT).await.unwrap();
    for (unit, fc, address, count) in [
        (1, Fc::Holding, 0, 0),
        (1, Fc::Holding, 0, 126),
        (1, Fc::Coils, 0, 2001),
        (1, Fc::Holding, 65_535, 2),
        (0, Fc::Holding, 0, 1),
    ] {
        let err = client
            .read(unit, fc, address, count, TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(err, ModbusError::InvalidRequest { .. }), "{err}");
    }
    assert_eq!(sim.handle.requests(1), 0);
}

#[tokio::test]
async fn a_meter_that_refuses_long_reads_is_read_two_registers_at_a_time() {
    // Promag 800: E+H word-swapped floats, SUM + OVERFLOW totalizer, reads > 2 registers fail.
    let points = vec![
        point(
            Channel::Flow,
            Fc::Holding,
            2008,
            DataType::F32,
            ByteOrder::CDAB,
            Unit::LitrePerSecond,
        ),
        point(
            Channel::Total,
            Fc::Holding,
            2609,
            DataType::F32Overflow,
            ByteOrder::CDAB,
            Unit::CubicMetre,
        ),
    ];
    let meter = SimulatedMeter::new(points.clone(), Model::steady(3.0, 25_000_123.0, 0.0))
        .max_regs_per_read(2);
    let sim = Simulator::new()
        .with_unit(247, meter)
        .start()
        .await
        .unwrap();
    let link = Link::Tcp {
        address: sim.addr.to_string(),
    };
    let mut client = BusClient::connect("field", &link, TIMEOUT).await.unwrap();
    let err = client
        .read(247, Fc::Holding, 2609, 4, TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(err.exception_code(), Some(3));

    let blocks = plan_reads(&points, 2);
    assert!(blocks.iter().all(|b| b.count <= 2));
    let mut replies = Vec::new();
    for b in &blocks {
        replies.push(Some(
            client
                .read(247, b.fc, b.address, b.count, TIMEOUT)
                .await
                .unwrap(),
        ));
    }
    let words = assemble(points.len(), &blocks, &replies);
    let total = points[1].decode(words[1].as_ref().unwrap()).unwrap();
    assert!((25_000_123.0..25_000_125.0).contains(&total), "{total}");
}

#[tokio::test]
async fn a_closed_link_is_link_down_and_the_client_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let link = Link::Tcp {
        address: addr.to_string(),
    };
    // A peer that accepts and hangs up at once.
    let closer = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        drop(s);
        listener
    });
    let mut client = BusClient::connect("field", &link, TIMEOUT).await.unwrap();
    let listener = closer.await.unwrap();
    let err = client
        .read(1, Fc::Holding, 0, 1, TIMEOUT)
        .await
        .unwrap_err();
    assert!(err.is_link_down(), "{err:?}");
    assert_eq!(err.kind(), "io");

    // The meter comes back on the same address: the next read reconnects by itself.
    let sim = Simulator::new().with_unit(
        1,
        SimulatedMeter::new(profile(), Model::steady(8.5, 0.0, 1.0)),
    );
    tokio::spawn(sim.serve(listener, std::future::pending()));
    assert!(read_flow(&mut client, 1).await.is_ok());
    assert_eq!(client.reconnects(), 1);

    // Nothing listening at all: connect fails as link down.
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = free.local_addr().unwrap();
    drop(free);
    let err = BusClient::connect(
        "field",
        &Link::Tcp {
            address: gone.to_string(),
        },
        TIMEOUT,
    )
    .await
    .unwrap_err();
    assert!(
        err.is_link_down() && err.to_string().contains("bus field: cannot open tcp"),
        "{err}"
    );
}

/// Real time here: paused time would auto-advance past the read timeout while a reply is on
/// its way through the socket. The simulator's integration under paused time is unit-tested.
#[tokio::test]
async fn totalizer_read_over_the_wire_integrates_the_flow() {
    let (sim, link) = start(Framing::Tcp, &[1]).await;
    let mut client = BusClient::connect("field", &link, TIMEOUT).await.unwrap();
    let t0 = std::time::Instant::now();
    let before = read_total(&mut client).await;
    let t1 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t2 = std::time::Instant::now();
    let after = read_total(&mut client).await;
    let t3 = std::time::Instant::now();
    // 8.5 L/s over the time between the reads, to the fraction's 1e-9 m3 resolution.
    let m3 = |d: Duration| 8.5 * d.as_secs_f64() / 1000.0;
    let grown = after - before;
    assert!(
        grown >= m3(t2 - t1) - 1e-8 && grown <= m3(t3 - t0) + 1e-8,
        "{before} -> {after}"
    );
    assert!(sim.handle.set_total(1, 0.0));
    let reset = read_total(&mut client).await;
    assert!(reset < 1e-3, "{reset}");
}

async fn read_total(client: &mut BusClient) -> f64 {
    let p = &profile()[1];
    let w = client.read(1, p.fc, p.address, 4, TIMEOUT).await.unwrap();
    p.decode(&w).unwrap()
}
