//! Per-component state round trips that need KVM: a vCPU saved, restored into
//! a vCPU of a fresh VM (as `resume` does in a new process), and saved again
//! gives the same state, except what the host moves on its own.

mod common;

use nvhv::persist::Persist;
use nvhv::vstate::vcpu::{EntryCpl, EntryPoint, Vcpu, VcpuArgs, VcpuState};
use nvhv::vstate::vm::Vm;

/// The TSC MSR follows the host TSC here (it cannot be set), so it differs.
const MSR_IA32_TSC: u32 = 0x10;

fn without_tsc(mut s: VcpuState) -> VcpuState {
    s.msrs.retain(|m| m.index != MSR_IA32_TSC);
    s
}

/// A new vCPU in the built-in ABI's entry state.
fn entry_vcpu(vm: &Vm, index: u32, cpl: EntryCpl) -> Vcpu {
    let v = Vcpu::new(vm, index).unwrap();
    v.configure_entry(&EntryPoint {
        rip: 0x20_1000,
        cpl,
        boot_info: nvhv_abi::BOOT_INFO_ADDR,
        ram_bytes: 64 << 20,
    })
    .unwrap();
    v
}

fn saved_entry_state(vm: &Vm, index: u32, cpl: EntryCpl) -> VcpuState {
    entry_vcpu(vm, index, cpl).save().unwrap()
}

#[test]
fn vcpu_state_save_restore_save_is_identity() {
    require_kvm!();
    for (index, cpl) in [(0, EntryCpl::Cpl3), (1, EntryCpl::Cpl0)] {
        let vm_a = Vm::new().unwrap();
        let s1 = saved_entry_state(&vm_a, index, cpl);
        assert_eq!(s1.regs.rip, 0x20_1000);
        assert_eq!(s1.regs.rsi, index as u64);
        assert!(s1.msrs.len() > 10, "only {} MSRs saved", s1.msrs.len());
        assert!(
            s1.msrs
                .iter()
                .any(|m| m.index == 0x4b56_4d01 && m.data & 1 == 1),
            "kvmclock not enabled in the saved MSRs"
        );

        let vm_b = Vm::new().unwrap();
        let v2 = Vcpu::restore(VcpuArgs { vm: &vm_b, index }, &s1).unwrap();
        let s2 = v2.save().unwrap();
        assert_eq!(
            without_tsc(s1.clone()),
            without_tsc(s2),
            "vCPU {index} ({cpl:?}): state changed across save → restore → save"
        );
    }
}

#[test]
fn restore_refuses_malformed_vcpu_state() {
    require_kvm!();
    let vm = Vm::new().unwrap();
    let good = saved_entry_state(&vm, 0, EntryCpl::Cpl3);
    let vm_b = Vm::new().unwrap();
    let mut bad = good.clone();
    bad.xsave.truncate(10);
    assert!(Vcpu::restore(
        VcpuArgs {
            vm: &vm_b,
            index: 0
        },
        &bad
    )
    .is_err());
    let mut bad = good.clone();
    bad.cpuid.clear();
    assert!(Vcpu::restore(
        VcpuArgs {
            vm: &vm_b,
            index: 1
        },
        &bad
    )
    .is_err());
}

/// A vCPU confined to CPL3 (entry state, page tables that confine) is saved
/// quickly from the second save on, and the quick save equals a full read;
/// a CPL0 vCPU, or one whose tables do not confine, is always saved in full.
#[test]
fn quick_save_equals_full_save_and_only_when_confined() {
    require_kvm!();
    for (cpl, confinable, expect_quick) in [
        (EntryCpl::Cpl3, true, true),
        (EntryCpl::Cpl3, false, false),
        (EntryCpl::Cpl0, true, false),
    ] {
        let vm = Vm::new().unwrap();
        let mut v = entry_vcpu(&vm, 0, cpl);
        v.set_confinable(confinable);
        let full = Vcpu::save(&mut v).unwrap();
        assert_eq!(v.quick_saves(), 0, "the first save is always full");
        let second = Vcpu::save(&mut v).unwrap();
        assert_eq!(
            v.quick_saves(),
            expect_quick as u64,
            "{cpl:?}, confinable {confinable}"
        );
        assert_eq!(
            without_tsc(full.clone()),
            without_tsc(second.clone()),
            "{cpl:?}: the second save differs from the first"
        );
        let tsc = |s: &VcpuState| {
            s.msrs
                .iter()
                .find(|m| m.index == MSR_IA32_TSC)
                .unwrap()
                .data
        };
        assert!(
            tsc(&second) >= tsc(&full),
            "the TSC is read afresh, never taken back"
        );
    }
}

/// After a restore the restored state is the base of quick saves: the first
/// save of a confined vCPU is already quick, and equal to what was restored.
#[test]
fn first_save_after_restore_is_quick_and_equals_the_restored_state() {
    require_kvm!();
    let vm_a = Vm::new().unwrap();
    let s1 = saved_entry_state(&vm_a, 0, EntryCpl::Cpl3);
    let vm_b = Vm::new().unwrap();
    let mut v = Vcpu::restore(
        VcpuArgs {
            vm: &vm_b,
            index: 0,
        },
        &s1,
    )
    .unwrap();
    v.set_confinable(true);
    let s2 = Vcpu::save(&mut v).unwrap();
    assert_eq!(v.quick_saves(), 1);
    assert_eq!(without_tsc(s1), without_tsc(s2));
}
