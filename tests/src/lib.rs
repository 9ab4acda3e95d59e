//! Harness for end-to-end scenarios: spawns the real binaries, an embedded broker and an acknowledging receiver.

pub mod broker;
pub mod receiver;
