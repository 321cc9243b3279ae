//! Tests of the on-NVRAM layout: header and meta-record round trips, every bit flip and bad field refused, the choice of the current meta record.

use super::*;
use crate::nvram::test_rng::Rng;

fn cfg() -> ImageConfig {
    ImageConfig {
        ram_bytes: 64 << 20,
        vcpus: 2,
        guest: "counter".into(),
        persist: PersistMode::SuspendOnly,
        log_bytes: 1 << 20,
    }
}

fn header() -> Header {
    Header::new(&cfg(), Uuid::from_random([7; 16]), 1_700_000_000, 5).unwrap()
}

fn meta(h: &Header, epoch: u64) -> Meta {
    Meta {
        epoch,
        status: Status::Suspended,
        state_slot: (epoch % 2) as usize,
        state_len: 100,
        state_crc: 0xdead_beef,
        log_head: 0,
        log_tail: 0,
        image_uuid: h.uuid,
        time_unix_ns: 42,
    }
}

/// Re-computes a header's CRC after a test changed its bytes.
fn reseal_header(b: &mut [u8]) {
    let crc = crc_with_hole(&b[..HEADER_LEN], H_CRC);
    b[H_CRC..H_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

fn reseal_meta(b: &mut [u8]) {
    let crc = crc_with_hole(&b[..META_LEN], M_CRC);
    b[M_CRC..M_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn test_header_round_trip() {
    let h = header();
    let b = h.encode();
    assert_eq!(Header::parse(&b).unwrap(), h);
    let mut block = vec![0u8; HEADER_BLOCK as usize];
    block[..HEADER_LEN].copy_from_slice(&b);
    assert_eq!(Header::parse(&block).unwrap(), h);
    assert_eq!(h.config, cfg());
}

#[test]
fn test_geometry_v1_layout() {
    let g = header().geometry;
    assert_eq!(
        g.meta[0],
        Region {
            offset: 4096,
            size: 4096
        }
    );
    assert_eq!(
        g.meta[1],
        Region {
            offset: 8192,
            size: 4096
        }
    );
    assert_eq!(
        g.state[0],
        Region {
            offset: 12288,
            size: 192 << 10
        }
    );
    assert_eq!(g.state[1].offset, g.state[0].end());
    assert_eq!(g.log.offset, g.state[1].end());
    assert_eq!(g.log.size, 1 << 20);
    assert_eq!(g.ram.offset, 2 << 20);
    assert_eq!(g.image_len(), (2 << 20) + (64 << 20));
    // Largest VM: 64 vCPUs, state slots of 4 MiB + 64 KiB each.
    let g = Geometry::for_config(nvhv_abi::MAX_VCPUS, 4096, 4095).unwrap();
    assert_eq!(g.log.size, 4096);
    assert_eq!(g.ram.offset % RAM_ALIGN, 0);
}

#[test]
fn test_config_rejects_bad_shapes() {
    let mut c = cfg();
    c.guest = "x".repeat(65);
    assert!(matches!(
        Header::new(&c, Uuid([0; 16]), 0, 0),
        Err(FormatError::Config(_))
    ));
    c.guest = "x".repeat(64);
    assert!(Header::new(&c, Uuid([0; 16]), 0, 0).is_ok());
    for (vcpus, ram, log) in [
        (0, 4096, 0),
        (65, 4096, 0),
        (1, 0, 0),
        (1, 4097, 0),
        (1, 4096, u64::MAX),
        (1, u64::MAX - 4095, 0),
    ] {
        assert!(
            matches!(
                Geometry::for_config(vcpus, ram, log),
                Err(FormatError::Config(_))
            ),
            "{vcpus} {ram} {log}"
        );
    }
}

#[test]
fn test_header_parse_empty_and_short() {
    assert_eq!(Header::parse(&[]), Err(FormatError::Empty));
    let b = header().encode();
    for n in [1, 7, 8, 15, 16, 100, HEADER_LEN - 1] {
        assert!(
            matches!(Header::parse(&b[..n]), Err(FormatError::TooShort { .. })),
            "cut at {n}"
        );
    }
}

#[test]
fn test_header_parse_recognises_foreign_magic() {
    let mut elf = vec![0u8; 4096];
    elf[..4].copy_from_slice(b"\x7fELF");
    let e = Header::parse(&elf).unwrap_err();
    assert!(matches!(e, FormatError::BadMagic { looks_like: Some(s) } if s.contains("ELF")));
    assert!(e.to_string().starts_with("not an nvhv image"));
    let mut qcow = vec![0u8; 4096];
    qcow[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
    let e = Header::parse(&qcow).unwrap_err();
    assert!(matches!(e, FormatError::BadMagic { looks_like: Some(s) } if s.contains("qcow2")));
    let e = Header::parse(&Rng(1).bytes(4096)).unwrap_err();
    assert_eq!(e, FormatError::BadMagic { looks_like: None });
    assert_eq!(e.to_string(), "not an nvhv image");
    // A header block of zeros: a creation that never finished (the
    // header is written last). One byte set anywhere in it is not that.
    let e = Header::parse(&[0u8; 4096]).unwrap_err();
    assert!(e.to_string().contains("creation never finished"), "{e}");
    let mut b = [0u8; 4096];
    b[HEADER_LEN - 1] = 1;
    assert_eq!(
        Header::parse(&b).unwrap_err(),
        FormatError::BadMagic { looks_like: None }
    );
}

#[test]
fn test_header_parse_wrong_version_resealed() {
    let mut b = header().encode();
    b[H_VERSION..H_VERSION + 4].copy_from_slice(&4u32.to_le_bytes());
    reseal_header(&mut b);
    let e = Header::parse(&b).unwrap_err();
    assert_eq!(e, FormatError::UnsupportedVersion { found: 4 });
    assert_eq!(e.to_string(), "image format 4, this nvhv reads 1 to 3");
    // Formats 1 and 2 (the same layout, older log protocols) are read.
    for old in [FORMAT_VERSION_1, FORMAT_VERSION_2] {
        b[H_VERSION..H_VERSION + 4].copy_from_slice(&old.to_le_bytes());
        reseal_header(&mut b);
        assert_eq!(Header::parse(&b).unwrap().format_version, old);
    }
}

#[test]
fn test_header_every_bit_flip_is_rejected() {
    let b = header().encode();
    for bit in 0..HEADER_LEN * 8 {
        let mut c = b;
        c[bit / 8] ^= 1 << (bit % 8);
        let e = Header::parse(&c).unwrap_err();
        let expected = match bit / 8 {
            0..=7 => matches!(e, FormatError::BadMagic { .. }),
            // 3 -> 2 or 1: another format this binary reads.
            8 if bit % 8 < 2 => matches!(e, FormatError::HeaderCrc { .. }),
            8..=11 => matches!(e, FormatError::UnsupportedVersion { .. }),
            12..=15 => matches!(e, FormatError::BadHeader(_)),
            _ => matches!(e, FormatError::HeaderCrc { .. }),
        };
        assert!(expected, "bit {bit}: {e}");
    }
}

#[test]
fn test_header_geometry_faults_resealed() {
    let h = header();
    fn region_at(i: usize) -> usize {
        H_REGIONS + 16 * i
    }
    type Patch = Box<dyn Fn(&mut [u8])>;
    let cases: Vec<(&str, Patch)> = vec![
        (
            "state 1 overlaps state 0",
            Box::new(move |b| {
                let off = h.geometry.state[0].offset + 4096;
                b[region_at(3)..region_at(3) + 8].copy_from_slice(&off.to_le_bytes());
            }),
        ),
        (
            "meta 1 overlaps meta 0",
            Box::new(|b| {
                b[region_at(1)..region_at(1) + 8].copy_from_slice(&4096u64.to_le_bytes());
            }),
        ),
        (
            "meta 0 inside the header",
            Box::new(|b| {
                b[region_at(0)..region_at(0) + 8].copy_from_slice(&0u64.to_le_bytes());
            }),
        ),
        (
            "misaligned RAM",
            Box::new(|b| {
                b[region_at(5)..region_at(5) + 8]
                    .copy_from_slice(&((4u64 << 20) + 4096).to_le_bytes());
            }),
        ),
        (
            "unaligned log",
            Box::new(|b| {
                b[region_at(4) + 8..region_at(4) + 16].copy_from_slice(&100u64.to_le_bytes());
            }),
        ),
        (
            "ram_bytes 0",
            Box::new(|b| {
                b[region_at(5) + 8..region_at(5) + 16].copy_from_slice(&0u64.to_le_bytes());
            }),
        ),
        (
            "RAM end overflows",
            Box::new(|b| {
                b[region_at(5) + 8..region_at(5) + 16]
                    .copy_from_slice(&(u64::MAX - 4095).to_le_bytes());
            }),
        ),
        (
            "huge state slot",
            Box::new(|b| {
                let s = MAX_STATE_SLOT + 4096;
                b[region_at(2) + 8..region_at(2) + 16].copy_from_slice(&s.to_le_bytes());
                b[region_at(3) + 8..region_at(3) + 16].copy_from_slice(&s.to_le_bytes());
            }),
        ),
        (
            "vcpus 0",
            Box::new(|b| b[H_VCPUS..H_VCPUS + 4].copy_from_slice(&0u32.to_le_bytes())),
        ),
        (
            "vcpus 65",
            Box::new(|b| b[H_VCPUS..H_VCPUS + 4].copy_from_slice(&65u32.to_le_bytes())),
        ),
    ];
    for (name, change) in cases {
        let mut b = header().encode();
        change(&mut b);
        reseal_header(&mut b);
        let e = Header::parse(&b).unwrap_err();
        assert!(matches!(e, FormatError::Geometry(_)), "{name}: {e}");
    }
}

#[test]
fn test_header_field_faults_resealed() {
    let cases: [(usize, u8); 5] = [
        (H_PERSIST, 9),
        (H_GUEST_LEN, 65),
        (H_FLAGS, 1),
        (H_RESERVED1, 1),
        (H_GUEST + 63, b'x'),
    ];
    for (at, v) in cases {
        let mut b = header().encode();
        b[at] = v;
        reseal_header(&mut b);
        assert!(
            matches!(Header::parse(&b), Err(FormatError::BadHeader(_))),
            "offset {at}"
        );
    }
    let mut b = header().encode();
    b[H_GUEST] = 0xff;
    reseal_header(&mut b);
    assert!(matches!(Header::parse(&b), Err(FormatError::BadHeader(m)) if m.contains("UTF-8")));
}

#[test]
fn test_meta_round_trip_and_faults() {
    let h = header();
    let m = meta(&h, 9);
    let b = m.encode();
    assert_eq!(Meta::parse(&b).unwrap(), m);
    assert_eq!(m.check(&h), Ok(()));
    assert_eq!(Meta::parse(&[0; 4096]), Err(FormatError::MetaBlank));
    assert!(matches!(
        Meta::parse(&b[..95]),
        Err(FormatError::MetaTooShort { .. })
    ));
    for bit in 0..META_LEN * 8 {
        let mut c = b;
        c[bit / 8] ^= 1 << (bit % 8);
        assert!(Meta::parse(&c).is_err(), "bit {bit}");
    }
    let mut c = b;
    c[M_STATUS] = 7;
    reseal_meta(&mut c);
    assert!(matches!(Meta::parse(&c), Err(FormatError::BadMeta(_))));
    let mut c = b;
    c[M_SLOT] = 2;
    reseal_meta(&mut c);
    assert!(matches!(Meta::parse(&c), Err(FormatError::BadMeta(_))));
    let mut other = m.clone();
    other.image_uuid = Uuid([1; 16]);
    assert!(matches!(other.check(&h), Err(FormatError::MetaForeign(_))));
    let mut big = m.clone();
    big.state_len = h.geometry.state[1].size + 1;
    assert!(matches!(big.check(&h), Err(FormatError::BadMeta(_))));
    let mut log = m;
    log.log_tail = h.log_bytes() + 1;
    assert!(matches!(log.check(&h), Err(FormatError::BadMeta(_))));
}

#[test]
fn test_select_meta_picks_highest_valid_epoch() {
    let h = header();
    let (m4, m5) = (meta(&h, 4).encode(), meta(&h, 5).encode());
    let s = select_meta(&h, &m4, &m5).unwrap();
    assert_eq!((s.current_block, s.current.epoch), (1, 5));
    let s = select_meta(&h, &m5, &m4).unwrap();
    assert_eq!((s.current_block, s.current.epoch), (0, 5));
    // A torn record for epoch 5: the first half written, the rest still epoch 3's.
    let m3 = Meta {
        time_unix_ns: 1,
        ..meta(&h, 3)
    }
    .encode();
    let mut torn = m3;
    torn[..META_LEN / 2].copy_from_slice(&m5[..META_LEN / 2]);
    let s = select_meta(&h, &m4, &torn).unwrap();
    assert_eq!((s.current_block, s.current.epoch), (0, 4));
    assert!(matches!(s.blocks[1], Err(FormatError::MetaCrc { .. })));
    assert!(matches!(
        select_meta(&h, &torn, &[0; 96]),
        Err(FormatError::NoValidMeta { .. })
    ));
    assert_eq!(select_meta(&h, &m4, &m4), Err(FormatError::MetaConflict(4)));
}

#[test]
fn test_parsers_never_panic_on_random_input() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let h = header();
    let good = h.encode();
    for i in 0..20_000 {
        let n = (rng.next() % 400) as usize;
        let mut b = rng.bytes(n);
        if i % 2 == 0 && n >= 8 {
            b[..8].copy_from_slice(&MAGIC);
        }
        if i % 4 == 0 && n >= 12 {
            b[8..12].copy_from_slice(&1u32.to_le_bytes());
        }
        let _ = Header::parse(&b);
        let _ = Meta::parse(&b);
        let _ = select_meta(&h, &b, &b);
        // Mutate a few bytes of a valid header and reseal it: reaches the field checks.
        let mut c = good;
        for _ in 0..3 {
            let at = (rng.next() as usize) % HEADER_LEN;
            c[at] = rng.next() as u8;
        }
        c[..12].copy_from_slice(&good[..12]);
        reseal_header(&mut c);
        if let Ok(p) = Header::parse(&c) {
            assert!(p.geometry.validate().is_ok());
        }
    }
}

#[test]
fn test_uuid_display() {
    let u = Uuid::from_random([0xff; 16]);
    let s = u.to_string();
    assert_eq!(s.len(), 36);
    assert_eq!(&s[14..15], "4");
    assert_eq!(s, "ffffffff-ffff-4fff-bfff-ffffffffffff");
}
