//! The real `caudal-agent` binary end to end, one module per scenario, with the rig in
//! `support`. One test binary: the scenarios take turns (`caudal_testkit::process::take_turn`),
//! so they still run one at a time, as when each was a binary of its own.

mod broker_outage;
mod crash;
mod device_faults;
mod fidelity;
mod pipeline;
mod service_notify;
mod support;
mod unreadable_outbox;
