//! nvhv-rt: the runtime every built-in nvhv guest links against.
//!
//! It owns what a `#![no_std] #![no_main]` guest binary needs around its
//! `guest_main`: the `_start` entry and the hand-over between vCPUs
//! ([`start`]), the heap ([`heap`]), port I/O and the nvhv ports ([`io`]), the
//! serial console and [`print!`]/[`println!`] ([`serial`]), time ([`time`]),
//! the panic handler, and the C memory functions that the prebuilt `core` and
//! `alloc` call ([`mem`]). Link flags and the linker script come from
//! `rt/guest-build.rs` and `rt/link.ld`.
//!
//! A guest looks like this:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use nvhv_rt::{println, BootInfo};
//!
//! fn main(info: &'static BootInfo, vcpu: u32) -> ! {
//!     println!("hello from vCPU {vcpu} of {}", info.vcpus);
//!     nvhv_rt::io::exit(0)
//! }
//! nvhv_rt::entry!(main);
//! ```
//!
//! Add `nvhv_rt::entry_cpl!(0);` to be entered at CPL0 instead of CPL3 (see
//! [`start`] for what then happens).
#![no_std]

pub mod heap;
pub mod io;
pub mod mem;
mod panic;
pub mod serial;
pub mod start;
pub mod time;

pub use nvhv_abi as abi;
pub use nvhv_abi::BootInfo;

pub use heap::{heap_free_bytes, heap_used_bytes};
pub use io::{exit, output_held, wait, OutputDeps};
pub use start::boot_info;
pub use time::{now_ns, tsc, unix_time_ns};

/// Declares the guest's main function: `entry!(path)` where `path` is a
/// `fn(&'static BootInfo, u32) -> !`. Every vCPU calls it (vCPU 0 after
/// setting up the heap, the others after vCPU 0 released them) with the boot
/// info and its vCPU index. It defines the `guest_main` symbol that
/// [`start`] calls, checking the signature.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        fn guest_main(info: &'static $crate::BootInfo, vcpu: u32) -> ! {
            let main: fn(&'static $crate::BootInfo, u32) -> ! = $main;
            main(info, vcpu)
        }
    };
}

/// Emits the nvhv ELF note that asks the VMM to enter this guest at the given
/// CPL (`0` or `3`; without a note the VMM enters at CPL3).
///
/// The note (name [`abi::NOTE_NAME`] with its NUL, type
/// [`abi::NOTE_TYPE_ENTRY_CPL`], a 4-byte descriptor holding the CPL) goes to
/// section `.note.nvhv`, which `rt/link.ld` covers with a `PT_NOTE` segment.
/// A guest entered at CPL0 should define the `nvhv_cpl0_init` hook; see
/// [`start`].
#[macro_export]
macro_rules! entry_cpl {
    ($cpl:literal) => {
        const _: () = assert!($cpl == 0 || $cpl == 3, "entry CPL must be 0 or 3");
        ::core::arch::global_asm!(
            ".pushsection .note.nvhv,\"a\",@note",
            ".balign 4",
            ".long 5",        // namesz: "nvhv" and its NUL
            ".long 4",        // descsz
            ".long {kind}",   // type
            ".asciz \"nvhv\"",
            ".balign 4",
            ".long {cpl}",    // descriptor: the CPL
            ".balign 4",
            ".popsection",
            kind = const $crate::abi::NOTE_TYPE_ENTRY_CPL,
            cpl = const $cpl,
            options(att_syntax)
        );
    };
}
