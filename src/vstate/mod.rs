//! KVM objects and their state: the VM ([`vm`]), guest memory ([`memory`]),
//! the vCPUs and their threads ([`vcpu`]), the wait port ([`wait`]), dirty
//! tracking for epochs ([`dirty`]), the helper thread that shares an
//! epoch's page compares ([`split`]), the throttle that holds the guest
//! back while a long commit runs ([`throttle`]) and the giving back of
//! private copies of pages gone cold ([`reclaim`]).
//!
//! This is one of the two places (with `nvram`) where `unsafe` code lives:
//! KVM ioctls that kvm-ioctls marks unsafe, the vCPU kick signal handler, and
//! the shadow pages the compare helper writes.

pub mod dirty;
pub mod memory;
pub mod reclaim;
pub mod split;
pub mod throttle;
pub mod vcpu;
pub mod vm;
pub mod wait;
