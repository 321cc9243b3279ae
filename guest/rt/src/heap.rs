//! The guest heap: a `#[global_allocator]` (talc, behind a spin lock) over
//! the free RAM between the image and the stacks, `[image_end, stacks_base)`
//! of the [`BootInfo`]. vCPU 0 sets it up before any `guest_main` runs.

use spinning_top::RawSpinlock;
use talc::source::Manual;
use talc::TalcLock;

use nvhv_abi::BootInfo;

#[global_allocator]
static HEAP: TalcLock<RawSpinlock, Manual> = TalcLock::new(Manual);

extern "C" {
    /// End of the loaded image, from `rt/link.ld`.
    static __nvhv_image_end: u8;
}

/// Start and end of the heap region for `info`: from the image end (the
/// VMM's figure, or the linker's if that is higher) to the stacks.
fn region(info: &BootInfo) -> (u64, u64) {
    let linked_end = core::ptr::addr_of!(__nvhv_image_end) as u64;
    let start = info.image_end.max(linked_end).next_multiple_of(4096);
    (start, info.stacks_base.max(start))
}

/// Gives the heap its memory. Called once, by vCPU 0, before other vCPUs run.
pub(crate) fn init(info: &BootInfo) {
    let (start, end) = region(info);
    if end - start < 64 * 1024 {
        panic!(
            "heap: only {} bytes between image end {start:#x} and stacks {end:#x}",
            end - start
        );
    }
    // SAFETY: per the ABI, [image_end, stacks_base) is RAM that nothing else
    // uses (the image ends at or below `start`, the stacks begin at `end`);
    // `Manual` permits claiming; this runs once, before any allocation.
    let claimed = unsafe { HEAP.lock().claim(start as *mut u8, (end - start) as usize) };
    assert!(
        claimed.is_some(),
        "heap: claim of [{start:#x}, {end:#x}) failed"
    );
}

/// Bytes the heap can still hand out (sum of free chunks).
pub fn heap_free_bytes() -> usize {
    HEAP.lock().counters().available_bytes
}

/// Bytes in live allocations (sum of their requested sizes).
pub fn heap_used_bytes() -> usize {
    HEAP.lock().counters().allocated_bytes
}
