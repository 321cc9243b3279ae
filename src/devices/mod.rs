//! Emulated devices and the buses that route guest port I/O and MMIO exits to them.
//!
//! Devices never touch KVM: a vCPU thread hands each exit to the VMM's bus (`vmm::bus`), which
//! finds the device by address. Devices that produce work for the guest wake a
//! parked vCPU through [`crate::vstate::wait::GuestWake`].

pub mod serial;
pub mod virtio;

/// Guest memory as every device sees it: the RAM image mapping, with vm-memory's
/// bitmap recording the pages the VMM itself writes (they are dirty pages too).
pub type GuestMemory = vm_memory::GuestMemoryMmap<crate::vstate::memory::PageBitmap>;

/// A device reached through MMIO exits. `offset` is relative to the device's window.
pub trait MmioDevice: Send {
    /// Guest reads `data.len()` bytes at `offset`.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset`.
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}
