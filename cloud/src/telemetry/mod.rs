//! Telemetry: what agents send (batches of readings, events and gaps; their status), received
//! over MQTT ([`ingest`]) and stored once per record ([`store`]). Queries and alerts come next.

pub mod ingest;
pub mod store;
pub mod volume;
