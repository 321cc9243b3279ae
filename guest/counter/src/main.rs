//! Built-in guest `counter`: every vCPU increments its own counter in guest
//! RAM as fast as it can; vCPU 0 prints `counter <vcpu> <value>` for every
//! vCPU every 100 ms (kvmclock time). All state is in guest RAM and registers,
//! so the counts continue across suspend/resume and the printed values only
//! grow.
#![no_std]
#![no_main]

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use nvhv_rt::abi::MAX_VCPUS;
use nvhv_rt::{now_ns, serial, BootInfo};

/// Print period.
const PERIOD_NS: u64 = 100_000_000;
/// Increments between two looks at the clock on vCPU 0.
const CHECK_EVERY: u32 = 4096;

/// One counter per cache line (two, against the adjacent-line prefetcher),
/// so vCPUs do not slow each other down.
#[repr(C, align(128))]
struct Slot(AtomicU64);

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: Slot = Slot(AtomicU64::new(0));
static COUNTERS: [Slot; MAX_VCPUS as usize] = [ZERO; MAX_VCPUS as usize];

/// One increment: only this vCPU writes its slot, so a relaxed load and store
/// suffice (no locked instruction).
#[inline(always)]
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

fn main(info: &'static BootInfo, vcpu: u32) -> ! {
    let vcpus = info.vcpus.min(MAX_VCPUS);
    let mine = &COUNTERS[vcpu as usize].0;
    if vcpu != 0 {
        loop {
            bump(mine);
        }
    }
    nvhv_rt::println!(
        "counter: {vcpus} vCPU(s), printing every {} ms",
        PERIOD_NS / 1_000_000
    );
    let mut next = now_ns();
    loop {
        for _ in 0..CHECK_EVERY {
            bump(mine);
        }
        let now = now_ns();
        // `next - now > PERIOD_NS`: the clock went backwards (it should not,
        // but never stop printing because of it).
        if now >= next || next - now > PERIOD_NS {
            let mut out = serial::lock();
            for (i, slot) in COUNTERS[..vcpus as usize].iter().enumerate() {
                let _ = writeln!(out, "counter {i} {}", slot.0.load(Ordering::Relaxed));
            }
            drop(out);
            next = now_ns() + PERIOD_NS;
        }
    }
}

nvhv_rt::entry!(main);
