//! Harness for end-to-end scenarios: a stoppable embedded broker, an acknowledging receiver and
//! the backlog the benches drain; the
//! whole-system scenarios in `tests/` and their rig (`tests/support/`) run the real binaries.

pub mod backlog;
pub mod broker;
pub mod receiver;
