//! The KVM VM: creation with the split irqchip, VM-wide state (kvmclock), and
//! the facts about this host's KVM that vCPUs need (supported CPUID, MSR list).
//!
//! Split irqchip (`KVM_CAP_SPLIT_IRQCHIP`): the local APIC lives in KVM, the
//! IOAPIC/PIC/PIT do not exist (built-in guests need none; a Linux guest's
//! IOAPIC will be emulated in the VMM). Measured on our hosts: the full
//! in-kernel irqchip makes the first memslot cost 6–11 ms at every start, the
//! split one ~50 µs, and the LAPIC timer works the same.

use kvm_bindings::{
    kvm_clock_data, kvm_enable_cap, CpuId, KVM_CAP_SPLIT_IRQCHIP, KVM_MAX_CPUID_ENTRIES,
};
use std::sync::OnceLock;

use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

/// Errors while creating or restoring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// The split irqchip could not be enabled.
    #[error("enabling KVM_CAP_SPLIT_IRQCHIP failed")]
    SplitIrqchip(#[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_GET_MSR_INDEX_LIST failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    MsrList(#[source] kvm_ioctls::Error),
    /// KVM_GET_CLOCK failed.
    #[error("KVM_GET_CLOCK failed")]
    GetClock(#[source] kvm_ioctls::Error),
    /// KVM_SET_CLOCK failed.
    #[error("KVM_SET_CLOCK failed")]
    SetClock(#[source] kvm_ioctls::Error),
}

/// The VM file descriptor and what we learn about KVM when a new vCPU needs it.
pub struct Vm {
    /// Kept open for system ioctls.
    pub kvm: Kvm,
    /// The VM.
    pub fd: VmFd,
    /// CPUID entries KVM supports, asked for when a new vCPU needs them
    /// (with the MSR list, ~0.4 ms here: a resume takes both from the
    /// saved state instead).
    supported_cpuid: OnceLock<CpuId>,
    /// The MSRs KVM reports in KVM_GET_MSR_INDEX_LIST, asked for likewise.
    msr_indices: OnceLock<Vec<u32>>,
    /// TSC frequency (kHz), 0 if KVM does not say.
    pub tsc_khz: u32,
}

/// VM-wide state that is saved and restored (kvmclock; later the VMM's IOAPIC).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmState {
    /// KVM_GET_CLOCK at the time of the save.
    pub clock: kvm_clock_data,
}

impl Vm {
    /// Open KVM and create a VM with the split irqchip (24 IOAPIC pins reserved).
    ///
    /// ORDER: the irqchip capability must be enabled before any vCPU exists.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = 24;
        fd.enable_cap(&cap).map_err(VmError::SplitIrqchip)?;
        Ok(Vm {
            kvm,
            fd,
            supported_cpuid: OnceLock::new(),
            msr_indices: OnceLock::new(),
            tsc_khz: 0,
        })
    }

    /// The CPUID entries KVM supports; a new vCPU gets these (with its APIC id).
    pub fn supported_cpuid(&self) -> Result<&CpuId, VmError> {
        if let Some(c) = self.supported_cpuid.get() {
            return Ok(c);
        }
        let c = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)?;
        Ok(self.supported_cpuid.get_or_init(|| c))
    }

    /// The MSRs KVM lists (KVM_GET_MSR_INDEX_LIST); a new vCPU saves those it
    /// can read.
    pub fn msr_indices(&self) -> Result<&[u32], VmError> {
        if let Some(m) = self.msr_indices.get() {
            return Ok(m);
        }
        let m = self
            .kvm
            .get_msr_index_list()
            .map_err(VmError::MsrList)?
            .as_slice()
            .to_vec();
        Ok(self.msr_indices.get_or_init(|| m))
    }

    /// Save the VM-wide state.
    pub fn save(&self) -> Result<VmState, VmError> {
        let clock = self.fd.get_clock().map_err(VmError::GetClock)?;
        Ok(VmState { clock })
    }

    /// Unix time minus kvmclock, in ns, now (for the guest's wall-clock record).
    pub fn unix_minus_kvmclock_ns(&self) -> Result<i64, VmError> {
        let clock = self.fd.get_clock().map_err(VmError::GetClock)?.clock;
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        Ok(unix - clock as i64)
    }

    /// Restore the VM-wide state: kvmclock continues from the saved value, so
    /// guest time never runs backwards (the time the VM was stopped is not
    /// counted, like a paused VM).
    pub fn restore(&self, state: &VmState) -> Result<(), VmError> {
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(VmError::SetClock)
    }
}
