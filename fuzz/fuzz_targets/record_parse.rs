//! Fuzz the redo-log record parsers: the record header (raw, and with its
//! magic, version, length and CRC forced so the field checks are reached)
//! and the payload decoder of both record versions. Invariants: nothing
//! panics; a header that parses re-encodes to the same bytes; every write a
//! payload decodes to lies inside its page and inside guest RAM; a payload
//! built from a decoded one's writes (v2) decodes to the same writes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvhv::nvram::redo::{
    decode_writes, Payload, RecordHeader, PAGE, RECORD_HEADER_LEN, RECORD_MAGIC, RECORD_VERSION,
    RECORD_VERSION_1,
};

fn resealed(data: &[u8], version: u32) -> [u8; RECORD_HEADER_LEN] {
    let mut b = [0u8; RECORD_HEADER_LEN];
    let n = data.len().min(RECORD_HEADER_LEN);
    b[..n].copy_from_slice(&data[..n]);
    b[..8].copy_from_slice(&RECORD_MAGIC);
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b[12..16].copy_from_slice(&(RECORD_HEADER_LEN as u32).to_le_bytes());
    b[16..20].fill(0);
    let crc = crc32c::crc32c(&b);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

fuzz_target!(|data: &[u8]| {
    for bytes in [
        data.to_vec(),
        resealed(data, RECORD_VERSION).to_vec(),
        resealed(data, RECORD_VERSION_1).to_vec(),
    ] {
        if let Ok(h) = RecordHeader::parse(&bytes) {
            assert_eq!(&h.encode()[..], &bytes[..RECORD_HEADER_LEN]);
        }
    }
    let ram_pages = 1 + u64::from(data.first().copied().unwrap_or(0) % 16);
    let pages = u64::from(data.get(1).copied().unwrap_or(0) % 8);
    let payload = data.get(2..).unwrap_or_default();
    for version in [RECORD_VERSION, RECORD_VERSION_1] {
        let Ok(writes) = decode_writes(version, payload, pages, ram_pages) else {
            continue;
        };
        for w in &writes {
            assert!(w.pfn < ram_pages && w.offset + w.data.len() <= PAGE as usize);
        }
        if version == RECORD_VERSION {
            // Rebuild each entry's page from zero, then log it against zero:
            // the delta decodes to writes that rebuild the same page.
            let mut pages_of: Vec<(usize, u64, Vec<u8>)> = Vec::new();
            for w in &writes {
                if pages_of.last().map(|p| p.0) != Some(w.entry) {
                    pages_of.push((w.entry, w.pfn, vec![0u8; PAGE as usize]));
                }
                let page = &mut pages_of.last_mut().expect("pushed").2;
                page[w.offset..w.offset + w.data.len()].copy_from_slice(w.data);
            }
            let zero = vec![0u8; PAGE as usize];
            for (_, pfn, page) in &pages_of {
                let mut p = Payload::default();
                if !p.push_delta(*pfn, &zero, page) {
                    continue;
                }
                let again = decode_writes(RECORD_VERSION, p.bytes(), 1, ram_pages)
                    .expect("an encoded delta decodes");
                let mut rebuilt = zero.clone();
                for w in again {
                    rebuilt[w.offset..w.offset + w.data.len()].copy_from_slice(w.data);
                }
                assert!(rebuilt == *page);
            }
        }
    }
});
