//! The serial console: bytes written to the THR register of the COM1 16550
//! ([`nvhv_abi::SERIAL_PORT`]), one `out` (one exit, ~56 µs here) per byte,
//! behind a spin lock so that lines from different vCPUs do not interleave.
//! [`print!`](crate::print) and [`println!`](crate::println) hold the lock for
//! one call; [`lock`] holds it across several writes.

use core::fmt;
use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, Ordering};

use nvhv_abi::SERIAL_PORT;

static LOCKED: AtomicBool = AtomicBool::new(false);

/// Writes bytes to the serial port without taking the lock.
pub fn write_bytes_unlocked(bytes: &[u8]) {
    for &b in bytes {
        // SAFETY: SERIAL_PORT + 0 is the UART's transmit holding register;
        // writing it emits one byte and has no other effect.
        unsafe { crate::io::outb(SERIAL_PORT, b) };
    }
}

/// Exclusive access to the serial console until dropped; implements
/// [`fmt::Write`].
pub struct SerialGuard {
    _private: (),
}

/// Takes the serial lock, spinning until it is free.
pub fn lock() -> SerialGuard {
    while LOCKED
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        while LOCKED.load(Ordering::Relaxed) {
            spin_loop();
        }
    }
    SerialGuard { _private: () }
}

/// Takes the serial lock if it becomes free within `spins` attempts; used by
/// the panic handler, which must print even if this vCPU panicked while
/// holding the lock.
pub(crate) fn lock_or_steal(spins: u64) -> Option<SerialGuard> {
    for _ in 0..spins {
        if LOCKED
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Some(SerialGuard { _private: () });
        }
        spin_loop();
    }
    None
}

impl SerialGuard {
    /// Writes raw bytes.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        write_bytes_unlocked(bytes);
    }
}

impl fmt::Write for SerialGuard {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes_unlocked(s.as_bytes());
        Ok(())
    }
}

impl Drop for SerialGuard {
    fn drop(&mut self) {
        LOCKED.store(false, Ordering::Release);
    }
}

/// A writer that does not lock (for contexts that cannot wait, e.g. after the
/// lock was stolen); prefer [`lock`].
pub struct Unlocked;

impl fmt::Write for Unlocked {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes_unlocked(s.as_bytes());
        Ok(())
    }
}

/// Writes bytes under the lock.
pub fn write_bytes(bytes: &[u8]) {
    lock().write_bytes(bytes);
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>, newline: bool) {
    let mut g = lock();
    // Our write_str never fails; a failing Display impl just cuts the line.
    let _ = fmt::Write::write_fmt(&mut g, args);
    if newline {
        g.write_bytes(b"\n");
    }
}

/// Prints to the serial console (under the serial lock).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::_print(::core::format_args!($($arg)*), false) };
}

/// Prints a line to the serial console (under the serial lock, so the line is
/// not interleaved with other vCPUs' output).
#[macro_export]
macro_rules! println {
    () => { $crate::serial::write_bytes(b"\n") };
    ($($arg:tt)*) => { $crate::serial::_print(::core::format_args!($($arg)*), true) };
}
