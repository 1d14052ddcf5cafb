//! Firehose input: fixture files, frame decoding, CAR blocks, typed records.

pub mod car;
pub mod cbor;
pub mod client;
pub mod datamodel;
pub mod event;
pub mod fixture;
pub mod frame;
pub mod limits;
pub mod record;
pub mod sanity;
pub mod syntax;

pub use event::{Action, Event, EventKind, OpRecord, RecordOp};
pub use frame::{decode, decode_with, FrameError};
pub use limits::{CommitLimits, OverLimit};
