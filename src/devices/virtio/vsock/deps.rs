//! Output dependencies: which held output may leave before its own epoch
//! commits.
//!
//! Output commit holds every byte the guest sends until the epoch that
//! produced it is durable. That is needed only for output that *depends* on
//! something a crash could still take back. A reply to a read of data that
//! is already committed (a GET of a key written epochs ago) depends on
//! nothing newer: if the VMM dies before the reply's own epoch commits, the
//! guest restarts from a state that holds the same data, and the host
//! connection the reply went out on is reset anyway.
//!
//! nvhv cannot tell a read from a write by looking at guest memory (a GET
//! writes stack, ring and connection pages too), so the guest says it, through
//! an optional ABI word ([`nvhv_abi::OUTPUT_DEPS_PORT`]): the guest registers
//! the address of a u64, its **state version**, and changes the version
//! before it sends any output that depends on a change a later output could
//! lose (the kv guest: every write command, CONFIG, and every expiry). The
//! rule here:
//!
//! - at each checkpoint (vCPUs and device paused) the cut records the version
//!   (`V_e`, exact: nothing runs);
//! - when that checkpoint is durable, its release makes `V_e` the
//!   **committed version**;
//! - a packet of guest output is held as before unless the version, read
//!   when the device takes the packet, equals the committed version: then
//!   every change the guest made before sending it is in a durable epoch, and
//!   the bytes go out at once (behind any bytes already held on the same
//!   connection, which keep their order).
//!
//! Why the read is safe: the guest changes the version before it publishes
//! the packet in the TX ring, and the device reads the version after taking
//! the packet, so it sees that change or a later one (x86 stores are seen in
//! order; the queue code fences the ring read). A later change only makes
//! the check fail, never pass. A version equal to `V_e` means no change after
//! the checkpoint of `e`, and every change before it is in `e`.
//!
//! The registration is device state (saved with the epoch, so a crash before
//! it commits forgets it, like the guest does); on restore the committed
//! version is the version in the restored RAM, which is the committed state.

use vm_memory::{Bytes, GuestAddress};

use crate::devices::GuestMemory;

/// The guest's registered state-version word and the last committed value.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutputDeps {
    /// Guest-physical address of the version word (8-byte aligned, in RAM).
    addr: Option<u64>,
    /// The version at the last durable checkpoint since the registration.
    committed: Option<u64>,
}

/// The version recorded at a checkpoint: (address, value).
pub type VersionMark = Option<(u64, u64)>;

impl OutputDeps {
    /// Register the word at guest-physical `addr` (0 unregisters). A word
    /// that is misaligned or outside RAM is refused (false) and unregisters.
    /// The committed version is unknown until the next checkpoint commits.
    pub fn register(&mut self, mem: &GuestMemory, addr: u64) -> bool {
        self.committed = None;
        self.addr = None;
        if addr == 0 {
            return true;
        }
        if addr % 8 != 0 || read(mem, addr).is_none() {
            return false;
        }
        self.addr = Some(addr);
        true
    }

    /// The registered address, for the saved device state.
    pub fn addr(&self) -> Option<u64> {
        self.addr
    }

    /// Restore a registration whose checkpoint is the state now in RAM (a
    /// resume): the version in RAM is the committed one.
    pub fn restored(mem: &GuestMemory, addr: Option<u64>) -> Self {
        let mut d = OutputDeps::default();
        if let Some(a) = addr {
            if d.register(mem, a) {
                d.committed = read(mem, a);
            }
        }
        d
    }

    /// At a checkpoint, with everything paused: the version now.
    pub fn mark(&self, mem: &GuestMemory) -> VersionMark {
        let a = self.addr?;
        read(mem, a).map(|v| (a, v))
    }

    /// The checkpoint of `mark` is durable.
    pub fn commit(&mut self, mark: VersionMark) {
        // A registration changed since the mark: its version says nothing.
        if let Some((a, v)) = mark {
            if self.addr == Some(a) {
                self.committed = Some(v);
            }
        }
    }

    /// Whether output the guest sends now depends on nothing uncommitted.
    pub fn settled(&self, mem: &GuestMemory) -> bool {
        match (self.addr, self.committed) {
            (Some(a), Some(c)) => read(mem, a) == Some(c),
            _ => false,
        }
    }
}

fn read(mem: &GuestMemory, addr: u64) -> Option<u64> {
    // ORDER: acquire, after the packet was taken from the TX ring (see the
    //        module doc).
    mem.load(GuestAddress(addr), std::sync::atomic::Ordering::Acquire)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn output_is_settled_only_while_the_version_equals_the_committed_one() {
        let m = mem();
        let mut d = OutputDeps::default();
        assert!(!d.settled(&m), "nothing registered: hold everything");
        m.write_obj(5u64, GuestAddress(0x2000)).unwrap();
        assert!(d.register(&m, 0x2000));
        assert!(!d.settled(&m), "no checkpoint committed since registering");
        let mark = d.mark(&m);
        assert_eq!(mark, Some((0x2000, 5)));
        assert!(!d.settled(&m), "marked but not durable yet");
        d.commit(mark);
        assert!(d.settled(&m));
        // A change after the checkpoint: held until a later one commits.
        m.write_obj(6u64, GuestAddress(0x2000)).unwrap();
        assert!(!d.settled(&m));
        let mark = d.mark(&m);
        m.write_obj(7u64, GuestAddress(0x2000)).unwrap();
        d.commit(mark);
        assert!(!d.settled(&m), "changed again after the mark");
        d.commit(d.mark(&m));
        assert!(d.settled(&m));
    }

    #[test]
    fn a_mark_of_another_word_commits_nothing() {
        let m = mem();
        let mut d = OutputDeps::default();
        assert!(d.register(&m, 0x2000));
        let old = d.mark(&m);
        assert!(d.register(&m, 0x3000));
        d.commit(old);
        assert!(!d.settled(&m));
        assert!(d.register(&m, 0x2000));
        assert!(
            !d.settled(&m),
            "re-registering forgets the committed version"
        );
        // The same word again: its version at the mark is still its version.
        d.commit(old);
        assert!(d.settled(&m));
    }

    #[test]
    fn bad_addresses_are_refused_and_zero_unregisters() {
        let m = mem();
        let mut d = OutputDeps::default();
        assert!(!d.register(&m, 0x2004), "misaligned");
        assert!(!d.register(&m, 0x10000), "outside RAM");
        assert_eq!(d.addr(), None);
        assert!(d.register(&m, 0x2000));
        d.commit(d.mark(&m));
        assert!(d.settled(&m));
        assert!(d.register(&m, 0));
        assert_eq!(d.addr(), None);
        assert!(!d.settled(&m));
    }

    #[test]
    fn a_restored_registration_takes_the_version_in_ram_as_committed() {
        let m = mem();
        m.write_obj(42u64, GuestAddress(0x2000)).unwrap();
        let d = OutputDeps::restored(&m, Some(0x2000));
        assert!(d.settled(&m));
        assert_eq!(OutputDeps::restored(&m, None), OutputDeps::default());
        let bad = OutputDeps::restored(&m, Some(0x2001));
        assert_eq!(bad.addr(), None);
    }
}
