//! Time: the raw TSC ([`tsc`]) and kvmclock nanoseconds ([`now_ns`]).
//!
//! kvmclock is what guests should use for intervals: the VMM restores it
//! across suspend/resume, while the TSC here is the host's (it jumps after a
//! host reboot). Both can jump forward by the time a VM spent suspended, so
//! compare deadlines with `now >= deadline`, never with stored differences.

use core::arch::asm;
use core::sync::atomic::{compiler_fence, Ordering};

use nvhv_abi::{PvclockVcpuTimeInfo, STACK_SIZE};

use crate::start::boot_info_ptr;

/// Reads the time-stamp counter (`rdtsc`, native at CPL3 here).
#[inline]
pub fn tsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the TSC (CR4.TSD is clear: the VMM allows it
    // at CPL3).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}

/// The index of the vCPU running this code, derived from the stack pointer
/// (vCPU `i`'s stack is `[ram_bytes - (i+1)*STACK_SIZE, ram_bytes - i*STACK_SIZE)`).
/// Returns 0 if the stack pointer is outside the ABI stacks (e.g. on a
/// guest's own interrupt stack) or before the runtime is set up.
pub fn current_vcpu() -> u32 {
    let Some(info) = boot_info_ptr() else {
        return 0;
    };
    let rsp: u64;
    // SAFETY: reads the stack pointer only.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    if rsp == 0 || rsp > info.ram_bytes || rsp <= info.stacks_base {
        return 0;
    }
    let index = (info.ram_bytes - rsp) / STACK_SIZE;
    if index < info.vcpus as u64 {
        index as u32
    } else {
        0
    }
}

/// kvmclock nanoseconds, read from this vCPU's kvmclock record (see
/// [`now_ns_on`]).
pub fn now_ns() -> u64 {
    now_ns_on(current_vcpu())
}

/// kvmclock nanoseconds, read from vCPU `vcpu`'s kvmclock record at
/// `kvmclock_addr + 32 * vcpu` with KVM's version protocol (retry while the
/// version is odd or changed under the read). If KVM has not filled the record
/// (version 0), falls back to TSC / `tsc_khz`. Before the runtime is set up,
/// returns the raw TSC.
pub fn now_ns_on(vcpu: u32) -> u64 {
    let Some(info) = boot_info_ptr() else {
        return tsc();
    };
    let vcpu = if vcpu < info.vcpus { vcpu } else { 0 };
    let rec = (info.kvmclock_addr + 32 * vcpu as u64) as *const PvclockVcpuTimeInfo;
    loop {
        // SAFETY: the VMM enabled kvmclock with this record for each vCPU
        // (ABI); it is identity-mapped RAM that KVM updates concurrently,
        // hence the volatile reads and the version check.
        let v1 = unsafe { core::ptr::addr_of!((*rec).version).read_volatile() };
        if v1 == 0 {
            return tsc_fallback_ns(info.tsc_khz);
        }
        if v1 & 1 != 0 {
            core::hint::spin_loop();
            continue;
        }
        compiler_fence(Ordering::Acquire);
        // SAFETY: as above.
        let copy = unsafe { rec.read_volatile() };
        let t = tsc();
        compiler_fence(Ordering::Acquire);
        // SAFETY: as above.
        let v2 = unsafe { core::ptr::addr_of!((*rec).version).read_volatile() };
        if v1 == v2 {
            return copy.nanos_at(t);
        }
    }
}

fn tsc_fallback_ns(tsc_khz: u64) -> u64 {
    let t = tsc();
    if tsc_khz == 0 {
        return t;
    }
    (t as u128 * 1_000_000 / tsc_khz as u128) as u64
}

/// Unix time in nanoseconds: kvmclock plus the offset the VMM keeps in the
/// wall-clock record (rewritten on every resume). Falls back to kvmclock time
/// if the VMM wrote no record.
pub fn unix_time_ns() -> u64 {
    let rec = nvhv_abi::WALL_CLOCK_ADDR as *const nvhv_abi::WallClock;
    // SAFETY: the wall-clock record is identity-mapped guest RAM at a fixed ABI
    // address that the VMM writes only while the vCPUs are stopped.
    let wc = unsafe { rec.read_volatile() };
    let now = now_ns();
    if wc.magic == nvhv_abi::WALL_CLOCK_MAGIC {
        (now as i64).wrapping_add(wc.unix_minus_kvmclock_ns) as u64
    } else {
        now
    }
}
