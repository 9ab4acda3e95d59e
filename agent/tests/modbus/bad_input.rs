//! Bad input on an RTU line, over a TCP converter and over a real serial pty: a reply in the
//! name of another unit, a CRC-valid reply of the wrong length, a burst of noise before the
//! reply, a device that answers only every other request. Each is discarded or refused with a
//! counted, named cause, never returned as a value, and never stalls the healthy device that
//! shares the line.

use super::serial::flow_point;
use caudal_agent::config::{Link, Parity};
use caudal_agent::modbus::rtu::Discard;
use caudal_agent::modbus::{BusClient, ModbusError};
use caudal_agent::register::Channel;
use caudal_agent::simulator::{Fault, Framing, Model, SimHandle, SimulatedMeter, Simulator};
use caudal_testkit::serial::PtyPair;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_millis(300);
const FAULTY: u8 = 1;
const HEALTHY: u8 = 2;

fn simulator() -> Simulator {
    let meter = || SimulatedMeter::new(vec![flow_point()], Model::steady(1.0, 0.0, 0.0));
    Simulator::new()
        .framing(Framing::Rtu)
        .with_unit(FAULTY, meter())
        .with_unit(HEALTHY, meter())
}

/// A line with the two units on it; the guard keeps the simulator (and the pty) alive.
struct Line {
    handle: SimHandle,
    client: BusClient,
    _guard: Box<dyn std::any::Any>,
}

async fn over_tcp() -> Line {
    let sim = simulator().start().await.unwrap();
    let link = Link::RtuOverTcp {
        address: sim.addr.to_string(),
    };
    let client = BusClient::connect("field", &link, TIMEOUT).await.unwrap();
    Line {
        handle: sim.handle.clone(),
        client,
        _guard: Box::new(sim),
    }
}

async fn over_serial() -> Option<Line> {
    let pty = PtyPair::start()?;
    let meter_port = tokio_serial::SerialStream::open(&tokio_serial::new(
        pty.meter_end.to_string_lossy(),
        19_200,
    ))
    .unwrap();
    let sim = simulator();
    let handle = sim.handle();
    let task = tokio::spawn(sim.serve_stream(meter_port, std::future::pending()));
    let link = Link::Rtu {
        port: pty.agent_end.clone(),
        baud: 19_200,
        parity: Parity::Even,
        data_bits: 8,
        stop_bits: 1,
    };
    let client = BusClient::connect("rs485", &link, TIMEOUT).await.unwrap();
    struct Guard {
        _pty: PtyPair,
        task: tokio::task::AbortHandle,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
    Some(Line {
        handle,
        client,
        _guard: Box::new(Guard {
            _pty: pty,
            task: task.abort_handle(),
        }),
    })
}

async fn read_flow(client: &mut BusClient, unit: u8) -> Result<f64, ModbusError> {
    let p = flow_point();
    let words = client.read(unit, p.fc, p.address, 2, TIMEOUT).await?;
    Ok(p.decode(&words).unwrap())
}

/// The healthy unit answers at once with its own current value.
async fn healthy_is_unaffected(line: &mut Line, value: f64) {
    line.handle.set_value(HEALTHY, Channel::Flow, Some(value));
    let started = Instant::now();
    let got = read_flow(&mut line.client, HEALTHY).await;
    assert!(
        matches!(got, Ok(v) if v == value),
        "healthy unit read {got:?}, {value} expected"
    );
    assert!(
        started.elapsed() < TIMEOUT,
        "the healthy unit waited {:?}",
        started.elapsed()
    );
}

async fn each_bad_input_is_discarded_and_counted(mut line: Line, what: &str) {
    // Another unit's name on the right reply: thrown away as other_unit, the request times out.
    line.handle.set_fault(FAULTY, Fault::AnswerAs(9));
    line.handle.set_value(FAULTY, Channel::Flow, Some(11.0));
    let err = read_flow(&mut line.client, FAULTY).await.unwrap_err();
    assert_eq!(err.kind(), "timeout", "{what} answer-as: {err}");
    let d = line.client.take_discards();
    assert!(d.get(Discard::OtherUnit) >= 1, "{what} answer-as: {d:?}");
    healthy_is_unaffected(&mut line, 21.0).await;

    // A valid CRC over the wrong byte count: a bad frame, not a value.
    line.handle.set_fault(FAULTY, Fault::WrongLength);
    line.handle.set_value(FAULTY, Channel::Flow, Some(12.0));
    let err = read_flow(&mut line.client, FAULTY).await.unwrap_err();
    assert_eq!(err.kind(), "bad_frame", "{what} wrong length: {err}");
    assert!(err.to_string().contains("6 data bytes for 4"), "{err}");
    healthy_is_unaffected(&mut line, 22.0).await;

    // Noise before the reply: the noise is dropped and counted, the reply is taken.
    line.handle.set_fault(FAULTY, Fault::NoiseFirst);
    line.handle.set_value(FAULTY, Channel::Flow, Some(13.0));
    let _ = line.client.take_discards();
    assert_eq!(
        read_flow(&mut line.client, FAULTY).await.unwrap(),
        13.0,
        "{what} noise first"
    );
    assert!(
        line.client.take_discards().get(Discard::Noise) >= 1,
        "{what}: noise counted"
    );
    healthy_is_unaffected(&mut line, 23.0).await;

    // Every other request answered: the answers carry the value of their own request, the
    // silences are timeouts, and the healthy unit in between is never delayed.
    line.handle.set_fault(FAULTY, Fault::EveryOther);
    let mut outcomes = Vec::new();
    for i in 0..6u8 {
        let value = 100.0 + f64::from(i);
        line.handle.set_value(FAULTY, Channel::Flow, Some(value));
        match read_flow(&mut line.client, FAULTY).await {
            Ok(v) => {
                assert_eq!(
                    v, value,
                    "{what} every other: request {i} got another value"
                );
                outcomes.push(true);
            }
            Err(e) => {
                assert_eq!(e.kind(), "timeout", "{what} every other: {e}");
                outcomes.push(false);
            }
        }
        healthy_is_unaffected(&mut line, 200.0 + f64::from(i)).await;
    }
    assert!(
        outcomes.windows(2).all(|w| w[0] != w[1]),
        "{what}: answered {outcomes:?}"
    );

    // Cleared, the faulty unit reads its current value again and nothing was reconnected.
    line.handle.set_fault(FAULTY, Fault::None);
    line.handle.set_value(FAULTY, Channel::Flow, Some(14.0));
    assert_eq!(read_flow(&mut line.client, FAULTY).await.unwrap(), 14.0);
    assert_eq!(line.client.reconnects(), 0, "{what}");
}

#[tokio::test]
async fn bad_input_over_a_tcp_converter() {
    each_bad_input_is_discarded_and_counted(over_tcp().await, "rtu over tcp").await;
}

#[tokio::test]
async fn bad_input_on_a_serial_line() {
    let Some(line) = over_serial().await else {
        return;
    };
    each_bad_input_is_discarded_and_counted(line, "serial").await;
}
