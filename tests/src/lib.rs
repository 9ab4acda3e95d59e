//! Harness for end-to-end scenarios: a stoppable embedded broker and an acknowledging receiver; the
//! whole-system scenarios in `tests/` and their rig (`tests/support/`) run the real binaries.

pub mod broker;
pub mod receiver;
