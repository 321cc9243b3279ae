//! vCPUs: creation in the built-in ABI's entry state, and the complete saved
//! state ([`VcpuState`]) with its restore order. The per-vCPU thread, with
//! its run loop, park, pause (signal + `immediate_exit`) and stop, is in
//! `thread.rs`.
//!
//! ORDER rules that matter on our hosts (see `../shared/kvm-host/README.md` §5):
//! - CPUID must be set before XCRs and xsave (KVM_SET_XCRS fails with EINVAL
//!   otherwise); we follow Firecracker's full order: cpuid, mp_state, regs,
//!   sregs, xsave, xcrs, debugregs, lapic, MSRs (TSC_DEADLINE after the
//!   LAPIC), vcpu_events last.
//! - A pending I/O or MMIO exit must be completed (`immediate_exit = 1` +
//!   `KVM_RUN`) before registers are read or changed, or its data is lost.
//!   The one exception is the guest's `out` to the wait port at a park: its
//!   completion at most moves RIP past it, so the park's save leaves it
//!   pending (see `save_or_reuse`).

use std::cell::Cell;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_segment, kvm_sregs, kvm_sync_regs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Cap, SyncReg, VcpuFd};
use serde::{Deserialize, Serialize};

use super::vm::Vm;

mod thread;
pub use thread::{
    install_kick_handler, kick_signal, spawn, ExitAction, ExitHandler, StopReason, VcpuCmd,
    VcpuEvent, VcpuHandle,
};

/// MSR_KVM_SYSTEM_TIME_NEW: enables kvmclock for one vCPU.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// Errors of vCPU creation, state save/restore and the run loop.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("KVM_CREATE_VCPU failed")]
    Create(#[source] kvm_ioctls::Error),
    /// A KVM_GET_* ioctl failed while saving.
    #[error("saving vCPU {index}: KVM_GET_{what} failed")]
    Get {
        /// vCPU index.
        index: u32,
        /// Which state.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM_SET_* ioctl failed while restoring or configuring.
    #[error("restoring vCPU {index}: KVM_SET_{what} failed")]
    Set {
        /// vCPU index.
        index: u32,
        /// Which state.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Not every MSR was accepted.
    #[error("restoring vCPU {index}: KVM accepted {accepted} of {total} MSRs")]
    PartialMsrs {
        /// vCPU index.
        index: u32,
        /// How many KVM took.
        accepted: usize,
        /// How many we gave.
        total: usize,
    },
    /// The saved state is malformed.
    #[error("vCPU state is invalid: {0}")]
    BadState(&'static str),
    /// Asking KVM what a new vCPU gets failed.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread could not be spawned.
    #[error("cannot spawn the vCPU thread")]
    Spawn(#[source] std::io::Error),
}

/// Everything KVM holds for one vCPU. Serialized into the machine state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VcpuState {
    /// CPUID entries (KVM_GET_CPUID2).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// KVM_GET_MP_STATE.
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state: the 1024 words of `kvm_xsave.region` (KVM_CAP_XSAVE2
    /// reports 4096 bytes on our hosts, so nothing lies beyond it).
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers (including the timer).
    pub lapic: kvm_lapic_state,
    /// Every MSR in KVM's MSR index list that reads back.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions/interrupts/NMIs (restored last).
    pub events: kvm_vcpu_events,
}

/// Privilege level a built-in guest is entered at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryCpl {
    /// Kernel mode (emulated, ~0.3 µs per instruction here).
    Cpl0,
    /// User mode (native speed): the default.
    Cpl3,
}

/// Where a built-in guest starts.
#[derive(Clone, Copy, Debug)]
pub struct EntryPoint {
    /// Entry address (`rip`).
    pub rip: u64,
    /// Privilege level.
    pub cpl: EntryCpl,
    /// Address of the boot-info block (`rdi`).
    pub boot_info: u64,
    /// RAM size, to place the stack.
    pub ram_bytes: u64,
}

/// IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS: 0 makes `sysenter` fault.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// EFER.SCE: `syscall` enabled.
const EFER_SCE: u64 = 1;

/// One vCPU and its file descriptor. Lives on its own thread once started.
pub struct Vcpu {
    fd: VcpuFd,
    index: u32,
    msr_indices: Vec<u32>,
    /// The last KVM_RUN ended in an I/O or MMIO exit that KVM completes only
    /// on the next KVM_RUN.
    io_pending: bool,
    /// CPUID as set (it never changes once the vCPU exists): saved once,
    /// not read back on every epoch.
    cpuid: Option<Vec<kvm_cpuid_entry2>>,
    /// KVM_RUN was entered since the last save (the state may have changed).
    ran_since_save: bool,
    /// The guest's page tables confine it to CPL3 (`guest_abi::is_confining`):
    /// saves may re-read only what CPL3 code can change.
    confinable: bool,
    /// The last full save, the base of quick saves.
    full: Option<Box<VcpuState>>,
    /// Saves done the quick way (for tests and metrics).
    quick_saves: u64,
    /// `kvm_run`'s sync area holds the registers, system registers and
    /// events as the last `KVM_RUN` left them, and nothing changed them
    /// since (see [`Vcpu::synced_regs`]).
    synced: Cell<bool>,
    /// KVM fills the sync area ([`SYNC_FIELDS`] are valid on this vCPU).
    sync: bool,
}

/// Whether a `KVM_RUN` that returned `r` left the sync fields current: its
/// normal returns do (an exit, or EINTR after a kick or an `immediate_exit`:
/// KVM stores them on its way out of every `KVM_RUN` that got that far).
fn leaves_sync_fields<T>(r: &Result<T, kvm_ioctls::Error>) -> bool {
    match r {
        Ok(_) => true,
        Err(e) => e.errno() == libc::EINTR || e.errno() == libc::EAGAIN,
    }
}

/// The `kvm_run` sync fields nvhv asks for: general and system registers
/// and pending events (`KVM_SYNC_X86_REGS | SREGS | EVENTS`).
const SYNC_FIELDS: u32 = kvm_bindings::KVM_SYNC_X86_REGS
    | kvm_bindings::KVM_SYNC_X86_SREGS
    | kvm_bindings::KVM_SYNC_X86_EVENTS;

impl Vcpu {
    /// Create vCPU `index` and give it KVM's supported CPUID (with its APIC id).
    ///
    /// ORDER: CPUID is set first; XCRs/xsave set later depend on it.
    pub fn new(vm: &Vm, index: u32) -> Result<Self, VcpuError> {
        let mut v = Vcpu::create(vm, index)?;
        let mut cpuid = vm.supported_cpuid()?.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                // Initial APIC id in EBX[31:24].
                0x1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
                // x2APIC id in EDX of the topology leaves.
                0xb | 0x1f => e.edx = index,
                _ => {}
            }
        }
        v.fd.set_cpuid2(&cpuid).map_err(|source| VcpuError::Set {
            index,
            what: "CPUID2",
            source,
        })?;
        v.msr_indices = v.readable_msrs(vm.msr_indices()?);
        Ok(v)
    }

    /// The bare vCPU: no CPUID set, no MSR list yet.
    fn create(vm: &Vm, index: u32) -> Result<Self, VcpuError> {
        let mut fd = vm.fd.create_vcpu(index as u64).map_err(VcpuError::Create)?;
        // KVM_CAP_SYNC_REGS: at every return from KVM_RUN, KVM copies these
        // into the shared kvm_run page, so a save after a run reads them
        // there instead of with three ioctls (~6 µs each here).
        let sync = vm.fd.check_extension_int(Cap::SyncRegs) as u32 & SYNC_FIELDS == SYNC_FIELDS;
        if sync {
            fd.set_sync_valid_reg(SyncReg::Register);
            fd.set_sync_valid_reg(SyncReg::SystemRegister);
            fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        }
        Ok(Vcpu {
            fd,
            index,
            msr_indices: Vec::new(),
            io_pending: false,
            cpuid: None,
            ran_since_save: true,
            confinable: false,
            full: None,
            quick_saves: 0,
            synced: Cell::new(false),
            sync,
        })
    }

    /// Index of this vCPU.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// TSC frequency KVM gives this vCPU, in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.fd.get_tsc_khz().unwrap_or(0)
    }

    /// Keep only the MSRs this KVM reads back (all 41 do on our hosts).
    fn readable_msrs(&self, all: &[u32]) -> Vec<u32> {
        all.iter()
            .copied()
            .filter(|&i| {
                let Ok(mut m) = Msrs::from_entries(&[kvm_msr_entry {
                    index: i,
                    ..Default::default()
                }]) else {
                    return false;
                };
                matches!(self.fd.get_msrs(&mut m), Ok(1))
            })
            .collect()
    }

    fn set_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Set {
            index,
            what,
            source,
        }
    }

    fn get_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Get {
            index,
            what,
            source,
        }
    }

    /// Put the vCPU in the built-in ABI's entry state (64-bit, paging on,
    /// CPL3 or CPL0), with kvmclock enabled at its per-vCPU record.
    pub fn configure_entry(&self, entry: &EntryPoint) -> Result<(), VcpuError> {
        self.synced.set(false);
        let mut sregs = self.fd.get_sregs().map_err(self.get_err("SREGS"))?;
        let (cs_sel, ds_sel, dpl) = match entry.cpl {
            EntryCpl::Cpl3 => (nvhv_abi::SEL_USER_CS, nvhv_abi::SEL_USER_DS, 3),
            EntryCpl::Cpl0 => (nvhv_abi::SEL_KERNEL_CS, nvhv_abi::SEL_KERNEL_DS, 0),
        };
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: cs_sel,
            type_: 0xb,
            present: 1,
            dpl,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: ds_sel,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ss = data;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.tr = kvm_segment {
            base: nvhv_abi::TSS_ADDR + self.index as u64 * nvhv_abi::TSS_STRIDE,
            limit: crate::boot::guest_abi::TSS_LIMIT,
            selector: nvhv_abi::SEL_TSS_BASE + 16 * self.index as u16,
            type_: 0xb,
            present: 1,
            s: 0,
            ..Default::default()
        };
        sregs.gdt.base = nvhv_abi::GDT_ADDR;
        sregs.gdt.limit = crate::boot::guest_abi::gdt_limit(self.index + 1);
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = 0x8005_0033; // PG AM WP NE ET MP PE
        sregs.cr3 = nvhv_abi::PML4_ADDR;
        sregs.cr4 = 0x40620; // OSXSAVE OSXMMEXCPT OSFXSR PAE
        sregs.efer = match entry.cpl {
            // No SCE: `syscall` at CPL3 is #UD (a triple fault without an
            // IDT), never a way into CPL0 (see `save`).
            EntryCpl::Cpl3 => 0xd00, // NXE LMA LME
            EntryCpl::Cpl0 => 0xd01, // NXE LMA LME SCE
        };
        self.fd.set_sregs(&sregs).map_err(self.set_err("SREGS"))?;

        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = 7; // x87 | SSE | AVX
        self.fd.set_xcrs(&xcrs).map_err(self.set_err("XCRS"))?;

        let regs = kvm_regs {
            rip: entry.rip,
            rsp: nvhv_abi::stack_top(entry.ram_bytes, self.index),
            rdi: entry.boot_info,
            rsi: self.index as u64,
            rflags: 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(self.set_err("REGS"))?;

        // With the LAPIC in KVM, application processors start UNINITIALIZED
        // (waiting for INIT/SIPI); the built-in ABI starts every vCPU at once.
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(self.set_err("MP_STATE"))?;

        let clock = nvhv_abi::KVMCLOCK_ADDR + 32 * self.index as u64;
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_KVM_SYSTEM_TIME_NEW,
            data: clock | 1,
            ..Default::default()
        }])
        .map_err(|_| VcpuError::BadState("MSR list"))?;
        let n = self.fd.set_msrs(&msrs).map_err(self.set_err("MSRS"))?;
        if n != 1 {
            return Err(VcpuError::PartialMsrs {
                index: self.index,
                accepted: n,
                total: 1,
            });
        }
        Ok(())
    }

    /// Complete a pending I/O or MMIO exit so no data is lost: KVM_RUN with
    /// `immediate_exit` set finishes the instruction and returns EINTR. Does
    /// nothing (no ioctl) when the last KVM_RUN left nothing pending.
    pub fn complete_pending_io(&mut self) {
        if !self.io_pending {
            return;
        }
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ());
        self.synced.set(self.sync && leaves_sync_fields(&r));
        self.fd.set_kvm_immediate_exit(0);
        self.io_pending = false;
    }

    /// `kvm_run`'s sync area (general and system registers, pending
    /// events) when the last `KVM_RUN` left it current and nothing set them
    /// since: KVM fills it at the end of every `KVM_RUN`, also after
    /// completing a pending I/O with `immediate_exit`. One snapshot, taken
    /// as KVM_RUN returned. None: read them by ioctl ([`Self::regs_sregs`],
    /// [`Self::events`]).
    fn synced_regs(&self) -> Option<kvm_sync_regs> {
        self.synced.get().then(|| self.fd.sync_regs())
    }

    /// General and system registers, from `synced` or by ioctl.
    fn regs_sregs(
        &self,
        synced: Option<&kvm_sync_regs>,
    ) -> Result<(kvm_regs, kvm_sregs), VcpuError> {
        Ok(match synced {
            Some(s) => (s.regs, s.sregs),
            None => (
                self.fd.get_regs().map_err(self.get_err("REGS"))?,
                self.fd.get_sregs().map_err(self.get_err("SREGS"))?,
            ),
        })
    }

    /// Pending events, from `synced` or by ioctl. ORDER: a save reads them
    /// last, so nothing read before changes what is pending.
    fn events(&self, synced: Option<&kvm_sync_regs>) -> Result<kvm_vcpu_events, VcpuError> {
        match synced {
            Some(s) => Ok(s.events),
            None => self
                .fd
                .get_vcpu_events()
                .map_err(self.get_err("VCPU_EVENTS")),
        }
    }

    /// The guest's page tables confine it to CPL3 (the VMM checked them with
    /// `guest_abi::is_confining`): later saves may be quick.
    pub fn set_confinable(&mut self, yes: bool) {
        self.confinable = yes;
    }

    /// Save the whole vCPU state. Call [`complete_pending_io`](Self::complete_pending_io)
    /// first. CPUID is read from KVM once and reused (it cannot change).
    ///
    /// Quick save: every vCPU ioctl costs ~6 µs here and a full save takes
    /// ten. A guest confined to CPL3 can change only its general registers,
    /// RFLAGS, FPU/SSE/AVX state, data segment selectors and (transiently)
    /// pending events, and the local APIC through its MMIO page; everything
    /// else (control registers, MSRs, XCRs, debug registers, mp_state) needs
    /// CPL0. It is confined while [`Self::set_confinable`] holds (its page
    /// tables and descriptor tables are read-only to it) and this save's
    /// `sregs` show CPL3, no IDT (any exception or interrupt is a triple
    /// fault), `syscall` disabled, the ABI's CR3, and the last full save
    /// showed `sysenter` disabled. Then only `sregs`, `regs`, xsave, the
    /// LAPIC, the TSC and the events are read (6 ioctls instead of 10); the
    /// rest comes from the last full save.
    pub fn save(&mut self) -> Result<VcpuState, VcpuError> {
        if let Some(st) = self.quick_save()? {
            self.quick_saves += 1;
            return Ok(st);
        }
        let st = self.read_state(self.cpuid.clone())?;
        if self.cpuid.is_none() {
            self.cpuid = Some(st.cpuid.clone());
        }
        if self.confinable {
            self.full = Some(Box::new(st.clone()));
        }
        Ok(st)
    }

    /// The xsave area (x87, SSE, AVX state).
    fn xsave_bytes(&self) -> Result<Vec<u32>, VcpuError> {
        Ok(self
            .fd
            .get_xsave()
            .map_err(self.get_err("XSAVE"))?
            .region
            .to_vec())
    }

    /// How many saves were quick (see [`save`](Self::save)).
    pub fn quick_saves(&self) -> u64 {
        self.quick_saves
    }

    fn quick_save(&self) -> Result<Option<VcpuState>, VcpuError> {
        let (true, Some(base)) = (self.confinable, self.full.as_deref()) else {
            return Ok(None);
        };
        let synced = self.synced_regs();
        let (regs, sregs) = self.regs_sregs(synced.as_ref())?;
        let sysenter_off = base
            .msrs
            .iter()
            .any(|m| m.index == MSR_IA32_SYSENTER_CS && m.data == 0);
        let confined = sregs.cs.dpl == 3
            && sregs.idt.limit == 0
            && sregs.efer & EFER_SCE == 0
            && sregs.cr3 == nvhv_abi::PML4_ADDR
            && sysenter_off;
        if !confined {
            return Ok(None);
        }
        let xsave = self.xsave_bytes()?;
        let lapic = self.fd.get_lapic().map_err(self.get_err("LAPIC"))?;
        // The TSC moves on its own; restoring the full save's value would
        // take the guest's TSC back in time on hosts that can set it.
        let mut msrs = base.msrs.clone();
        let mut tsc = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .map_err(|_| VcpuError::BadState("MSR list"))?;
        if self.fd.get_msrs(&mut tsc).map_err(self.get_err("MSRS"))? == 1 {
            let now = tsc.as_slice()[0].data;
            for m in msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
                m.data = now;
            }
        }
        // ORDER: events last, as in a full save.
        let events = self.events(synced.as_ref())?;
        Ok(Some(VcpuState {
            cpuid: base.cpuid.clone(),
            mp_state: base.mp_state,
            regs,
            sregs,
            xsave,
            xcrs: base.xcrs,
            debugregs: base.debugregs,
            lapic,
            msrs,
            events,
        }))
    }

    /// Read every piece of vCPU state from KVM; CPUID too unless `cpuid` is given.
    fn read_state(&self, cpuid: Option<Vec<kvm_cpuid_entry2>>) -> Result<VcpuState, VcpuError> {
        let cpuid = match cpuid {
            Some(c) => c,
            None => self
                .fd
                .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(self.get_err("CPUID2"))?
                .as_slice()
                .to_vec(),
        };
        let mp_state = self.fd.get_mp_state().map_err(self.get_err("MP_STATE"))?;
        let synced = self.synced_regs();
        let (regs, sregs) = self.regs_sregs(synced.as_ref())?;
        let xsave = self.xsave_bytes()?;
        let xcrs = self.fd.get_xcrs().map_err(self.get_err("XCRS"))?;
        let debugregs = self
            .fd
            .get_debug_regs()
            .map_err(self.get_err("DEBUGREGS"))?;
        let lapic = self.fd.get_lapic().map_err(self.get_err("LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| VcpuError::BadState("too many MSRs"))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(self.get_err("MSRS"))?;
        let msrs = msrs.as_slice()[..n].to_vec();
        // ORDER: events last, so nothing above changes what is pending.
        let events = self.events(synced.as_ref())?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
        })
    }

    /// Load a saved state into this (fresh) vCPU, in Firecracker's order.
    /// [`Persist::restore`](crate::persist::Persist::restore) creates the vCPU and calls this.
    pub fn set_state(&mut self, s: &VcpuState) -> Result<(), VcpuError> {
        self.synced.set(false);
        if s.cpuid.is_empty() || s.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
            return Err(VcpuError::BadState("CPUID entry count"));
        }
        // ORDER: CPUID first: KVM validates XCRs/xsave against it.
        let cpuid =
            CpuId::from_entries(&s.cpuid).map_err(|_| VcpuError::BadState("CPUID entries"))?;
        self.fd.set_cpuid2(&cpuid).map_err(self.set_err("CPUID2"))?;
        self.cpuid = Some(s.cpuid.clone());
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(self.set_err("MP_STATE"))?;
        self.fd.set_regs(&s.regs).map_err(self.set_err("REGS"))?;
        // ORDER: sregs (APIC base) before the LAPIC.
        self.fd.set_sregs(&s.sregs).map_err(self.set_err("SREGS"))?;
        let mut xsave = kvm_xsave::default();
        if s.xsave.len() != xsave.region.len() {
            return Err(VcpuError::BadState("xsave area size"));
        }
        xsave.region.copy_from_slice(&s.xsave);
        // SAFETY: `kvm_xsave` is the fixed 4096-byte legacy struct, and our hosts
        // report KVM_CAP_XSAVE2 = 4096, so KVM reads no byte past its end.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(self.set_err("XSAVE"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(self.set_err("XCRS"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(self.set_err("DEBUGREGS"))?;
        self.fd.set_lapic(&s.lapic).map_err(self.set_err("LAPIC"))?;
        // ORDER: MSRs after the LAPIC (TSC_DEADLINE needs the timer mode set).
        if s.msrs.len() > 1024 {
            return Err(VcpuError::BadState("too many MSRs"));
        }
        let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VcpuError::BadState("MSRs"))?;
        let n = self.fd.set_msrs(&msrs).map_err(self.set_err("MSRS"))?;
        if n != s.msrs.len() {
            return Err(VcpuError::PartialMsrs {
                index: self.index,
                accepted: n,
                total: s.msrs.len(),
            });
        }
        // ORDER: vcpu_events last.
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(self.set_err("VCPU_EVENTS"))?;
        // The vCPU now holds `s`: the base of quick saves (the first epoch
        // after a resume need not read everything back).
        self.full = Some(Box::new(s.clone()));
        Ok(())
    }

    /// Registers, for crash reports.
    pub fn regs(&self) -> Option<kvm_regs> {
        self.fd.get_regs().ok()
    }
}

/// What [`Vcpu`]'s restore needs besides its state: the VM and the index.
pub struct VcpuArgs<'a> {
    /// The VM to create the vCPU in.
    pub vm: &'a Vm,
    /// Its index.
    pub index: u32,
}

impl<'a> crate::persist::Persist<'a> for Vcpu {
    type State = VcpuState;
    type Args = VcpuArgs<'a>;
    type Error = VcpuError;

    /// Reads the state from KVM. The vCPU must be stopped with nothing
    /// pending (as after [`Vcpu::complete_pending_io`]); the CPUID read once
    /// is reused, not cached here.
    fn save(&self) -> Result<VcpuState, VcpuError> {
        self.read_state(self.cpuid.clone())
    }

    /// Creates vCPU `index` in `vm` and restores `state` into it. The
    /// saved CPUID and MSR list are the ones used: no asking KVM what it
    /// supports and no probing each MSR (~0.4 ms and ~0.3 ms here); a host
    /// whose KVM refuses them fails the restore (`KVM_SET_*`, `PartialMsrs`).
    fn restore(args: VcpuArgs<'a>, state: &VcpuState) -> Result<Self, VcpuError> {
        let mut v = Vcpu::create(args.vm, args.index)?;
        v.msr_indices = state.msrs.iter().map(|m| m.index).collect();
        v.set_state(state)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::thread::save_or_reuse;
    use super::*;
    use crate::devices::GuestMemory;
    use kvm_ioctls::VcpuExit;
    use vm_memory::{Bytes, GuestAddress};

    /// Real-mode code at 0x1000: `mov ax, 0x1234; mov bx, 0x5678; out 0x80,
    /// al; mov cx, 0x9abc; out 0x81, al; hlt` (the second `out` marks the
    /// end: with the LAPIC in KVM a `hlt` never comes back to us).
    const CODE: &[u8] = &[
        0xb8, 0x34, 0x12, 0xbb, 0x78, 0x56, 0xe6, 0x80, 0xb9, 0xbc, 0x9a, 0xe6, 0x81, 0xf4,
    ];

    /// Whether /dev/kvm can be used; with NVHV_REQUIRE_KVM=1 a missing KVM
    /// fails the test instead of skipping it.
    fn kvm_available() -> bool {
        let ok = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if !ok {
            assert_ne!(
                std::env::var("NVHV_REQUIRE_KVM").as_deref(),
                Ok("1"),
                "NVHV_REQUIRE_KVM=1 but /dev/kvm cannot be opened"
            );
            eprintln!("SKIPPED: /dev/kvm not available");
        }
        ok
    }

    /// A vCPU of `vm` over 64 KiB of `CODE` in real mode, at 0x1000.
    fn real_mode_vcpu(vm: &Vm) -> (GuestMemory, Vcpu) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(CODE, GuestAddress(0x1000)).unwrap();
        crate::vstate::memory::register(&vm.fd, &mem, false).unwrap();
        let v = Vcpu::new(vm, 0).unwrap();
        let mut sregs = v.fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        v.fd.set_sregs(&sregs).unwrap();
        v.fd.set_regs(&kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
        (mem, v)
    }

    /// KVM_RUN to the `out` to port 0x80, noted as the run loop notes it.
    fn run_to_first_out(v: &mut Vcpu) {
        let r = v.fd.run();
        assert!(
            matches!(r, Ok(VcpuExit::IoOut(0x80, _))),
            "expected the OUT to port 0x80, got {r:?}"
        );
        v.synced.set(v.sync && leaves_sync_fields(&r));
        v.io_pending = true;
    }

    /// Registers, system registers and events as a save reads them.
    fn as_saved(v: &Vcpu) -> (kvm_regs, kvm_sregs, kvm_vcpu_events) {
        let synced = v.synced_regs();
        let (regs, sregs) = v.regs_sregs(synced.as_ref()).unwrap();
        (regs, sregs, v.events(synced.as_ref()).unwrap())
    }

    /// What `KVM_GET_REGS`, `KVM_GET_SREGS` and `KVM_GET_VCPU_EVENTS` say.
    fn by_ioctl(v: &Vcpu) -> (kvm_regs, kvm_sregs, kvm_vcpu_events) {
        (
            v.fd.get_regs().unwrap(),
            v.fd.get_sregs().unwrap(),
            v.fd.get_vcpu_events().unwrap(),
        )
    }

    /// The sync area a quick save reads instead of three ioctls holds what
    /// the ioctls return: after an I/O exit, after completing it with
    /// `immediate_exit`, and never after the VMM set registers itself.
    #[test]
    fn the_sync_area_equals_the_ioctls() {
        if !kvm_available() {
            return;
        }
        let vm = Vm::new().unwrap();
        let (_mem, mut v) = real_mode_vcpu(&vm);
        let has_cap = vm.fd.check_extension_int(Cap::SyncRegs) as u32 & SYNC_FIELDS == SYNC_FIELDS;
        assert_eq!(v.sync, has_cap);
        assert!(!v.synced.get(), "nothing ran yet");

        run_to_first_out(&mut v);
        assert_eq!(v.synced.get(), has_cap);
        let at_exit = as_saved(&v);
        assert_eq!(at_exit, by_ioctl(&v));
        assert_eq!(at_exit.0.rax & 0xffff, 0x1234);
        assert_eq!(at_exit.0.rbx & 0xffff, 0x5678);

        v.complete_pending_io();
        assert_eq!(v.synced.get(), has_cap);
        let done = as_saved(&v);
        assert_eq!(done, by_ioctl(&v));
        assert_eq!(done.0.rip, 0x1008, "RIP past the completed OUT");
        assert_eq!(done.0.rcx & 0xffff, 0, "the next instruction has not run");

        // The VMM setting state makes the sync area stale: ioctls again.
        let mut entry = v.save().unwrap();
        entry.regs.rax = 0xfeed;
        v.set_state(&entry).unwrap();
        assert!(!v.synced.get());
        assert_eq!(as_saved(&v).0.rax, 0xfeed);
    }

    /// A state saved with the `out` still pending (as a park saves it) is
    /// a point a vCPU can continue from: restored in another VM it executes
    /// the `out` again if KVM left RIP at it (upstream KVM) or goes on after
    /// it if KVM had moved RIP past it already (this host's `kvm_pvm`), and
    /// reaches the same end as the original.
    #[test]
    fn a_state_saved_before_a_pending_out_continues_when_restored() {
        if !kvm_available() {
            return;
        }
        // Runs `v` to the `out` to port 0x81, completing the ones to 0x80;
        // returns how many of those it executed and the registers at the end.
        let to_end = |v: &mut Vcpu| {
            let mut outs = 0;
            loop {
                match v.fd.run() {
                    Ok(VcpuExit::IoOut(0x80, _)) => outs += 1,
                    Ok(VcpuExit::IoOut(0x81, _)) => break,
                    r => panic!("unexpected exit {r:?}"),
                }
            }
            (outs, v.fd.get_regs().unwrap())
        };
        let vm = Vm::new().unwrap();
        let (_mem, mut v) = real_mode_vcpu(&vm);
        run_to_first_out(&mut v);
        let mut last = None;
        let st = save_or_reuse(&mut v, &mut last, true).unwrap();
        assert!(v.io_pending, "the park's save leaves the out pending");
        assert!(
            st.regs.rip == 0x1006 || st.regs.rip == 0x1008,
            "RIP at the out or past it: {:#x}",
            st.regs.rip
        );
        assert_eq!(st.regs.rax & 0xffff, 0x1234);
        assert_eq!(st.regs.rcx & 0xffff, 0, "nothing after the out ran");

        let vm_b = Vm::new().unwrap();
        let (_mem_b, mut w) = real_mode_vcpu(&vm_b);
        w.set_state(&st).unwrap();
        let (outs, regs_w) = to_end(&mut w);
        assert_eq!(
            outs,
            usize::from(st.regs.rip == 0x1006),
            "the out again iff RIP was at it"
        );
        let (outs_v, regs_v) = to_end(&mut v);
        assert_eq!(outs_v, 0, "the original completes its out and goes on");
        for (what, r) in [("restored", regs_w), ("original", regs_v)] {
            assert_eq!(r.rcx & 0xffff, 0x9abc, "{what}");
            assert_eq!(r.rax & 0xffff, 0x1234, "{what}");
            assert_eq!(r.rbx & 0xffff, 0x5678, "{what}");
        }
    }
}
