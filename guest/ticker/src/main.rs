//! Built-in guest `ticker`: a LAPIC timer interrupt every millisecond.
//!
//! Entered at CPL0 (its ELF note asks for it), vCPU 0's `nvhv_cpl0_init` hook
//! installs an IDT with one interrupt gate (vector 0x40), points RSP0 of its
//! TSS at a dedicated interrupt stack and programs the local APIC timer:
//! periodic, vector 0x40, divide by 1, initial count 1 000 000 (1 ms at the
//! LAPIC's 1 GHz). The runtime then drops to CPL3 with interrupts enabled. The
//! ISR (CPL0, a handful of emulated instructions) counts ticks and writes EOI.
//! At CPL3, vCPU 0 prints `ticks <n>` every 100 ticks; other vCPUs take no
//! interrupts and park at the wait port.
//!
//! This is the "timer3" pattern of `kvm-host/README.md` section 2, which works
//! with the split irqchip (LAPIC in KVM).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use nvhv_rt::abi::{BootInfo, LAPIC_BASE, SEL_KERNEL_CS, TSS_ADDR, TSS_RSP0_OFFSET};
use nvhv_rt::println;

nvhv_rt::entry_cpl!(0);

/// Timer interrupt vector.
const VECTOR: u64 = 0x40;
/// LAPIC timer initial count: 1 ms at 1 GHz with divide-by-1.
const INITIAL_COUNT: u32 = 1_000_000;
/// Ticks between two printed lines.
const PRINT_EVERY: u64 = 100;
/// Bytes of the interrupt stack (vCPU 0's TSS.RSP0).
const ISTACK_SIZE: usize = 16 * 1024;

/// Ticks counted by the ISR (written at CPL0, read at CPL3).
static TICKS: AtomicU64 = AtomicU64::new(0);
/// Set by the CPL0 hook when the LAPIC page is outside the identity mapping.
static NO_LAPIC: AtomicU64 = AtomicU64::new(0);

// The CPL0 part, in assembly (every CPL0 instruction is emulated here).
//
// nvhv_cpl0_init(rdi = &BootInfo, rsi = vCPU) -> rax = RFLAGS for CPL3.
// Only vCPU 0 sets up the timer; the others return 0x2 (interrupts off).
core::arch::global_asm!(
    ".pushsection .bss.ticker_cpl0,\"aw\",@nobits",
    ".balign 16",
    "ticker_idt:",
    "    .zero 16 * ({vector} + 1)",
    ".balign 16",
    "ticker_istack:",
    "    .zero {istack_size}",
    "ticker_istack_top:",
    ".popsection",
    "",
    ".pushsection .text.nvhv_cpl0_init,\"ax\",@progbits",
    ".globl nvhv_cpl0_init",
    ".type nvhv_cpl0_init,@function",
    "nvhv_cpl0_init:",
    "    mov $2, %eax",
    "    test %rsi, %rsi",
    "    jnz 9f",
    // The LAPIC page must be identity-mapped: map_end >= LAPIC_BASE + 4 KiB.
    "    mov {map_end}(%rdi), %rcx",
    "    movabs ${lapic_end}, %rdx",
    "    cmp %rdx, %rcx",
    "    jb 8f",
    // IDT[vector] = 64-bit interrupt gate, DPL0, kernel CS, -> ticker_isr.
    "    lea ticker_isr(%rip), %rcx",
    "    lea ticker_idt + 16 * {vector}(%rip), %rdx",
    "    mov %cx, (%rdx)",             // offset 15:0
    "    movw ${kernel_cs}, 2(%rdx)",  // selector
    "    movw $0x8e00, 4(%rdx)",       // IST 0; P=1 DPL=0 type 0xe
    "    shr $16, %rcx",
    "    mov %cx, 6(%rdx)",            // offset 31:16
    "    shr $16, %rcx",
    "    mov %ecx, 8(%rdx)",           // offset 63:32
    "    movl $0, 12(%rdx)",
    // lidt {limit, base} built on the stack.
    "    sub $16, %rsp",
    "    movw $(16 * ({vector} + 1) - 1), (%rsp)",
    "    lea ticker_idt(%rip), %rcx",
    "    mov %rcx, 2(%rsp)",
    "    lidt (%rsp)",
    "    add $16, %rsp",
    // vCPU 0's TSS.RSP0 = our interrupt stack.
    "    lea ticker_istack_top(%rip), %rcx",
    "    mov %rcx, {tss_rsp0}",
    // LAPIC: SVR (enable, spurious 0xff), divide by 1, periodic timer.
    "    movabs ${lapic}, %rcx",
    "    movl $0x1ff, 0xf0(%rcx)",
    "    movl $0xb, 0x3e0(%rcx)",
    "    movl $(0x20000 | {vector}), 0x320(%rcx)",
    "    movl ${initial_count}, 0x380(%rcx)",
    "    mov $0x202, %eax",
    "9:  ret",
    "8:  movq $1, {no_lapic}(%rip)",
    "    ret",
    ".size nvhv_cpl0_init, . - nvhv_cpl0_init",
    "",
    // The ISR: runs at CPL0 on ticker_istack; count, EOI, return.
    ".type ticker_isr,@function",
    "ticker_isr:",
    "    incq {ticks}(%rip)",
    "    push %rax",
    "    xor %eax, %eax",
    "    movabs %eax, {lapic_eoi}",
    "    pop %rax",
    "    iretq",
    ".size ticker_isr, . - ticker_isr",
    ".popsection",
    vector = const VECTOR,
    istack_size = const ISTACK_SIZE,
    map_end = const core::mem::offset_of!(BootInfo, map_end),
    lapic_end = const LAPIC_BASE + 0x1000,
    lapic = const LAPIC_BASE,
    lapic_eoi = const LAPIC_BASE + 0xb0,
    kernel_cs = const SEL_KERNEL_CS,
    tss_rsp0 = const TSS_ADDR + TSS_RSP0_OFFSET,
    initial_count = const INITIAL_COUNT,
    ticks = sym TICKS,
    no_lapic = sym NO_LAPIC,
    options(att_syntax)
);

fn main(info: &'static BootInfo, vcpu: u32) -> ! {
    if vcpu != 0 {
        loop {
            nvhv_rt::wait(0);
        }
    }
    if NO_LAPIC.load(Ordering::Relaxed) != 0 {
        panic!(
            "ticker: the LAPIC page {LAPIC_BASE:#x} is not identity-mapped (map_end {:#x})",
            info.map_end
        );
    }
    println!(
        "ticker: LAPIC timer vector {VECTOR:#x}, every {} us, {} vCPU(s)",
        INITIAL_COUNT / 1000,
        info.vcpus
    );
    let mut next = PRINT_EVERY;
    loop {
        let ticks = TICKS.load(Ordering::Relaxed);
        if ticks >= next {
            println!("ticks {ticks}");
            next = ticks + PRINT_EVERY;
        }
        core::hint::spin_loop();
    }
}

nvhv_rt::entry!(main);
