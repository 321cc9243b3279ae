//! The redo log's on-NVRAM format (epoch mode): where the two log halves lie,
//! how many pages a record may carry, and the record header and page-number
//! table as pure little-endian encode/parse functions with no file behind
//! them (the tests and the fuzzer feed them anything).
//!
//! A record is one epoch's dirty pages: a 4 KiB header block, the page-number
//! table (one u64 per page, zero-padded to 4 KiB) and the page data. It is
//! self-validating: the header carries CRCs of itself, of the table and data
//! (the "payload"), and of the machine state the epoch saved in a state slot.
//! `docs/nvram-format.md` ("Redo log") is the long form of this file.
//!
//! Every length read from an image is untrusted: parsers check sizes before
//! reading, never allocate from a stored length, and never panic.

use super::layout::{all_zero, crc_with_hole, le_u32, le_u64, put, Header, Region, Uuid, BLOCK};

/// Magic at offset 0 of every log record.
pub const RECORD_MAGIC: [u8; 8] = *b"NVHVLOGR";
/// The record format version this binary writes and reads.
pub const RECORD_VERSION: u32 = 1;
/// Bytes of the record header covered by its CRC (the rest of the 4 KiB header block is zero).
pub const RECORD_HEADER_LEN: usize = 128;
/// Guest page size: the unit of the log.
pub const PAGE: u64 = 4096;
/// Page numbers per 4 KiB table block.
const PFNS_PER_BLOCK: u64 = BLOCK / 8;

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
const R_RESERVED1: usize = 88; // 40 bytes up to RECORD_HEADER_LEN

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
    #[error("record format {0}, this nvhv reads {RECORD_VERSION}")]
    Version(u32),
    /// The header length is not v1's.
    #[error("header length {0}, v1 uses {RECORD_HEADER_LEN}")]
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
    /// The record says it was written to the other half.
    #[error("written for log half {written}, found in half {found}")]
    WrongHalf {
        /// Half named in the header.
        written: usize,
        /// Half it was read from.
        found: usize,
    },
    /// More pages than a half of this image's log can hold.
    #[error("{pages} pages exceed the half's capacity of {capacity}")]
    TooManyPages {
        /// Pages in the header.
        pages: u64,
        /// Capacity of one half.
        capacity: u64,
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
    /// The table names a page outside guest RAM, or its padding is not zero.
    #[error("page table: {0}")]
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

/// Bytes of the page-number table for `pages` pages (a multiple of 4 KiB).
pub fn table_bytes(pages: u64) -> u64 {
    pages.div_ceil(PFNS_PER_BLOCK) * BLOCK
}

/// Bytes of a whole record with `pages` pages: header block, table, data.
pub fn record_bytes(pages: u64) -> u64 {
    BLOCK + table_bytes(pages) + pages * PAGE
}

/// The most pages one record may carry in a half of `half_bytes` bytes, or
/// `None` when not even an empty record fits.
pub fn capacity_pages(half_bytes: u64) -> Option<u64> {
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
    /// The log half (0 or 1) the record was written to.
    pub half: usize,
    /// The epoch this record commits.
    pub epoch: u64,
    /// The UUID of the image the record belongs to.
    pub image_uuid: Uuid,
    /// Pages in the record.
    pub pages: u64,
    /// The state slot (0 or 1) holding this epoch's machine state.
    pub state_slot: usize,
    /// Bytes of machine state in that slot.
    pub state_len: u64,
    /// CRC32C of those bytes.
    pub state_crc: u32,
    /// CRC32C of the page-number table (padded) followed by the page data.
    pub payload_crc: u32,
    /// Wall-clock time of the commit, nanoseconds since the Unix epoch (informational).
    pub time_unix_ns: u64,
}

impl RecordHeader {
    /// The header record bytes, CRC included.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        put(&mut b, R_MAGIC, &RECORD_MAGIC);
        put(&mut b, R_VERSION, &RECORD_VERSION.to_le_bytes());
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
        if version != RECORD_VERSION {
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
        if !all_zero(&b[R_RESERVED0..R_RESERVED0 + 4]) || !all_zero(&b[R_RESERVED1..]) {
            return bad("reserved bytes are not zero".into());
        }
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
        Ok(RecordHeader {
            half,
            epoch: le_u64(b, R_EPOCH),
            image_uuid: Uuid(uuid),
            pages: le_u64(b, R_PAGES),
            state_slot,
            state_len: le_u64(b, R_STATE_LEN),
            state_crc: le_u32(b, R_STATE_CRC),
            payload_crc: le_u32(b, R_PAYLOAD_CRC),
            time_unix_ns: le_u64(b, R_TIME),
        })
    }

    /// Checks the header against the image it was found in, read from log
    /// half `found_in`: same UUID, same half, page count within the half's
    /// capacity, state within its slot.
    pub fn check(&self, header: &Header, found_in: usize) -> Result<(), RecordError> {
        if self.image_uuid != header.uuid {
            return Err(RecordError::Foreign(self.image_uuid));
        }
        if self.half != found_in {
            return Err(RecordError::WrongHalf {
                written: self.half,
                found: found_in,
            });
        }
        let half = half_region(header.geometry.log, found_in);
        let capacity = capacity_pages(half.size).unwrap_or(0);
        if self.pages > capacity {
            return Err(RecordError::TooManyPages {
                pages: self.pages,
                capacity,
            });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::layout::{ImageConfig, PersistMode};

    fn header() -> Header {
        let cfg = ImageConfig {
            ram_bytes: 1 << 20,
            vcpus: 1,
            guest: "t".into(),
            persist: PersistMode::Epoch,
            log_bytes: 20 * BLOCK,
        };
        Header::new(&cfg, Uuid::from_random([3; 16]), 1, 2).unwrap()
    }

    fn record(h: &Header) -> RecordHeader {
        RecordHeader {
            half: 1,
            epoch: 77,
            image_uuid: h.uuid,
            pages: 3,
            state_slot: 1,
            state_len: 999,
            state_crc: 0x1234_5678,
            payload_crc: 0x9abc_def0,
            time_unix_ns: 5,
        }
    }

    #[test]
    fn test_capacity_matches_record_size_exhaustively() {
        assert_eq!(capacity_pages(0), None);
        assert_eq!(capacity_pages(4095), None);
        assert_eq!(capacity_pages(4096), Some(0));
        assert_eq!(capacity_pages(8192), Some(0));
        assert_eq!(capacity_pages(3 * 4096), Some(1));
        for blocks in 1..3000u64 {
            let half = blocks * BLOCK;
            let n = capacity_pages(half).unwrap();
            assert!(record_bytes(n) <= half, "{blocks}");
            assert!(record_bytes(n + 1) > half, "{blocks}");
        }
        // 64 MiB half: 16384 blocks, 32 of them table, one header.
        assert_eq!(capacity_pages(64 << 20), Some(16384 - 1 - 32));
    }

    #[test]
    fn test_half_regions_split_the_log() {
        let log = Region {
            offset: 8192,
            size: 5 * BLOCK,
        };
        assert_eq!(
            half_region(log, 0),
            Region {
                offset: 8192,
                size: 2 * BLOCK
            }
        );
        assert_eq!(half_region(log, 1).offset, 8192 + 2 * BLOCK);
        assert_eq!(half_region(Region { offset: 0, size: 0 }, 1).size, 0);
    }

    #[test]
    fn test_record_header_round_trip_and_check() {
        let h = header();
        let r = record(&h);
        let b = r.encode();
        assert_eq!(RecordHeader::parse(&b).unwrap(), r);
        assert_eq!(r.check(&h, 1), Ok(()));
        assert_eq!(
            r.check(&h, 0),
            Err(RecordError::WrongHalf {
                written: 1,
                found: 0
            })
        );
        let foreign = RecordHeader {
            image_uuid: Uuid([9; 16]),
            ..r.clone()
        };
        assert!(matches!(foreign.check(&h, 1), Err(RecordError::Foreign(_))));
        let big = RecordHeader {
            pages: 100,
            ..r.clone()
        };
        assert!(matches!(
            big.check(&h, 1),
            Err(RecordError::TooManyPages { capacity: 8, .. })
        ));
        let long = RecordHeader {
            state_len: 1 << 30,
            ..r
        };
        assert!(matches!(
            long.check(&h, 1),
            Err(RecordError::StateTooLong { .. })
        ));
        assert_eq!(RecordHeader::parse(&[0; 4096]), Err(RecordError::Blank));
        assert_eq!(RecordHeader::parse(&b[..100]), Err(RecordError::NoRoom));
    }

    #[test]
    fn test_record_header_every_bit_flip_is_rejected() {
        let b = record(&header()).encode();
        for bit in 0..RECORD_HEADER_LEN * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            let e = RecordHeader::parse(&c).unwrap_err();
            let ok = match bit / 8 {
                0..=7 => e == RecordError::Magic,
                8..=11 => matches!(e, RecordError::Version(_)),
                12..=15 => matches!(e, RecordError::Length(_)),
                _ => matches!(e, RecordError::HeaderCrc { .. }),
            };
            assert!(ok, "bit {bit}: {e}");
        }
    }

    #[test]
    fn test_table_round_trip_and_faults() {
        let pfns = [3u64, 4, 5, 9, 0, 255];
        let t = encode_table(&pfns);
        assert_eq!(t.len(), 4096);
        assert_eq!(decode_table(&t, 6, 256).unwrap(), pfns);
        assert!(matches!(
            decode_table(&t, 6, 255),
            Err(RecordError::BadTable(m)) if m.contains("outside")
        ));
        let mut p = t.clone();
        p[4000] = 1;
        assert!(matches!(
            decode_table(&p, 6, 256),
            Err(RecordError::BadTable(m)) if m.contains("padding")
        ));
        assert!(decode_table(&t, 513, 256).is_err());
        assert!(encode_table(&[]).is_empty());
        assert_eq!(encode_table(&[0; 513]).len(), 8192);
    }

    #[test]
    fn test_runs_split_at_gaps() {
        let v: Vec<_> = runs(&[1, 2, 3, 7, 8, 2, u64::MAX, 0]).collect();
        assert_eq!(v, [(0, 3), (3, 2), (5, 1), (6, 1), (7, 1)]);
        assert_eq!(runs(&[]).count(), 0);
    }

    #[test]
    fn test_parse_never_panics_on_random_input() {
        let mut rng = crate::nvram::test_rng::Rng(0x2545_f491_4f6c_dd1d);
        let h = header();
        for i in 0..20_000 {
            let mut b = [0u8; RECORD_HEADER_LEN];
            b.copy_from_slice(&rng.bytes(RECORD_HEADER_LEN));
            if i % 2 == 0 {
                b[..8].copy_from_slice(&RECORD_MAGIC);
                b[8..12].copy_from_slice(&1u32.to_le_bytes());
                b[12..16].copy_from_slice(&128u32.to_le_bytes());
                b[R_RESERVED0..R_RESERVED0 + 4].fill(0);
                b[R_RESERVED1..].fill(0);
                let crc = crc_with_hole(&b, R_CRC);
                b[R_CRC..R_CRC + 4].copy_from_slice(&crc.to_le_bytes());
            }
            if let Ok(r) = RecordHeader::parse(&b) {
                assert_eq!(r.encode(), b);
                let _ = r.check(&h, i % 2);
            }
        }
    }
}
