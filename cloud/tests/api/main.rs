//! The cloud's API over real HTTP, one module per area (alerts, catchment, compliance, telemetry, users),
//! in one test binary: each area's tests used to be a binary of their own, each linking the
//! whole cloud.

#[path = "../support/mod.rs"]
mod support;

mod alerts;
mod catchment;
mod compliance;
mod telemetry;
mod users;
