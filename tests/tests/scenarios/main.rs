//! The whole-system scenarios, one module per scenario, with the rig in `support`. One test
//! binary (each scenario was one, each linking the agent and the cloud); the scenarios take
//! turns (`caudal_testkit::process::take_turn`, taken by every `Scene`), so on a 2-core machine
//! they still run one at a time, as they did as binaries of their own.

mod agent_sigkill;
mod broker_outage;
mod cloud_outage;
mod cloud_restart;
mod cloud_tls;
mod disk_budget;
mod duplicate_batch;
mod normal_flow;
mod rtu_fidelity;
mod site_isolation;
mod support;
