//! The `virtio-drivers` [`Hal`] of the built-in guest ABI: guest RAM is
//! identity-mapped (virtual == physical) and there is no IOMMU, so DMA memory
//! is page-aligned, zeroed memory from the guest heap, and sharing a buffer
//! with the device is just handing over its address.

use core::alloc::Layout;
use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// The identity-mapped HAL.
pub struct IdentityHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?.max(PAGE_SIZE), PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` returns page-aligned, zeroed heap memory that nothing
// else references until `dma_dealloc`; addresses are identity-mapped, so the
// physical address is the pointer value and `share` returns it unchanged.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = dma_layout(pages) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        match NonNull::new(p) {
            Some(p) => (p.as_ptr() as PhysAddr, p),
            // Physical address 0 tells `Dma::new` that the allocation failed.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = dma_layout(pages) else {
            return -1;
        };
        // SAFETY: the caller passes a pointer from `dma_alloc` with the same
        // page count, so it was allocated with this layout.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
