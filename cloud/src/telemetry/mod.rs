//! Telemetry: what agents send (batches of readings, events and gaps; their status), received
//! over MQTT ([`ingest`]) and stored once per record ([`store`]), and the alerts raised from it
//! ([`alert`]).

pub mod alert;
pub mod ingest;
pub mod store;
