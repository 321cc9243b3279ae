//! Recovery's writes to the RAM image, gathered per page and written once.
//!
//! The records recovery replays carry deltas: a handful of byte ranges per
//! page, the same page in many records. Writing each range as it is
//! decoded cost one `pwrite` per range: after a SIGKILL under `redis-benchmark
//! -c 16 -P 16` SETs (tmpfs), 15 782 writes for 5 652 page entries of 20
//! records, 12–19 ms of recovery. [`ReplayPages`] collects every range per
//! page (borrowing the records' payloads, all read first: format 3
//! replays about the replay budget plus one record, formats 1 and 2 at most
//! two records), then, page by page in page order,
//! applies a page's ranges to a scratch copy (later records over earlier
//! ones, as replaying them in order would) and writes the page once:
//!
//! - a page the log covers in at most [`MAX_RANGES`] ranges (not whole) is
//!   written range by range, from the log's bytes alone;
//! - any other page is written whole, together with the whole pages that
//!   follow it (one write per run of up to [`RUN_PAGES`]); where the log
//!   does not cover a page whole, the run is read from the RAM image first
//!   (one read) and the bytes the log does not cover are rewritten with
//!   what they already hold.
//!
//! The same recovery: 1 783 writes, `recover` 7.2–10.4 ms against 12.3–19.3
//! ms (tmpfs, three resumes each, side by side with the build before); the
//! write-out is 5.3–7.3 ms of it for 2 088 pages (a RAM image preallocated
//! with `fallocate` took as long).
//!
//! The result equals replaying the writes one by one, and it is as
//! idempotent: every byte written is either the log's (absolute) or the
//! image's own, read just before, so a crash part-way and a second replay
//! leave the same image.

use std::collections::BTreeMap;

use super::image::{read_err, ImageError};
use super::redo::{PageWrite, PAGE};
use super::storage::Storage;

/// A page written in more ranges than this is read and written whole.
pub(super) const MAX_RANGES: usize = 2;

/// Pages gathered into one read and one write at most (1 MiB).
const RUN_PAGES: usize = 256;

const PAGE_BYTES: usize = PAGE as usize;
const MASK_WORDS: usize = PAGE_BYTES / 64;

/// One page's final bytes and which of them the log wrote: a scratch page,
/// reused for every page (fresh memory costs a ~3 µs page fault per 4 KiB
/// here, more than the writes it saves).
struct PageImage {
    data: Box<[u8]>,
    /// Bit `i`: byte `i` was written.
    mask: [u64; MASK_WORDS],
}

impl PageImage {
    fn new() -> PageImage {
        PageImage {
            data: vec![0u8; PAGE_BYTES].into_boxed_slice(),
            mask: [0; MASK_WORDS],
        }
    }

    fn clear(&mut self) {
        self.mask = [0; MASK_WORDS];
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        let end = offset + bytes.len();
        self.data[offset..end].copy_from_slice(bytes);
        let mut i = offset;
        while i < end {
            let (word, bit) = (i / 64, i % 64);
            let n = (64 - bit).min(end - i);
            let bits = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.mask[word] |= bits;
            i += n;
        }
    }

    fn whole(&self) -> bool {
        self.mask.iter().all(|&w| w == u64::MAX)
    }

    /// The written byte ranges, in order, or `None` if there are more than
    /// `max`.
    fn ranges(&self, max: usize) -> Option<Vec<(usize, usize)>> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut open: Option<usize> = None;
        for (w, &word) in self.mask.iter().enumerate() {
            let mut bit = 0usize;
            while bit < 64 {
                // The bits from `bit` on (zeros shifted in above them).
                let rest = word >> bit;
                let i = w * 64 + bit;
                match open {
                    None if rest == 0 => break,
                    None => {
                        let skip = rest.trailing_zeros() as usize;
                        open = Some(i + skip);
                        bit += skip;
                    }
                    Some(start) => {
                        let ones = rest.trailing_ones() as usize;
                        if bit + ones == 64 {
                            // The range goes on into the next word.
                            break;
                        }
                        if out.len() == max {
                            return None;
                        }
                        out.push((start, i + ones));
                        open = None;
                        bit += ones;
                    }
                }
            }
        }
        if let Some(start) = open {
            if out.len() == max {
                return None;
            }
            out.push((start, PAGE_BYTES));
        }
        Some(out)
    }
}

/// The replayed writes, per page, in record order (see the module
/// documentation); they borrow the records' payloads.
#[derive(Default)]
pub(super) struct ReplayPages<'a> {
    pages: BTreeMap<u64, Vec<(usize, &'a [u8])>>,
}

/// What [`ReplayPages::write_out`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct WriteOut {
    /// Distinct pages written.
    pub(super) pages: u64,
    /// Of those, read from the RAM image first.
    pub(super) read: u64,
    /// Writes issued.
    pub(super) writes: u64,
}

impl<'a> ReplayPages<'a> {
    /// Takes a record's writes, after those of the records before it.
    pub(super) fn add(&mut self, writes: &[PageWrite<'a>]) {
        for w in writes {
            self.pages
                .entry(w.pfn)
                .or_default()
                .push((w.offset, w.data));
        }
    }

    /// Writes every page into the RAM region at `ram` of `s`, in page
    /// order. Does not persist.
    pub(super) fn write_out<S: Storage + ?Sized>(
        &self,
        s: &mut S,
        ram: u64,
    ) -> Result<WriteOut, ImageError> {
        let mut done = WriteOut::default();
        let mut page = PageImage::new();
        let mut run = Run::default();
        for (&pfn, writes) in &self.pages {
            done.pages += 1;
            page.clear();
            for &(offset, data) in writes {
                page.put(offset, data);
            }
            let whole = page.whole();
            if !whole {
                if let Some(ranges) = page.ranges(MAX_RANGES) {
                    let at = ram + pfn * PAGE;
                    for (a, b) in ranges {
                        s.write_at(at + a as u64, &page.data[a..b])?;
                        done.writes += 1;
                    }
                    continue;
                }
            }
            if !run.continues(pfn) {
                run.flush(s, ram, &mut done)?;
            }
            run.push(pfn, &page, !whole);
        }
        run.flush(s, ram, &mut done)?;
        Ok(done)
    }
}

/// Pages written whole that follow each other: one write for all of them,
/// after one read of the range if some need the RAM image's own bytes.
#[derive(Default)]
struct Run {
    first: u64,
    data: Vec<u8>,
    /// For each page: its mask if it needs the image's bytes.
    masks: Vec<Option<[u64; MASK_WORDS]>>,
    base: Vec<u8>,
}

impl Run {
    fn continues(&self, pfn: u64) -> bool {
        !self.masks.is_empty()
            && pfn == self.first + self.masks.len() as u64
            && self.masks.len() < RUN_PAGES
    }

    fn push(&mut self, pfn: u64, page: &PageImage, needs_base: bool) {
        if self.masks.is_empty() {
            self.first = pfn;
        }
        self.data.extend_from_slice(&page.data);
        self.masks.push(needs_base.then_some(page.mask));
    }

    fn flush<S: Storage + ?Sized>(
        &mut self,
        s: &mut S,
        ram: u64,
        done: &mut WriteOut,
    ) -> Result<(), ImageError> {
        if self.masks.is_empty() {
            return Ok(());
        }
        let at = ram + self.first * PAGE;
        if self.masks.iter().any(Option::is_some) {
            self.base.resize(self.data.len(), 0);
            s.read_at(at, &mut self.base)
                .map_err(read_err("pages of the RAM image"))?;
            for (i, mask) in self.masks.iter().enumerate() {
                if let Some(mask) = mask {
                    let r = i * PAGE_BYTES..(i + 1) * PAGE_BYTES;
                    fill_from(&mut self.data[r.clone()], mask, &self.base[r]);
                    done.read += 1;
                }
            }
        }
        s.write_at(at, &self.data)?;
        done.writes += 1;
        self.data.clear();
        self.masks.clear();
        Ok(())
    }
}

/// Fills the bytes of `data` that `mask` says the log did not write from
/// `base` (the page as the RAM image holds it).
fn fill_from(data: &mut [u8], mask: &[u64; MASK_WORDS], base: &[u8]) {
    for (w, &word) in mask.iter().enumerate() {
        let at = w * 64;
        match word {
            u64::MAX => {}
            0 => data[at..at + 64].copy_from_slice(&base[at..at + 64]),
            _ => {
                for bit in 0..64 {
                    if word & (1 << bit) == 0 {
                        data[at + bit] = base[at + bit];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::storage::MemStorage;
    use crate::nvram::test_rng::Rng;

    /// Replaying random overlapping writes through `ReplayPages` leaves the
    /// same bytes as writing them one by one, whatever the page held.
    #[test]
    fn test_gathered_replay_equals_writes_in_order() {
        let mut rng = Rng(0x5eed_0fba_5e00_0001);
        for round in 0..200 {
            let pages = 6u64;
            let ram = 3 * PAGE;
            let len = (ram + pages * PAGE) as usize;
            let mut before = vec![0u8; len];
            for b in before.iter_mut() {
                *b = rng.next() as u8;
            }
            let mut one_by_one = MemStorage::from_bytes(before.clone());
            let mut gathered = MemStorage::from_bytes(before);
            let mut bufs: Vec<(u64, usize, Vec<u8>)> = Vec::new();
            for _ in 0..(rng.next() % 40) {
                let pfn = rng.next() % pages;
                let whole = rng.next() % 5 == 0;
                let offset = if whole {
                    0
                } else {
                    (rng.next() % PAGE) as usize
                };
                let n = if whole {
                    PAGE_BYTES
                } else {
                    1 + (rng.next() as usize % (PAGE_BYTES - offset).min(300))
                };
                let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                bufs.push((pfn, offset, data));
            }
            let writes: Vec<PageWrite<'_>> = bufs
                .iter()
                .enumerate()
                .map(|(entry, (pfn, offset, data))| PageWrite {
                    entry,
                    pfn: *pfn,
                    offset: *offset,
                    data,
                })
                .collect();
            for w in &writes {
                one_by_one
                    .write_at(ram + w.pfn * PAGE + w.offset as u64, w.data)
                    .unwrap();
            }
            let mut r = ReplayPages::default();
            // In two "records", to cover later records over earlier ones.
            let half = writes.len() / 2;
            r.add(&writes[..half]);
            r.add(&writes[half..]);
            let done = r.write_out(&mut gathered, ram).unwrap();
            assert_eq!(one_by_one.bytes(), gathered.bytes(), "round {round}");
            let distinct: std::collections::BTreeSet<u64> = writes.iter().map(|w| w.pfn).collect();
            assert_eq!(done.pages, distinct.len() as u64, "round {round}");
            assert!(
                done.writes <= (MAX_RANGES as u64) * done.pages,
                "round {round}"
            );
        }
    }

    #[test]
    fn test_ranges_of_a_page() {
        let mut p = PageImage::new();
        assert_eq!(p.ranges(4), Some(vec![]));
        p.put(10, &[1; 5]);
        p.put(15, &[2; 3]);
        p.put(100, &[3; 64]);
        assert_eq!(p.ranges(4), Some(vec![(10, 18), (100, 164)]));
        assert_eq!(p.ranges(1), None);
        p.put(0, &[4; PAGE_BYTES]);
        assert!(p.whole());
        assert_eq!(p.ranges(1), Some(vec![(0, PAGE_BYTES)]));
    }
}
