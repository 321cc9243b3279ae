//! Epoch mode: giving back nvhv's private copies of guest pages that have
//! gone cold.
//!
//! In epoch mode guest RAM is a private (copy-on-write) mapping of the
//! image's RAM region. The guest's first write to a page gives nvhv an
//! anonymous copy of it, and the committed bytes reach the image when their
//! epoch is applied: from then on a page the guest no longer writes (a bulk
//! load, say) is held twice, once in nvhv and once in the image (on tmpfs,
//! both in memory). [`Reclaim`] drops such copies (`MADV_DONTNEED`), after
//! which the page reads the image again, as it did before its first write.
//!
//! The rule that makes this invisible to the guest: a page's copy is
//! dropped only
//! - right after a capture, with every vCPU and device paused, so nothing
//!   writes the page between the check and the drop;
//! - if the page is not in that capture, is not hot (a hot page is written
//!   often and left writable, see [`super::dirty`]) and has no committed
//!   bytes the image lacks (`Image::is_pending`);
//! - and if its bytes equal the image's, compared then.
//!
//! The guest then reads the same bytes before and after. The image is never
//! written for a page the guest reads from it: only committed pages are
//! written there, and a page is committed only after the guest or a device
//! wrote it, which gave nvhv its copy again (and KVM's dirty log sees that
//! write as it sees any other).
//!
//! Only pages last written to the image at least an age ago
//! (`--give-back-after`, 10 s by default) are looked at, so a
//! page that keeps changing is not dropped and copied again over and over;
//! at most `max` a pause (see the caller), so the pause stays short.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::GuestMemory;
use crate::nvram::redo::runs;

/// Page size.
const PAGE: usize = 4096;

/// Why giving back pages failed.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// Reading a page of the image to compare failed.
    #[error("cannot read page {pfn} of the RAM image")]
    Read {
        /// The page.
        pfn: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `madvise(MADV_DONTNEED)` failed.
    #[error("cannot give back guest pages {first}..{end}")]
    Discard {
        /// The first page.
        first: u64,
        /// The page after the last.
        end: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The pages written to the image that may be given back once old enough
/// (see the module header).
///
/// Ages are kept in windows of the age's length rather than per page: a
/// page written to the image goes into the current window; when a window
/// closes, the pages of the window before it that were not written again
/// in it become candidates. So a page becomes one between one and two ages
/// after its last write to the image, for three bits of memory a page.
#[derive(Debug)]
pub struct Reclaim {
    /// Pages written to the image in the current window.
    current: Vec<u64>,
    /// Pages written to the image in the window before (and not since).
    previous: Vec<u64>,
    /// Pages whose last write to the image is older than both windows and
    /// that were not looked at yet.
    candidates: Vec<u64>,
    /// Set bits in `candidates`.
    waiting: usize,
    /// Where the next look at `candidates` starts (a word index).
    cursor: usize,
    /// When the current window began.
    opened: Instant,
    /// A window's length: the age.
    age: Duration,
    /// A page of the image, read to compare.
    page: Vec<u8>,
}

/// `pfn`'s word and bit in a one-bit-per-page map.
fn bit(pfn: u64) -> (usize, u64) {
    ((pfn / 64) as usize, 1u64 << (pfn % 64))
}

impl Reclaim {
    /// For a guest of `ram_pages` pages, giving back pages whose last write
    /// to the image is `age` ago or more (at most twice `age`), from `now`.
    pub fn new(ram_pages: usize, age: Duration, now: Instant) -> Reclaim {
        let words = ram_pages.div_ceil(64);
        Reclaim {
            current: vec![0; words],
            previous: vec![0; words],
            candidates: vec![0; words],
            waiting: 0,
            cursor: 0,
            opened: now,
            age,
            page: vec![0; PAGE],
        }
    }

    /// `pfns` were written to the image (at the time of the next
    /// [`Reclaim::due`] or [`Reclaim::run`] at the latest).
    pub fn written(&mut self, pfns: &[u64]) {
        for &pfn in pfns {
            let (w, b) = bit(pfn);
            let Some(word) = self.current.get_mut(w) else {
                continue;
            };
            *word |= b;
            // Written again: no candidate until it is old again.
            if self.candidates[w] & b != 0 {
                self.candidates[w] &= !b;
                self.waiting -= 1;
            }
        }
    }

    /// Closes the current window if it is `age` old at `now` (and the next
    /// one too if that is over as well): the pages of the window before it
    /// not written since become candidates.
    fn close_window(&mut self, now: Instant) {
        for _ in 0..2 {
            if now < self.opened + self.age {
                return;
            }
            for ((c, p), n) in self
                .candidates
                .iter_mut()
                .zip(self.previous.iter_mut())
                .zip(self.current.iter_mut())
            {
                let new = *p & !*n & !*c;
                self.waiting += new.count_ones() as usize;
                *c |= new;
                *p = std::mem::take(n);
            }
            self.opened += self.age;
        }
        // Far behind: the next window starts now.
        if now >= self.opened + self.age {
            self.opened = now;
        }
    }

    /// Whether pages are old enough to be looked at, at `now`.
    pub fn due(&mut self, now: Instant) -> bool {
        self.close_window(now);
        self.waiting > 0
    }

    /// Pages old enough and not looked at yet.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Takes up to `max` candidates, from the cursor on (and around).
    fn take_candidates(&mut self, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let words = self.candidates.len();
        let mut seen = 0;
        while out.len() < max && self.waiting > 0 && seen <= words {
            let w = self.cursor % words.max(1);
            let mut bits = self.candidates[w];
            while bits != 0 && out.len() < max {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                out.push(w as u64 * 64 + u64::from(b));
            }
            self.waiting -= (self.candidates[w] ^ bits).count_ones() as usize;
            self.candidates[w] = bits;
            if bits == 0 {
                self.cursor = w + 1;
                seen += 1;
            }
        }
        out
    }

    /// Looks at up to `max` of the pages old enough at `now` and gives back
    /// those whose bytes in `mem` equal the image's (`file`, RAM region at
    /// `ram_offset`), except the pages `keep` says to keep. Returns the
    /// pages given back.
    ///
    /// ORDER: only with every vCPU and device paused, right after a
    /// capture, and with `keep` true for the pages in that capture, the hot
    /// pages and the pages the image lacks the newest committed bytes of
    /// (see the module header).
    pub fn run(
        &mut self,
        mem: &GuestMemory,
        file: &File,
        ram_offset: u64,
        max: usize,
        keep: impl Fn(u64) -> bool,
        now: Instant,
    ) -> Result<usize, ReclaimError> {
        self.close_window(now);
        let Some(region) = mem.iter().next() else {
            return Ok(0);
        };
        let npages = region.len() as usize / PAGE;
        let mut drop: Vec<u64> = Vec::new();
        // Looked at once: written to the image again later, a page is a
        // candidate again once old again.
        for pfn in self.take_candidates(max) {
            if pfn as usize >= npages || keep(pfn) {
                continue;
            }
            file.read_exact_at(&mut self.page, ram_offset + pfn * PAGE as u64)
                .map_err(|source| ReclaimError::Read { pfn, source })?;
            // SAFETY: the page lies inside the live mapping of `region`
            // (checked above), borrowed for this call. Every vCPU and device
            // is paused (the caller's ORDER rule), so nothing writes it
            // while the shared slice exists.
            let ours = unsafe {
                std::slice::from_raw_parts(region.as_ptr().add(pfn as usize * PAGE), PAGE)
            };
            if ours == &self.page[..] {
                drop.push(pfn);
            }
        }
        // In page order (the candidates wrap around at the cursor), so
        // that neighbours go in one call.
        drop.sort_unstable();
        for (i, n) in runs(&drop) {
            let first = drop[i];
            // SAFETY: the range lies inside the live private mapping of
            // `region`. MADV_DONTNEED on it drops nvhv's copies of these
            // pages, which equal the image's bytes (compared above, with
            // nothing running that could write them since): the next access
            // reads the same bytes from the image. No Rust reference into
            // the range is alive.
            let r = unsafe {
                libc::madvise(
                    region.as_ptr().add(first as usize * PAGE).cast(),
                    n * PAGE,
                    libc::MADV_DONTNEED,
                )
            };
            if r != 0 {
                return Err(ReclaimError::Discard {
                    first,
                    end: first + n as u64,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(drop.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::map_ram;
    use vm_memory::{Bytes, GuestAddress};

    fn fill(b: u8) -> Vec<u8> {
        vec![b; PAGE]
    }

    /// A private mapping of a 16-page file, as epoch mode maps guest RAM
    /// (RAM region at offset one page).
    fn setup() -> (File, GuestMemory) {
        let path = std::env::temp_dir().join(format!("nvhv-reclaim-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(17 * PAGE as u64).unwrap();
        let mem = map_ram(&file, PAGE as u64, 16 * PAGE as u64, false).unwrap();
        (file, mem)
    }

    fn read(mem: &GuestMemory, pfn: u64) -> Vec<u8> {
        let mut v = fill(0);
        mem.read_slice(&mut v, GuestAddress(pfn * PAGE as u64))
            .unwrap();
        v
    }

    /// Only pages last written to the image at least an age ago, whose
    /// bytes equal the image's and that are not kept, lose their private
    /// copy: afterwards they show what the file holds, the others still
    /// show their own bytes.
    #[test]
    fn only_old_equal_unkept_pages_are_given_back() {
        let (file, mem) = setup();
        let age = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut r = Reclaim::new(16, age, t0);
        for pfn in 0..8u64 {
            // The guest's copy; the image holds the same bytes ("applied")
            // except for page 3, which the guest wrote again since.
            mem.write_slice(&fill(pfn as u8 + 1), GuestAddress(pfn * PAGE as u64))
                .unwrap();
            let image = if pfn == 3 { 0xee } else { pfn as u8 + 1 };
            file.write_all_at(&fill(image), (pfn + 1) * PAGE as u64)
                .unwrap();
        }
        let keep = |pfn: u64| pfn == 4;
        let run = |r: &mut Reclaim, max, now| r.run(&mem, &file, PAGE as u64, max, keep, now);
        r.written(&[0, 1, 2, 3, 4, 5, 6]);
        // Younger than one age: nothing looked at.
        assert!(!r.due(t0));
        assert_eq!(run(&mut r, 100, t0).unwrap(), 0);
        // One age on, the window closes; the pages are one window old.
        let t1 = t0 + age;
        r.written(&[6]);
        assert!(!r.due(t1));
        // Page 6 written again in this window.
        r.written(&[6, 7]);
        // Two ages on: 0–5 are candidates, 6 and 7 were written since.
        let t2 = t1 + age;
        assert!(r.due(t2));
        assert_eq!(r.waiting(), 6);
        // At most `max` a call, in page order.
        assert_eq!(run(&mut r, 2, t2).unwrap(), 2);
        // 3 differs, 4 is kept: both are looked at without being given
        // back (written to the image again, they are candidates again once
        // old).
        assert_eq!(run(&mut r, 100, t2).unwrap(), 2);
        assert_eq!(r.waiting(), 0);
        // One age on, 6 and 7 (last written in the window before) are.
        let t3 = t2 + age;
        assert!(r.due(t3));
        assert_eq!(r.waiting(), 2);
        assert_eq!(run(&mut r, 100, t3).unwrap(), 2);
        // A page written in every window never is one; a candidate written
        // again is no longer one.
        r.written(&[8]);
        let t4 = t3 + age;
        assert!(!r.due(t4));
        r.written(&[8]);
        let t5 = t4 + age;
        assert!(!r.due(t5), "8 was written again in the last window");
        let t6 = t5 + age;
        assert!(r.due(t6));
        r.written(&[8]);
        assert!(!r.due(t6));
        // The file changes under the pages: those given back show it.
        for pfn in 0..8u64 {
            file.write_all_at(&fill(0x50 + pfn as u8), (pfn + 1) * PAGE as u64)
                .unwrap();
        }
        for pfn in 0..8u64 {
            let want = if [0, 1, 2, 5, 6, 7].contains(&pfn) {
                0x50 + pfn as u8
            } else {
                pfn as u8 + 1
            };
            assert_eq!(read(&mem, pfn)[0], want, "page {pfn}");
        }
        // An image that cannot be read (cut short here) is an error.
        r.written(&[9]);
        let t8 = t6 + age * 2;
        assert!(r.due(t8));
        file.set_len(9 * PAGE as u64).unwrap();
        match r.run(&mem, &file, PAGE as u64, 100, keep, t8) {
            Err(ReclaimError::Read { pfn: 8 | 9, .. }) => {}
            other => panic!("expected a read error, got {other:?}"),
        }
        file.set_len(17 * PAGE as u64).unwrap();
        // Given back, a page is copied again by its next write.
        mem.write_slice(&fill(9), GuestAddress(0)).unwrap();
        file.write_all_at(&fill(0x77), PAGE as u64).unwrap();
        assert_eq!(read(&mem, 0), fill(9));
    }
}
