//! The panic handler (`panic: <message>` on the serial console, then the
//! panic port, which stops the VM) and the unwinding stubs that the prebuilt
//! `core`/`alloc` reference although guests are built with `panic = "abort"`.

use core::fmt::Write;
use core::panic::PanicInfo;

use crate::serial;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    // Wait a while for another vCPU's line to finish; if this vCPU itself
    // holds the lock (a panic inside a print), print anyway.
    let guard = serial::lock_or_steal(1 << 24);
    let mut w = serial::Unlocked;
    let _ = write!(w, "panic: {}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(w, " (at {}:{}:{})", loc.file(), loc.line(), loc.column());
    }
    let _ = w.write_str("\n");
    drop(guard);
    crate::io::panic_exit(1)
}

/// Personality routine referenced by the prebuilt `alloc`; never called
/// because nothing unwinds (`panic = "abort"`).
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Unwinder entry referenced by landing pads in the prebuilt `core`/`alloc`
/// (compiled with `panic = "unwind"`); never reached, since a panic aborts
/// before anything unwinds. Reports like a panic if it ever is.
#[no_mangle]
extern "C" fn _Unwind_Resume(_exception: *mut u8) -> ! {
    serial::write_bytes_unlocked(b"panic: _Unwind_Resume called (unwinding is not supported)\n");
    crate::io::panic_exit(2)
}
