//! KVM objects and their state: the VM ([`vm`]), guest memory ([`memory`]),
//! the vCPUs and their threads ([`vcpu`]), and the wait port ([`wait`]).
//!
//! This is one of the two places (with `nvram`) where `unsafe` code lives:
//! KVM ioctls that kvm-ioctls marks unsafe and the vCPU kick signal handler.

pub mod dirty;
pub mod memory;
pub mod vcpu;
pub mod vm;
pub mod wait;
