//! Recovery's writes to the RAM image, gathered per page and written in
//! spans.
//!
//! The records recovery replays carry deltas: a handful of byte ranges per
//! page, the same page in many records. Writing each range as it is
//! decoded cost one `pwrite` per range: after a SIGKILL under `redis-benchmark
//! -c 16 -P 16` SETs (tmpfs), 15 782 writes for 5 652 page entries of 20
//! records, 12–19 ms of recovery. [`ReplayPages`] takes every write of every
//! replayed record (borrowing the records' payloads, all read first: format
//! 3 replays about the replay budget plus one record, formats 1 and 2 at
//! most two records), sorts them by page (stably: later records over earlier
//! ones, as replaying them in order would) and writes the pages out span by
//! span, a span being replayed pages at most [`MAX_GAP`] apart within
//! [`SPAN_PAGES`]:
//!
//! - an isolated page the log covers in at most [`MAX_RANGES`] writes (not
//!   whole) is written write by write, from the log's bytes alone;
//! - any other span is read from the RAM image in one read (none if every
//!   page in it is logged whole), the writes are laid over it, and it goes
//!   out in one write per run of pages: the replayed pages and, between
//!   them, the pages that hold anything but zeros, written back unchanged.
//!   A page of zeros between them is not written, so a hole of the sparse
//!   RAM region stays a hole.
//!
//! While it reads, the kernel's readahead is off (`Storage::scattered_reads`).
//! On a file, many spans are split between two threads (the upper half
//! through a second descriptor, `Storage::second_handle`): after a SIGKILL
//! under pipelined SETs of small values (1 479 pages over 111 spans, ext4)
//! the write-out took 1.9–2.1 ms instead of 3.1–3.2 ms.
//!
//! Measured on ext4 (`/var/tmp`), one image saved after a SIGKILL under
//! `-c 16 -P 16` SETs of changing values, resumed three times by each build,
//! alternately: 20 records, 5 980 entries over 2 303 pages. Gathered per page
//! in a `BTreeMap` and written page by page (1 635 reads, 1 918 writes):
//! write-out 7.8–10.2 ms, `recover` 9.6–12.3 ms, process start → guest
//! running 12.1–16.7 ms. Sorted, in spans, readahead off (47 reads, 48
//! writes): gathering 0.47–0.65 ms against ~1.6, write-out 3.1–4.0 ms,
//! `recover` 4.0–4.8 ms, guest running 6.5–7.7 ms. The spans alone, with
//! readahead on: write-out 7.3–8.3 ms (the reads of the holes read ahead).
//!
//! The result equals replaying the writes one by one, and it is as
//! idempotent: every byte written is either the log's (absolute) or the
//! image's own, read just before, so a crash part-way and a second replay
//! leave the same image.

use super::image::{read_err, ImageError};
use super::redo::{PageWrite, PAGE};
use super::storage::Storage;

/// An isolated page the log covers in at most this many writes (not whole)
/// is written write by write, from the log's bytes alone, without a read.
pub(super) const MAX_RANGES: usize = 2;

/// Replayed pages at most this many pages apart share a span; the pages
/// between them are read with it.
const MAX_GAP: u64 = 8;

/// Pages one span covers at most (256 KiB): the scratch buffer holds one
/// span and is reused, since fresh memory costs a ~3 µs fault per 4 KiB here.
const SPAN_PAGES: u64 = 64;

const PAGE_BYTES: usize = PAGE as usize;

/// One page's replayed writes, oldest first: (offset in the page, bytes).
type Writes<'a> = [(u64, usize, &'a [u8])];

/// Whether one of `writes` covers the whole page.
fn whole(writes: &Writes<'_>) -> bool {
    writes
        .iter()
        .any(|&(_, offset, data)| offset == 0 && data.len() == PAGE_BYTES)
}

/// The replayed writes, in record order (see the module documentation);
/// they borrow the records' payloads.
#[derive(Default)]
pub(super) struct ReplayPages<'a> {
    /// (page, offset in the page, bytes), in the order they were added.
    writes: Vec<(u64, usize, &'a [u8])>,
}

/// What [`ReplayPages::write_out`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct WriteOut {
    /// Distinct pages written.
    pub(super) pages: u64,
    /// Pages read from the RAM image (replayed pages and those between them).
    pub(super) read: u64,
    /// Reads and writes issued.
    pub(super) reads: u64,
    pub(super) writes: u64,
    /// The lowest and highest page written.
    pub(super) span: Option<(u64, u64)>,
    /// Threads that wrote (1, or 2 when the spans were split).
    pub(super) threads: u8,
}

impl<'a> ReplayPages<'a> {
    /// Takes a record's writes, after those of the records before it.
    pub(super) fn add(&mut self, writes: &[PageWrite<'a>]) {
        self.writes
            .extend(writes.iter().map(|w| (w.pfn, w.offset, w.data)));
    }

    /// Writes every page into the RAM region at `ram` of `s`, span by span.
    /// Where the storage offers a second handle of its file
    /// ([`Storage::second_handle`]) and there are at least
    /// [`SPLIT_MIN_SPANS`] spans, a second thread writes the upper half of
    /// the spans (by page) while this one writes the lower: the spans are
    /// disjoint and each is read and written by one thread, so the result is
    /// the same as in page order. Does not persist.
    pub(super) fn write_out<S: Storage>(
        &mut self,
        s: &mut S,
        ram: u64,
    ) -> Result<WriteOut, ImageError> {
        // ORDER: a stable sort keeps each page's writes in record order,
        // later records over earlier ones.
        self.writes.sort_by_key(|&(pfn, _, _)| pfn);
        let spans = spans(&self.writes);
        let span = self
            .writes
            .first()
            .zip(self.writes.last())
            .map(|(a, b)| (a.0, b.0));
        let half = spans.len() / 2;
        let second = (spans.len() >= SPLIT_MIN_SPANS)
            .then(|| s.second_handle())
            .flatten();
        let writes = &self.writes[..];
        let run = |s: &mut dyn Storage, spans: &[std::ops::Range<usize>]| {
            let mut done = WriteOut::default();
            let mut buf = Vec::new();
            for r in spans {
                write_span(s, ram, &writes[r.clone()], &mut buf, &mut done)?;
            }
            Ok::<_, ImageError>(done)
        };
        let mut done = match second {
            Some(mut file) => {
                let (lower, upper) = spans.split_at(half);
                let (a, b, threads) = std::thread::scope(|sc| {
                    let upper = std::thread::Builder::new()
                        .name("nvhv-replay".into())
                        .spawn_scoped(sc, || run(&mut file, upper));
                    match upper {
                        Ok(h) => {
                            let a = run(s, lower);
                            let b = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                            (a, b, 2)
                        }
                        // No thread: all of it here.
                        Err(_) => (run(s, &spans), Ok(WriteOut::default()), 1),
                    }
                });
                let (a, b) = (a?, b?);
                WriteOut {
                    pages: a.pages + b.pages,
                    read: a.read + b.read,
                    reads: a.reads + b.reads,
                    writes: a.writes + b.writes,
                    span: None,
                    threads,
                }
            }
            None => WriteOut {
                threads: 1,
                ..run(s, &spans)?
            },
        };
        done.span = span;
        Ok(done)
    }
}

/// Spans at least this many are split between two threads (fewer are
/// written faster than a thread starts: one span is tens of µs).
const SPLIT_MIN_SPANS: usize = 16;

/// The spans of `writes` (sorted by page): ranges of it whose pages lie at
/// most [`MAX_GAP`] apart, within [`SPAN_PAGES`].
fn spans(writes: &Writes<'_>) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut from, mut first, mut last) = (0, 0, 0);
    for (to, &(pfn, _, _)) in writes.iter().enumerate() {
        if to > from && (pfn - last > MAX_GAP || pfn - first >= SPAN_PAGES) {
            out.push(from..to);
            from = to;
        }
        if to == from {
            first = pfn;
        }
        last = pfn;
    }
    if from < writes.len() {
        out.push(from..writes.len());
    }
    out
}

/// Writes the pages of one span (its writes sorted by page, within
/// [`SPAN_PAGES`]): an isolated page of few writes write by write;
/// otherwise the span is read (unless every page is logged whole), the
/// writes are laid over it in order, and runs of pages go out in one write
/// each: the replayed pages, and between them the pages read that hold
/// anything but zeros (they are written back unchanged; a page of zeros,
/// maybe a hole of a sparse image, is left alone and splits the run).
fn write_span(
    s: &mut dyn Storage,
    ram: u64,
    span: &Writes<'_>,
    buf: &mut Vec<u8>,
    done: &mut WriteOut,
) -> Result<(), ImageError> {
    let (Some(&(first, _, _)), Some(&(last, _, _))) = (span.first(), span.last()) else {
        return Ok(());
    };
    let n = (last - first + 1) as usize;
    // Bit i: page first + i is replayed (n ≤ SPAN_PAGES = 64), and whether
    // some replayed page is not logged whole.
    let mut out = 0u64;
    let mut partial = false;
    for page in span.chunk_by(|a, b| a.0 == b.0) {
        out |= 1 << (page[0].0 - first);
        partial |= !whole(page);
    }
    done.pages += u64::from(out.count_ones());
    if n == 1 && partial && span.len() <= MAX_RANGES {
        for &(pfn, offset, data) in span {
            s.write_at(ram + pfn * PAGE + offset as u64, data)?;
            done.writes += 1;
        }
        return Ok(());
    }
    // Grown, never shrunk: zeroing it again for every span cost more than
    // the reads. Bytes left from an earlier span are read over or, in a
    // span read from nowhere (all pages whole), lie only in pages not written.
    if buf.len() < n * PAGE_BYTES {
        buf.resize(n * PAGE_BYTES, 0);
    }
    let buf = &mut buf[..n * PAGE_BYTES];
    if partial {
        s.read_at(ram + first * PAGE, buf)
            .map_err(read_err("pages of the RAM image"))?;
        done.read += n as u64;
        done.reads += 1;
    }
    for &(pfn, offset, data) in span {
        let at = (pfn - first) as usize * PAGE_BYTES + offset;
        buf[at..at + data.len()].copy_from_slice(data);
    }
    if partial {
        for (i, page) in buf.chunks_exact(PAGE_BYTES).enumerate() {
            if page.iter().any(|&b| b != 0) {
                out |= 1 << i;
            }
        }
    }
    let mut i = 0;
    while i < n {
        if out >> i & 1 == 0 {
            i += 1;
            continue;
        }
        let run = (out >> i).trailing_ones() as usize;
        let bytes = &buf[i * PAGE_BYTES..(i + run) * PAGE_BYTES];
        s.write_at(ram + (first + i as u64) * PAGE, bytes)?;
        done.writes += 1;
        i += run;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::backing::BackingError;
    use crate::nvram::storage::MemStorage;
    use crate::nvram::test_rng::Rng;

    /// A `MemStorage` that records the pages each write touches.
    struct Recording {
        inner: MemStorage,
        written: Vec<(u64, usize)>,
    }

    impl Storage for Recording {
        fn size(&self) -> std::io::Result<u64> {
            self.inner.size()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.inner.read_at(offset, buf)
        }
        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
            self.written.push((offset, data.len()));
            self.inner.write_at(offset, data)
        }
        fn persist(&mut self, offset: u64, len: u64) -> Result<(), BackingError> {
            self.inner.persist(offset, len)
        }
    }

    /// The writes of a record made of `bufs` (page, offset, bytes), in order.
    fn page_writes(bufs: &[(u64, usize, Vec<u8>)]) -> Vec<PageWrite<'_>> {
        bufs.iter()
            .enumerate()
            .map(|(entry, (pfn, offset, data))| PageWrite {
                entry,
                pfn: *pfn,
                offset: *offset,
                data,
            })
            .collect()
    }

    /// What replaying `writes` one by one leaves: each written where it says.
    fn write_in_order(s: &mut MemStorage, ram: u64, writes: &[PageWrite<'_>]) {
        for w in writes {
            s.write_at(ram + w.pfn * PAGE + w.offset as u64, w.data)
                .unwrap();
        }
    }

    /// Replaying random overlapping writes through `ReplayPages` leaves the
    /// same bytes as writing them one by one, whatever the pages held, with
    /// pages close together (one span), spread out (isolated pages, spans
    /// split by gaps and by their length) and pages of zeros between them.
    #[test]
    fn test_gathered_replay_equals_writes_in_order() {
        let mut rng = Rng(0x5eed_0fba_5e00_0001);
        for round in 0..400 {
            let pages = [6u64, 40, 200][round % 3];
            let ram = 3 * PAGE;
            let len = (ram + pages * PAGE) as usize;
            let mut before = vec![0u8; len];
            for (i, b) in before.iter_mut().enumerate() {
                // Every third page of zeros (a hole, maybe).
                if (i / PAGE_BYTES) % 3 != 0 {
                    *b = rng.next() as u8;
                }
            }
            let mut one_by_one = MemStorage::from_bytes(before.clone());
            let mut gathered = MemStorage::from_bytes(before);
            let mut bufs: Vec<(u64, usize, Vec<u8>)> = Vec::new();
            for _ in 0..(rng.next() % 60) {
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
            let writes = page_writes(&bufs);
            write_in_order(&mut one_by_one, ram, &writes);
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

    /// Many spans on a file are split between two threads, and the file
    /// then holds what writing every write in order leaves.
    #[test]
    fn test_replay_on_two_threads_equals_writes_in_order() {
        let mut rng = Rng(0x5eed_0fba_5e00_0002);
        let pages = 4000u64;
        let ram = 2 * PAGE;
        let len = (ram + pages * PAGE) as usize;
        let mut before = vec![0u8; len];
        for (i, b) in before.iter_mut().enumerate() {
            if (i / PAGE_BYTES) % 4 != 0 {
                *b = rng.next() as u8;
            }
        }
        let mut one_by_one = MemStorage::from_bytes(before.clone());
        let path = crate::nvram::image::tests::TempPath::new("replay-split");
        std::fs::write(&path.0, &before).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path.0)
            .unwrap();
        let bufs: Vec<(u64, usize, Vec<u8>)> = (0..600)
            .map(|_| {
                let pfn = rng.next() % pages;
                let offset = (rng.next() % PAGE) as usize;
                let n = 1 + (rng.next() as usize % (PAGE_BYTES - offset).min(200));
                (pfn, offset, (0..n).map(|_| rng.next() as u8).collect())
            })
            .collect();
        let writes = page_writes(&bufs);
        write_in_order(&mut one_by_one, ram, &writes);
        let mut r = ReplayPages::default();
        r.add(&writes);
        let done = r.write_out(&mut file, ram).unwrap();
        assert_eq!(done.threads, 2, "{done:?}");
        let distinct: std::collections::BTreeSet<u64> = writes.iter().map(|w| w.pfn).collect();
        assert_eq!(done.pages, distinct.len() as u64);
        assert_eq!(std::fs::read(&path.0).unwrap(), one_by_one.bytes());
    }

    /// Close pages share one read and one write; a page of zeros between
    /// them is not written (it may be a hole); an isolated page of one small
    /// write is written without a read.
    #[test]
    fn test_spans_read_once_and_leave_pages_of_zeros_alone() {
        let pages = 200u64;
        let mut before = vec![0u8; (pages * PAGE) as usize];
        for pfn in [10u64, 11, 12, 14, 15] {
            before[(pfn * PAGE) as usize..][..PAGE_BYTES].fill(0xab);
        }
        // Page 13 holds zeros.
        let mut s = Recording {
            inner: MemStorage::from_bytes(before),
            written: Vec::new(),
        };
        let data = [7u8; 16];
        let write = |entry, pfn| PageWrite {
            entry,
            pfn,
            offset: 100,
            data: &data,
        };
        let mut r = ReplayPages::default();
        r.add(&[write(0, 10), write(1, 12), write(2, 15), write(3, 150)]);
        let done = r.write_out(&mut s, 0).unwrap();
        assert_eq!(done.pages, 4);
        // Pages 10-15 read at once; page 150 written without a read.
        assert_eq!((done.reads, done.read), (1, 6));
        // 10-12 in one write, 14-15 in another, 150's bytes alone.
        assert_eq!(
            s.written,
            vec![
                (10 * PAGE, 3 * PAGE_BYTES),
                (14 * PAGE, 2 * PAGE_BYTES),
                (150 * PAGE + 100, 16)
            ]
        );
        for pfn in [10u64, 12, 15, 150] {
            let at = (pfn * PAGE) as usize + 100;
            assert_eq!(&s.inner.bytes()[at..at + 16], &data, "page {pfn}");
        }
        assert!(s.inner.bytes()[(13 * PAGE) as usize..][..PAGE_BYTES]
            .iter()
            .all(|&b| b == 0));
    }
}
