//! The simulated meters of a configured site: read the agent's configuration file as the agent
//! will, and serve exactly the points it will read (over Modbus TCP, behind a simulated
//! serial-to-Ethernet converter, or on a serial line), each device with the process its test
//! gives it.

use caudal_agent::config::{AgentConfig, Site};
use caudal_agent::simulator::{Framing, Model, SimHandle, SimulatedMeter, Simulator};
use std::path::{Path, PathBuf};
use tokio::task::JoinHandle;

/// The agent's configuration at `path`, loaded and resolved with its profiles; panics on any
/// error (the test wrote the file).
pub fn resolve(path: &Path) -> Site {
    let config = AgentConfig::load(path).expect("agent config loads");
    let profiles = config.load_profiles().expect("profiles load");
    config.resolve(&profiles).expect("agent config resolves")
}

/// Serves every device of every bus of `site` on `listener` (every bus may point at it), the
/// device's points as configured and its process `model(device id)`. The simulator runs until
/// the returned task is aborted.
pub fn serve(
    site: &Site,
    listener: tokio::net::TcpListener,
    model: impl Fn(&str) -> Model,
) -> (SimHandle, JoinHandle<()>) {
    serve_on(site, Line::Listener(listener, Framing::Tcp), model)
}

/// Where simulated meters answer.
#[derive(Debug)]
pub enum Line {
    /// A TCP listener with this framing (`Tcp` for Modbus TCP, `Rtu` for RTU over TCP where
    /// each connection is its own line).
    Listener(tokio::net::TcpListener, Framing),
    /// A transparent serial-to-Ethernet converter: one RTU line shared by successive
    /// connections, replies to a client that left go to the next one.
    Converter(tokio::net::TcpListener),
    /// A serial port (the meters' end of a pty pair), RTU framing.
    Serial(PathBuf),
}

/// Serves every device of every bus of `site` on `line`, as [`serve`] does.
pub fn serve_on(
    site: &Site,
    line: Line,
    model: impl Fn(&str) -> Model,
) -> (SimHandle, JoinHandle<()>) {
    let mut sim = Simulator::new();
    for d in site.buses.iter().flat_map(|b| &b.devices) {
        sim = sim.with_unit(
            d.unit,
            SimulatedMeter::new(d.points.clone(), model(d.id.as_str())),
        );
    }
    let handle = sim.handle();
    let task = tokio::spawn(async move {
        let never = std::future::pending();
        let result = match line {
            Line::Listener(listener, framing) => sim.framing(framing).serve(listener, never).await,
            Line::Converter(listener) => sim.serve_converter(listener, never).await,
            Line::Serial(path) => {
                match tokio_serial::SerialStream::open(&tokio_serial::new(
                    path.to_string_lossy(),
                    19_200,
                )) {
                    Ok(port) => sim.framing(Framing::Rtu).serve_stream(port, never).await,
                    Err(e) => Err(std::io::Error::from(e)),
                }
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "simulated meters stopped");
        }
    });
    (handle, task)
}

/// How long after the simulator wrote a reply the reading made from it may be stamped: the
/// agent stamps a value when its reply arrives, so on loopback this is scheduling noise. A
/// stale reply (an earlier request's) is taken a whole poll after it was written.
pub const STAMP_SLACK: chrono::TimeDelta = chrono::TimeDelta::milliseconds(150);

/// How long after a reading's stamp the reply carrying its flow may have been written: a poll
/// stamps its reading at the first reply and reads the device's other blocks back to back (a
/// device read point by point takes several requests), so the flow's own reply may come a
/// little later. A stale reply was written before the stamp, never after it.
pub const POLL_SPAN: chrono::TimeDelta = chrono::TimeDelta::milliseconds(600);

/// The fidelity proof: every stored reading of meter `id` (unit `unit`) holds the flow the
/// simulator served to exactly one request of that unit, no two readings the same reply, and is
/// stamped by the poll that read that reply: at most [`STAMP_SLACK`] after the reply was
/// written and at most [`POLL_SPAN`] before. `readings` are `(device, ts, flow)` of whatever store the test reads; the models must make every served flow unique
/// (noise on the flow). Panics naming the reading otherwise; returns how many were checked.
pub fn prove_fidelity<'a>(
    readings: impl IntoIterator<Item = (&'a str, chrono::DateTime<chrono::Utc>, Option<f64>)>,
    served: &[caudal_agent::simulator::Served],
    id: &str,
    unit: u8,
) -> usize {
    let mine: Vec<&caudal_agent::simulator::Served> = served
        .iter()
        .filter(|s| s.unit == unit && s.values.is_some() && s.replied.is_some())
        .collect();
    let mut used = std::collections::BTreeSet::new();
    let mut checked = 0;
    for (device, ts, flow) in readings {
        let (true, Some(flow)) = (device == id, flow) else {
            continue;
        };
        let matches: Vec<(usize, &&caudal_agent::simulator::Served)> = mine
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.values
                    .is_some_and(|v| (v.flow_lps - flow).abs() <= 1e-5 * v.flow_lps.abs().max(1.0))
            })
            .collect();
        assert_eq!(
            matches.len(),
            1,
            "{id} reading at {ts} (flow {flow}) matches {} served values: {matches:?}",
            matches.len()
        );
        let (i, s) = matches[0];
        assert!(used.insert(i), "{id}: two readings of one served reply");
        let replied = s.replied.expect("filtered");
        let lag = ts - replied;
        assert!(
            lag >= -POLL_SPAN && lag <= STAMP_SLACK,
            "{id} reading stamped {ts} holds the value served at {replied} to the request \
             received at {}: not the reply to its own request",
            s.received
        );
        checked += 1;
    }
    checked
}
