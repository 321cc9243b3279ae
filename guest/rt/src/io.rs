//! Port I/O and the nvhv ports: `in`/`out` helpers, [`wait`] on the wait port,
//! [`exit`] through the exit port. Port I/O works at CPL3 because the VMM's TSS
//! I/O permission bitmap grants the guest's ports.

use core::arch::asm;

use core::sync::atomic::{compiler_fence, AtomicU64, Ordering};

use nvhv_abi::{DEPS_SLOTS, EXIT_PORT, OUTPUT_DEPS_PORT, PANIC_PORT, WAIT_PORT};

/// Writes one byte to an I/O port.
///
/// # Safety
/// Port writes act on devices; the caller must know what the port does.
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the port; `out` touches no memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads one byte from an I/O port.
///
/// # Safety
/// Port reads can have side effects on devices; the caller must know the port.
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller vouches for the port; `in` touches no memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes a 32-bit value to an I/O port.
///
/// # Safety
/// Port writes act on devices; the caller must know what the port does.
#[inline]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller vouches for the port; `out` touches no memory.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a 32-bit value from an I/O port.
///
/// # Safety
/// Port reads can have side effects on devices; the caller must know the port.
#[inline]
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: the caller vouches for the port; `in` touches no memory.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Parks this vCPU until a device has work for the guest or `timeout_us`
/// microseconds pass (`0`: no timeout). Costs one exit (~56 µs here), so call
/// it only when idle.
pub fn wait(timeout_us: u32) {
    // SAFETY: WAIT_PORT is the ABI's wait port; writing it only parks the vCPU.
    // It is a compiler barrier (no `nomem`) so memory is re-read afterwards.
    unsafe {
        asm!("out dx, eax", in("dx") WAIT_PORT, in("eax") timeout_us, options(nostack, preserves_flags))
    }
}

/// Whether the VMM holds output this guest sent until its epoch commits
/// ([`nvhv_abi::Hints::output_held`]): then an idle guest should [`wait`]
/// at once rather than poll.
pub fn output_held() -> bool {
    // SAFETY: HINTS_ADDR lies in the identity-mapped, always-readable first
    // 2 MiB; the VMM updates the word concurrently, hence the volatile read.
    unsafe { core::ptr::read_volatile(nvhv_abi::HINTS_ADDR as *const u32) != 0 }
}

/// The guest's output-dependency area ([`nvhv_abi::OUTPUT_DEPS_PORT`]): a
/// state version and one dependency slot per connection (by host port). Data
/// sent on a connection whose slot is at most the version at the last
/// committed epoch is not held for output commit. [`register`](Self::register)
/// it once; then, before sending data on a connection,
/// [`publish`](Self::publish) the current version (it must only grow, and
/// grow with every change that later output may depend on) and
/// [`raise`](Self::raise) the connection's slot to the newest version that
/// data depends on.
#[repr(C)]
pub struct OutputDeps {
    version: AtomicU64,
    slots: [AtomicU64; DEPS_SLOTS],
}

#[allow(clippy::declare_interior_mutable_const)] // only an array initialiser
const ZERO: AtomicU64 = AtomicU64::new(0);

impl OutputDeps {
    /// Everything 0, not registered.
    pub const fn new() -> Self {
        OutputDeps {
            version: AtomicU64::new(0),
            slots: [ZERO; DEPS_SLOTS],
        }
    }

    /// Tells the VMM where the area is (a static: identity-mapped, below
    /// 4 GiB).
    pub fn register(&'static self) {
        let addr = self as *const OutputDeps as u64;
        assert!(addr < 1 << 32, "output-dependency area above 4 GiB");
        // SAFETY: OUTPUT_DEPS_PORT is the ABI's port; the VMM only records
        // the address (and reads the area from then on).
        unsafe { outl(OUTPUT_DEPS_PORT, addr as u32) };
    }

    /// Sets the state version to `v` (never lower than before). Stores only
    /// a new value, so a read-only stretch does not dirty the page.
    #[inline]
    pub fn publish(&self, v: u64) {
        store_max(&self.version, v);
    }

    /// Raises the slot of the connection from host port `host_port` to
    /// `dep`: call it before sending data that depends on version `dep`.
    #[inline]
    pub fn raise(&self, host_port: u32, dep: u64) {
        store_max(&self.slots[host_port as usize % DEPS_SLOTS], dep);
    }
}

/// `w = max(w, v)`, written only when it grows.
#[inline]
fn store_max(w: &AtomicU64, v: u64) {
    if w.load(Ordering::Relaxed) < v {
        // ORDER: after the state changes (release), before the packet is
        // published in the TX ring (the fence keeps the compiler from moving
        // that store above this one; x86 keeps stores in order).
        w.store(v, Ordering::Release);
        compiler_fence(Ordering::SeqCst);
    }
}

impl Default for OutputDeps {
    fn default() -> Self {
        Self::new()
    }
}

/// Stops the VM (guest-requested power off) with status `code`.
pub fn exit(code: u32) -> ! {
    // SAFETY: EXIT_PORT is the ABI's exit port; writing it stops the VM.
    unsafe { outl(EXIT_PORT, code) };
    // The VMM does not resume a vCPU after an exit; spin in case it does.
    loop {
        core::hint::spin_loop();
    }
}

/// Reports a guest panic to the VMM (the VM stops) and never returns.
pub(crate) fn panic_exit(code: u32) -> ! {
    // SAFETY: PANIC_PORT is the ABI's panic port; writing it stops the VM.
    unsafe { outl(PANIC_PORT, code) };
    loop {
        core::hint::spin_loop();
    }
}
