//! The cloud service running: its ingest over MQTT with the embedded broker (and an external one
//! when `CAUDAL_TEST_MQTT_URL` is set), and `caudal-cloud` processes of different presets on one
//! database; the compliance submitter against a fake DGA. One test binary for the area.

#[path = "../support/mod.rs"]
mod support;

mod broker;
mod compliance;
mod console;
mod fake_dga;
mod ingest;
mod processes;
mod signing;
