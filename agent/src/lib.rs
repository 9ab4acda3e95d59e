//! `caudal-agent`: polls Modbus meters, validates and stores readings durably, syncs them to the
//! cloud over MQTT with end-to-end acknowledgements, and gives the technician tools on site.
//!
//! See `ARCHITECTURE.md` for the tasks, the channels between them and the durability invariant.

pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod metrics;
pub mod modbus;
pub mod outbox;
pub mod poller;
pub mod position;
pub mod probe;
pub mod profile;
pub mod register;
pub mod simulator;
pub mod uplink;
pub mod validation;
pub mod watchdog;
