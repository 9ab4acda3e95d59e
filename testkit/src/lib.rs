//! Test support written once for every package's integration tests and benches and for the
//! whole-system scenarios: the things a test stands up (a stoppable broker, an acknowledging
//! receiver, an agent stand-in, a database of its own, free loopback ports), the child
//! processes it runs, and the proof it ends with.
//!
//! It never depends on the cloud, so the agent's tests build without it. What needs the agent
//! (`agent` feature) or sqlx (`database` feature) is behind a feature, so the agent's tests do
//! not build sqlx and the cloud's do not build the agent.

pub mod broker;
pub mod http;
pub mod log;
pub mod loopback;
pub mod metrics;
pub mod process;
pub mod proof;
pub mod receiver;
pub mod serial;
pub mod services;
pub mod stand_in;

#[cfg(feature = "agent")]
pub mod backlog;
#[cfg(feature = "database")]
pub mod database;
#[cfg(feature = "agent")]
pub mod meters;
#[cfg(feature = "agent")]
pub mod outbox;
