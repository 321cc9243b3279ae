//! The entry point `_start` and the hand-over to the guest's `guest_main`.
//!
//! Per the ABI every vCPU enters `_start` at the same time with `rdi` =
//! `&BootInfo`, `rsi` = vCPU index and `rsp` = the top of its stack.
//!
//! - Entered at CPL0 (the guest asked with [`entry_cpl!`](crate::entry_cpl)),
//!   `_start` calls the hook `nvhv_cpl0_init(info, vcpu)` on the entry stack,
//!   then drops to CPL3 with `iretq` (CS [`SEL_USER_CS`], SS [`SEL_USER_DS`],
//!   the same stack top) and continues as below. The hook is assembly (every
//!   CPL0 instruction is emulated here, ~0.3 µs each, and the emulator knows
//!   little SSE: do not call Rust from it); it follows the SysV calling
//!   convention and returns in `rax` the RFLAGS for CPL3 (`0x2`, or `0x202`
//!   to enable interrupts). The runtime's default hook, a weak symbol that a
//!   guest's strong `nvhv_cpl0_init` replaces, returns `0x2`.
//! - At CPL3, `_start` aligns the stack and calls Rust: vCPU 0 checks the
//!   boot info, sets up the heap and then releases the other vCPUs, which spin
//!   until then; every vCPU then calls `guest_main(info, vcpu)`
//!   (see [`entry!`](crate::entry)).
//!
//! Statics are not zeroed here: the loader zero-fills `.bss` (ELF
//! `p_memsz > p_filesz`), and a resumed VM never re-enters `_start`.

use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use nvhv_abi::{BootInfo, BOOT_INFO_MAGIC, BOOT_INFO_VERSION, SEL_USER_CS, SEL_USER_DS};

core::arch::global_asm!(
    ".pushsection .text._start,\"ax\",@progbits",
    ".globl _start",
    ".type _start,@function",
    "_start:",
    "    mov %rdi, %r12",         // &BootInfo
    "    mov %rsi, %r13",         // vCPU index
    "    mov %rsp, %r14",
    "    and $-16, %r14",         // stack top, 16-byte aligned
    "    mov %cs, %eax",
    "    test $3, %eax",
    "    jnz 3f",                 // already at CPL3
    // CPL0: run the guest's hook, then iretq to CPL3 at 3f.
    "    mov %r14, %rsp",
    "    call nvhv_cpl0_init",    // rdi, rsi = info, vcpu; rax = RFLAGS for CPL3
    "    push ${user_ds}",        // SS
    "    push %r14",              // RSP
    "    push %rax",              // RFLAGS
    "    push ${user_cs}",        // CS
    "    lea 3f(%rip), %rcx",
    "    push %rcx",              // RIP
    "    iretq",
    "3:",
    "    mov %r12, %rdi",
    "    mov %r13, %rsi",
    "    mov %r14, %rsp",
    "    xor %ebp, %ebp",
    "    call {rust_start}",
    "    ud2",
    ".size _start, . - _start",
    ".popsection",
    "",
    ".pushsection .text.nvhv_cpl0_init,\"ax\",@progbits",
    ".weak nvhv_cpl0_init",
    ".type nvhv_cpl0_init,@function",
    "nvhv_cpl0_init:",
    "    mov $2, %eax",
    "    ret",
    ".size nvhv_cpl0_init, . - nvhv_cpl0_init",
    ".popsection",
    user_ds = const SEL_USER_DS,
    user_cs = const SEL_USER_CS,
    rust_start = sym rust_start,
    options(att_syntax)
);

static INFO: AtomicPtr<BootInfo> = AtomicPtr::new(core::ptr::null_mut());
static RELEASED: AtomicBool = AtomicBool::new(false);

extern "Rust" {
    /// Defined by the guest binary through [`entry!`](crate::entry).
    fn guest_main(info: &'static BootInfo, vcpu: u32) -> !;
}

extern "sysv64" fn rust_start(info: *mut BootInfo, vcpu: u64) -> ! {
    let vcpu = vcpu as u32;
    if vcpu == 0 {
        INFO.store(info, Ordering::Release);
        // SAFETY: per the ABI `rdi` points to the BootInfo block, which the
        // VMM filled before entry and nobody writes afterwards.
        let i: &'static BootInfo = unsafe { &*info };
        if i.magic != BOOT_INFO_MAGIC || i.version != BOOT_INFO_VERSION {
            panic!(
                "boot info at {info:p}: magic {:#x} version {}, expected {BOOT_INFO_MAGIC:#x} version {BOOT_INFO_VERSION}",
                i.magic, i.version
            );
        }
        crate::heap::init(i);
        RELEASED.store(true, Ordering::Release);
    } else {
        while !RELEASED.load(Ordering::Acquire) {
            spin_loop();
        }
    }
    // SAFETY: vCPU 0 checked the block above (the others waited for that).
    let info: &'static BootInfo = unsafe { &*info };
    // SAFETY: `guest_main` has this signature (the entry! macro checks it).
    unsafe { guest_main(info, vcpu) }
}

/// The boot-info block, once vCPU 0 has entered.
pub(crate) fn boot_info_ptr() -> Option<&'static BootInfo> {
    let p = INFO.load(Ordering::Acquire);
    // SAFETY: INFO is null or the ABI's BootInfo pointer, valid forever.
    unsafe { p.as_ref() }
}

/// The boot-info block (the same reference `guest_main` receives).
///
/// # Panics
/// If called before the runtime entered (it cannot be: guest code runs after).
pub fn boot_info() -> &'static BootInfo {
    boot_info_ptr().expect("boot info not set yet")
}
