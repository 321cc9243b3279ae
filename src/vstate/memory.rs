//! Guest RAM: a mapping of the image's RAM region, registered with KVM as slot 0.
//!
//! RAM is mapped `MAP_SHARED` from the image file, so guest writes land in the
//! image in place (the suspend-only / flush-on-fail model) and resuming maps the
//! file again without reading or copying a single page: the cost of resume does
//! not depend on RAM size. vm-memory's [`AtomicBitmap`] records the pages the
//! VMM itself writes (device emulation), which the epoch engine needs.
//!
//! [`AtomicBitmap`]: vm_memory::bitmap::AtomicBitmap

use std::fs::File;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::devices::GuestMemory;

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
    /// KVM_GET_DIRTY_LOG failed.
    #[error("KVM_GET_DIRTY_LOG failed")]
    DirtyLog(#[source] kvm_ioctls::Error),
    /// Reading guest memory for a checkpoint failed.
    #[error("cannot copy guest page {0:#x}")]
    Copy(u64, #[source] vm_memory::GuestMemoryError),
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
/// `log_dirty`, KVM records the pages the guest writes (see [`harvest_dirty`]).
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

/// Page size of the dirty tracking.
pub const PAGE: usize = 4096;

/// The guest pages written since the last harvest, as page frame numbers in
/// ascending order: pages the guest wrote (KVM's dirty log, which this call
/// resets and re-protects) and pages the VMM wrote through `mem` (vm-memory's
/// bitmap: used rings, RX buffers, loaded images), which it also resets.
///
/// ORDER: call with every vCPU paused and every device quiesced, or a write
/// racing the harvest may be missed by both bitmaps' resets.
pub fn harvest_dirty(vm: &VmFd, mem: &GuestMemory) -> Result<Vec<u64>, MemoryError> {
    let mut pfns = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let len = region.len() as usize;
        let kvm = vm
            .get_dirty_log(slot as u32, len)
            .map_err(MemoryError::DirtyLog)?;
        let mapping: &MmapRegion<_> = region;
        let vmm = mapping.bitmap().get_and_reset();
        let base = region.start_addr().0 / PAGE as u64;
        let words = kvm.len().max(vmm.len());
        for w in 0..words {
            let mut bits = kvm.get(w).copied().unwrap_or(0) | vmm.get(w).copied().unwrap_or(0);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let pfn = w as u64 * 64 + b;
                if pfn < (len / PAGE) as u64 {
                    pfns.push(base + pfn);
                }
            }
        }
    }
    Ok(pfns)
}

/// Copy the pages `pfns` out of guest memory into `buf` (resized to fit).
pub fn copy_pages(mem: &GuestMemory, pfns: &[u64], buf: &mut Vec<u8>) -> Result<(), MemoryError> {
    use vm_memory::Bytes;
    buf.resize(pfns.len() * PAGE, 0);
    for (i, &pfn) in pfns.iter().enumerate() {
        mem.read_slice(
            &mut buf[i * PAGE..(i + 1) * PAGE],
            GuestAddress(pfn * PAGE as u64),
        )
        .map_err(|e| MemoryError::Copy(pfn, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn vmm_writes_are_dirty_and_copied_back() {
        let mem: GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * PAGE)]).unwrap();
        mem.write_obj(0xabu8, GuestAddress(5 * PAGE as u64 + 7))
            .unwrap();
        mem.write_obj(0xcdu8, GuestAddress(63 * PAGE as u64))
            .unwrap();
        let region: &MmapRegion<_> = mem.iter().next().unwrap();
        let words = region.bitmap().get_and_reset();
        let set: Vec<u64> = (0..64).filter(|i| words[0] >> i & 1 == 1).collect();
        assert_eq!(set, vec![5, 63]);
        let mut buf = Vec::new();
        copy_pages(&mem, &[5, 63], &mut buf).unwrap();
        assert_eq!(buf.len(), 2 * PAGE);
        assert_eq!(buf[7], 0xab);
        assert_eq!(buf[PAGE], 0xcd);
        assert!(copy_pages(&mem, &[64], &mut buf).is_err());
    }
}
