//! Split-virtqueue helpers on top of `virtio-queue`, shared by every device:
//!
//! - [`pop_chain`]: take the next available descriptor chain and validate it
//!   strictly. virtio-queue's chain iterator silently stops on a loop, an
//!   out-of-range `next` or an unreadable descriptor; here each of those, an
//!   address outside guest memory and a buffer of the wrong direction is an
//!   error with a reason, which the device turns into `DEVICE_NEEDS_RESET`.
//! - [`Chain`]: the validated buffers, read and written only through vm-memory
//!   (bounds-checked; writes are recorded in the dirty bitmap).
//! - [`set_notification`] / [`enable_and_recheck`]: driver-to-device
//!   notification suppression. With `VIRTIO_RING_F_EVENT_IDX` a suppressed
//!   queue gets `avail_event = 0xfffe` rather than "leave it where it was":
//!   `virtio-drivers` 0.13 compares `avail_idx >= avail_event + 1` without
//!   wrapping, so a stale `avail_event` behind the ring makes it notify on every
//!   buffer; `0xfffe` is ahead of it for all but one index in 65536, for that
//!   driver and for a spec-conforming one alike.

use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::devices::GuestMemory;

/// Longest descriptor chain accepted (indirect tables can be longer than the queue).
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;
/// `avail_event` value that suppresses driver notifications (see the module doc).
pub const AVAIL_EVENT_SUPPRESSED: u16 = 0xfffe;

const USED_RING_HEADER: u64 = 4;
const USED_ELEM_SIZE: u64 = 8;

/// Why a queue or one of its chains cannot be processed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available ring is unusable (index jumped by more than the queue size, not ready).
    #[error("available ring is invalid")]
    AvailRing(#[source] virtio_queue::Error),
    /// A used-ring or event-index access failed.
    #[error("used ring access failed")]
    UsedRing(#[source] virtio_queue::Error),
    /// The head index is out of range or its descriptor is unreadable.
    #[error("descriptor chain {head}: head descriptor missing or unreadable")]
    EmptyChain {
        /// Head index from the available ring.
        head: u16,
    },
    /// The chain ends on a descriptor that still has NEXT set: a loop, a `next`
    /// out of range, an unreadable descriptor or a bad indirect table.
    #[error("descriptor chain {head}: truncated after {count} descriptors (loop, next index out of range, or bad indirect table)")]
    Truncated {
        /// Head index.
        head: u16,
        /// Descriptors read before the chain broke.
        count: usize,
    },
    /// More descriptors than [`MAX_CHAIN_DESCRIPTORS`].
    #[error("descriptor chain {head}: longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooLong {
        /// Head index.
        head: u16,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor chain {head}: buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Head index.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-writable buffer where the device reads, or the other way round.
    #[error(
        "descriptor chain {head}: buffer {index} has the wrong direction (expected {expected})"
    )]
    WrongDirection {
        /// Head index.
        head: u16,
        /// Position of the buffer in the chain.
        index: usize,
        /// What the device expected.
        expected: &'static str,
    },
    /// The chain's buffers add up to more than 4 GiB.
    #[error("descriptor chain {head}: total length overflows")]
    LengthOverflow {
        /// Head index.
        head: u16,
    },
    /// The chain is too short for what it must hold.
    #[error("descriptor chain {head}: {len} bytes, at least {need} needed")]
    TooShort {
        /// Head index.
        head: u16,
        /// Bytes in the chain.
        len: u32,
        /// Bytes needed.
        need: u32,
    },
    /// Reading or writing a validated buffer failed.
    #[error("guest memory access failed")]
    Memory(#[source] GuestMemoryError),
}

/// Which way the device uses a chain's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Device reads (driver-to-device, e.g. a TX packet).
    DeviceReads,
    /// Device writes (device-to-driver, e.g. an RX buffer).
    DeviceWrites,
}

/// A validated descriptor chain: every buffer is inside guest memory and has
/// the expected direction.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    head: u16,
    segs: Vec<(GuestAddress, u32)>,
    len: u32,
}

impl Chain {
    /// Head index, to be returned in the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Total bytes of all buffers.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the chain holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copy up to `buf.len()` bytes starting `offset` bytes into the chain;
    /// returns how many were copied (less at the end of the chain).
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<usize, QueueError> {
        self.for_each_piece(offset, buf.len(), |at, range| {
            mem.read_slice(&mut buf[range], at)
        })
    }

    /// Copy `data` into the chain starting `offset` bytes in; returns how many
    /// bytes fitted. Writes go through vm-memory, so the pages are marked dirty.
    pub fn write_at(
        &self,
        mem: &GuestMemory,
        offset: usize,
        data: &[u8],
    ) -> Result<usize, QueueError> {
        self.for_each_piece(offset, data.len(), |at, range| {
            mem.write_slice(&data[range], at)
        })
    }

    /// Walk the chain's bytes `offset..offset + total` (cut at the chain's
    /// end) one buffer at a time: `f(guest address, range of the caller's
    /// bytes)`. Returns how many bytes were covered.
    fn for_each_piece(
        &self,
        offset: usize,
        total: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), GuestMemoryError>,
    ) -> Result<usize, QueueError> {
        let mut skip = offset;
        let mut done = 0;
        for &(addr, len) in &self.segs {
            let len = len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(total - done);
            // `skip < len <= u32::MAX`, so the addition cannot overflow a u64.
            let at = GuestAddress(addr.0 + skip as u64);
            f(at, done..done + n).map_err(QueueError::Memory)?;
            done += n;
            skip = 0;
            if done == total {
                break;
            }
        }
        Ok(done)
    }
}

/// Take the next available chain of `q` and validate it for `dir`.
/// `Ok(None)`: the available ring is empty.
///
/// On an error the chain has been consumed from the available ring; the
/// device must stop using the queue (it is in `DEVICE_NEEDS_RESET`).
pub fn pop_chain(
    q: &mut Queue,
    mem: &GuestMemory,
    dir: Direction,
) -> Result<Option<Chain>, QueueError> {
    let mut iter = q.iter(mem).map_err(QueueError::AvailRing)?;
    let Some(dc) = iter.next() else {
        return Ok(None);
    };
    let head = dc.head_index();
    let mut chain = Chain {
        head,
        segs: Vec::new(),
        len: 0,
    };
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in dc {
        if count == MAX_CHAIN_DESCRIPTORS {
            return Err(QueueError::TooLong { head });
        }
        let writable = desc.flags() & VRING_DESC_F_WRITE as u16 != 0;
        let expected = match dir {
            Direction::DeviceReads if writable => Some("device-readable"),
            Direction::DeviceWrites if !writable => Some("device-writable"),
            _ => None,
        };
        if let Some(expected) = expected {
            return Err(QueueError::WrongDirection {
                head,
                index: count,
                expected,
            });
        }
        let (addr, len) = (desc.addr(), desc.len());
        if len > 0 && !GuestMemoryBackend::check_range(mem, addr, len as usize) {
            return Err(QueueError::OutOfRange {
                head,
                addr: addr.0,
                len,
            });
        }
        chain.len = chain
            .len
            .checked_add(len)
            .ok_or(QueueError::LengthOverflow { head })?;
        if len > 0 {
            chain.segs.push((addr, len));
        }
        last_has_next = desc.has_next();
        count += 1;
    }
    if count == 0 {
        return Err(QueueError::EmptyChain { head });
    }
    if last_has_next {
        return Err(QueueError::Truncated { head, count });
    }
    Ok(Some(chain))
}

/// Whether the driver made buffers available that the device has not taken yet.
pub fn has_available(q: &Queue, mem: &GuestMemory) -> Result<bool, QueueError> {
    Ok(avail_idx(q, mem)? != q.next_avail())
}

/// The driver's avail index (how many buffers it has made available, mod 2^16).
pub fn avail_idx(q: &Queue, mem: &GuestMemory) -> Result<u16, QueueError> {
    Ok(q.avail_idx(mem, Ordering::Acquire)
        .map_err(QueueError::AvailRing)?
        .0)
}

/// Return `chain` to the driver in the used ring with `len` bytes written.
pub fn add_used(q: &mut Queue, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
    // ORDER: virtio-queue writes the used element first and publishes the used
    // index with a Release store, so the driver never sees the index before the
    // element (and the buffer contents the caller wrote before this call).
    q.add_used(mem, head, len).map_err(QueueError::UsedRing)
}

/// Ask the driver to notify (`enable`) or not to notify on new available
/// buffers: the used ring's flags and, with EVENT_IDX, its `avail_event`.
pub fn set_notification(q: &Queue, mem: &GuestMemory, enable: bool) -> Result<(), QueueError> {
    let event = if enable {
        q.next_avail()
    } else {
        AVAIL_EVENT_SUPPRESSED
    };
    write_notification(q, mem, enable, event)
}

/// The used ring's flags (`enable`: notifications wanted) and, with
/// EVENT_IDX, its `avail_event` (`event`: the avail index whose passing
/// the driver signals).
fn write_notification(
    q: &Queue,
    mem: &GuestMemory,
    enable: bool,
    event: u16,
) -> Result<(), QueueError> {
    let used = GuestAddress(q.used_ring());
    let flags: u16 = if enable {
        0
    } else {
        VRING_USED_F_NO_NOTIFY as u16
    };
    mem.store(flags.to_le(), used, Ordering::Relaxed)
        .map_err(|e| QueueError::UsedRing(virtio_queue::Error::GuestMemory(e)))?;
    if q.event_idx_enabled() {
        let off = USED_RING_HEADER + USED_ELEM_SIZE * u64::from(q.size());
        let at = used
            .0
            .checked_add(off)
            .ok_or(QueueError::UsedRing(virtio_queue::Error::AddressOverflow))?;
        mem.store(event.to_le(), GuestAddress(at), Ordering::Relaxed)
            .map_err(|e| QueueError::UsedRing(virtio_queue::Error::GuestMemory(e)))?;
    }
    Ok(())
}

/// Ask the driver to notify once its avail index moves past `idx` (rather
/// than past the next buffer the device would take, as [`set_notification`]
/// asks), then read the avail index again: whether it has moved already.
/// For a device that waits for the driver to re-post a buffer while others
/// it has not taken are already there.
pub fn notify_past(q: &Queue, mem: &GuestMemory, idx: u16) -> Result<bool, QueueError> {
    write_notification(q, mem, true, idx)?;
    // ORDER: as in `enable_and_recheck`.
    fence(Ordering::SeqCst);
    Ok(avail_idx(q, mem)? != idx)
}

/// Re-enable driver notifications before the device goes to sleep, then look
/// at the ring again. Returns true if buffers arrived meanwhile: the device
/// must keep processing (and may suppress notifications again).
pub fn enable_and_recheck(q: &Queue, mem: &GuestMemory) -> Result<bool, QueueError> {
    set_notification(q, mem, true)?;
    // ORDER: the avail_event/flags store must be globally visible before the
    // avail index is read again. Otherwise the driver could publish a buffer,
    // read the stale (suppressed) event and skip the notification while we
    // read the stale index and sleep: a lost kick (FC #5969 in another form).
    fence(Ordering::SeqCst);
    has_available(q, mem)
}

#[cfg(test)]
pub(crate) mod testing {
    //! A minimal driver side of a split queue, written straight into guest
    //! memory, for the tests of the transport and the devices.

    use super::*;

    /// Anonymous guest memory of `size` bytes at address 0.
    pub fn memory(size: usize) -> GuestMemory {
        crate::devices::GuestMemory::from_ranges(&[(GuestAddress(0), size)])
            .expect("anonymous guest memory")
    }

    /// Driver view of one split queue at fixed addresses.
    #[derive(Debug, Clone, Copy)]
    pub struct DriverQueue {
        pub size: u16,
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        /// Next free descriptor slot (no free list: tests use few).
        pub next_desc: u16,
        pub avail_idx: u16,
        pub last_used: u16,
    }

    impl DriverQueue {
        /// Lay out a queue of `size` entries from `base` (page-aligned parts).
        pub fn new(base: u64, size: u16) -> Self {
            let desc = base;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size) + 0xfff) & !0xfff;
            Self {
                size,
                desc,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            }
        }

        /// A device-side `Queue` configured like the transport would.
        pub fn device_queue(&self, event_idx: bool) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.try_set_size(self.size).unwrap();
            q.try_set_desc_table_address(GuestAddress(self.desc))
                .unwrap();
            q.try_set_avail_ring_address(GuestAddress(self.avail))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(self.used))
                .unwrap();
            q.set_event_idx(event_idx);
            q.set_ready(true);
            q
        }

        /// Write descriptor `i`.
        pub fn write_desc(
            &self,
            mem: &GuestMemory,
            i: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let at = GuestAddress(self.desc + 16 * u64::from(i));
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, at).unwrap();
        }

        /// Publish descriptor `head` in the available ring.
        pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
            let slot = u64::from(self.avail_idx % self.size);
            mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            fence(Ordering::SeqCst);
            mem.store(
                self.avail_idx.to_le(),
                GuestAddress(self.avail + 2),
                Ordering::Release,
            )
            .unwrap();
        }

        /// Add a chain of `(addr, len, writable)` buffers and publish it; returns the head.
        pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
            let n = bufs.len() as u16;
            let head = self.next_desc % self.size;
            for (k, &(addr, len, w)) in bufs.iter().enumerate() {
                let i = (head + k as u16) % self.size;
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if (k as u16) + 1 < n {
                    flags |= virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
                }
                self.write_desc(mem, i, addr, len, flags, (i + 1) % self.size);
            }
            self.next_desc = self.next_desc.wrapping_add(n);
            self.publish(mem, head);
            head
        }

        /// The device's used index.
        pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
            u16::from_le(
                mem.load(GuestAddress(self.used + 2), Ordering::Acquire)
                    .unwrap(),
            )
        }

        /// Next used element `(id, len)`, if any.
        pub fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u32, u32)> {
            if self.used_idx(mem) == self.last_used {
                return None;
            }
            let slot = u64::from(self.last_used % self.size);
            let at = self.used + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            self.last_used = self.last_used.wrapping_add(1);
            // Like virtio-drivers with EVENT_IDX: used_event = next entry to look at.
            let used_event = self.avail + 4 + 2 * u64::from(self.size);
            mem.write_obj(self.last_used.to_le(), GuestAddress(used_event))
                .unwrap();
            Some((u32::from_le(id), u32::from_le(len)))
        }

        /// The `avail_event` the device wrote (EVENT_IDX).
        pub fn avail_event(&self, mem: &GuestMemory) -> u16 {
            let at = self.used + 4 + 8 * u64::from(self.size);
            u16::from_le(mem.read_obj(GuestAddress(at)).unwrap())
        }

        /// The used ring's flags.
        pub fn used_flags(&self, mem: &GuestMemory) -> u16 {
            u16::from_le(mem.read_obj(GuestAddress(self.used)).unwrap())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    fn setup() -> (GuestMemory, DriverQueue, Queue) {
        let mem = memory(0x10_0000);
        let dq = DriverQueue::new(0x1000, 16);
        let q = dq.device_queue(true);
        (mem, dq, q)
    }

    #[test]
    fn valid_chain_reads_and_writes_across_buffers() {
        let (mem, mut dq, mut q) = setup();
        mem.write_slice(b"hello", GuestAddress(0x8000)).unwrap();
        mem.write_slice(b" world", GuestAddress(0x9000)).unwrap();
        dq.add_chain(&mem, &[(0x8000, 5, false), (0x9000, 6, false)]);
        let c = pop_chain(&mut q, &mem, Direction::DeviceReads)
            .unwrap()
            .unwrap();
        assert_eq!(c.len(), 11);
        let mut buf = [0u8; 16];
        assert_eq!(c.read_at(&mem, 0, &mut buf).unwrap(), 11);
        assert_eq!(&buf[..11], b"hello world");
        assert_eq!(c.read_at(&mem, 3, &mut buf[..4]).unwrap(), 4);
        assert_eq!(&buf[..4], b"lo w");
        assert!(pop_chain(&mut q, &mem, Direction::DeviceReads)
            .unwrap()
            .is_none());

        dq.add_chain(&mem, &[(0xa000, 3, true), (0xb000, 100, true)]);
        let c = pop_chain(&mut q, &mem, Direction::DeviceWrites)
            .unwrap()
            .unwrap();
        assert_eq!(c.write_at(&mem, 1, b"abcdef").unwrap(), 6);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0xb000)).unwrap();
        assert_eq!(&got, b"cdef");
        add_used(&mut q, &mem, c.head(), 7).unwrap();
        assert_eq!(dq.pop_used(&mem), Some((u32::from(c.head()), 7)));
    }

    #[test]
    fn buffer_outside_memory_is_an_error() {
        let (mem, mut dq, mut q) = setup();
        dq.add_chain(&mem, &[(0x10_0000 - 4, 8, false)]);
        assert!(matches!(
            pop_chain(&mut q, &mem, Direction::DeviceReads),
            Err(QueueError::OutOfRange { .. })
        ));
        dq.add_chain(&mem, &[(u64::MAX - 2, 8, false)]);
        assert!(matches!(
            pop_chain(&mut q, &mem, Direction::DeviceReads),
            Err(QueueError::OutOfRange { .. })
        ));
    }

    #[test]
    fn descriptor_loop_is_an_error() {
        let (mem, mut dq, mut q) = setup();
        dq.write_desc(&mem, 0, 0x8000, 4, NEXT, 1);
        dq.write_desc(&mem, 1, 0x8000, 4, NEXT, 0);
        dq.publish(&mem, 0);
        assert!(matches!(
            pop_chain(&mut q, &mem, Direction::DeviceReads),
            Err(QueueError::Truncated { .. })
        ));
    }

    #[test]
    fn next_index_out_of_range_is_an_error() {
        let (mem, mut dq, mut q) = setup();
        dq.write_desc(&mem, 0, 0x8000, 4, NEXT, 200);
        dq.publish(&mem, 0);
        assert!(matches!(
            pop_chain(&mut q, &mem, Direction::DeviceReads),
            Err(QueueError::Truncated { .. })
        ));
        dq.publish(&mem, 99);
        assert!(matches!(
            pop_chain(&mut q, &mem, Direction::DeviceReads),
            Err(QueueError::EmptyChain { head: 99 })
        ));
    }

    #[test]
    fn wrong_direction_is_an_error() {
        let (mem, mut dq, mut q) = setup();
        dq.add_chain(&mem, &[(0x8000, 4, false), (0x9000, 4, true)]);
        assert!(matches!(
            pop_chain(&mut q, &mem, Direction::DeviceReads),
            Err(QueueError::WrongDirection { index: 1, .. })
        ));
        dq.write_desc(&mem, 5, 0x8000, 4, 0, 0);
        dq.publish(&mem, 5);
        assert!(matches!(
            pop_chain(&mut q, &mem, Direction::DeviceWrites),
            Err(QueueError::WrongDirection { index: 0, .. })
        ));
    }

    #[test]
    fn avail_index_jump_is_an_error() {
        let (mem, _dq, mut q) = setup();
        mem.store(
            100u16.to_le(),
            GuestAddress(0x1000 + 16 * 16 + 2),
            Ordering::Release,
        )
        .unwrap();
        assert!(matches!(
            pop_chain(&mut q, &mem, Direction::DeviceReads),
            Err(QueueError::AvailRing(_))
        ));
    }

    #[test]
    fn suppression_sets_event_ahead_and_enable_rechecks() {
        let (mem, mut dq, mut q) = setup();
        set_notification(&q, &mem, false).unwrap();
        assert_eq!(dq.avail_event(&mem), AVAIL_EVENT_SUPPRESSED);
        assert_eq!(dq.used_flags(&mem), VRING_USED_F_NO_NOTIFY as u16);
        assert!(!enable_and_recheck(&q, &mem).unwrap());
        assert_eq!(dq.avail_event(&mem), 0);
        assert_eq!(dq.used_flags(&mem), 0);
        dq.add_chain(&mem, &[(0x8000, 4, false)]);
        assert!(enable_and_recheck(&q, &mem).unwrap());
        pop_chain(&mut q, &mem, Direction::DeviceReads)
            .unwrap()
            .unwrap();
        assert!(!enable_and_recheck(&q, &mem).unwrap());
        assert_eq!(dq.avail_event(&mem), 1);
    }
}
