//! NVRAM images: the on-NVRAM format (header, double-buffered meta records,
//! state slots, redo-log area, guest RAM image), the backing it lives on and
//! its persist primitive, and the crash-atomic commit.
//!
//! An [`Image`] is an open, validated, exclusively locked image; [`inspect`]
//! reads one without changing it. The format and the commit order are
//! specified in `docs/nvram-format.md`.
//!
//! - [`layout`]: pure encode/parse of the header and meta records (fuzzed);
//! - [`backing`]: tmpfs / file / DAX detection and `persist`;
//! - `image`: create, open, commit, read state, resumability;
//! - `inspect`: the read-only report.

pub mod backing;
mod image;
mod inspect;
pub mod layout;

pub use backing::{BackingError, BackingKind};
pub use image::{CommitTimes, Image, ImageError, NotResumable};
pub use inspect::{inspect, InspectReport, MetaBlockReport};
pub use layout::{
    FormatError, Geometry, Header, ImageConfig, Meta, MetaSelection, PersistMode, Region, Status,
    Uuid, FORMAT_VERSION,
};
