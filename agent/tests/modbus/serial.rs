//! The bus client on a real serial device: a pseudo-terminal pair made by `socat`, the
//! simulator serving RTU on one end and the client opening the other by path, as it would open
//! /dev/ttyUSB0. Skipped (with a note) where `socat` is not installed.

use caudal_agent::config::{Link, Parity};
use caudal_agent::modbus::BusClient;
use caudal_agent::register::{ByteOrder, Channel, DataType, Fc, Point};
use caudal_agent::simulator::{Fault, Framing, Model, SimulatedMeter, Simulator};
use caudal_common::units::Unit;
use caudal_testkit::serial::PtyPair;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_millis(300);

/// A Siemens-style flow point (f32 at 3002, L/s), shared with the bad-input tests.
pub(crate) fn flow_point() -> Point {
    Point {
        channel: Channel::Flow,
        fc: Fc::Holding,
        address: 3002,
        data_type: DataType::F32,
        order: ByteOrder::ABCD,
        scale: 1.0,
        offset: 0.0,
        unit: Unit::LitrePerSecond,
        fraction_scale: 1e-9,
        overflow_factor: 1.0,
        overflow_address: None,
        rollover_at: None,
        water_column: None,
    }
}

#[tokio::test]
async fn rtu_on_a_serial_port_survives_every_fault() {
    let Some(pty) = PtyPair::start() else {
        return;
    };
    let meter_port = tokio_serial::SerialStream::open(&tokio_serial::new(
        pty.meter_end.to_string_lossy(),
        19_200,
    ))
    .unwrap();
    let sim = Simulator::new().framing(Framing::Rtu).with_unit(
        1,
        SimulatedMeter::new(vec![flow_point()], Model::steady(7.25, 0.0, 0.0)),
    );
    let handle = sim.handle();
    tokio::spawn(sim.serve_stream(meter_port, std::future::pending()));

    let link = Link::Rtu {
        port: pty.agent_end.clone(),
        baud: 19_200,
        parity: Parity::Even,
        data_bits: 8,
        stop_bits: 1,
    };
    let mut client = BusClient::connect("rs485", &link, TIMEOUT).await.unwrap();
    assert_eq!(read_flow(&mut client).await.unwrap(), 7.25);

    for (fault, kind) in [
        (Fault::Silent, "timeout"),
        (Fault::Exception(0x06), "exception"),
        (Fault::Garbage, "bad_frame"),
        (Fault::Delay(TIMEOUT + TIMEOUT / 2), "timeout"),
    ] {
        handle.set_fault(1, fault);
        handle.set_value(1, Channel::Flow, Some(99.0));
        let err = read_flow(&mut client).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{fault:?}: {err}");
        // A late or garbled answer is still in the pty when the next request goes out.
        handle.set_fault(1, Fault::None);
        handle.set_value(1, Channel::Flow, Some(1.5));
        assert_eq!(
            read_flow(&mut client).await.unwrap(),
            1.5,
            "after {fault:?}"
        );
    }
    // Unit 2 is not on the line: it stays silent like an absent RTU slave.
    let err = client
        .read(2, Fc::Holding, 3002, 2, TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "timeout");
}

async fn read_flow(client: &mut BusClient) -> Result<f64, caudal_agent::modbus::ModbusError> {
    let p = flow_point();
    let words = client.read(1, p.fc, p.address, 2, TIMEOUT).await?;
    Ok(p.decode(&words).unwrap())
}
