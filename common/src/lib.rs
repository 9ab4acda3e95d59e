//! Caudal's wire contract and domain vocabulary, shared by the agent and the cloud.
//!
//! This crate owns the MQTT topic layout ([`topic`]), the versioned payloads that travel on
//! those topics ([`payload`]), the identity of every record ([`seq`], [`id`]), reading quality
//! ([`quality`]), canonical units ([`units`]) and the signed envelope that proves who wrote a
//! payload ([`signed`]). It does no I/O and depends on no runtime: a
//! change here is a protocol change and is written down in `docs/protocol.md`.

pub mod id;
pub mod payload;
pub mod quality;
pub mod seq;
pub mod signed;
pub mod topic;
pub mod units;

pub use id::{DeviceId, IdError, SiteId};
pub use payload::{
    Ack, AckStatus, Batch, BatchError, Command, CommandKind, CommandResult, DecodeError,
    DesiredConfig, DeviceState, Event, EventKind, Gap, GapCause, Reading, SCHEMA_VERSION, Status,
};
pub use quality::{Flag, Quality};
pub use seq::{Seq, SeqRange};
