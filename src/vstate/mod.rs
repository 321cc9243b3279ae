//! KVM objects: placeholder, being written.
pub mod wait;
