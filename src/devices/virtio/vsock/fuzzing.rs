//! Fuzzing entry point: drive the vsock device's queue processing with
//! guest-controlled rings (used by `fuzz/fuzz_targets/virtio_queue.rs` and by
//! the property test in this module's tests). Not part of the stable API.
//!
//! Input layout (missing bytes read as zero): the TX and RX descriptor tables
//! (16 entries of 16 bytes each), the TX and RX available indices and rings,
//! then the contents of the packet area. Descriptor addresses are taken as
//! given, so most point outside the 64 KiB of guest memory; the device must
//! fail cleanly (DEVICE_NEEDS_RESET) or process them, never panic or hang.

use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::device::{CoreParams, VsockCore};
use crate::devices::virtio::DeviceSignals;
use crate::devices::GuestMemory;

const MEM_SIZE: usize = 0x1_0000;
const QSIZE: u16 = 16;
const TX_BASE: u64 = 0x0000;
const RX_BASE: u64 = 0x1000;
const EVT_BASE: u64 = 0x2000;
/// Start of the packet area the fuzzer fills.
pub const PACKET_AREA: u64 = 0x4000;

fn queue_at(base: u64) -> Queue {
    let mut q = Queue::new(QSIZE).expect("valid max size");
    let avail = base + 16 * u64::from(QSIZE);
    let used = base + 0x800;
    let _ = q.try_set_desc_table_address(GuestAddress(base));
    let _ = q.try_set_avail_ring_address(GuestAddress(avail));
    let _ = q.try_set_used_ring_address(GuestAddress(used));
    q.set_event_idx(true);
    q.set_ready(true);
    q
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (a, b) = data.split_at(n);
    *data = b;
    a
}

/// Run the device over rings built from `data`. Returns whether the device
/// ended in DEVICE_NEEDS_RESET.
pub fn run_queues(data: &[u8]) -> bool {
    let mem: GuestMemory = crate::devices::GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("anonymous guest memory");
    let mut d = data;
    let table = 16 * usize::from(QSIZE);
    let ring = 4 + 2 * usize::from(QSIZE);
    let writes = [
        (TX_BASE, take(&mut d, table)),
        (RX_BASE, take(&mut d, table)),
        (TX_BASE + table as u64, take(&mut d, ring)),
        (RX_BASE + table as u64, take(&mut d, ring)),
    ];
    for (at, bytes) in writes {
        let _ = mem.write_slice(bytes, GuestAddress(at));
    }
    let rest = take(&mut d, MEM_SIZE - PACKET_AREA as usize);
    let _ = mem.write_slice(rest, GuestAddress(PACKET_AREA));

    let signals = Arc::new(DeviceSignals::new());
    let params = CoreParams {
        guest_cid: 3,
        guest_port: 6379,
        buf_alloc: 4096,
        max_connections: 4,
    };
    let mut core = VsockCore::new(mem, Arc::clone(&signals), params);
    let queues = vec![queue_at(RX_BASE), queue_at(TX_BASE), queue_at(EVT_BASE)];
    if core.activate(queues, 0).is_err() {
        return false;
    }
    core.reset_event_pending = true;
    let now = Instant::now();
    for _ in 0..8 {
        if !core.run(now) {
            break;
        }
    }
    let _ = core.arm_notifications();
    core.suppress_notifications();
    signals.needs_reset()
}
