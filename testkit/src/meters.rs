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
