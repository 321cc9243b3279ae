//! nvhv: a KVM hypervisor whose virtual machines survive power outages.
//!
//! The flow follows rust-vmm's vmm-reference: the command line becomes a
//! [`vmm::VmConfig`], [`vmm`] builds the machine from it (new image or resumed
//! image), runs it, and commits its state to NVRAM when told to stop.
//! `ARCHITECTURE.md` narrates each step and maps every module.

pub mod boot;
pub mod devices;
pub mod guests;
pub mod nvram;
pub mod persist;
pub mod vmm;
pub mod vstate;
