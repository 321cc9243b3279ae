//! Feeds arbitrary bytes to the image header and meta-record parsers.
//!
//! Raw bytes rarely pass a magic and a CRC, so each input is also tried with
//! the magic, version and length forced and the CRC re-computed ("resealed"),
//! and XORed onto a valid header and meta records before resealing
//! ("overlaid"), which takes the mutations into the field, geometry and
//! selection checks. Invariants:
//! no parser panics; a record that parses re-encodes to the same bytes; a
//! parsed header's geometry is valid; the selected meta record is valid and
//! has the highest epoch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvhv::nvram::layout::{
    check_file_len, select_meta, Header, ImageConfig, Meta, PersistMode, Status, Uuid,
    FORMAT_VERSION, HEADER_LEN, MAGIC, META_LEN, META_MAGIC,
};

/// Offsets of the length and CRC fields (the same in header and meta records).
const LEN_AT: usize = 8 + 4;
const CRC_AT: usize = 16;
const META_LEN_AT: usize = 8;
const META_CRC_AT: usize = 12;

fn padded<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut b = [0u8; N];
    let n = bytes.len().min(N);
    b[..n].copy_from_slice(&bytes[..n]);
    b
}

fn reseal(b: &mut [u8], crc_at: usize) {
    b[crc_at..crc_at + 4].fill(0);
    let crc = crc32c::crc32c(b);
    b[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

fn resealed_header(bytes: &[u8]) -> [u8; HEADER_LEN] {
    let mut b = padded::<HEADER_LEN>(bytes);
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[LEN_AT..LEN_AT + 4].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    reseal(&mut b, CRC_AT);
    b
}

fn resealed_meta(bytes: &[u8], header: Option<&Header>) -> [u8; META_LEN] {
    let mut b = padded::<META_LEN>(bytes);
    b[..8].copy_from_slice(&META_MAGIC);
    b[META_LEN_AT..META_LEN_AT + 4].copy_from_slice(&(META_LEN as u32).to_le_bytes());
    if let Some(h) = header {
        // Make it belong to the header's image so `Meta::check` runs its other checks.
        b[64..80].copy_from_slice(&h.uuid.0);
    }
    reseal(&mut b, META_CRC_AT);
    b
}

fn check_header(bytes: &[u8]) -> Option<Header> {
    let h = Header::parse(bytes).ok()?;
    assert!(h.geometry.validate().is_ok());
    assert_eq!(
        &h.encode()[..],
        &bytes[..HEADER_LEN],
        "header does not round-trip"
    );
    assert!(check_file_len(&h, h.geometry.image_len()).is_ok());
    assert!(check_file_len(&h, h.geometry.image_len() - 1).is_err());
    Some(h)
}

fn check_meta(bytes: &[u8]) {
    if let Ok(m) = Meta::parse(bytes) {
        assert_eq!(
            &m.encode()[..],
            &bytes[..META_LEN],
            "meta record does not round-trip"
        );
    }
}

/// A valid header, the base that inputs are XORed onto.
fn base_header() -> Header {
    let cfg = ImageConfig {
        ram_bytes: 64 << 20,
        vcpus: 2,
        guest: "counter".into(),
        persist: PersistMode::SuspendOnly,
        log_bytes: 1 << 20,
    };
    // The config is fixed and valid; a failure here is a bug the fuzzer should report.
    Header::new(&cfg, Uuid::from_random([0x5a; 16]), 1_700_000_000, 0).expect("valid base config")
}

fn base_meta(h: &Header, epoch: u64) -> Meta {
    Meta {
        epoch,
        status: Status::Suspended,
        state_slot: (epoch % 2) as usize,
        state_len: 1000,
        state_crc: 0x1234_5678,
        log_head: 0,
        log_tail: 0,
        image_uuid: h.uuid,
        time_unix_ns: 1,
    }
}

fn xor<const N: usize>(base: [u8; N], delta: &[u8]) -> [u8; N] {
    let mut b = base;
    for (x, d) in b.iter_mut().zip(delta) {
        *x ^= d;
    }
    b
}

fn check_selection(h: &Header, m0: &[u8], m1: &[u8]) {
    if let Ok(sel) = select_meta(h, m0, m1) {
        assert!(sel.current.check(h).is_ok());
        if let Ok(other) = &sel.blocks[1 - sel.current_block] {
            assert!(other.epoch < sel.current.epoch);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. The raw bytes, as a header block and as a meta block.
    let raw = check_header(data);
    check_meta(data);

    // The input as three parts: header bytes, then two meta records.
    let (head, rest) = data.split_at(data.len().min(HEADER_LEN));
    let (m0, m1) = rest.split_at(rest.len().min(META_LEN));
    if let Some(h) = &raw {
        let _ = select_meta(h, m0, m1);
    }

    // 2. Resealed: magic, version and length forced, CRCs re-computed.
    if let Some(h) = check_header(&resealed_header(head)) {
        let metas = [resealed_meta(m0, Some(&h)), resealed_meta(m1, Some(&h))];
        check_meta(&metas[0]);
        check_meta(&metas[1]);
        check_selection(&h, &metas[0], &metas[1]);
    }

    // 3. Overlaid: the input XORed onto a valid header and two valid meta
    //    records, then resealed; an all-zero input is a valid image.
    let base = base_header();
    let Some(h) = check_header(&resealed_header(&xor(base.encode(), head))) else {
        return;
    };
    let metas = [
        resealed_meta(&xor(base_meta(&h, 7).encode(), m0), None),
        resealed_meta(&xor(base_meta(&h, 8).encode(), m1), None),
    ];
    check_meta(&metas[0]);
    check_meta(&metas[1]);
    check_selection(&h, &metas[0], &metas[1]);
});
