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
//! Only pages written to the image at least an age ago (`--give-back-after`,
//! 10 s by default) are looked at, so a
//! page that keeps changing is not dropped and copied again over and over;
//! at most `max` a pause (see the caller), so the pause stays short.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::GuestMemory;

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
#[derive(Debug)]
pub struct Reclaim {
    /// Pages written to the image, in the order they were, with when.
    queue: VecDeque<(u64, Instant)>,
    /// One bit per guest page: whether it is in `queue`.
    queued: Vec<u64>,
    /// A page of the image, read to compare.
    page: Vec<u8>,
    /// Pages given back so far.
    given_back: u64,
    /// How long after its write to the image a page may be given back.
    age: Duration,
}

impl Reclaim {
    /// For a guest of `ram_pages` pages, giving back pages written to the
    /// image `age` ago or more.
    pub fn new(ram_pages: usize, age: Duration) -> Reclaim {
        Reclaim {
            age,
            queue: VecDeque::new(),
            queued: vec![0; ram_pages.div_ceil(64)],
            page: vec![0; PAGE],
            given_back: 0,
        }
    }

    /// `pfns` were written to the image at `now`.
    pub fn written(&mut self, pfns: &[u64], now: Instant) {
        for &pfn in pfns {
            let (w, b) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
            let Some(word) = self.queued.get_mut(w) else {
                continue;
            };
            if *word & b == 0 {
                *word |= b;
                self.queue.push_back((pfn, now));
            }
        }
    }

    /// Whether a page is old enough to be looked at, at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.queue
            .front()
            .is_some_and(|&(_, t)| now >= t + self.age)
    }

    /// Pages given back so far.
    pub fn given_back(&self) -> u64 {
        self.given_back
    }

    /// Pages waiting to be looked at.
    pub fn waiting(&self) -> usize {
        self.queue.len()
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
        let Some(region) = mem.iter().next() else {
            return Ok(0);
        };
        let npages = region.len() as usize / PAGE;
        let mut drop: Vec<u64> = Vec::new();
        while drop.len() < max {
            match self.queue.front() {
                Some(&(_, t)) if now >= t + self.age => {}
                _ => break,
            }
            let Some((pfn, _)) = self.queue.pop_front() else {
                break;
            };
            self.queued[(pfn / 64) as usize] &= !(1u64 << (pfn % 64));
            if pfn as usize >= npages || keep(pfn) {
                // Written to the image again later, it is queued again then.
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
        drop.sort_unstable();
        let mut i = 0;
        while i < drop.len() {
            let mut n = 1;
            while i + n < drop.len() && drop[i + n] == drop[i] + n as u64 {
                n += 1;
            }
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
            i += n;
        }
        self.given_back += drop.len() as u64;
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

    /// Only old enough pages whose bytes equal the image's, and that are
    /// not kept, lose their private copy: afterwards they show what the
    /// file holds, the others still show their own bytes.
    #[test]
    fn only_old_equal_unkept_pages_are_given_back() {
        let (file, mem) = setup();
        let age = Duration::from_secs(5);
        let mut r = Reclaim::new(16, age);
        for pfn in 0..8u64 {
            // The guest's copy; the image holds the same bytes ("applied")
            // except for page 3, which the guest wrote again since.
            mem.write_slice(&fill(pfn as u8 + 1), GuestAddress(pfn * PAGE as u64))
                .unwrap();
            let image = if pfn == 3 { 0xee } else { pfn as u8 + 1 };
            file.write_all_at(&fill(image), (pfn + 1) * PAGE as u64)
                .unwrap();
        }
        let t0 = Instant::now();
        r.written(&[0, 1, 2, 3, 4, 5], t0);
        r.written(&[6, 7], t0 + age);
        // Queued once, whatever the number of writes.
        r.written(&[1, 1], t0);
        assert_eq!(r.waiting(), 8);
        let keep = |pfn: u64| pfn == 4;
        // Not old enough yet: nothing looked at.
        assert!(!r.due(t0));
        assert_eq!(r.run(&mem, &file, PAGE as u64, 100, keep, t0).unwrap(), 0);
        assert_eq!(r.waiting(), 8);
        // At most `max` a call, oldest first.
        let later = t0 + age;
        assert!(r.due(later));
        assert_eq!(r.run(&mem, &file, PAGE as u64, 2, keep, later).unwrap(), 2);
        // 3 differs, 4 is kept: both leave the queue without being given
        // back (written to the image again, they are queued again).
        assert_eq!(
            r.run(&mem, &file, PAGE as u64, 100, keep, later).unwrap(),
            2
        );
        // 6 and 7 are not old enough yet.
        assert_eq!(r.waiting(), 2);
        assert_eq!(r.given_back(), 4);
        // The file changes under the pages: those given back show it.
        for pfn in 0..8u64 {
            file.write_all_at(&fill(0x50 + pfn as u8), (pfn + 1) * PAGE as u64)
                .unwrap();
        }
        for pfn in 0..8u64 {
            let want = if [0, 1, 2, 5].contains(&pfn) {
                0x50 + pfn as u8
            } else {
                pfn as u8 + 1
            };
            assert_eq!(read(&mem, pfn)[0], want, "page {pfn}");
        }
        // Given back, a page is copied again by its next write.
        mem.write_slice(&fill(9), GuestAddress(0)).unwrap();
        file.write_all_at(&fill(0x77), PAGE as u64).unwrap();
        assert_eq!(read(&mem, 0), fill(9));
    }
}
