//! Tests of the redo log: record headers and tables (every bit flip refused), capacities, deltas, payload decoding of random input.

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
        version: RECORD_VERSION,
        half: 1,
        epoch: 77,
        image_uuid: h.uuid,
        pages: 3,
        payload_len: 300,
        state_slot: 1,
        state_len: 999,
        state_crc: 0x1234_5678,
        payload_crc: 0x9abc_def0,
        time_unix_ns: 5,
        applied_through: 0,
        offset: 0,
    }
}

#[test]
fn test_v1_capacity_matches_record_size_exhaustively() {
    assert_eq!(capacity_pages_v1(0), None);
    assert_eq!(capacity_pages_v1(4095), None);
    assert_eq!(capacity_pages_v1(4096), Some(0));
    assert_eq!(capacity_pages_v1(8192), Some(0));
    assert_eq!(capacity_pages_v1(3 * 4096), Some(1));
    for blocks in 1..3000u64 {
        let half = blocks * BLOCK;
        let n = capacity_pages_v1(half).unwrap();
        assert!(record_bytes(n) <= half, "{blocks}");
        assert!(record_bytes(n + 1) > half, "{blocks}");
    }
    // 64 MiB half: 16384 blocks, 32 of them table, one header.
    assert_eq!(capacity_pages_v1(64 << 20), Some(16384 - 1 - 32));
}

#[test]
fn test_capacity_is_whole_pages_in_the_payload_room() {
    assert_eq!(capacity_pages(4095), None);
    assert_eq!(capacity_pages(4096), Some(0));
    assert_eq!(payload_room(4096), Some(0));
    assert_eq!(payload_room(3 * 4096 + 100), Some(2 * 4096));
    assert_eq!(capacity_pages(3 * 4096), Some(1));
    for n in 0..2000u64 {
        let mut p = Payload::default();
        let page = vec![7u8; PAGE as usize];
        for i in 0..n.min(3) {
            p.push_full(i, &page);
        }
        assert_eq!(p.bytes().len() as u64, n.min(3) * FULL_ENTRY);
        let half = BLOCK + n * FULL_ENTRY;
        assert!(capacity_pages(half).unwrap() <= n, "{n}");
    }
    // 64 MiB half: one header block, then entries of 4110 bytes.
    assert_eq!(capacity_pages(64 << 20), Some(((64 << 20) - 4096) / 4110));
}

#[test]
fn half_bytes_for_is_the_smallest_half_that_holds_the_pages() {
    for n in (0..3000u64).chain([16_384, 65_536, 262_144]) {
        let half = half_bytes_for(n);
        assert_eq!(half % BLOCK, 0, "{n}");
        assert!(capacity_pages(half).unwrap() >= n, "{n}");
        assert!(
            half == BLOCK || capacity_pages(half - BLOCK).unwrap() < n,
            "{n}: one block less would do"
        );
    }
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
    assert_eq!(r.check(&h, 1, 0), Ok(()));
    assert_eq!(
        r.check(&h, 0, 0),
        Err(RecordError::WrongHalf {
            written: 1,
            found: 0
        })
    );
    let foreign = RecordHeader {
        image_uuid: Uuid([9; 16]),
        ..r.clone()
    };
    assert!(matches!(
        foreign.check(&h, 1, 0),
        Err(RecordError::Foreign(_))
    ));
    let big = RecordHeader {
        version: RECORD_VERSION_1,
        pages: 100,
        ..r.clone()
    };
    assert!(matches!(
        big.check(&h, 1, 0),
        Err(RecordError::TooManyPages { capacity: 8, .. })
    ));
    // v2 is bounded by bytes: 10 blocks a half, one of them the header.
    let fits = RecordHeader {
        pages: 100,
        payload_len: 9 * BLOCK,
        ..r.clone()
    };
    assert_eq!(fits.check(&h, 1, 0), Ok(()));
    let long = RecordHeader {
        payload_len: 9 * BLOCK + 1,
        ..r.clone()
    };
    assert_eq!(
        long.check(&h, 1, 0),
        Err(RecordError::PayloadTooLong {
            len: 9 * BLOCK + 1,
            room: 9 * BLOCK
        })
    );
    // A v1 header round-trips too, its payload length implied.
    let v1 = RecordHeader {
        version: RECORD_VERSION_1,
        payload_len: BLOCK + 3 * PAGE,
        ..r.clone()
    };
    assert_eq!(RecordHeader::parse(&v1.encode()).unwrap(), v1);
    // A v3 header carries its place in the half and its applied epoch,
    // and is checked against where it is found and what room is left.
    let v3 = RecordHeader {
        version: RECORD_VERSION_3,
        applied_through: 75,
        offset: 2 * BLOCK,
        ..r.clone()
    };
    assert_eq!(RecordHeader::parse(&v3.encode()).unwrap(), v3);
    assert_eq!(v3.check(&h, 1, 2 * BLOCK), Ok(()));
    assert_eq!(
        v3.check(&h, 1, 0),
        Err(RecordError::WrongOffset {
            written: 2 * BLOCK,
            found: 0
        })
    );
    let v3_long = RecordHeader {
        payload_len: 7 * BLOCK + 1,
        ..v3.clone()
    };
    assert!(matches!(
        v3_long.check(&h, 1, 2 * BLOCK),
        Err(RecordError::PayloadTooLong { room, .. }) if room == 7 * BLOCK
    ));
    for (applied, offset) in [(77, 0), (78, 0), (0, 100)] {
        let bad = RecordHeader {
            applied_through: applied,
            offset,
            ..v3.clone()
        };
        assert!(
            matches!(
                RecordHeader::parse(&bad.encode()),
                Err(RecordError::BadHeader(_))
            ),
            "applied {applied}, offset {offset}"
        );
    }
    let long = RecordHeader {
        state_len: 1 << 30,
        ..r
    };
    assert!(matches!(
        long.check(&h, 1, 0),
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
            // 2 -> 3: another version this binary reads.
            8 if bit % 8 == 0 => matches!(e, RecordError::HeaderCrc { .. }),
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
            let version = [RECORD_VERSION_1, RECORD_VERSION, RECORD_VERSION_3][i / 2 % 3];
            b[..8].copy_from_slice(&RECORD_MAGIC);
            b[8..12].copy_from_slice(&version.to_le_bytes());
            b[12..16].copy_from_slice(&128u32.to_le_bytes());
            b[R_RESERVED0..R_RESERVED0 + 4].fill(0);
            b[match version {
                RECORD_VERSION_1 => R_RESERVED1_V1,
                RECORD_VERSION_3 => R_RESERVED1_V3,
                _ => R_RESERVED1,
            }..]
                .fill(0);
            let crc = crc_with_hole(&b, R_CRC);
            b[R_CRC..R_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        }
        if let Ok(r) = RecordHeader::parse(&b) {
            assert_eq!(r.encode(), b);
            let _ = r.check(&h, i % 2, r.offset);
        }
    }
}

/// `old` with the writes of `payload` (entries for page 0 only) applied.
fn applied(old: &[u8], payload: &Payload) -> Vec<u8> {
    let mut page = old.to_vec();
    let writes = decode_writes(
        RECORD_VERSION,
        payload.bytes(),
        payload.pfns().len() as u64,
        1,
    )
    .unwrap();
    for w in writes {
        page[w.offset..w.offset + w.data.len()].copy_from_slice(w.data);
    }
    page
}

#[test]
fn test_delta_rebuilds_the_new_page_from_the_old() {
    let mut rng = crate::nvram::test_rng::Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..3000 {
        let old = rng.bytes(PAGE as usize);
        let mut new = old.clone();
        // Few scattered words, a run, bytes at the page's ends, or all.
        match case % 5 {
            0 => {
                for _ in 0..=rng.below(8) {
                    let at = rng.below(PAGE) as usize;
                    new[at] ^= 1 + rng.below(255) as u8;
                }
            }
            1 => {
                let at = rng.below(PAGE - 300) as usize;
                new[at..at + 1 + rng.below(299) as usize].fill(0x5a);
            }
            2 => {
                new[0] ^= 1;
                new[PAGE as usize - 1] ^= 0x80;
            }
            3 => new = rng.bytes(PAGE as usize),
            _ => {}
        }
        let mut p = Payload::default();
        let logged = p.push_delta(case, &old, &new);
        assert_eq!(logged, old != new, "case {case}");
        if !logged {
            assert!(p.is_empty() && p.bytes().is_empty());
            continue;
        }
        assert_eq!(p.pfns(), [case]);
        assert!(p.bytes().len() as u64 <= FULL_ENTRY, "case {case}");
        let writes = decode_writes(RECORD_VERSION, p.bytes(), 1, case + 1).unwrap();
        assert!(writes.iter().all(|w| w.pfn == case && w.entry == 0));
        let mut rebuilt = old.clone();
        for w in writes {
            rebuilt[w.offset..w.offset + w.data.len()].copy_from_slice(w.data);
        }
        assert!(rebuilt == new, "case {case}");
    }
}

#[test]
fn test_small_changes_log_small_and_large_ones_whole() {
    let old = vec![0u8; PAGE as usize];
    let mut new = old.clone();
    new[100] = 1; // word 96..104
    new[110] = 2; // word 104..112: adjacent, one range
    new[2000] = 3; // word 2000..2008: another range
    let mut p = Payload::default();
    assert!(p.push_delta(0, &old, &new));
    // Entry head, two ranges, 16 + 8 bytes.
    assert_eq!(p.bytes().len(), ENTRY_HEAD + 2 * RANGE_HEAD + 24);
    assert_eq!(applied(&old, &p), new);
    // Words 16 bytes apart merge into one range (MERGE_GAP).
    let mut near = old.clone();
    near[0] = 1;
    near[24] = 1;
    let mut p = Payload::default();
    assert!(p.push_delta(0, &old, &near));
    assert_eq!(p.bytes().len(), ENTRY_HEAD + RANGE_HEAD + 32);
    // One changed word in every four: a range each (24 unchanged bytes
    // between them cost more than a descriptor).
    let mut striped = old.clone();
    for w in (0..PAGE as usize).step_by(32) {
        striped[w] = 9;
    }
    let mut p = Payload::default();
    assert!(p.push_delta(0, &old, &striped));
    assert_eq!(p.bytes().len(), ENTRY_HEAD + 128 * (RANGE_HEAD + 8));
    assert_eq!(applied(&old, &p), striped);
    // Most words changed (a page rewritten), one kept: whole at once.
    let mut rewritten: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8 + 1).collect();
    rewritten[..8].fill(0);
    let mut p = Payload::default();
    assert!(p.push_delta(0, &old, &rewritten));
    assert_eq!(p.bytes().len() as u64, FULL_ENTRY);
    assert_eq!(applied(&old, &p), rewritten);
    // Every word changed: the page whole, one range.
    let mut p = Payload::default();
    assert!(p.push_delta(0, &old, &vec![1u8; PAGE as usize]));
    assert_eq!(p.bytes().len() as u64, FULL_ENTRY);
    assert_eq!(&p.bytes()[8..14], &[1, 0, 0, 0, 0, 16]);
}

#[test]
fn test_payload_decode_refuses_malformed_entries() {
    let page = vec![1u8; PAGE as usize];
    let mut p = Payload::default();
    p.push_full(3, &page);
    let mut old = page.clone();
    old[8] = 0;
    p.push_delta(5, &old, &page);
    let good = p.bytes().to_vec();
    assert_eq!(decode_writes(RECORD_VERSION, &good, 2, 6).unwrap().len(), 2);
    let refused = |b: &[u8], pages: u64, ram: u64| {
        matches!(
            decode_writes(RECORD_VERSION, b, pages, ram),
            Err(RecordError::BadTable(_))
        )
    };
    assert!(refused(&good, 2, 5), "page 5 outside 5 pages of RAM");
    assert!(refused(&good, 1, 6), "bytes left over");
    assert!(refused(&good, 3, 6), "an entry missing");
    assert!(refused(&good[..good.len() - 1], 2, 6), "data cut off");
    assert!(refused(&good[..9], 1, 6), "entry head cut off");
    let second = FULL_ENTRY as usize; // where entry 1 starts
    let mut zero_ranges = good.clone();
    zero_ranges[second + 8..second + 10].fill(0);
    assert!(refused(&zero_ranges, 2, 6), "no range");
    let mut empty_range = good.clone();
    empty_range[second + 12..second + 14].fill(0);
    assert!(refused(&empty_range, 2, 6), "empty range");
    let mut outside = good.clone();
    outside[second + 10..second + 12].copy_from_slice(&4095u16.to_le_bytes());
    assert!(refused(&outside, 2, 6), "range past the page");
    // Ranges out of order.
    let mut two = Payload::default();
    let mut far = old.clone();
    far[4000] = 7;
    two.push_delta(0, &page, &far);
    let mut b = two.bytes().to_vec();
    assert_eq!(u16::from_le_bytes([b[8], b[9]]), 2);
    let (r0, r1) = (b[10..14].to_vec(), b[14..18].to_vec());
    b[10..14].copy_from_slice(&r1);
    b[14..18].copy_from_slice(&r0);
    assert!(refused(&b, 1, 1), "ranges out of order");
}

#[test]
fn test_v1_payload_decodes_to_whole_pages() {
    let pfns = [4u64, 2];
    let mut payload = encode_table(&pfns);
    payload.extend(vec![0xaa; PAGE as usize]);
    payload.extend(vec![0xbb; PAGE as usize]);
    let w = decode_writes(RECORD_VERSION_1, &payload, 2, 8).unwrap();
    assert_eq!(w.len(), 2);
    assert_eq!((w[0].entry, w[0].pfn, w[0].offset), (0, 4, 0));
    assert_eq!((w[1].entry, w[1].pfn, w[1].data[0]), (1, 2, 0xbb));
    assert!(decode_writes(RECORD_VERSION_1, &payload[..payload.len() - 1], 2, 8).is_err());
    assert!(decode_writes(RECORD_VERSION_1, &payload, 2, 4).is_err());
}

#[test]
fn test_payload_decode_never_panics_on_random_input() {
    let mut rng = crate::nvram::test_rng::Rng(0x1234_5678_9abc_def1);
    for i in 0..20_000u64 {
        let len = rng.below(200) as usize;
        let mut b = rng.bytes(len);
        if len >= 10 && i % 2 == 0 {
            // A plausible head: small pfn and range count.
            b[..8].copy_from_slice(&(i % 4).to_le_bytes());
            b[8..10].copy_from_slice(&(1 + (i % 3) as u16).to_le_bytes());
        }
        let _ = decode_writes(RECORD_VERSION, &b, 1 + i % 3, 4);
        let _ = decode_writes(RECORD_VERSION_1, &b, i % 3, 4);
    }
}
