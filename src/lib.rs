//! nvhv: a KVM hypervisor whose virtual machines survive power outages.
//!
//! The flow follows rust-vmm's vmm-reference: the command line becomes a
//! [`vmm::RunConfig`] or [`vmm::ResumeConfig`], [`vmm`] builds the machine from it (new image or resumed
//! image), runs it, and commits its state to NVRAM when told to stop.
//! `ARCHITECTURE.md` narrates each step and maps every module.

pub mod boot;
pub mod devices;
pub mod guests;
pub mod nvram;
pub mod persist;
pub mod vmm;
pub mod vstate;

/// An error and its sources as one line: "outer: inner: innermost".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Whether an I/O error in `e`'s chain says a file system is full
/// (`ENOSPC`, or `EDQUOT` for a quota).
pub fn is_out_of_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                return true;
            }
        }
        cur = c.source();
    }
    false
}
