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
//! writes stack, ring and connection pages too), so the guest says it,
//! through an optional ABI area ([`nvhv_abi::OUTPUT_DEPS_PORT`]): a **state
//! version** that only grows, and grows after every change of guest state
//! that later output may depend on, and one **dependency slot** per
//! connection (by host port, [`nvhv_abi::DEPS_SLOTS`] of them), raised
//! before the guest sends data on that connection to the newest version the
//! data depends on (the kv guest: a GET, the version of the key's last
//! change; a SET, the version after it). The rule here:
//!
//! - at each checkpoint (vCPUs and device paused) the cut records the version
//!   (`V_e`, exact: nothing runs);
//! - when that checkpoint is durable, its release makes `V_e` the
//!   **committed version**;
//! - a data packet is held as before unless its connection's slot, read
//!   when the device takes the packet, is at most the committed version:
//!   then every change the data depends on happened before a durable
//!   checkpoint, and the bytes go out at once (behind any bytes already held
//!   on the same connection, which keep their order).
//!
//! Why the read is safe: the guest raises the slot before it publishes the
//! packet in the TX ring, and the device reads the slot after taking the
//! packet, so it sees that value or a later, larger one (x86 stores are seen
//! in order; the queue code fences the ring read). A larger value only makes
//! the check fail, never pass. A change whose version is at most `V_e` was
//! complete (its version published after it) before the checkpoint of `e`,
//! so it is in `e`. Slots are per connection, so one client's uncommitted
//! write holds only the replies that read it, and its own acknowledgement.
//!
//! The registration is device state (saved with the epoch, so a crash before
//! it commits forgets it, like the guest does); on restore the committed
//! version is the version in the restored RAM, which is the committed state.

use vm_memory::{Bytes, GuestAddress};

use crate::devices::GuestMemory;

/// Bytes of the guest's area: the version, then the slots.
const AREA_BYTES: u64 = 8 * (1 + nvhv_abi::DEPS_SLOTS as u64);

/// The guest's registered output-dependency area and the last committed
/// version.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutputDeps {
    /// Guest-physical address of the area (8-byte aligned, all in RAM).
    addr: Option<u64>,
    /// The version at the last durable checkpoint since the registration.
    committed: Option<u64>,
}

/// The version recorded at a checkpoint: (address, value).
pub type VersionMark = Option<(u64, u64)>;

impl OutputDeps {
    /// Register the area at guest-physical `addr` (0 unregisters). An area
    /// that is misaligned or not all in RAM is refused (false) and
    /// unregisters.
    /// The committed version is unknown until the next checkpoint commits.
    pub fn register(&mut self, mem: &GuestMemory, addr: u64) -> bool {
        self.committed = None;
        self.addr = None;
        if addr == 0 {
            return true;
        }
        let last = addr.checked_add(AREA_BYTES - 8);
        if addr % 8 != 0 || read(mem, addr).is_none() || last.and_then(|l| read(mem, l)).is_none() {
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

    /// Whether data the guest sends now on the connection from host port
    /// `host_port` depends on nothing uncommitted.
    pub fn settled(&self, mem: &GuestMemory, host_port: u32) -> bool {
        match (self.addr, self.committed) {
            (Some(a), Some(c)) => read(mem, slot_addr(a, host_port)).is_some_and(|d| d <= c),
            _ => false,
        }
    }
}

/// Where the slot of the connection from `host_port` lies in the area at `area`.
fn slot_addr(area: u64, host_port: u32) -> u64 {
    area + 8 + 8 * (host_port as u64 % nvhv_abi::DEPS_SLOTS as u64)
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

    const A: u64 = 0x2000;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn set_version(m: &GuestMemory, v: u64) {
        m.write_obj(v, GuestAddress(A)).unwrap();
    }

    /// Writes a slot where the ABI says it is (spelled out here, not
    /// through `slot_addr`, so the layout is checked).
    fn set_slot(m: &GuestMemory, port: u32, v: u64) {
        let at = A + 8 + 8 * (port as u64 % nvhv_abi::DEPS_SLOTS as u64);
        m.write_obj(v, GuestAddress(at)).unwrap();
    }

    #[test]
    fn data_is_settled_only_while_its_slot_is_at_most_the_committed_version() {
        let m = mem();
        let mut d = OutputDeps::default();
        assert!(!d.settled(&m, 1024), "nothing registered: hold everything");
        set_version(&m, 5);
        set_slot(&m, 1024, 5);
        assert!(d.register(&m, A));
        assert!(
            !d.settled(&m, 1024),
            "no checkpoint committed since registering"
        );
        let mark = d.mark(&m);
        assert_eq!(mark, Some((A, 5)));
        assert!(!d.settled(&m, 1024), "marked but not durable yet");
        d.commit(mark);
        assert!(d.settled(&m, 1024));
        // Another connection writes (version 6, its slot 6): only it waits.
        set_version(&m, 6);
        set_slot(&m, 1025, 6);
        assert!(!d.settled(&m, 1025));
        assert!(d.settled(&m, 1024), "a reader of older data is not held");
        // The first connection reads what was written: held until a
        // checkpoint with version 6 commits.
        set_slot(&m, 1024, 6);
        assert!(!d.settled(&m, 1024));
        let mark = d.mark(&m);
        set_version(&m, 7);
        set_slot(&m, 1025, 7);
        d.commit(mark);
        assert!(d.settled(&m, 1024));
        assert!(!d.settled(&m, 1025), "changed again after the mark");
        d.commit(d.mark(&m));
        assert!(d.settled(&m, 1025));
        // Ports share a slot modulo DEPS_SLOTS (the guest keeps the max).
        assert!(d.settled(&m, 1025 + nvhv_abi::DEPS_SLOTS as u32));
    }

    #[test]
    fn a_mark_of_another_area_commits_nothing() {
        let m = mem();
        let mut d = OutputDeps::default();
        assert!(d.register(&m, A));
        let old = d.mark(&m);
        assert!(d.register(&m, 0x8000));
        d.commit(old);
        assert!(!d.settled(&m, 1024));
        assert!(d.register(&m, A));
        assert!(
            !d.settled(&m, 1024),
            "re-registering forgets the committed version"
        );
        // The same area again: its version at the mark is still its version.
        d.commit(old);
        assert!(d.settled(&m, 1024));
    }

    #[test]
    fn bad_areas_are_refused_and_zero_unregisters() {
        let m = mem();
        let mut d = OutputDeps::default();
        assert!(!d.register(&m, A + 4), "misaligned");
        assert!(!d.register(&m, 0x10000), "outside RAM");
        assert!(!d.register(&m, 0x10000 - 16), "slots run past RAM");
        assert!(!d.register(&m, u64::MAX - 7), "wraps");
        assert_eq!(d.addr(), None);
        assert!(
            d.register(&m, 0x10000 - AREA_BYTES),
            "the last area that fits"
        );
        assert!(d.register(&m, A));
        d.commit(d.mark(&m));
        assert!(d.settled(&m, 1024));
        assert!(d.register(&m, 0));
        assert_eq!(d.addr(), None);
        assert!(!d.settled(&m, 1024));
    }

    #[test]
    fn a_restored_registration_takes_the_version_in_ram_as_committed() {
        let m = mem();
        set_version(&m, 42);
        set_slot(&m, 2000, 42);
        let d = OutputDeps::restored(&m, Some(A));
        assert!(d.settled(&m, 2000));
        set_slot(&m, 2000, 43);
        assert!(!d.settled(&m, 2000));
        assert_eq!(OutputDeps::restored(&m, None), OutputDeps::default());
        let bad = OutputDeps::restored(&m, Some(A + 1));
        assert_eq!(bad.addr(), None);
    }
}
