//! The on-NVRAM format (version 3 is written; 1 and 2 are still read): the
//! header block, the two meta records and the geometry of every region, as
//! pure little-endian encode/parse functions with no file behind them (so
//! `fuzz/` and the tests can feed them anything).
//!
//! Nothing here goes through serde: an nvhv binary of any version must be able
//! to read the magic and the version of any image and explain a mismatch.
//! `docs/nvram-format.md` is the long form of this file; keep them in step.
//!
//! Every length read from an image is untrusted: parsers check sizes before
//! reading, never allocate from a stored length, and never panic.

use std::fmt;

use serde::Serialize;

/// Magic at offset 0 of every nvhv image.
pub const MAGIC: [u8; 8] = *b"NVHVIMG\0";
/// Magic at offset 0 of every meta record.
pub const META_MAGIC: [u8; 8] = *b"NVHVMETA";
/// The format version this binary writes: redo-log records of version 3,
/// several to a log half, the RAM image applied lazily (see
/// docs/nvram-format.md, "Epoch commit protocol"). It reads and writes
/// this one, [`FORMAT_VERSION_2`] and [`FORMAT_VERSION_1`], each with its
/// own protocol.
pub const FORMAT_VERSION: u32 = 3;
/// The second format: the same layout, one redo-log record of version 2 to a
/// half and every epoch applied at once (nvhv keeps to that protocol in
/// images of this format, so that the builds before format 3 still read them).
pub const FORMAT_VERSION_2: u32 = 2;
/// The first format: the same layout, redo-log records of version 1 (which
/// nvhv still writes into images of this format, so that the builds before
/// format 2 still read them).
pub const FORMAT_VERSION_1: u32 = 1;
/// Alignment and granularity of every region; also the size of a meta block.
pub const BLOCK: u64 = 4096;
/// Size of the header block at offset 0 (the header record is its first [`HEADER_LEN`] bytes).
pub const HEADER_BLOCK: u64 = BLOCK;
/// Bytes of the v1 header record covered by its CRC.
pub const HEADER_LEN: usize = 256;
/// Bytes of the v1 meta record covered by its CRC.
pub const META_LEN: usize = 96;
/// Alignment of the guest RAM region (a 2 MiB huge page).
pub const RAM_ALIGN: u64 = 2 << 20;
/// Longest guest name, in bytes.
pub const GUEST_NAME_MAX: usize = 64;
/// State slot bytes for a VM with no vCPU; each vCPU adds [`STATE_PER_VCPU`].
pub const STATE_BASE: u64 = 64 << 10;
/// State slot bytes per vCPU.
pub const STATE_PER_VCPU: u64 = 64 << 10;
/// Largest state slot this binary accepts from an image (bounds every state allocation).
pub const MAX_STATE_SLOT: u64 = 64 << 20;

// Header record offsets (v1). See docs/nvram-format.md, "Header block".
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_LEN: usize = 12;
const H_CRC: usize = 16;
const H_FLAGS: usize = 20;
const H_UUID: usize = 24;
const H_CREATED_SECS: usize = 40;
const H_CREATED_NANOS: usize = 48;
const H_VCPUS: usize = 52;
const H_PERSIST: usize = 56;
const H_GUEST_LEN: usize = 57;
const H_RESERVED0: usize = 58; // 6 bytes
const H_GUEST: usize = 64; // 64 bytes
const H_REGIONS: usize = 128; // 6 x (offset u64, size u64)
const H_RESERVED1: usize = 224; // 32 bytes up to HEADER_LEN

// Meta record offsets (v1). See docs/nvram-format.md, "Meta records".
const M_MAGIC: usize = 0;
const M_LEN: usize = 8;
const M_CRC: usize = 12;
const M_EPOCH: usize = 16;
const M_STATUS: usize = 24;
const M_SLOT: usize = 28;
const M_STATE_LEN: usize = 32;
const M_STATE_CRC: usize = 40;
const M_RESERVED0: usize = 44; // 4 bytes
const M_LOG_HEAD: usize = 48;
const M_LOG_TAIL: usize = 56;
const M_UUID: usize = 64;
const M_TIME: usize = 80;
const M_RESERVED1: usize = 88; // 8 bytes up to META_LEN

/// Why bytes are not a valid (v1) image header or meta record, or a config
/// cannot be laid out. Pure: no I/O error lives here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The file has no bytes at all.
    #[error("image file is empty")]
    Empty,
    /// Fewer bytes than a header needs.
    #[error("too short for an nvhv header: {len} of {need} bytes")]
    TooShort {
        /// Bytes available.
        len: u64,
        /// Bytes needed.
        need: u64,
    },
    /// The first eight bytes are not [`MAGIC`].
    #[error("not an nvhv image{}", looks_like.map(|k| format!(" (it looks like {k})")).unwrap_or_default())]
    BadMagic {
        /// What the bytes look like instead, when recognised.
        looks_like: Option<&'static str>,
    },
    /// A format version this binary cannot read.
    #[error("image format {found}, this nvhv reads {FORMAT_VERSION_1} to {FORMAT_VERSION}")]
    UnsupportedVersion {
        /// The version in the image.
        found: u32,
    },
    /// The header bytes do not match their CRC32C.
    #[error("header CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc {
        /// CRC stored in the header.
        stored: u32,
        /// CRC of the bytes read.
        computed: u32,
    },
    /// A header field holds a value v1 does not allow.
    #[error("invalid header: {0}")]
    BadHeader(String),
    /// Regions overlap, are misaligned, or the VM shape is impossible.
    #[error("inconsistent geometry: {0}")]
    Geometry(String),
    /// The file ends before the last region the header describes.
    #[error("image is truncated: {len} bytes, its geometry needs {need}")]
    Truncated {
        /// File length.
        len: u64,
        /// Length the geometry needs.
        need: u64,
    },
    /// A meta block that was never written (its record bytes are all zero).
    #[error("meta record never written")]
    MetaBlank,
    /// Fewer bytes than a meta record needs.
    #[error("too short for a meta record: {len} of {need} bytes")]
    MetaTooShort {
        /// Bytes available.
        len: u64,
        /// Bytes needed.
        need: u64,
    },
    /// The first eight bytes of the record are not [`META_MAGIC`].
    #[error("meta record has bad magic")]
    MetaMagic,
    /// The record length is not v1's.
    #[error("meta record length {0}, v1 uses {META_LEN}")]
    MetaLength(u32),
    /// The record bytes do not match their CRC32C (for example a torn write).
    #[error("meta record CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    MetaCrc {
        /// CRC stored in the record.
        stored: u32,
        /// CRC of the bytes read.
        computed: u32,
    },
    /// A meta field holds a value v1 does not allow, or one the header contradicts.
    #[error("invalid meta record: {0}")]
    BadMeta(String),
    /// The record carries another image's UUID.
    #[error("meta record belongs to image {0}")]
    MetaForeign(Uuid),
    /// Neither meta block holds a valid record.
    #[error("neither meta record is valid (block 0: {meta0}; block 1: {meta1})")]
    NoValidMeta {
        /// Why block 0 is invalid.
        meta0: Box<FormatError>,
        /// Why block 1 is invalid.
        meta1: Box<FormatError>,
    },
    /// Both meta blocks hold valid records with the same epoch.
    #[error("both meta records claim epoch {0}")]
    MetaConflict(u64),
    /// An [`ImageConfig`] that cannot be laid out.
    #[error("invalid image config: {0}")]
    Config(String),
}

/// How the VM in an image is made durable. Stored in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PersistMode {
    /// State is committed only on suspend (power-fail warning, orderly stop);
    /// guest RAM runs from a shared mapping of the RAM image.
    SuspendOnly,
    /// Continuous epochs: guest RAM runs from a private mapping, dirty pages
    /// reach the RAM image through the redo log after each commit.
    Epoch,
}

impl PersistMode {
    fn code(self) -> u8 {
        match self {
            PersistMode::SuspendOnly => 1,
            PersistMode::Epoch => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(PersistMode::SuspendOnly),
            2 => Some(PersistMode::Epoch),
            _ => None,
        }
    }
}

impl fmt::Display for PersistMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PersistMode::SuspendOnly => "suspend-only",
            PersistMode::Epoch => "epoch",
        })
    }
}

/// What the VM was doing when a meta record was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Fresh image: no VM state saved yet.
    Created,
    /// Guest code may be running (on a shared RAM mapping in suspend-only mode).
    Running,
    /// The VM was stopped in order and its whole state committed.
    Suspended,
    /// An epoch committed while the VM kept running.
    Committed,
}

impl Status {
    fn code(self) -> u32 {
        match self {
            Status::Created => 1,
            Status::Running => 2,
            Status::Suspended => 3,
            Status::Committed => 4,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Status::Created),
            2 => Some(Status::Running),
            3 => Some(Status::Suspended),
            4 => Some(Status::Committed),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Suspended => "suspended",
            Status::Committed => "committed",
        })
    }
}

/// An image's identity: 16 random bytes (RFC 4122 version 4 layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A UUID from 16 random bytes, with the version-4 and variant bits set.
    pub fn from_random(mut bytes: [u8; 16]) -> Self {
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Uuid(bytes)
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for Uuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a new image is made for. The header stores all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// Guest RAM in bytes: non-zero, a multiple of 4 KiB.
    pub ram_bytes: u64,
    /// Number of vCPUs, 1..=[`nvhv_abi::MAX_VCPUS`].
    pub vcpus: u32,
    /// Which guest runs (a built-in guest's name or a file name), at most 64 bytes of UTF-8.
    pub guest: String,
    /// How the VM is made durable.
    pub persist: PersistMode,
    /// Bytes reserved for the redo log (rounded up to 4 KiB).
    pub log_bytes: u64,
}

/// One region of the image: `size` bytes at file offset `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Region {
    /// File offset of the first byte.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Region {
    /// One past the last byte (saturating; validated geometries never saturate).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }
}

/// Where every region of an image lives. Regions are 4 KiB aligned, in this
/// order, and never overlap: header block, meta 0, meta 1, state 0, state 1,
/// redo log, guest RAM (2 MiB aligned, last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Geometry {
    /// The two meta blocks, one record each.
    pub meta: [Region; 2],
    /// The two machine-state slots.
    pub state: [Region; 2],
    /// The redo-log area (reserved in v1; may be empty).
    pub log: Region,
    /// The guest RAM image.
    pub ram: Region,
}

/// State slot size for `vcpus` vCPUs (64 KiB + 64 KiB per vCPU).
pub fn state_slot_bytes(vcpus: u32) -> u64 {
    STATE_BASE + STATE_PER_VCPU * u64::from(vcpus)
}

fn round_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x / align * align)
}

fn check_vcpus(vcpus: u32) -> Result<(), String> {
    if vcpus == 0 || vcpus > nvhv_abi::MAX_VCPUS {
        return Err(format!(
            "vcpus {vcpus} is outside 1..={}",
            nvhv_abi::MAX_VCPUS
        ));
    }
    Ok(())
}

impl Geometry {
    /// The v1 layout for a VM shape. `log_bytes` is rounded up to 4 KiB.
    pub fn for_config(vcpus: u32, ram_bytes: u64, log_bytes: u64) -> Result<Geometry, FormatError> {
        check_vcpus(vcpus).map_err(FormatError::Config)?;
        if ram_bytes == 0 || ram_bytes % BLOCK != 0 {
            return Err(FormatError::Config(format!(
                "ram_bytes {ram_bytes} is not a non-zero multiple of {BLOCK}"
            )));
        }
        let too_big =
            || FormatError::Config("the image would exceed the largest file offset".into());
        let slot = state_slot_bytes(vcpus);
        let meta0 = Region {
            offset: HEADER_BLOCK,
            size: BLOCK,
        };
        let meta1 = Region {
            offset: meta0.end(),
            size: BLOCK,
        };
        let state0 = Region {
            offset: meta1.end(),
            size: slot,
        };
        let state1 = Region {
            offset: state0.end(),
            size: slot,
        };
        let log = Region {
            offset: state1.end(),
            size: round_up(log_bytes, BLOCK).ok_or_else(too_big)?,
        };
        let ram_offset = log
            .offset
            .checked_add(log.size)
            .and_then(|e| round_up(e, RAM_ALIGN))
            .ok_or_else(too_big)?;
        let g = Geometry {
            meta: [meta0, meta1],
            state: [state0, state1],
            log,
            ram: Region {
                offset: ram_offset,
                size: ram_bytes,
            },
        };
        g.validate().map_err(|e| match e {
            FormatError::Geometry(m) => FormatError::Config(m),
            other => other,
        })?;
        Ok(g)
    }

    /// The file length this geometry needs (the end of the RAM region).
    pub fn image_len(&self) -> u64 {
        self.ram.end()
    }

    /// Checks the v1 rules: alignment, order, no overlap, sizes, no overflow.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |m: String| Err(FormatError::Geometry(m));
        let named = [
            (
                "header",
                Region {
                    offset: 0,
                    size: HEADER_BLOCK,
                },
            ),
            ("meta 0", self.meta[0]),
            ("meta 1", self.meta[1]),
            ("state slot 0", self.state[0]),
            ("state slot 1", self.state[1]),
            ("redo log", self.log),
            ("RAM", self.ram),
        ];
        for (name, r) in named {
            if r.offset % BLOCK != 0 || r.size % BLOCK != 0 {
                return bad(format!(
                    "{name} region ({:#x}+{:#x}) is not {BLOCK}-byte aligned",
                    r.offset, r.size
                ));
            }
            match r.offset.checked_add(r.size) {
                Some(end) if end <= i64::MAX as u64 => {}
                _ => return bad(format!("{name} region ends beyond the largest file offset")),
            }
        }
        for pair in named.windows(2) {
            let [(pn, p), (n, r)] = pair else { continue };
            if r.offset < p.end() {
                return bad(format!(
                    "{n} region at {:#x} overlaps or precedes the {pn} region ending at {:#x}",
                    r.offset,
                    p.end()
                ));
            }
        }
        for (i, m) in self.meta.iter().enumerate() {
            if m.size != BLOCK {
                return bad(format!(
                    "meta {i} block is {} bytes, v1 uses {BLOCK}",
                    m.size
                ));
            }
        }
        if self.state[0].size != self.state[1].size {
            return bad(format!(
                "state slots differ in size ({} and {} bytes)",
                self.state[0].size, self.state[1].size
            ));
        }
        let slot = self.state[0].size;
        if slot == 0 || slot > MAX_STATE_SLOT {
            return bad(format!(
                "state slot size {slot} is outside 4096..={MAX_STATE_SLOT}"
            ));
        }
        if self.ram.size == 0 {
            return bad("ram_bytes is 0".into());
        }
        if self.ram.offset % RAM_ALIGN != 0 {
            return bad(format!(
                "RAM offset {:#x} is not 2 MiB aligned",
                self.ram.offset
            ));
        }
        Ok(())
    }
}

/// The header record: identity, VM config and geometry of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Always [`FORMAT_VERSION`] for a parsed header.
    pub format_version: u32,
    /// The image's identity; every meta record repeats it.
    pub uuid: Uuid,
    /// Creation time: seconds since the Unix epoch.
    pub created_secs: u64,
    /// Creation time: nanoseconds within the second.
    pub created_nanos: u32,
    /// The VM the image was made for. `ram_bytes` and `log_bytes` are the
    /// sizes of the RAM and log regions (`log_bytes` as rounded at creation).
    pub config: ImageConfig,
    /// Where every region lives.
    pub geometry: Geometry,
}

// Little-endian field helpers shared by the hand-parsed records (header and
// meta records here, redo-log records in `redo.rs`). Out-of-range offsets
// read as zero and write nothing: callers check lengths first.

/// The u32 at `off`.
pub(super) fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

/// The u64 at `off`.
pub(super) fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Write `v` at `off`.
pub(super) fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(off..off + v.len()) {
        d.copy_from_slice(v);
    }
}

/// Whether every byte is zero (compared against a zero block: fast in any build).
pub(super) fn all_zero(b: &[u8]) -> bool {
    static ZERO: [u8; 4096] = [0; 4096];
    b.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

/// CRC32C of `bytes` with the four bytes at `crc_at` taken as zero.
pub(super) fn crc_with_hole(bytes: &[u8], crc_at: usize) -> u32 {
    let (pre, rest) = bytes.split_at(crc_at.min(bytes.len()));
    let post = rest.get(4..).unwrap_or(&[]);
    let crc = crc32c::crc32c(pre);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, post)
}

/// What foreign bytes at the start of a file look like, if we know them.
fn looks_like(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(b"\x7fELF") {
        Some("an ELF file, e.g. a guest binary or kernel: pass it as the guest, not as the image")
    } else if b.starts_with(b"QFI\xfb") {
        Some("a qcow2 disk image")
    } else if b.get(0x202..0x206) == Some(b"HdrS") {
        Some("a Linux bzImage kernel")
    } else if b.starts_with(b"NVHVMETA") {
        Some("an nvhv meta record, not the start of an image")
    } else if b.len() >= HEADER_LEN && b[..HEADER_LEN].iter().all(|&x| x == 0) {
        // `create` writes the header last: this is what a run killed while
        // it made the image leaves.
        Some("an image whose creation never finished: a `nvhv run` stopped while making it; no VM ever ran in it, and `nvhv run --force` replaces it")
    } else {
        None
    }
}

impl Header {
    /// A new v1 header for `cfg`, with the given identity and creation time.
    pub fn new(
        cfg: &ImageConfig,
        uuid: Uuid,
        created_secs: u64,
        created_nanos: u32,
    ) -> Result<Header, FormatError> {
        if cfg.guest.len() > GUEST_NAME_MAX {
            return Err(FormatError::Config(format!(
                "guest name is {} bytes, at most {GUEST_NAME_MAX}",
                cfg.guest.len()
            )));
        }
        let geometry = Geometry::for_config(cfg.vcpus, cfg.ram_bytes, cfg.log_bytes)?;
        Ok(Header {
            format_version: FORMAT_VERSION,
            uuid,
            created_secs,
            created_nanos: created_nanos.min(999_999_999),
            config: ImageConfig {
                log_bytes: geometry.log.size,
                ..cfg.clone()
            },
            geometry,
        })
    }

    /// Guest RAM bytes (the size of the RAM region).
    pub fn ram_bytes(&self) -> u64 {
        self.geometry.ram.size
    }

    /// Redo-log bytes (the size of the log region).
    pub fn log_bytes(&self) -> u64 {
        self.geometry.log.size
    }

    /// The header record bytes, CRC included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        put(&mut b, H_MAGIC, &MAGIC);
        put(&mut b, H_VERSION, &self.format_version.to_le_bytes());
        put(&mut b, H_LEN, &(HEADER_LEN as u32).to_le_bytes());
        put(&mut b, H_UUID, &self.uuid.0);
        put(&mut b, H_CREATED_SECS, &self.created_secs.to_le_bytes());
        put(&mut b, H_CREATED_NANOS, &self.created_nanos.to_le_bytes());
        put(&mut b, H_VCPUS, &self.config.vcpus.to_le_bytes());
        put(&mut b, H_PERSIST, &[self.config.persist.code()]);
        // `new` and `parse` keep the name within bounds; cut a hand-built
        // one at a character boundary so the record still parses.
        let guest = &self.config.guest;
        let mut n = guest.len().min(GUEST_NAME_MAX);
        while !guest.is_char_boundary(n) {
            n -= 1;
        }
        let name = &guest.as_bytes()[..n];
        put(&mut b, H_GUEST_LEN, &[name.len() as u8]);
        put(&mut b, H_GUEST, name);
        let g = &self.geometry;
        let regions = [g.meta[0], g.meta[1], g.state[0], g.state[1], g.log, g.ram];
        for (i, r) in regions.iter().enumerate() {
            put(&mut b, H_REGIONS + 16 * i, &r.offset.to_le_bytes());
            put(&mut b, H_REGIONS + 16 * i + 8, &r.size.to_le_bytes());
        }
        let crc = crc_with_hole(&b, H_CRC);
        put(&mut b, H_CRC, &crc.to_le_bytes());
        b
    }

    /// Parses and validates a header from the first bytes of an image (pass
    /// the whole header block, or at least [`HEADER_LEN`] bytes).
    ///
    /// Checks, in this order: length, magic, version, header length, CRC,
    /// then every field and the geometry. The file length is not checked here
    /// (see [`check_file_len`]).
    pub fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
        let len = bytes.len() as u64;
        if bytes.is_empty() {
            return Err(FormatError::Empty);
        }
        let too_short = FormatError::TooShort {
            len,
            need: HEADER_LEN as u64,
        };
        if bytes.len() < MAGIC.len() {
            return Err(too_short);
        }
        if bytes[..MAGIC.len()] != MAGIC {
            return Err(FormatError::BadMagic {
                looks_like: looks_like(bytes),
            });
        }
        if bytes.len() < H_LEN + 4 {
            return Err(too_short);
        }
        let version = le_u32(bytes, H_VERSION);
        if !matches!(
            version,
            FORMAT_VERSION_1 | FORMAT_VERSION_2 | FORMAT_VERSION
        ) {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        let header_len = le_u32(bytes, H_LEN);
        if header_len as usize != HEADER_LEN {
            return Err(FormatError::BadHeader(format!(
                "header length {header_len}, v1 uses {HEADER_LEN}"
            )));
        }
        let Some(b) = bytes.get(..HEADER_LEN) else {
            return Err(too_short);
        };
        let stored = le_u32(b, H_CRC);
        let computed = crc_with_hole(b, H_CRC);
        if stored != computed {
            return Err(FormatError::HeaderCrc { stored, computed });
        }
        let bad = |m: String| Err(FormatError::BadHeader(m));
        if le_u32(b, H_FLAGS) != 0
            || !all_zero(&b[H_RESERVED0..H_GUEST])
            || !all_zero(&b[H_RESERVED1..HEADER_LEN])
        {
            return bad("flags or reserved bytes are not zero".into());
        }
        let Some(persist) = PersistMode::from_code(b[H_PERSIST]) else {
            return bad(format!("persist mode {} is unknown", b[H_PERSIST]));
        };
        let guest_len = usize::from(b[H_GUEST_LEN]);
        if guest_len > GUEST_NAME_MAX {
            return bad(format!(
                "guest name length {guest_len} exceeds {GUEST_NAME_MAX}"
            ));
        }
        let name_field = &b[H_GUEST..H_GUEST + GUEST_NAME_MAX];
        let (name, pad) = name_field.split_at(guest_len);
        if !all_zero(pad) {
            return bad("guest name padding is not zero".into());
        }
        let Ok(guest) = std::str::from_utf8(name) else {
            return bad("guest name is not UTF-8".into());
        };
        let created_nanos = le_u32(b, H_CREATED_NANOS);
        if created_nanos > 999_999_999 {
            return bad(format!(
                "creation time nanoseconds {created_nanos} out of range"
            ));
        }
        let vcpus = le_u32(b, H_VCPUS);
        check_vcpus(vcpus).map_err(FormatError::Geometry)?;
        let region = |i: usize| Region {
            offset: le_u64(b, H_REGIONS + 16 * i),
            size: le_u64(b, H_REGIONS + 16 * i + 8),
        };
        let geometry = Geometry {
            meta: [region(0), region(1)],
            state: [region(2), region(3)],
            log: region(4),
            ram: region(5),
        };
        geometry.validate()?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[H_UUID..H_UUID + 16]);
        Ok(Header {
            format_version: version,
            uuid: Uuid(uuid),
            created_secs: le_u64(b, H_CREATED_SECS),
            created_nanos,
            config: ImageConfig {
                ram_bytes: geometry.ram.size,
                vcpus,
                guest: guest.to_owned(),
                persist,
                log_bytes: geometry.log.size,
            },
            geometry,
        })
    }
}

/// Checks that a file of `file_len` bytes holds every region of `header`.
pub fn check_file_len(header: &Header, file_len: u64) -> Result<(), FormatError> {
    let need = header.geometry.image_len();
    if file_len < need {
        return Err(FormatError::Truncated {
            len: file_len,
            need,
        });
    }
    Ok(())
}

/// One meta record: which epoch is committed, in what state, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Commit counter; the valid record with the highest epoch is current.
    pub epoch: u64,
    /// What the VM was doing at this commit.
    pub status: Status,
    /// Which state slot (0 or 1) holds this epoch's machine state.
    pub state_slot: usize,
    /// Bytes of machine state in that slot (0: none).
    pub state_len: u64,
    /// CRC32C of those bytes.
    pub state_crc: u32,
    /// Redo log: position of the first record not yet applied to the RAM image.
    pub log_head: u64,
    /// Redo log: position one past the last committed record.
    pub log_tail: u64,
    /// The UUID of the image this record belongs to.
    pub image_uuid: Uuid,
    /// Wall-clock time of the commit, nanoseconds since the Unix epoch.
    pub time_unix_ns: u64,
}

impl Meta {
    /// The record bytes, CRC included.
    pub fn encode(&self) -> [u8; META_LEN] {
        let mut b = [0u8; META_LEN];
        put(&mut b, M_MAGIC, &META_MAGIC);
        put(&mut b, M_LEN, &(META_LEN as u32).to_le_bytes());
        put(&mut b, M_EPOCH, &self.epoch.to_le_bytes());
        put(&mut b, M_STATUS, &self.status.code().to_le_bytes());
        // A slot index other than 0/1 cannot be built by this module's callers; encode 1 for anything non-zero.
        put(
            &mut b,
            M_SLOT,
            &u32::from(self.state_slot != 0).to_le_bytes(),
        );
        put(&mut b, M_STATE_LEN, &self.state_len.to_le_bytes());
        put(&mut b, M_STATE_CRC, &self.state_crc.to_le_bytes());
        put(&mut b, M_LOG_HEAD, &self.log_head.to_le_bytes());
        put(&mut b, M_LOG_TAIL, &self.log_tail.to_le_bytes());
        put(&mut b, M_UUID, &self.image_uuid.0);
        put(&mut b, M_TIME, &self.time_unix_ns.to_le_bytes());
        let crc = crc_with_hole(&b, M_CRC);
        put(&mut b, M_CRC, &crc.to_le_bytes());
        b
    }

    /// Parses one meta record (pass the whole meta block or at least
    /// [`META_LEN`] bytes) and checks what it can without the header: magic,
    /// length, CRC, field ranges. [`Meta::check`] adds the header's view.
    pub fn parse(bytes: &[u8]) -> Result<Meta, FormatError> {
        let Some(b) = bytes.get(..META_LEN) else {
            return Err(FormatError::MetaTooShort {
                len: bytes.len() as u64,
                need: META_LEN as u64,
            });
        };
        if all_zero(b) {
            return Err(FormatError::MetaBlank);
        }
        if b[M_MAGIC..M_MAGIC + 8] != META_MAGIC {
            return Err(FormatError::MetaMagic);
        }
        let record_len = le_u32(b, M_LEN);
        if record_len as usize != META_LEN {
            return Err(FormatError::MetaLength(record_len));
        }
        let stored = le_u32(b, M_CRC);
        let computed = crc_with_hole(b, M_CRC);
        if stored != computed {
            return Err(FormatError::MetaCrc { stored, computed });
        }
        let bad = |m: String| Err(FormatError::BadMeta(m));
        if !all_zero(&b[M_RESERVED0..M_RESERVED0 + 4]) || !all_zero(&b[M_RESERVED1..META_LEN]) {
            return bad("reserved bytes are not zero".into());
        }
        let code = le_u32(b, M_STATUS);
        let Some(status) = Status::from_code(code) else {
            return bad(format!("status {code} is unknown"));
        };
        let state_slot = match le_u32(b, M_SLOT) {
            0 => 0,
            1 => 1,
            n => return bad(format!("state slot {n} does not exist")),
        };
        let log_head = le_u64(b, M_LOG_HEAD);
        let log_tail = le_u64(b, M_LOG_TAIL);
        if log_head > log_tail {
            return bad(format!("log head {log_head} is past log tail {log_tail}"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[M_UUID..M_UUID + 16]);
        Ok(Meta {
            epoch: le_u64(b, M_EPOCH),
            status,
            state_slot,
            state_len: le_u64(b, M_STATE_LEN),
            state_crc: le_u32(b, M_STATE_CRC),
            log_head,
            log_tail,
            image_uuid: Uuid(uuid),
            time_unix_ns: le_u64(b, M_TIME),
        })
    }

    /// Checks the record against its image's header: same UUID, state within
    /// its slot, log span within the log area.
    pub fn check(&self, header: &Header) -> Result<(), FormatError> {
        if self.image_uuid != header.uuid {
            return Err(FormatError::MetaForeign(self.image_uuid));
        }
        let slot = header.geometry.state[self.state_slot.min(1)].size;
        if self.state_len > slot {
            return Err(FormatError::BadMeta(format!(
                "state length {} exceeds its {slot}-byte slot",
                self.state_len
            )));
        }
        let span = self.log_tail.saturating_sub(self.log_head);
        if span > header.geometry.log.size {
            return Err(FormatError::BadMeta(format!(
                "log span {span} exceeds the {}-byte log area",
                header.geometry.log.size
            )));
        }
        Ok(())
    }
}

/// The outcome of reading both meta blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaSelection {
    /// Block (0 or 1) holding the current record.
    pub current_block: usize,
    /// The current record: the valid one with the highest epoch.
    pub current: Meta,
    /// Each block's record, or why it is invalid.
    pub blocks: [Result<Meta, FormatError>; 2],
}

/// Picks the current meta record from the two meta blocks of an image.
///
/// A record is valid when it parses and agrees with the header. The valid
/// record with the highest epoch is current; with one valid record, it is.
/// See docs/nvram-format.md ("Recovery") for when falling back is sound.
pub fn select_meta(
    header: &Header,
    block0: &[u8],
    block1: &[u8],
) -> Result<MetaSelection, FormatError> {
    let parse = |b: &[u8]| {
        let m = Meta::parse(b)?;
        m.check(header)?;
        Ok(m)
    };
    let blocks: [Result<Meta, FormatError>; 2] = [parse(block0), parse(block1)];
    let current_block = match &blocks {
        [Ok(a), Ok(b)] if a.epoch == b.epoch => return Err(FormatError::MetaConflict(a.epoch)),
        [Ok(a), Ok(b)] => usize::from(b.epoch > a.epoch),
        [Ok(_), Err(_)] => 0,
        [Err(_), Ok(_)] => 1,
        [Err(e0), Err(e1)] => {
            return Err(FormatError::NoValidMeta {
                meta0: Box::new(e0.clone()),
                meta1: Box::new(e1.clone()),
            })
        }
    };
    let current = match &blocks[current_block] {
        Ok(m) => m.clone(),
        // Unreachable by the match above; answered without panicking anyway.
        Err(e) => return Err(e.clone()),
    };
    Ok(MetaSelection {
        current_block,
        current,
        blocks,
    })
}

#[cfg(test)]
mod tests;
