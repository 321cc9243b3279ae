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
//!   copy kept from the last epoch it changed in (its shadow) and copies out
//!   only the pages whose bytes changed, refreshing their shadows; so the
//!   log carries only changed pages, and nothing is left to sort out after
//!   the guest resumes (the commit, and the replies it releases, wait for
//!   nothing but the write).
//! - A page unchanged for [`HOT_EPOCHS`] epochs, or beyond the hot budget,
//!   is re-protected with `KVM_CLEAR_DIRTY_LOG` — while the guest is paused
//!   and before the page is read, so a write after the capture always faults
//!   and is seen next epoch.
//!
//! Pages the VMM writes (vm-memory's bitmap: used rings, RX buffers) are
//! reported by that bitmap and handled the same way.

use std::collections::HashMap;

use kvm_bindings::{kvm_clear_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::devices::GuestMemory;

/// Page size.
pub const PAGE: usize = 4096;
/// Epochs a hot page may stay unchanged before it is re-protected. Keeping
/// a page hot costs ~0.3 µs of pause per epoch (one compare); letting it go
/// cold costs ~20 µs the next time it is written: a page written about once
/// in 60 epochs breaks even. 32 keeps the pages of a random-key workload hot
/// (pipelined SETs: 81 → 29 faults and 80k → 98k SET/s per `-c 16 -P 16`
/// run at 8 → 32 here) while the hot budget bounds the pause.
pub const HOT_EPOCHS: u32 = 32;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The manual-protect capability could not be enabled.
    #[error("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 failed")]
    EnableCap(#[source] kvm_ioctls::Error),
    /// KVM_GET_DIRTY_LOG failed.
    #[error("KVM_GET_DIRTY_LOG failed")]
    GetLog(#[source] kvm_ioctls::Error),
    /// KVM_CLEAR_DIRTY_LOG failed.
    #[error("KVM_CLEAR_DIRTY_LOG failed")]
    ClearLog(#[source] std::io::Error),
    /// Reading guest memory failed.
    #[error("cannot copy guest page {0:#x}")]
    Copy(u64, #[source] vm_memory::GuestMemoryError),
    /// Guest memory has more than one region (not supported yet).
    #[error("dirty tracking supports one memory region")]
    Regions,
}

/// One hot page: where its shadow copy (its bytes as last logged) lives and
/// how long it has been unchanged.
#[derive(Clone, Copy, Debug)]
struct Hot {
    slot: usize,
    unchanged: u32,
}

/// Pages captured in one pause: every reported page with its bytes.
#[derive(Debug, Default)]
pub struct Captured {
    /// Page frame numbers, ascending.
    pub pfns: Vec<u64>,
    /// Their bytes, 4 KiB each, in `pfns` order.
    pub pages: Vec<u8>,
}

/// Tracks which guest pages changed, epoch by epoch.
pub struct DirtyTracker {
    hot: HashMap<u64, Hot>,
    shadow: Vec<u8>,
    free: Vec<usize>,
    /// Pages re-protected at the last capture, compared once more in `filter`.
    retiring: HashMap<u64, usize>,
    budget: usize,
    /// A page buffer handed back by [`recycle`](Self::recycle) for the next capture.
    spare: Vec<u8>,
    /// Pages of the last capture that were write-protected when written
    /// (each cost the guest a ~20 µs fault).
    faulted: usize,
}

impl DirtyTracker {
    /// Enable manual dirty-log protection on `vm`. ORDER: before the memory
    /// slot is registered with `KVM_MEM_LOG_DIRTY_PAGES`.
    pub fn enable(vm: &VmFd, hot_budget: usize) -> Result<Self, DirtyError> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = 1; // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, not INITIALLY_SET
        vm.enable_cap(&cap).map_err(DirtyError::EnableCap)?;
        Ok(DirtyTracker {
            hot: HashMap::new(),
            // Reserved, not touched: growing it during a pause would copy it.
            shadow: Vec::with_capacity(hot_budget.saturating_add(hot_budget / 4) * PAGE),
            free: Vec::new(),
            retiring: HashMap::new(),
            budget: hot_budget,
            spare: Vec::new(),
            faulted: 0,
        })
    }

    /// Hand back a committed capture's page buffer, to be reused.
    pub fn recycle(&mut self, cap: Captured) {
        if cap.pages.capacity() > self.spare.capacity() {
            self.spare = cap.pages;
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
    pub fn peek_count(&self, vm: &VmFd, mem: &GuestMemory) -> Result<usize, DirtyError> {
        let region = mem.iter().next().ok_or(DirtyError::Regions)?;
        let bits = vm
            .get_dirty_log(0, region.len() as usize)
            .map_err(DirtyError::GetLog)?;
        Ok(bits.iter().map(|w| w.count_ones() as usize).sum())
    }

    fn alloc_slot(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.shadow.resize(self.shadow.len() + PAGE, 0);
            self.shadow.len() / PAGE - 1
        })
    }

    fn shadow_page(&self, slot: usize) -> &[u8] {
        &self.shadow[slot * PAGE..(slot + 1) * PAGE]
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
        out: &mut Captured,
    ) -> Result<(), DirtyError> {
        let mut regions = mem.iter();
        let region = regions.next().ok_or(DirtyError::Regions)?;
        if regions.next().is_some() || region.start_addr().0 != 0 {
            return Err(DirtyError::Regions);
        }
        let npages = region.len() as usize / PAGE;
        let kvm = vm
            .get_dirty_log(0, region.len() as usize)
            .map_err(DirtyError::GetLog)?;
        let mapping: &MmapRegion<_> = region;
        let vmm = mapping.bitmap().get_and_reset();

        // Pick the pages to re-protect: unchanged too long, or over budget.
        let mut cold: Vec<u64> = self
            .hot
            .iter()
            .filter(|(_, h)| h.unchanged >= HOT_EPOCHS)
            .map(|(&p, _)| p)
            .collect();
        if self.hot.len() - cold.len() > self.budget {
            let mut rest: Vec<(u64, u32)> = self
                .hot
                .iter()
                .filter(|(_, h)| h.unchanged < HOT_EPOCHS)
                .map(|(&p, h)| (p, h.unchanged))
                .collect();
            rest.sort_by_key(|&(p, u)| (std::cmp::Reverse(u), p));
            let excess = self.hot.len() - cold.len() - self.budget;
            cold.extend(rest.iter().take(excess).map(|&(p, _)| p));
        }
        if !cold.is_empty() {
            let mut bitmap = vec![0u64; npages.div_ceil(64)];
            for &p in &cold {
                bitmap[p as usize / 64] |= 1 << (p % 64);
            }
            clear_dirty_log(vm, npages, &mut bitmap)?;
            for p in cold {
                if let Some(h) = self.hot.remove(&p) {
                    self.retiring.insert(p, h.slot);
                }
            }
        }

        // Log every reported page whose bytes changed.
        out.pfns.clear();
        out.pages.clear();
        if out.pages.capacity() == 0 {
            // Reuse the buffer of an earlier epoch: a fresh 8 MiB allocation
            // costs thousands of page faults, slow under nested paging.
            out.pages = std::mem::take(&mut self.spare);
            out.pages.clear();
        }
        self.faulted = 0;
        let base = region.as_ptr();
        let words = kvm.len().max(vmm.len());
        for w in 0..words {
            let mut bits = kvm.get(w).copied().unwrap_or(0) | vmm.get(w).copied().unwrap_or(0);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let pfn = w as u64 * 64 + b;
                if pfn as usize >= npages {
                    return Err(DirtyError::Copy(
                        pfn,
                        vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(
                            pfn * PAGE as u64,
                        )),
                    ));
                }
                // SAFETY: `pfn < npages`, so the 4 KiB range lies inside the
                // live mapping of `region` (borrowed for the call). Every vCPU
                // and device is paused (the caller's ORDER rule), so nothing
                // writes it while the shared slice exists.
                let page =
                    unsafe { std::slice::from_raw_parts(base.add(pfn as usize * PAGE), PAGE) };
                self.take_page(pfn, page, out);
            }
        }
        // Retiring pages not reported (cannot happen for KVM pages, whose
        // bit was set): free their shadows.
        for (_, slot) in self.retiring.drain() {
            self.free.push(slot);
        }
        Ok(())
    }

    /// Pages of the last capture that were protected when the guest (or the
    /// VMM) wrote them: each cost the guest one write fault.
    pub fn faulted(&self) -> usize {
        self.faulted
    }

    /// One reported page: log it into `out` if its bytes changed since it
    /// was last logged (a page that was protected always did: it faulted),
    /// keeping its shadow and its hot/cold bookkeeping up to date.
    fn take_page(&mut self, pfn: u64, page: &[u8], out: &mut Captured) {
        let changed = if let Some(h) = self.hot.get_mut(&pfn) {
            let shadow = &mut self.shadow[h.slot * PAGE..(h.slot + 1) * PAGE];
            if shadow == page {
                h.unchanged = h.unchanged.saturating_add(1);
                false
            } else {
                shadow.copy_from_slice(page);
                h.unchanged = 0;
                true
            }
        } else if let Some(slot) = self.retiring.remove(&pfn) {
            // Re-protected in this capture: compared one last time.
            let changed = self.shadow_page(slot) != page;
            self.free.push(slot);
            changed
        } else {
            // Written while protected: it faulted, and becomes hot.
            self.faulted += 1;
            let slot = self.alloc_slot();
            self.shadow[slot * PAGE..(slot + 1) * PAGE].copy_from_slice(page);
            self.hot.insert(pfn, Hot { slot, unchanged: 0 });
            true
        };
        if changed {
            out.pfns.push(pfn);
            out.pages.extend_from_slice(page);
        }
    }
}

/// Re-protect the pages set in `bitmap` (whole slot 0) and clear their bits.
fn clear_dirty_log(vm: &VmFd, npages: usize, bitmap: &mut [u64]) -> Result<(), DirtyError> {
    let arg = kvm_clear_dirty_log {
        slot: 0,
        num_pages: npages as u32,
        first_page: 0,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd; `bitmap` holds one bit per page of slot 0
    // (npages.div_ceil(64) words) and outlives the call; KVM only reads it.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret != 0 {
        return Err(DirtyError::ClearLog(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> DirtyTracker {
        DirtyTracker {
            hot: HashMap::new(),
            shadow: Vec::new(),
            free: Vec::new(),
            retiring: HashMap::new(),
            budget: 100,
            spare: Vec::new(),
            faulted: 0,
        }
    }

    /// Feed one capture's reported pages (pfn, fill byte) to `t`.
    fn capture(t: &mut DirtyTracker, pages: &[(u64, u8)]) -> Captured {
        let mut out = Captured::default();
        t.faulted = 0;
        for &(p, fill) in pages {
            t.take_page(p, &[fill; PAGE], &mut out);
        }
        for (_, slot) in t.retiring.drain() {
            t.free.push(slot);
        }
        out
    }

    #[test]
    fn unchanged_hot_pages_are_dropped_and_changed_ones_kept() {
        let mut t = tracker();
        let c = capture(&mut t, &[(3, 1), (9, 2)]);
        assert_eq!(
            c.pfns,
            vec![3, 9],
            "pages written while protected are logged"
        );
        assert_eq!(t.faulted, 2);
        let c = capture(&mut t, &[(3, 1), (9, 7)]);
        assert_eq!(c.pfns, vec![9]);
        assert_eq!(t.faulted, 0, "hot pages do not fault");
        assert_eq!(c.pages.len(), PAGE);
        assert!(c.pages.iter().all(|&b| b == 7), "the new bytes are logged");
        assert_eq!(t.hot[&3].unchanged, 1);
        assert_eq!(t.hot[&9].unchanged, 0);
        // The shadow follows the logged bytes: 9 back to 2 is a change again.
        let c = capture(&mut t, &[(3, 1), (9, 2)]);
        assert_eq!(c.pfns, vec![9]);
        assert_eq!(t.hot[&3].unchanged, 2);
    }

    #[test]
    fn retiring_pages_are_compared_once_then_forgotten() {
        let mut t = tracker();
        capture(&mut t, &[(8, 4), (9, 4)]);
        for p in [8, 9] {
            let h = t.hot.remove(&p).unwrap();
            t.retiring.insert(p, h.slot);
        }
        let c = capture(&mut t, &[(8, 4), (9, 5)]);
        assert_eq!(
            c.pfns,
            vec![9],
            "unchanged retiring page dropped, changed one logged"
        );
        assert!(t.retiring.is_empty());
        assert_eq!(t.free.len(), 2, "both shadows freed");
        assert!(!t.hot.contains_key(&8) && !t.hot.contains_key(&9));
        // Written again after being re-protected: it faulted, it is logged.
        let c = capture(&mut t, &[(8, 4)]);
        assert_eq!(c.pfns, vec![8]);
        assert_eq!(t.faulted, 1);
        assert_eq!(t.free.len(), 1, "a freed shadow slot is reused");
    }
}
