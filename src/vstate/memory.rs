//! Guest RAM: a mapping of the image's RAM region, registered with KVM as slot 0.
//!
//! RAM is mapped `MAP_SHARED` from the image file, so guest writes land in the
//! image in place (the suspend-only / flush-on-fail model) and resuming maps the
//! file again without reading or copying a single page: the cost of resume does
//! not depend on RAM size. [`PageBitmap`], vm-memory's dirty bitmap here,
//! records the pages the VMM itself writes (device emulation), which the
//! epoch engine needs.
//!
//! [`AdviceWord`] is the one exception: a word the VMM writes without marking
//! it dirty, for advice that is not state ([`nvhv_abi::Hints`]).

use std::fs::File;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use crate::devices::GuestMemory;

use super::dirty::PAGE;

/// Pages per summary bit of [`PageBitmap`]: one 64-bit word of page bits.
const GROUP_PAGES: usize = 64;

/// The dirty bitmap of guest memory (vm-memory's `Bitmap`): a bit per 4 KiB
/// page the VMM wrote through vm-memory, plus a summary bit per 64 pages, so
/// that taking the written pages costs time in proportion to them, not to
/// RAM. (vm-memory's `AtomicBitmap::get_and_reset` swaps every word: ~125 µs
/// per epoch for 6.25 GiB of RAM here, more than the rest of a capture.)
#[derive(Clone, Debug)]
pub struct PageBitmap {
    pages: AtomicBitmap,
    groups: AtomicBitmap,
}

impl PageBitmap {
    fn with_bytes(len: usize) -> Self {
        let nz = |n: usize| std::num::NonZeroUsize::new(n).expect("non-zero");
        PageBitmap {
            pages: AtomicBitmap::new(len, nz(PAGE)),
            groups: AtomicBitmap::new(len, nz(PAGE * GROUP_PAGES)),
        }
    }

    /// Take and clear the written pages, as words of 64 page bits: calls
    /// `f(word_index, bits)` for each non-empty word, in ascending order.
    ///
    /// ORDER: nothing may write guest memory through vm-memory meanwhile (the
    /// caller pauses the devices): a page marked between reading its bit and
    /// clearing it would be lost.
    pub fn take_words(&self, mut f: impl FnMut(usize, u64)) {
        for (gw, mut gbits) in self.groups.get_and_reset().into_iter().enumerate() {
            while gbits != 0 {
                let g = gw * 64 + gbits.trailing_zeros() as usize;
                gbits &= gbits - 1;
                let first = g * GROUP_PAGES;
                let bits = (0..GROUP_PAGES)
                    .filter(|&i| self.pages.is_bit_set(first + i))
                    .fold(0u64, |w, i| w | 1 << i);
                self.pages
                    .reset_addr_range(first * PAGE, GROUP_PAGES * PAGE);
                if bits != 0 {
                    f(g, bits);
                }
            }
        }
    }
}

impl Default for PageBitmap {
    fn default() -> Self {
        PageBitmap::with_bytes(0)
    }
}

impl<'a> WithBitmapSlice<'a> for PageBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for PageBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        // ORDER: the page bits before their summary bit.
        self.pages.set_addr_range(offset, len);
        self.groups.set_addr_range(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.pages.is_addr_set(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for PageBitmap {
    fn with_len(len: usize) -> Self {
        PageBitmap::with_bytes(len)
    }
}

/// Errors while mapping guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Cloning the image file descriptor failed.
    #[error("cannot duplicate the image file descriptor")]
    CloneFd(#[source] std::io::Error),
    /// mmap of the RAM region failed.
    #[error("cannot map guest RAM from the image")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// The region could not become guest memory.
    #[error("cannot build guest memory from the mapping")]
    Region,
    /// RAM size does not fit this host's address space.
    #[error("guest RAM size {0} does not fit in this host's address space")]
    TooLarge(u64),
    /// KVM refused the memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed")]
    SetSlot(#[source] kvm_ioctls::Error),
}

/// Map `ram_bytes` of `file` at `offset` as guest RAM at guest-physical 0.
///
/// `shared` picks `MAP_SHARED` (writes reach the image) or `MAP_PRIVATE`
/// (copy-on-write over the image, for the epoch engine).
pub fn map_ram(
    file: &File,
    offset: u64,
    ram_bytes: u64,
    shared: bool,
) -> Result<GuestMemory, MemoryError> {
    let size = usize::try_from(ram_bytes).map_err(|_| MemoryError::TooLarge(ram_bytes))?;
    let file = file.try_clone().map_err(MemoryError::CloneFd)?;
    let flags = libc::MAP_NORESERVE
        | if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
    let region = MmapRegion::build(
        Some(FileOffset::new(file, offset)),
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        flags,
    )
    .map_err(MemoryError::Map)?;
    let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::Region)?;
    GuestMemory::from_regions(vec![region]).map_err(|_| MemoryError::Region)
}

/// Register every region of `mem` with KVM, slot numbers from 0. With
/// `log_dirty`, KVM records the pages the guest writes (see `vstate::dirty`).
pub fn register(vm: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range [as_ptr, as_ptr + len) is a live mapping owned by
        // `mem`, and every caller keeps `mem` alive for as long as the VM exists
        // (the `Vm` struct owns both and drops the VM fd first).
        unsafe { vm.set_user_memory_region(r) }.map_err(MemoryError::SetSlot)?;
    }
    Ok(())
}

/// A 32-bit word of guest memory that the VMM updates while the guest runs,
/// as advice only ([`nvhv_abi::Hints`]). Stores bypass vm-memory's dirty
/// bitmap on purpose: the word is not part of the persistent state (an
/// epoch never logs a page for it), so its value after a resume may be stale.
/// Never use this for anything the guest relies on for correctness.
#[derive(Clone)]
pub struct AdviceWord {
    /// Keeps the mapping that `word` points into alive.
    _mem: GuestMemory,
    word: *const AtomicU32,
}

// SAFETY: `word` points into a mapping kept alive by `_mem` (shared, reference
// counted) and is only accessed atomically.
unsafe impl Send for AdviceWord {}
// SAFETY: as above; `&AdviceWord` only allows atomic stores.
unsafe impl Sync for AdviceWord {}

impl AdviceWord {
    /// The word at guest-physical `addr` (4-byte aligned, inside RAM), or
    /// `None` when it is not.
    pub fn new(mem: &GuestMemory, addr: u64) -> Option<Self> {
        if addr % 4 != 0 {
            return None;
        }
        // Both ends inside one region (RAM is one region here).
        let host = mem.get_host_address(GuestAddress(addr)).ok()?;
        let end = mem.get_host_address(GuestAddress(addr + 3)).ok()?;
        if end as usize != host as usize + 3 {
            return None;
        }
        Some(AdviceWord {
            _mem: mem.clone(),
            word: host.cast::<AtomicU32>(),
        })
    }

    /// Store `v` (visible to the guest's next read).
    pub fn store(&self, v: u32) {
        // SAFETY: `word` is 4-byte aligned, lies inside the live mapping owned
        // by `_mem`, and is only ever accessed atomically by the VMM (the
        // guest's plain reads of it are advisory).
        unsafe { (*self.word).store(v, Ordering::Release) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn advice_word_is_seen_by_the_guest_and_never_marks_a_page_dirty() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        assert!(AdviceWord::new(&mem, 0x9002).is_none(), "misaligned");
        assert!(AdviceWord::new(&mem, 0x10000).is_none(), "outside RAM");
        let w = AdviceWord::new(&mem, 0x9000).unwrap();
        w.store(7);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x9000)).unwrap(), 7);
        let region: &MmapRegion<_> = mem.iter().next().unwrap();
        let mut words = Vec::new();
        region.bitmap().take_words(|i, b| words.push((i, b)));
        assert!(words.is_empty(), "advice is not state");
        // A write through vm-memory, by contrast, is tracked.
        mem.write_obj(1u32, GuestAddress(0x9000)).unwrap();
        region.bitmap().take_words(|i, b| words.push((i, b)));
        assert_eq!(words, vec![(0, 1 << 9)]);
    }

    #[test]
    fn page_bitmap_reports_exactly_the_written_pages_once() {
        // 8 MiB: 2048 pages, 32 words.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let region: &MmapRegion<_> = mem.iter().next().unwrap();
        // A write across a page boundary, one in the last page, one across a
        // 64-page group boundary.
        mem.write_slice(&[1; 8], GuestAddress(0x1ffc)).unwrap();
        mem.write_obj(7u64, GuestAddress((8 << 20) - 8)).unwrap();
        mem.write_slice(&[2; 16], GuestAddress(64 * 4096 - 8))
            .unwrap();
        let mut pages = Vec::new();
        region.bitmap().take_words(|w, mut b| {
            while b != 0 {
                pages.push(w * 64 + b.trailing_zeros() as usize);
                b &= b - 1;
            }
        });
        assert_eq!(pages, vec![1, 2, 63, 64, 2047]);
        let mut again = 0;
        region.bitmap().take_words(|_, _| again += 1);
        assert_eq!(again, 0, "taking clears");
    }
}
