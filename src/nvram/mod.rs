//! NVRAM images: the on-NVRAM format (header, double-buffered meta records,
//! state slots, redo log, guest RAM image), the backing it lives on and its
//! persist primitive, the crash-atomic commits (suspend and epoch) and
//! recovery.
//!
//! An [`Image`] is an open, validated, exclusively locked image; [`inspect()`]
//! reads one without changing it. The format, the commit orders and the
//! recovery rule are specified in `docs/nvram-format.md`.
//!
//! - [`layout`]: pure encode/parse of the header and meta records (fuzzed);
//! - [`redo`]: pure encode/parse of redo-log records and the log geometry;
//! - [`backing`]: tmpfs / file / DAX detection and `persist`;
//! - `storage`: the read/write/persist interface every image byte goes through;
//! - `create`: making a new image, which appears at its path only once complete;
//! - `image`: open, suspend commit, read state, resumability;
//! - `lock`: who may write an image (the owner's `flock`, a standby's claim);
//! - [`notice`]: the death notice, by which a standby learns that the
//!   thread writing an image is gone;
//! - `epoch`: epoch commit through the redo log, apply;
//! - `recovery`: classifying the redo log, planning and carrying out recovery;
//! - `replay`: recovery's writes gathered per page, each page written once;
//! - `inspect`: the read-only report;
//! - `crash_tests` (tests only): every crash point of the epoch protocol;
//! - `test_rng` (tests only): the deterministic generator the tests share.

pub mod backing;
#[cfg(test)]
mod crash_tests;
mod create;
mod epoch;
mod image;
mod inspect;
pub mod layout;
mod lock;
pub mod notice;
mod recovery;
pub mod redo;
mod replay;
mod storage;
#[cfg(test)]
pub(crate) mod test_rng;

pub use backing::{BackingError, BackingKind};
pub use create::{
    leftovers, remove_leftovers, CreateOptions, Discarded, Leftover, NewImage, RESERVE_CHUNK,
};
pub use image::{CommitTimes, Image, ImageError, NotResumable, Space};
pub use inspect::{inspect, Bytes, InspectReport, LogRecordReport, MetaBlockReport};
pub use layout::{
    FormatError, Geometry, Header, ImageConfig, Meta, MetaSelection, PersistMode, Region, Status,
    Uuid, FORMAT_VERSION,
};
pub use lock::Successor;
pub use recovery::{RecordState, RecoveryPlan, RecoveryReport};
pub use redo::RecordError;
pub use storage::{FileStorage, MemStorage, ReadBytes, Storage};
