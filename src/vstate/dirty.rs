//! Dirty-page tracking for epochs, with hot pages left unprotected.
//!
//! On our hosts the first guest write to a write-protected page costs ~20 µs
//! (a fault handled in KVM), while copying or comparing a 4 KiB page costs
//! ~0.3 µs. A key-value store under random writes touches thousands of
//! distinct pages per second; re-protecting all of them every epoch (plain
//! `KVM_GET_DIRTY_LOG`) makes the guest spend most of its time in faults.
//! So, as TreeSLS does, pages written recently stay writable ("hot"):
//!
//! - KVM runs with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: `KVM_GET_DIRTY_LOG`
//!   reports every page written since its last `KVM_CLEAR_DIRTY_LOG` without
//!   re-protecting anything, so a hot page keeps being reported.
//! - Each epoch (guest paused) compares every reported hot page with the
//!   copy kept from the last epoch it changed in (its shadow) and logs only
//!   the pages whose bytes changed, and of those only the changed bytes
//!   (a delta against the shadow, which is what the RAM image holds for the
//!   page once the last epoch is applied), refreshing their shadows; a page
//!   that faulted has no shadow and is logged whole. So the log carries
//!   only changes, and nothing is left to sort out after the guest resumes
//!   (the commit, and the replies it releases, wait for nothing but the
//!   write).
//! - A page unchanged for its hold ([`FIRST_HOLD`] epochs the first time it
//!   is hot, then [`HOT_EPOCHS`], doubled each time it is written again soon
//!   after going cold, see [`MAX_HOLD_SHIFT`]), or beyond the hot budget, is
//!   re-protected with
//!   `KVM_CLEAR_DIRTY_LOG` — while the guest is paused and before the page
//!   is read, so a write after the capture always faults and is seen next
//!   epoch.
//!
//! Pages the VMM writes (vm-memory's bitmap: used rings, RX buffers) are
//! reported by that bitmap and handled the same way.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_enable_cap,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::devices::GuestMemory;
use crate::nvram::redo::{Changes, Mark};
use crate::vstate::split::{second_core, Side, Splitter, MAX_CHUNKS};

/// Page size.
pub const PAGE: usize = 4096;
/// Epochs a page newly hot may stay unchanged before it is re-protected.
/// Keeping a page hot costs ~0.25 µs of pause per epoch (one compare);
/// letting it go cold costs ~20 µs the next time it is written: a page
/// written about once in 80 epochs breaks even.
pub const HOT_EPOCHS: u32 = 32;
/// Epochs a page hot for the first time (never re-protected before) may stay
/// unchanged. Pages written once, such as the pages of a large value, then
/// cost two compares instead of 32, while pages that come back within twice
/// `HOT_EPOCHS` of leaving join the working set below. Measured with
/// `cargo bench --bench epoch_pause` (values of 0–16 MiB) and a hot budget of
/// 8 192: pause p50 0.27 / 0.24 / 1.98 / 2.74 ms for 0–16 / 16–64 / 64–256 /
/// 256–1 024 logged pages, against 5.4 / 3.7 / 6.2 / 5.9 ms with a first hold
/// of 32 (the hot set full of pages written once); `redis-benchmark -t set
/// -r 100000` at 16, 16 × 16 and 50 × 16 clients within noise of it.
pub const FIRST_HOLD: u32 = 2;
/// A page written again soon after it went cold (within twice its hold, or
/// twice `HOT_EPOCHS` after its first hold) gets its hold doubled, up to
/// `HOT_EPOCHS << MAX_HOLD_SHIFT` (64 epochs); one that stayed cold longer
/// starts again at `HOT_EPOCHS`. Pages written once leave after
/// `FIRST_HOLD` epochs.
///
/// Why no longer: holding an unchanged page for about the break-even number
/// of epochs (a fault's cost over a compare's, ~80 here) and then
/// re-protecting it costs at most about twice the best choice made knowing
/// its future writes (the ski-rental bound), whatever its write pattern; a
/// longer hold only adds compares for pages written less often than that.
/// Holds of up to 1 024 epochs did exactly that in long runs: after 7 000
/// epochs of `redis-benchmark -t set -c 16 -r 100000`, 608 of 1 240 hot
/// pages had a hold of 1 024 and had been unchanged for 455 epochs on
/// average, and the pause p50 grew to 511–678 µs. Three interleaved
/// 200 000-request runs on tmpfs, at most 1 024 against at most 64: 16
/// clients 7.9–12.5k against 14.5–18.7k SET/s (pause p50 511–678 against
/// 180–219 µs, nvhv's CPU time 1 731–2 330 against 1 214–1 434 ticks);
/// 16 × 16 and 50 × 16 clients and 1 client within noise.
pub const MAX_HOLD_SHIFT: u8 = 1;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

/// Shadow and page-buffer pages [`DirtyTracker::warm`] faults in ahead of
/// the first capture.
const WARM_PAGES: usize = 64;

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The manual-protect capability could not be enabled.
    #[error("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 failed")]
    EnableCap(#[source] kvm_ioctls::Error),
    /// KVM_GET_DIRTY_LOG failed.
    #[error("KVM_GET_DIRTY_LOG failed")]
    GetLog(#[source] std::io::Error),
    /// KVM_CLEAR_DIRTY_LOG failed.
    #[error("KVM_CLEAR_DIRTY_LOG failed")]
    ClearLog(#[source] std::io::Error),
    /// A dirty bitmap buffer does not match the memory slot (a bug).
    #[error("dirty bitmap does not match the memory slot")]
    BitmapSize,
    /// A dirty bit names a page outside guest memory.
    #[error("dirty bit for guest page {0:#x}, outside guest memory")]
    OutOfRange(u64),
    /// Guest memory has more than one region (not supported yet).
    #[error("dirty tracking supports one memory region")]
    Regions,
}

/// One hot page: where its shadow copy (its bytes as last logged) lives,
/// how long it has been unchanged, and how long it may stay so.
#[derive(Clone, Copy, Debug)]
struct Hot {
    pfn: u64,
    slot: u32,
    unchanged: u32,
    hold: u32,
}

/// `DirtyTracker::at` of a page re-protected in this capture: the shadow
/// slot it is compared with once more.
const RETIRING: u32 = 1 << 31;

/// How a reported page is handled in one capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Hot at this index of `DirtyTracker::hot`: compared, shadow refreshed.
    Hot(u32),
    /// Re-protected in this capture: compared with its shadow once more.
    Retiring,
    /// Written while protected (it faulted): always logged.
    Fresh,
}

/// One reported page of a capture.
#[derive(Clone, Copy, Debug)]
struct Job {
    pfn: u64,
    kind: Kind,
    /// Its shadow slot (`Hot` and `Retiring`; 0 for `Fresh`).
    slot: u32,
}

/// Jobs per chunk of the compares split with the helper thread (about 7 µs
/// of work: a claim costs far less).
const CHUNK_JOBS: usize = 8;

/// The helper thread's results of one capture: what it logged, chunk by
/// chunk (it takes chunks from the last one down).
#[derive(Default)]
struct HelperOut {
    changes: Changes,
    chunks: Vec<(Mark, Mark)>,
}

/// The shadow copies, shared with the helper thread during the compares.
struct Shadows {
    base: *mut u8,
    len: usize,
}

// SAFETY: used only inside `DirtyTracker::take`, where every job's shadow
// slot is distinct and each job is handled by one thread (see `compare`).
unsafe impl Sync for Shadows {}

/// Tracks which guest pages changed, epoch by epoch.
pub struct DirtyTracker {
    /// Pages left writable, in no order.
    hot: Vec<Hot>,
    /// Per guest page: 0 = protected, `i + 1` = `hot[i]`, `RETIRING | slot`.
    at: Vec<u32>,
    /// Per guest page: the capture number at which it last went cold (0 = never).
    retired: Vec<u32>,
    /// Per guest page: its hold is `HOT_EPOCHS << shift`.
    shift: Vec<u8>,
    /// Captures taken (numbers the `retired` entries).
    captures: u32,
    shadow: Vec<u8>,
    free: Vec<u32>,
    /// Pages re-protected at this capture, compared once more.
    retiring: Vec<u64>,
    budget: usize,
    /// Reused per capture.
    jobs: Vec<Job>,
    /// KVM's dirty bitmap, read into the same buffer every time (a
    /// capture then adds the pages the VMM wrote).
    kvm_bits: Vec<u64>,
    /// Buffers handed back by [`recycle`](Self::recycle) for the next capture.
    spare: Changes,
    /// Pages of the last capture that were write-protected when written
    /// (each cost the guest a ~20 µs fault).
    faulted: usize,
    /// The thread that takes part of the compares (None: all on the caller).
    splitter: Option<Splitter>,
    /// Per job of a capture: whether its page changed.
    changed: Vec<AtomicBool>,
    helper_out: Mutex<HelperOut>,
    /// Chunks of compares the helper took in the last capture.
    helped: usize,
}

impl DirtyTracker {
    /// Enable manual dirty-log protection on `vm`. ORDER: before the memory
    /// slot is registered with `KVM_MEM_LOG_DIRTY_PAGES`.
    pub fn enable(vm: &VmFd, hot_budget: usize, ram_bytes: u64) -> Result<Self, DirtyError> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = 1; // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, not INITIALLY_SET
        vm.enable_cap(&cap).map_err(DirtyError::EnableCap)?;
        let mut t = Self::new(hot_budget);
        // A helper only where there is a second core for it; without one
        // (or if it cannot start) the compares all run on the pause thread.
        if second_core() {
            t.splitter = Splitter::spawn()
                .inspect_err(|e| tracing::warn!(error = ?e, "page compares on one thread"))
                .ok();
        }
        // Sized now, not in the first capture (where it would add to the
        // first reply's wait after a resume).
        t.size_for(usize::try_from(ram_bytes).unwrap_or(usize::MAX) / PAGE);
        Ok(t)
    }

    fn new(hot_budget: usize) -> Self {
        DirtyTracker {
            hot: Vec::new(),
            at: Vec::new(),
            retired: Vec::new(),
            shift: Vec::new(),
            captures: 0,
            // Reserved, not touched: growing it during a pause would copy it.
            shadow: Vec::with_capacity(hot_budget.saturating_add(hot_budget / 4) * PAGE),
            free: Vec::new(),
            retiring: Vec::new(),
            budget: hot_budget,
            jobs: Vec::new(),
            kvm_bits: Vec::new(),
            spare: Changes::default(),
            faulted: 0,
            splitter: None,
            changed: Vec::new(),
            helper_out: Mutex::default(),
            helped: 0,
        }
    }

    /// A capture follows soon: wake the helper thread now, so that it is
    /// running by the time the compares start (call at the start of the
    /// pause).
    pub fn prepare(&self) {
        if let Some(s) = &self.splitter {
            s.wake();
        }
    }

    /// Fault in what the first capture writes (the bitmap buffers, some
    /// shadow and page-buffer pages), so that it costs what later ones do:
    /// on our hosts each first touch of a page costs microseconds, and the
    /// first capture after a resume holds the first reply. Call before the
    /// guest runs (the resume does it while KVM registers guest memory).
    pub fn warm(&mut self) {
        self.kvm_bits.fill(0);
        if self.shadow.is_empty() {
            self.shadow.resize(WARM_PAGES * PAGE, 0);
            self.free = (0..WARM_PAGES as u32).rev().collect();
        }
        if self.spare.pages.capacity() == 0 {
            self.spare.pages = vec![1; WARM_PAGES * PAGE];
            // The first epoch after a resume logs every page whole (no
            // page has a shadow yet).
            self.spare.payload.warm(WARM_PAGES);
        }
    }

    /// Hand back a committed capture's buffers, to be reused.
    pub fn recycle(&mut self, cap: Changes) {
        if cap.pages.capacity() > self.spare.pages.capacity() {
            self.spare.pages = cap.pages;
        }
        if cap.payload.capacity() > self.spare.payload.capacity() {
            self.spare.payload = cap.payload;
        }
    }

    /// Pages currently left writable.
    pub fn hot_pages(&self) -> usize {
        self.hot.len()
    }

    /// How many pages KVM reports written (hot pages included) right now,
    /// without changing anything: with manual protection `KVM_GET_DIRTY_LOG`
    /// neither clears nor re-protects. For the dirty-budget check between
    /// epochs; safe while the guest runs.
    pub fn peek_count(&mut self, vm: &VmFd, mem: &GuestMemory) -> Result<usize, DirtyError> {
        let npages = slot_pages(mem)?;
        self.size_for(npages);
        count_dirty(vm, npages, &mut self.kvm_bits)
    }

    /// With every vCPU and device paused: re-protect the pages gone cold,
    /// then copy every page written since its last protection (and every page
    /// the VMM wrote) into `out`.
    ///
    /// ORDER: re-protect before copying, so any write after the copy faults.
    pub fn capture(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        out: &mut Changes,
    ) -> Result<(), DirtyError> {
        let mut regions = mem.iter();
        let region = regions.next().ok_or(DirtyError::Regions)?;
        if regions.next().is_some() || region.start_addr().0 != 0 {
            return Err(DirtyError::Regions);
        }
        let npages = region.len() as usize / PAGE;
        self.size_for(npages);
        // The bitmap buffer goes back whatever happens (it is sized once).
        let mut bits = std::mem::take(&mut self.kvm_bits);
        let r = (|| {
            // KVM_GET_DIRTY_LOG overwrites every word; the pages the VMM
            // wrote are added to them.
            get_dirty_log(vm, npages, &mut bits)?;
            let mapping: &MmapRegion<_> = region;
            let mut outside = None;
            mapping.bitmap().take_words(|w, vmm| match bits.get_mut(w) {
                Some(b) => *b |= vmm,
                None => outside = Some(w as u64 * 64),
            });
            if let Some(pfn) = outside {
                return Err(DirtyError::OutOfRange(pfn));
            }
            if let Some((first, bitmap)) = self.retire() {
                clear_dirty_log(vm, npages, first, &bitmap)?;
            }
            // SAFETY: the slice covers exactly the live mapping of `region`
            // (borrowed for the call). Every vCPU and device is paused (the
            // caller's ORDER rule), so nothing writes guest memory while the
            // shared slice exists.
            let guest = unsafe { std::slice::from_raw_parts(region.as_ptr(), npages * PAGE) };
            self.take(guest, &bits, out)
        })();
        self.kvm_bits = bits;
        r
    }

    /// Whether page `pfn` is hot (left writable, compared each epoch) or
    /// going cold.
    pub fn is_hot(&self, pfn: u64) -> bool {
        self.at.get(pfn as usize).is_some_and(|&a| a != 0)
    }

    /// Chunks of compares (of `CHUNK_JOBS` pages) the helper thread took
    /// in the last capture.
    pub fn helped(&self) -> usize {
        self.helped
    }

    /// Pages of the last capture that were protected when the guest (or the
    /// VMM) wrote them: each cost the guest one write fault.
    pub fn faulted(&self) -> usize {
        self.faulted
    }

    fn size_for(&mut self, npages: usize) {
        if self.at.len() != npages {
            // Zeroed allocations: untouched entries cost no memory.
            self.at = vec![0; npages];
            self.retired = vec![0; npages];
            self.shift = vec![0; npages];
            self.hot.clear();
            self.free.clear();
            self.shadow.clear();
            self.kvm_bits = vec![0; npages.div_ceil(64)];
        }
    }

    /// Start a capture: pick the hot pages to re-protect (unchanged past
    /// their hold, or the longest unchanged beyond the hot budget), mark them
    /// retiring, and return what to hand to `KVM_CLEAR_DIRTY_LOG`: the first
    /// page (a multiple of 64) and the bitmap from there to the last cold
    /// page, so that the cost follows the cold pages, not RAM (`None` when
    /// there are none).
    fn retire(&mut self) -> Option<(usize, Vec<u64>)> {
        self.captures = self.captures.wrapping_add(1).max(1);
        let mut cold: Vec<usize> = (0..self.hot.len())
            .filter(|&i| self.hot[i].unchanged >= self.hot[i].hold)
            .collect();
        if self.hot.len() - cold.len() > self.budget {
            let mut rest: Vec<usize> = (0..self.hot.len())
                .filter(|&i| self.hot[i].unchanged < self.hot[i].hold)
                .collect();
            rest.sort_by_key(|&i| (std::cmp::Reverse(self.hot[i].unchanged), self.hot[i].pfn));
            let excess = self.hot.len() - cold.len() - self.budget;
            cold.extend(rest.into_iter().take(excess));
        }
        if cold.is_empty() {
            return None;
        }
        let pfns = cold.iter().map(|&i| self.hot[i].pfn as usize);
        let first = pfns.clone().min().unwrap_or(0) / 64 * 64;
        let last = pfns.max().unwrap_or(0);
        let mut bitmap = vec![0u64; (last - first) / 64 + 1];
        // Highest index first: swap_remove then only moves entries that stay.
        cold.sort_unstable_by(|a, b| b.cmp(a));
        for i in cold {
            let h = self.hot.swap_remove(i);
            if let Some(moved) = self.hot.get(i) {
                self.at[moved.pfn as usize] = i as u32 + 1;
            }
            let p = h.pfn as usize;
            bitmap[(p - first) / 64] |= 1 << (p % 64);
            self.at[p] = RETIRING | h.slot;
            self.retired[p] = self.captures;
            self.retiring.push(h.pfn);
        }
        Some((first, bitmap))
    }

    /// The rest of a capture, after the re-protection: compare every page
    /// set in `dirty` (KVM's bits and the VMM's) with its shadow, log what
    /// changed in `guest` into `out` in ascending pfn order, and update the
    /// hot set. The compares are split with the helper thread when there is
    /// one (see [`crate::vstate::split`]); everything else, which changes
    /// the hot set, runs on the caller afterwards.
    fn take(&mut self, guest: &[u8], dirty: &[u64], out: &mut Changes) -> Result<(), DirtyError> {
        let npages = guest.len() / PAGE;
        if out.pages.capacity() == 0 {
            // Reuse the buffers of an earlier epoch: a fresh 8 MiB allocation
            // costs thousands of page faults, slow under nested paging.
            let spare = std::mem::take(&mut self.spare);
            out.pages = spare.pages;
            out.payload = spare.payload;
        }
        out.pages.clear();
        out.payload.clear();
        self.faulted = 0;
        let mut jobs = std::mem::take(&mut self.jobs);
        jobs.clear();
        let mut outside = None;
        for_each_set_word(dirty, |w, word| {
            let mut bits = word;
            while bits != 0 {
                let pfn = w as u64 * 64 + bits.trailing_zeros() as u64;
                bits &= bits - 1;
                if pfn as usize >= npages {
                    outside.get_or_insert(pfn);
                    continue;
                }
                let (kind, slot) = match self.at[pfn as usize] {
                    0 => (Kind::Fresh, 0),
                    a if a & RETIRING != 0 => (Kind::Retiring, a & !RETIRING),
                    a => (Kind::Hot(a - 1), self.hot[a as usize - 1].slot),
                };
                jobs.push(Job { pfn, kind, slot });
            }
        });
        if let Some(pfn) = outside {
            self.jobs = jobs;
            return Err(DirtyError::OutOfRange(pfn));
        }
        self.compare_all(guest, &jobs, out);
        // The hot set follows, in job order, on this thread alone.
        let flags = std::mem::take(&mut self.changed);
        for (j, changed) in jobs.iter().zip(&flags) {
            let changed = changed.load(Ordering::Relaxed);
            match j.kind {
                Kind::Hot(i) => {
                    let h = &mut self.hot[i as usize];
                    h.unchanged = if changed {
                        0
                    } else {
                        h.unchanged.saturating_add(1)
                    };
                }
                Kind::Retiring => {
                    self.at[j.pfn as usize] = 0;
                    self.free.push(j.slot);
                }
                Kind::Fresh => self.make_hot(j.pfn, &guest[j.pfn as usize * PAGE..][..PAGE]),
            }
        }
        self.changed = flags;
        // Retiring pages not reported (cannot happen for KVM pages, whose
        // bit was set): forget them too.
        for p in self.retiring.drain(..) {
            let a = self.at[p as usize];
            if a & RETIRING != 0 {
                self.at[p as usize] = 0;
                self.free.push(a & !RETIRING);
            }
        }
        self.jobs = jobs;
        Ok(())
    }

    /// Compare (or copy) every job's page into `out`, in job order, the
    /// helper thread (if any) taking chunks from the end; sets
    /// `self.changed` per job and refreshes the shadows of changed hot pages.
    fn compare_all(&mut self, guest: &[u8], jobs: &[Job], out: &mut Changes) {
        self.changed.clear();
        self.changed
            .resize_with(jobs.len(), || AtomicBool::new(false));
        let chunk = CHUNK_JOBS.max(jobs.len().div_ceil(MAX_CHUNKS));
        let chunks = jobs.len().div_ceil(chunk);
        let shadows = Shadows {
            base: self.shadow.as_mut_ptr(),
            len: self.shadow.len(),
        };
        let (changed, helper_out) = (&self.changed[..], &self.helper_out);
        let caller_out = Mutex::new(&mut *out);
        let work = |c: usize, side: Side| {
            let range = c * chunk..((c + 1) * chunk).min(jobs.len());
            let (jobs, changed) = (&jobs[range.clone()], &changed[range]);
            match side {
                Side::Caller => {
                    let mut o = caller_out.lock().unwrap_or_else(|e| e.into_inner());
                    compare(guest, &shadows, jobs, changed, &mut o);
                }
                Side::Helper => {
                    let mut h = helper_out.lock().unwrap_or_else(|e| e.into_inner());
                    let from = h.changes.mark();
                    compare(guest, &shadows, jobs, changed, &mut h.changes);
                    let to = h.changes.mark();
                    h.chunks.push((from, to));
                }
            }
        };
        match self.splitter.as_mut() {
            Some(s) => s.run(chunks, &work),
            None => (0..chunks).for_each(|c| work(c, Side::Caller)),
        }
        // The helper's chunks are the last ones, taken from the end down:
        // appended in reverse, the log stays in ascending pfn order.
        let h = self.helper_out.get_mut().unwrap_or_else(|e| e.into_inner());
        for &(from, to) in h.chunks.iter().rev() {
            out.extend_from(&h.changes, from, to);
        }
        self.helped = h.chunks.len();
        h.chunks.clear();
        h.changes.clear();
    }

    /// A page written while protected becomes hot, with a shadow of its
    /// bytes and a hold that doubles if it went cold only recently.
    fn make_hot(&mut self, pfn: u64, page: &[u8]) {
        self.faulted += 1;
        let p = pfn as usize;
        let hold_of = |shift: u8| HOT_EPOCHS << shift;
        let (r, s) = (self.retired[p], self.shift[p]);
        self.shift[p] = if r == 0 {
            0
        } else if self.captures.wrapping_sub(r) <= 2 * hold_of(s) {
            (s + 1).min(MAX_HOLD_SHIFT)
        } else {
            0
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.shadow.resize(self.shadow.len() + PAGE, 0);
            (self.shadow.len() / PAGE - 1) as u32
        });
        self.shadow[slot as usize * PAGE..][..PAGE].copy_from_slice(page);
        self.hot.push(Hot {
            pfn,
            slot,
            unchanged: 0,
            hold: if r == 0 {
                FIRST_HOLD
            } else {
                hold_of(self.shift[p])
            },
        });
        self.at[p] = self.hot.len() as u32;
    }
}

/// Log the jobs' pages into `out`: a hot or retiring page as its delta from
/// its shadow (nothing when equal), refreshing a changed hot page's shadow;
/// a fresh page whole. Sets `changed` per job.
fn compare(
    guest: &[u8],
    shadows: &Shadows,
    jobs: &[Job],
    changed: &[AtomicBool],
    out: &mut Changes,
) {
    for (j, flag) in jobs.iter().zip(changed) {
        let page = &guest[j.pfn as usize * PAGE..][..PAGE];
        let at = j.slot as usize * PAGE;
        let in_shadows = || assert!(at + PAGE <= shadows.len, "shadow slot {}", j.slot);
        let c = match j.kind {
            Kind::Hot(_) => {
                in_shadows();
                // SAFETY: the slot is inside the shadow buffer (asserted),
                // which is not resized while the compares run. A hot page's
                // slot is its own (no two hot pages share one, and a
                // retiring page's slot is freed only after the compares),
                // and each job is handled by exactly one thread: no other
                // reference to these bytes exists meanwhile.
                let shadow = unsafe { std::slice::from_raw_parts_mut(shadows.base.add(at), PAGE) };
                let c = out.payload.push_delta(j.pfn, shadow, page);
                if c {
                    shadow.copy_from_slice(page);
                }
                c
            }
            Kind::Retiring => {
                in_shadows();
                // SAFETY: as above; this slot is only read.
                let shadow = unsafe { std::slice::from_raw_parts(shadows.base.add(at), PAGE) };
                out.payload.push_delta(j.pfn, shadow, page)
            }
            Kind::Fresh => {
                out.payload.push_full(j.pfn, page);
                true
            }
        };
        if c {
            out.pages.extend_from_slice(page);
        }
        flag.store(c, Ordering::Relaxed);
    }
}

/// Calls `f(index, word)` for every non-zero word of `bits`, in ascending
/// order. The bitmap has one bit per page of RAM (200 KiB for 6.25 GiB) and
/// is nearly all zero: it is scanned 8 words at a time (one OR, which the
/// compiler vectorises), so the per-epoch cost of a large, mostly idle RAM
/// stays a few µs (a word-at-a-time loop took ~40 µs of every pause at
/// 6.25 GiB).
fn for_each_set_word(bits: &[u64], mut f: impl FnMut(usize, u64)) {
    const CHUNK: usize = 8;
    let chunks = bits.chunks_exact(CHUNK);
    let rest = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        if chunk.iter().fold(0, |a, &w| a | w) == 0 {
            continue;
        }
        for (i, &w) in chunk.iter().enumerate() {
            if w != 0 {
                f(c * CHUNK + i, w);
            }
        }
    }
    let base = bits.len() - rest.len();
    for (i, &w) in rest.iter().enumerate() {
        if w != 0 {
            f(base + i, w);
        }
    }
}

/// The pages of guest memory's one region (slot 0), as KVM's dirty bitmap
/// of it counts them.
pub fn slot_pages(mem: &GuestMemory) -> Result<usize, DirtyError> {
    let region = mem.iter().next().ok_or(DirtyError::Regions)?;
    Ok(region.len() as usize / PAGE)
}

/// How many pages of slot 0 (`npages` pages) KVM reports written right now
/// (see [`DirtyTracker::peek_count`]), for the throttle thread, which holds
/// its own duplicate of the VM fd and its own `bits` (one bit per page).
pub fn count_dirty(
    vm: &impl AsRawFd,
    npages: usize,
    bits: &mut [u64],
) -> Result<usize, DirtyError> {
    get_dirty_log(vm, npages, bits)?;
    Ok(bits.iter().map(|w| w.count_ones() as usize).sum())
}

/// `KVM_GET_DIRTY_LOG` of slot 0 (`npages` pages) into `bits`.
fn get_dirty_log(vm: &impl AsRawFd, npages: usize, bits: &mut [u64]) -> Result<(), DirtyError> {
    if bits.len() != npages.div_ceil(64) {
        return Err(DirtyError::BitmapSize);
    }
    let arg = kvm_dirty_log {
        slot: 0,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bits.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd (or a duplicate of one); `bits` holds one bit per page of slot 0
    // (checked above) and outlives the call; KVM writes at most that many
    // bits.
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &arg) };
    if ret != 0 {
        return Err(DirtyError::GetLog(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Re-protect the pages set in `bitmap` and clear their bits: bit `i` is
/// page `first + i` of slot 0 (`npages` pages); `first` is a multiple of 64.
fn clear_dirty_log(
    vm: &VmFd,
    npages: usize,
    first: usize,
    bitmap: &[u64],
) -> Result<(), DirtyError> {
    // KVM wants a multiple of 64 pages unless the range ends the slot.
    let num = (bitmap.len() * 64).min(npages.saturating_sub(first));
    if first % 64 != 0 || num == 0 || bitmap.len() != num.div_ceil(64) {
        return Err(DirtyError::BitmapSize);
    }
    let arg = kvm_clear_dirty_log {
        slot: 0,
        num_pages: u32::try_from(num).map_err(|_| DirtyError::BitmapSize)?,
        first_page: first as u64,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_ptr().cast_mut().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd; `bitmap` holds one bit for each of the `num`
    // pages from `first` (checked above) and outlives the call; KVM only
    // reads it.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret != 0 {
        return Err(DirtyError::ClearLog(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
