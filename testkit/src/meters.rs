//! The simulated meters of a configured site: read the agent's configuration file as the agent
//! will, and serve exactly the points it will read over Modbus TCP, each device with the
//! process its test gives it.

use caudal_agent::config::{AgentConfig, Site};
use caudal_agent::simulator::{Model, SimHandle, SimulatedMeter, Simulator};
use std::path::Path;
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
    let mut sim = Simulator::new();
    for d in site.buses.iter().flat_map(|b| &b.devices) {
        sim = sim.with_unit(
            d.unit,
            SimulatedMeter::new(d.points.clone(), model(d.id.as_str())),
        );
    }
    let handle = sim.handle();
    let task = tokio::spawn(async move {
        let _ = sim.serve(listener, std::future::pending()).await;
    });
    (handle, task)
}
