//! The redo log's on-NVRAM format (epoch mode): where the two log halves lie,
//! how many pages a record may carry, and the record header and payload as
//! pure little-endian encode/parse functions with no file behind them (the
//! tests and the fuzzer feed them anything).
//!
//! A record is one epoch's changes to guest RAM: a 4 KiB header block, then
//! the payload. Version 3 (written into images of format 3) and version 2
//! (format 2) have one entry per changed page: its page number and the byte
//! ranges of the page that changed, with their new bytes ([`Payload`]; a page
//! new to the log is one range covering it all). A version-3 header also says
//! where in its half the record lies (records follow each other there) and
//! through which epoch the RAM image was durably applied when it was written.
//! Version 1 (still read) has a page-number table (one u64 per page,
//! zero-padded to 4 KiB) and whole pages. A record is self-validating: the
//! header carries CRCs of itself, of the payload, and of the machine state the
//! epoch saved in a state slot. `docs/nvram-format.md` ("Redo log") is the
//! long form of this file.
//!
//! Every length read from an image is untrusted: parsers check sizes before
//! reading, never allocate from a stored length, and never panic.

use super::layout::{all_zero, crc_with_hole, le_u32, le_u64, put, Header, Region, Uuid, BLOCK};

/// Magic at offset 0 of every log record.
pub const RECORD_MAGIC: [u8; 8] = *b"NVHVLOGR";
/// The record format of format-2 images: one record per log half, the delta
/// payload. (Format-3 images get [`RECORD_VERSION_3`].)
pub const RECORD_VERSION: u32 = 2;
/// The record format of format-3 images: the version-2 payload; the header
/// adds the record's offset in its half and the epoch through which the RAM
/// image was durably applied (see docs/nvram-format.md, "Redo log").
pub const RECORD_VERSION_3: u32 = 3;
/// The first record format: whole pages behind a page-number table.
pub const RECORD_VERSION_1: u32 = 1;
/// Bytes of the record header covered by its CRC (the rest of the 4 KiB header block is zero).
pub const RECORD_HEADER_LEN: usize = 128;
/// Guest page size: the unit of the log.
pub const PAGE: u64 = 4096;
/// Page numbers per 4 KiB table block (v1).
const PFNS_PER_BLOCK: u64 = BLOCK / 8;
/// Bytes of a v2 entry's fixed part: the page number (u64) and the number
/// of ranges (u16).
const ENTRY_HEAD: usize = 10;
/// Bytes of one v2 range descriptor: offset and length in the page (u16 each).
const RANGE_HEAD: usize = 4;
/// Bytes of the largest v2 entry: one range covering the whole page.
pub const FULL_ENTRY: u64 = (ENTRY_HEAD + RANGE_HEAD) as u64 + PAGE;
/// Changed words at most this many bytes apart are logged as one range: a
/// range costs 4 bytes of descriptor and one write when it is replayed, the
/// unchanged bytes in between cost as many bytes.
const MERGE_GAP: usize = 16;

// Record header offsets. See docs/nvram-format.md, "Log record header".
const R_MAGIC: usize = 0;
const R_VERSION: usize = 8;
const R_LEN: usize = 12;
const R_CRC: usize = 16;
const R_HALF: usize = 20;
const R_EPOCH: usize = 24;
const R_UUID: usize = 32;
const R_PAGES: usize = 48;
const R_SLOT: usize = 56;
const R_STATE_CRC: usize = 60;
const R_STATE_LEN: usize = 64;
const R_PAYLOAD_CRC: usize = 72;
const R_RESERVED0: usize = 76; // 4 bytes
const R_TIME: usize = 80;
const R_PAYLOAD_LEN: usize = 88; // v2; reserved (zero) in v1
const R_RESERVED1_V1: usize = 88; // 40 bytes up to RECORD_HEADER_LEN
const R_RESERVED1: usize = 96; // v2: 32 bytes up to RECORD_HEADER_LEN
const R_APPLIED: usize = 96; // v3
const R_OFFSET: usize = 104; // v3
const R_RESERVED1_V3: usize = 112; // v3: 16 bytes up to RECORD_HEADER_LEN

/// Why the bytes in a log half are not a valid record for this image. Pure:
/// no I/O error lives here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The header bytes are all zero: nothing was ever written here.
    #[error("never written")]
    Blank,
    /// The half is too small to hold even a record header.
    #[error("the log half is too small for a record")]
    NoRoom,
    /// The first eight bytes are not [`RECORD_MAGIC`].
    #[error("bad magic")]
    Magic,
    /// A record format this binary cannot read.
    #[error("record format {0}, this nvhv reads {RECORD_VERSION_1} to {RECORD_VERSION_3}")]
    Version(u32),
    /// The header length is not the one both versions use.
    #[error("header length {0}, records use {RECORD_HEADER_LEN}")]
    Length(u32),
    /// The header bytes do not match their CRC (for example a torn write).
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
    /// The record carries another image's UUID.
    #[error("belongs to image {0}")]
    Foreign(Uuid),
    /// A version-3 record found elsewhere in its half than it says it was
    /// written (or a v1/v2 record not at the start of its half).
    #[error("written at offset {written} of its half, found at {found}")]
    WrongOffset {
        /// Offset named in the header.
        written: u64,
        /// Offset it was read from.
        found: u64,
    },
    /// Format 3: a record after a half's sequence with an epoch that does
    /// not follow it (damage: records of a half are written in order).
    #[error("epoch {found} where the half's sequence continues with {expected}")]
    OutOfSequence {
        /// The epoch that would continue the sequence.
        expected: u64,
        /// The epoch found.
        found: u64,
    },
    /// The record says it was written to the other half.
    #[error("written for log half {written}, found in half {found}")]
    WrongHalf {
        /// Half named in the header.
        written: usize,
        /// Half it was read from.
        found: usize,
    },
    /// More pages than a half of this image's log can hold (v1).
    #[error("{pages} pages exceed the half's capacity of {capacity}")]
    TooManyPages {
        /// Pages in the header.
        pages: u64,
        /// Capacity of one half.
        capacity: u64,
    },
    /// A payload longer than a half of this image's log can hold (v2).
    #[error("a payload of {len} bytes exceeds the half's room of {room}")]
    PayloadTooLong {
        /// Payload length in the header.
        len: u64,
        /// Bytes a half holds after the header block.
        room: u64,
    },
    /// The state length exceeds the state slot.
    #[error("state length {len} exceeds its {slot_bytes}-byte slot")]
    StateTooLong {
        /// State length in the header.
        len: u64,
        /// Slot size.
        slot_bytes: u64,
    },
    /// Table and page data do not match their CRC (a torn or damaged record).
    #[error("payload CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    PayloadCrc {
        /// CRC stored in the header.
        stored: u32,
        /// CRC of the bytes read.
        computed: u32,
    },
    /// The payload's page table (v1) or entries (v2) are malformed: a page
    /// outside guest RAM, a range outside its page, non-zero padding, a
    /// length that does not add up.
    #[error("payload: {0}")]
    BadTable(String),
    /// The state slot does not hold the state this record committed (torn
    /// state write, or the slot was reused by a later commit).
    #[error("state slot {slot} does not hold this record's state (CRC stored {stored:#010x}, computed {computed:#010x})")]
    StateCrc {
        /// The slot the record names.
        slot: usize,
        /// CRC in the record.
        stored: u32,
        /// CRC of the slot's bytes.
        computed: u32,
    },
}

/// The byte range of log half `half` (0 or 1): the log region split in two
/// equal parts of whole 4 KiB blocks (an odd last block is unused).
pub fn half_region(log: Region, half: usize) -> Region {
    let size = log.size / 2 / BLOCK * BLOCK;
    Region {
        offset: log.offset + size * (half.min(1) as u64),
        size,
    }
}

/// Bytes of a v1 page-number table for `pages` pages (a multiple of 4 KiB).
pub fn table_bytes(pages: u64) -> u64 {
    pages.div_ceil(PFNS_PER_BLOCK) * BLOCK
}

/// Bytes of a whole v1 record with `pages` pages: header block, table, data.
pub fn record_bytes(pages: u64) -> u64 {
    BLOCK + table_bytes(pages) + pages * PAGE
}

/// The bytes of payload a record may carry in a half of `half_bytes` bytes
/// (what follows the header block), or `None` when not even the header fits.
pub fn payload_room(half_bytes: u64) -> Option<u64> {
    (half_bytes >= BLOCK).then(|| half_bytes / BLOCK * BLOCK - BLOCK)
}

/// The most pages one (v2) record may carry in a half of `half_bytes` bytes
/// whatever changed in them (every page logged whole), or `None` when not
/// even an empty record fits.
pub fn capacity_pages(half_bytes: u64) -> Option<u64> {
    payload_room(half_bytes).map(|room| room / FULL_ENTRY)
}

/// The smallest half (whole 4 KiB blocks) whose record can carry `pages`
/// pages whatever changed in them: the inverse of [`capacity_pages`].
pub fn half_bytes_for(pages: u64) -> u64 {
    BLOCK + (pages * FULL_ENTRY).div_ceil(BLOCK) * BLOCK
}

/// The most pages one record may carry in a half of `half_bytes` bytes
/// whatever changed in them, for an image of format `format_version`
/// (format 1 writes v1 records).
pub fn capacity_pages_for(format_version: u32, half_bytes: u64) -> Option<u64> {
    if format_version == super::layout::FORMAT_VERSION_1 {
        capacity_pages_v1(half_bytes)
    } else {
        capacity_pages(half_bytes)
    }
}

/// The most pages one v1 record may carry in a half of `half_bytes` bytes, or
/// `None` when not even an empty record fits.
pub fn capacity_pages_v1(half_bytes: u64) -> Option<u64> {
    let blocks = half_bytes / BLOCK;
    if blocks == 0 {
        return None;
    }
    // n pages need n + ceil(n / 512) blocks after the header block.
    let room = blocks - 1;
    let mut n = room * PFNS_PER_BLOCK / (PFNS_PER_BLOCK + 1);
    while record_bytes(n + 1) <= half_bytes {
        n += 1;
    }
    while n > 0 && record_bytes(n) > half_bytes {
        n -= 1;
    }
    Some(n)
}

/// The header of one log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    /// The record format: [`RECORD_VERSION`] or [`RECORD_VERSION_1`].
    pub version: u32,
    /// The log half (0 or 1) the record was written to.
    pub half: usize,
    /// The epoch this record commits.
    pub epoch: u64,
    /// The UUID of the image the record belongs to.
    pub image_uuid: Uuid,
    /// Pages in the record (v2: entries).
    pub pages: u64,
    /// Bytes of payload after the header block (v1: table and pages, as
    /// the page count implies).
    pub payload_len: u64,
    /// The state slot (0 or 1) holding this epoch's machine state.
    pub state_slot: usize,
    /// Bytes of machine state in that slot.
    pub state_len: u64,
    /// CRC32C of those bytes.
    pub state_crc: u32,
    /// CRC32C of the payload (v1: the page-number table, padded, then the
    /// page data).
    pub payload_crc: u32,
    /// Wall-clock time of the commit, nanoseconds since the Unix epoch (informational).
    pub time_unix_ns: u64,
    /// v3: every epoch up to this one was applied to the RAM image, durably,
    /// before this record was written, so recovery needs no older record.
    /// 0 in v1 and v2 (where it is implied: the epoch two before).
    pub applied_through: u64,
    /// v3: the byte offset of the record in its half. 0 in v1 and v2.
    pub offset: u64,
}

impl RecordHeader {
    /// The header record bytes, CRC included.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        put(&mut b, R_MAGIC, &RECORD_MAGIC);
        put(&mut b, R_VERSION, &self.version.to_le_bytes());
        put(&mut b, R_LEN, &(RECORD_HEADER_LEN as u32).to_le_bytes());
        put(&mut b, R_HALF, &u32::from(self.half != 0).to_le_bytes());
        put(&mut b, R_EPOCH, &self.epoch.to_le_bytes());
        put(&mut b, R_UUID, &self.image_uuid.0);
        put(&mut b, R_PAGES, &self.pages.to_le_bytes());
        put(
            &mut b,
            R_SLOT,
            &u32::from(self.state_slot != 0).to_le_bytes(),
        );
        put(&mut b, R_STATE_CRC, &self.state_crc.to_le_bytes());
        put(&mut b, R_STATE_LEN, &self.state_len.to_le_bytes());
        put(&mut b, R_PAYLOAD_CRC, &self.payload_crc.to_le_bytes());
        put(&mut b, R_TIME, &self.time_unix_ns.to_le_bytes());
        if self.version != RECORD_VERSION_1 {
            put(&mut b, R_PAYLOAD_LEN, &self.payload_len.to_le_bytes());
        }
        if self.version == RECORD_VERSION_3 {
            put(&mut b, R_APPLIED, &self.applied_through.to_le_bytes());
            put(&mut b, R_OFFSET, &self.offset.to_le_bytes());
        }
        let crc = crc_with_hole(&b, R_CRC);
        put(&mut b, R_CRC, &crc.to_le_bytes());
        b
    }

    /// Parses a record header (pass at least [`RECORD_HEADER_LEN`] bytes of
    /// the header block) and checks what it can without the image: magic,
    /// version, length, CRC, reserved bytes, field ranges.
    pub fn parse(bytes: &[u8]) -> Result<RecordHeader, RecordError> {
        let Some(b) = bytes.get(..RECORD_HEADER_LEN) else {
            return Err(RecordError::NoRoom);
        };
        if all_zero(b) {
            return Err(RecordError::Blank);
        }
        if b[R_MAGIC..R_MAGIC + 8] != RECORD_MAGIC {
            return Err(RecordError::Magic);
        }
        let version = le_u32(b, R_VERSION);
        if !matches!(
            version,
            RECORD_VERSION_1 | RECORD_VERSION | RECORD_VERSION_3
        ) {
            return Err(RecordError::Version(version));
        }
        let len = le_u32(b, R_LEN);
        if len as usize != RECORD_HEADER_LEN {
            return Err(RecordError::Length(len));
        }
        let stored = le_u32(b, R_CRC);
        let computed = crc_with_hole(b, R_CRC);
        if stored != computed {
            return Err(RecordError::HeaderCrc { stored, computed });
        }
        let bad = |m: String| Err(RecordError::BadHeader(m));
        let reserved1 = match version {
            RECORD_VERSION_1 => R_RESERVED1_V1,
            RECORD_VERSION_3 => R_RESERVED1_V3,
            _ => R_RESERVED1,
        };
        if !all_zero(&b[R_RESERVED0..R_RESERVED0 + 4]) || !all_zero(&b[reserved1..]) {
            return bad("reserved bytes are not zero".into());
        }
        let pages = le_u64(b, R_PAGES);
        let payload_len = match version {
            // What the page count implies (bounded by check()).
            RECORD_VERSION_1 => {
                let p = pages.min(1 << 40);
                table_bytes(p) + p * PAGE
            }
            _ => le_u64(b, R_PAYLOAD_LEN),
        };
        let half = match le_u32(b, R_HALF) {
            0 => 0,
            1 => 1,
            n => return bad(format!("log half {n} does not exist")),
        };
        let state_slot = match le_u32(b, R_SLOT) {
            0 => 0,
            1 => 1,
            n => return bad(format!("state slot {n} does not exist")),
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[R_UUID..R_UUID + 16]);
        let v3 = |at| {
            if version == RECORD_VERSION_3 {
                le_u64(b, at)
            } else {
                0
            }
        };
        let (applied_through, offset) = (v3(R_APPLIED), v3(R_OFFSET));
        if offset % BLOCK != 0 {
            return bad(format!("offset {offset} is not block-aligned"));
        }
        if applied_through >= le_u64(b, R_EPOCH) && version == RECORD_VERSION_3 {
            return bad(format!(
                "applied through epoch {applied_through}, not below its own"
            ));
        }
        Ok(RecordHeader {
            version,
            half,
            epoch: le_u64(b, R_EPOCH),
            image_uuid: Uuid(uuid),
            pages,
            payload_len,
            state_slot,
            state_len: le_u64(b, R_STATE_LEN),
            state_crc: le_u32(b, R_STATE_CRC),
            payload_crc: le_u32(b, R_PAYLOAD_CRC),
            time_unix_ns: le_u64(b, R_TIME),
            applied_through,
            offset,
        })
    }

    /// Checks the header against the image it was found in, read from log
    /// half `found_in` at byte `found_at` of it: same UUID, same half and
    /// offset, page count (v1) or payload length (v2, v3) within what the
    /// half holds from there, state within its slot.
    pub fn check(
        &self,
        header: &Header,
        found_in: usize,
        found_at: u64,
    ) -> Result<(), RecordError> {
        if self.image_uuid != header.uuid {
            return Err(RecordError::Foreign(self.image_uuid));
        }
        if self.half != found_in {
            return Err(RecordError::WrongHalf {
                written: self.half,
                found: found_in,
            });
        }
        if self.offset != found_at {
            return Err(RecordError::WrongOffset {
                written: self.offset,
                found: found_at,
            });
        }
        let half = half_region(header.geometry.log, found_in);
        if self.version == RECORD_VERSION_1 {
            let capacity = capacity_pages_v1(half.size).unwrap_or(0);
            if self.pages > capacity {
                return Err(RecordError::TooManyPages {
                    pages: self.pages,
                    capacity,
                });
            }
        } else {
            let room = payload_room(half.size.saturating_sub(found_at)).unwrap_or(0);
            if self.payload_len > room {
                return Err(RecordError::PayloadTooLong {
                    len: self.payload_len,
                    room,
                });
            }
        }
        let slot_bytes = header.geometry.state[self.state_slot.min(1)].size;
        if self.state_len > slot_bytes {
            return Err(RecordError::StateTooLong {
                len: self.state_len,
                slot_bytes,
            });
        }
        Ok(())
    }
}

/// The page-number table for `pfns`, zero-padded to [`table_bytes`].
pub fn encode_table(pfns: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(table_bytes(pfns.len() as u64) as usize);
    for pfn in pfns {
        b.extend_from_slice(&pfn.to_le_bytes());
    }
    b.resize(table_bytes(pfns.len() as u64) as usize, 0);
    b
}

/// The page numbers of a table of `pages` entries, checked: every page lies
/// below `ram_pages` and the padding is zero.
pub fn decode_table(table: &[u8], pages: u64, ram_pages: u64) -> Result<Vec<u64>, RecordError> {
    let n = usize::try_from(pages).map_err(|_| RecordError::BadTable("too long".into()))?;
    let Some(entries) = n.checked_mul(8).and_then(|len| table.get(..len)) else {
        return Err(RecordError::BadTable(format!(
            "{} bytes cannot hold {pages} entries",
            table.len()
        )));
    };
    if !all_zero(&table[entries.len()..]) {
        return Err(RecordError::BadTable("padding is not zero".into()));
    }
    entries
        .chunks_exact(8)
        .map(|c| {
            let pfn = le_u64(c, 0);
            if pfn >= ram_pages {
                Err(RecordError::BadTable(format!(
                    "page {pfn} is outside guest RAM ({ram_pages} pages)"
                )))
            } else {
                Ok(pfn)
            }
        })
        .collect()
}

/// Runs of consecutive page numbers: `(first index, count)` such that
/// `pfns[i..i + count]` are consecutive pages, so each run is one write of
/// `count` pages (the page data of a record is in table order).
pub fn runs(pfns: &[u64]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let start = i;
        let first = *pfns.get(start)?;
        i += 1;
        while pfns
            .get(i)
            .is_some_and(|&p| Some(p) == first.checked_add((i - start) as u64))
        {
            i += 1;
        }
        Some((start, i - start))
    })
}

/// A v2 record's payload, built entry by entry: for each page, its number,
/// the ranges of it that changed and their new bytes.
///
/// An entry: `pfn` (u64), `n` (u16, ≥ 1), `n` × (`offset`, `len`) (u16
/// each; ranges ascending, not overlapping, inside the page, `len` ≥ 1),
/// then the ranges' bytes one after the other. Entries follow each other
/// with no padding.
#[derive(Debug, Default, Clone)]
pub struct Payload {
    bytes: Vec<u8>,
    pfns: Vec<u64>,
    /// Reused by `push_delta`: the changed ranges of one page.
    ranges: Vec<(usize, usize)>,
}

impl Payload {
    /// Every page of `pages` (`pfns.len()` pages of 4 KiB, page `i` being
    /// guest page `pfns[i]`) logged whole.
    pub fn full(pfns: &[u64], pages: &[u8]) -> Self {
        assert_eq!(pages.len(), pfns.len() * PAGE as usize, "one page per pfn");
        let mut p = Payload::default();
        for (&pfn, page) in pfns.iter().zip(pages.chunks_exact(PAGE as usize)) {
            p.push_full(pfn, page);
        }
        p
    }

    /// Log guest page `pfn` whole (its bytes before are not known or not
    /// worth diffing).
    pub fn push_full(&mut self, pfn: u64, page: &[u8]) {
        assert_eq!(page.len(), PAGE as usize, "a page");
        self.ranges.clear();
        self.ranges.push((0, PAGE as usize));
        self.push_ranges(pfn, page);
    }

    /// Log what changed in guest page `pfn` from `old` (its bytes as of the
    /// last record that logged it, which the RAM image holds once that
    /// record is applied) to `new`: the changed 8-byte words, as ranges
    /// (whole when that is no larger). Returns false, and logs nothing, when
    /// the two are equal.
    pub fn push_delta(&mut self, pfn: u64, old: &[u8], new: &[u8]) -> bool {
        const BLOCK64: usize = 64;
        assert!(
            old.len() == PAGE as usize && new.len() == PAGE as usize,
            "pages"
        );
        // Most pages compared are unchanged: one memcmp says so.
        if old == new {
            return false;
        }
        self.ranges.clear();
        // A page rewritten all over (a new value, a refilled buffer) is
        // cheaper logged whole than scanned: when 8 probed words mostly
        // changed, and so did most words of 8 sampled blocks, it is logged
        // whole at once (measured: 1.5 -> 0.5 us a page; the probes cost a
        // page with few changes ~nothing).
        if rewritten(old, new) {
            self.ranges.push((0, PAGE as usize));
            self.push_ranges(pfn, new);
            return true;
        }
        let mut cur: Option<(usize, usize)> = None;
        for (b, (o, n)) in old
            .chunks_exact(BLOCK64)
            .zip(new.chunks_exact(BLOCK64))
            .enumerate()
        {
            // Eight words XORed and ORed: zero when the block is unchanged.
            if (0..BLOCK64)
                .step_by(8)
                .fold(0, |d, i| d | (word(o, i) ^ word(n, i)))
                == 0
            {
                continue;
            }
            for w in 0..BLOCK64 / 8 {
                if word(o, w * 8) == word(n, w * 8) {
                    continue;
                }
                let at = b * BLOCK64 + w * 8;
                cur = match cur {
                    Some((s, e)) if at - e <= MERGE_GAP => Some((s, at + 8)),
                    Some(r) => {
                        self.ranges.push(r);
                        Some((at, at + 8))
                    }
                    None => Some((at, at + 8)),
                };
            }
        }
        let Some(last) = cur else {
            return false;
        };
        self.ranges.push(last);
        let data: usize = self.ranges.iter().map(|(s, e)| e - s).sum();
        if ENTRY_HEAD + RANGE_HEAD * self.ranges.len() + data >= FULL_ENTRY as usize {
            self.ranges.clear();
            self.ranges.push((0, PAGE as usize));
        }
        self.push_ranges(pfn, new);
        true
    }

    fn push_ranges(&mut self, pfn: u64, page: &[u8]) {
        let b = &mut self.bytes;
        b.extend_from_slice(&pfn.to_le_bytes());
        b.extend_from_slice(&(self.ranges.len() as u16).to_le_bytes());
        for &(s, e) in &self.ranges {
            b.extend_from_slice(&(s as u16).to_le_bytes());
            b.extend_from_slice(&((e - s) as u16).to_le_bytes());
        }
        for &(s, e) in &self.ranges {
            b.extend_from_slice(&page[s..e]);
        }
        self.pfns.push(pfn);
    }

    /// The pages logged, in entry order.
    pub fn pfns(&self) -> &[u64] {
        &self.pfns
    }

    /// The encoded payload.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// No page logged.
    pub fn is_empty(&self) -> bool {
        self.pfns.is_empty()
    }

    /// Allocate and touch room for `pages` whole pages (each first touch of
    /// a page of memory costs microseconds under nested paging), leaving
    /// the payload empty.
    pub fn warm(&mut self, pages: usize) {
        self.bytes.clear();
        self.bytes.resize(pages * FULL_ENTRY as usize, 1);
        self.bytes.clear();
        self.pfns.reserve(pages);
    }

    /// Bytes the payload can hold without growing.
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// Forget every entry (keeping the buffers).
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.pfns.clear();
    }
}

/// One epoch's changes to guest RAM: as the redo log records them
/// (`payload`: the changed bytes of each page) and whole (`pages`: the new
/// bytes of each of those pages, 4 KiB each in the payload's order — what
/// applying the epoch to the RAM image writes, and what a v1 record holds).
#[derive(Debug, Default)]
pub struct Changes {
    /// The changes, page by page.
    pub payload: Payload,
    /// The pages' whole new bytes.
    pub pages: Vec<u8>,
}

impl Changes {
    /// Every page of `pages` (`pfns.len()` pages, page `i` being guest page
    /// `pfns[i]`) logged whole.
    pub fn whole(pfns: &[u64], pages: &[u8]) -> Self {
        Changes {
            payload: Payload::full(pfns, pages),
            pages: pages.to_vec(),
        }
    }

    /// The pages changed, in order.
    pub fn pfns(&self) -> &[u64] {
        self.payload.pfns()
    }

    /// Forget every page (keeping the buffers).
    pub fn clear(&mut self) {
        self.payload.clear();
        self.pages.clear();
    }

    /// Where the next page logged will go (for [`extend_from`](Self::extend_from)).
    pub fn mark(&self) -> Mark {
        Mark {
            pages: self.payload.pfns.len(),
            bytes: self.payload.bytes.len(),
        }
    }

    /// Append the pages `other` logged between its marks `from` and `to`.
    pub fn extend_from(&mut self, other: &Changes, from: Mark, to: Mark) {
        let p = &other.payload;
        self.payload
            .pfns
            .extend_from_slice(&p.pfns[from.pages..to.pages]);
        self.payload
            .bytes
            .extend_from_slice(&p.bytes[from.bytes..to.bytes]);
        let page = PAGE as usize;
        self.pages
            .extend_from_slice(&other.pages[from.pages * page..to.pages * page]);
    }
}

/// A position in a [`Changes`]: the pages logged before it and their
/// payload bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pages: usize,
    bytes: usize,
}

/// The 8-byte word of `b` at byte `i` (as stored: only compared).
#[inline]
fn word(b: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// Whether most of page `new` differs from `old`: 6 of 8 probed words
/// changed, then 48 of the 64 words of 8 sampled blocks. Kept out of line:
/// the probes should cost a page with few changes next to nothing.
#[inline(never)]
fn rewritten(old: &[u8], new: &[u8]) -> bool {
    let stride = PAGE as usize / 8;
    let probed = (0..8)
        .filter(|k| word(old, k * stride + stride / 2) != word(new, k * stride + stride / 2))
        .count();
    probed >= 6
        && (0..PAGE as usize)
            .step_by(stride)
            .flat_map(|at| (at..at + 64).step_by(8))
            .filter(|&i| word(old, i) != word(new, i))
            .count()
            >= 48
}

/// One write a record makes to the RAM image: `data` at byte `offset` of
/// guest page `pfn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageWrite<'a> {
    /// The payload entry (v1: page-table entry) it comes from.
    pub entry: usize,
    /// The guest page.
    pub pfn: u64,
    /// Where in the page (`offset + data.len()` ≤ 4096).
    pub offset: usize,
    /// The new bytes.
    pub data: &'a [u8],
}

/// The writes of a record's payload (`version`, `pages` pages or entries),
/// in order, after checking all of it: every page below `ram_pages`, every
/// range inside its page, every byte accounted for (v1: the table's padding
/// zero and one page per entry after it).
pub fn decode_writes(
    version: u32,
    payload: &[u8],
    pages: u64,
    ram_pages: u64,
) -> Result<Vec<PageWrite<'_>>, RecordError> {
    let bad = |m: String| Err(RecordError::BadTable(m));
    if version == RECORD_VERSION_1 {
        let tb = usize::try_from(table_bytes(pages)).unwrap_or(usize::MAX);
        let Some(table) = payload.get(..tb) else {
            return bad(format!(
                "{} bytes cannot hold a table of {pages} pages",
                payload.len()
            ));
        };
        let pfns = decode_table(table, pages, ram_pages)?;
        let data = &payload[tb..];
        if data.len() as u64 != pages.saturating_mul(PAGE) {
            return bad(format!(
                "{} bytes of page data for {pages} pages",
                data.len()
            ));
        }
        return Ok(pfns
            .iter()
            .zip(data.chunks_exact(PAGE as usize))
            .enumerate()
            .map(|(entry, (&pfn, page))| PageWrite {
                entry,
                pfn,
                offset: 0,
                data: page,
            })
            .collect());
    }
    let mut writes = Vec::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
        let s = payload.get(*at..at.checked_add(n)?)?;
        *at += n;
        Some(s)
    };
    for i in 0..pages {
        let Some(head) = take(&mut at, ENTRY_HEAD) else {
            return bad(format!("entry {i} of {pages} is cut off"));
        };
        let pfn = le_u64(head, 0);
        let n = u16::from_le_bytes([head[8], head[9]]) as usize;
        if pfn >= ram_pages {
            return bad(format!(
                "page {pfn} is outside guest RAM ({ram_pages} pages)"
            ));
        }
        if n == 0 {
            return bad(format!("entry {i} (page {pfn}) has no range"));
        }
        let Some(descs) = take(&mut at, n * RANGE_HEAD) else {
            return bad(format!("entry {i} (page {pfn}): ranges cut off"));
        };
        let mut end = 0usize;
        let first = writes.len();
        for d in descs.chunks_exact(RANGE_HEAD) {
            let off = u16::from_le_bytes([d[0], d[1]]) as usize;
            let len = u16::from_le_bytes([d[2], d[3]]) as usize;
            if len == 0 || off < end || off + len > PAGE as usize {
                return bad(format!(
                    "entry {i} (page {pfn}): range {off}+{len} is empty, out of order or outside the page"
                ));
            }
            end = off + len;
            // Its bytes follow all of the entry's descriptors: taken below.
            writes.push(PageWrite {
                entry: i as usize,
                pfn,
                offset: off,
                data: &[],
            });
        }
        for (w, d) in writes[first..]
            .iter_mut()
            .zip(descs.chunks_exact(RANGE_HEAD))
        {
            let len = u16::from_le_bytes([d[2], d[3]]) as usize;
            let Some(data) = take(&mut at, len) else {
                return bad(format!("entry {i} (page {pfn}): data cut off"));
            };
            w.data = data;
        }
    }
    if at != payload.len() {
        return bad(format!(
            "{} bytes left after {pages} entries",
            payload.len() - at
        ));
    }
    Ok(writes)
}

#[cfg(test)]
mod tests;
