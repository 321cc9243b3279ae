//! virtio devices: the [`VirtioDevice`] trait that the virtio-mmio transport
//! ([`mmio::MmioTransport`]) drives, the split-virtqueue helpers every device
//! uses ([`queue`]), and the devices themselves ([`vsock`]).
//!
//! Division of labour:
//! - the transport owns the guest-visible registers (status, features, queue
//!   configuration) and enforces the virtio 1.x initialisation rules; on
//!   `DRIVER_OK` it hands validated [`Queue`]s to the device ([`VirtioDevice::activate`]);
//! - the device owns the queues from then on (usually on its own thread) and
//!   reports back through [`DeviceSignals`]: interrupt-status bits (no
//!   interrupts are delivered in the built-in guest ABI, but the registers stay
//!   coherent) and `DEVICE_NEEDS_RESET` when the guest handed it something
//!   malformed.
//!
//! Every guest-memory access goes through vm-memory (bounds-checked, and the
//! `PageBitmap` of [`crate::devices::GuestMemory`] records the pages the VMM
//! writes, which are dirty pages for the checkpoint engine).

pub mod mmio;
pub mod queue;
pub mod vsock;

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

/// Feature bit: the device complies with virtio 1.x (mandatory for modern devices).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: `used_event` / `avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Interrupt-status bit: the device used a buffer.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt-status bit: the configuration changed (also raised with `DEVICE_NEEDS_RESET`).
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Errors of the virtio core: queue handover and device activation.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The transport handed over the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// A queue's configuration is invalid (size, alignment, not ready).
    #[error("queue {0} has an invalid configuration")]
    QueueConfig(usize, #[source] virtio_queue::Error),
    /// A queue's rings lie outside guest memory or it is not ready.
    #[error("queue {0} is not usable (not ready or rings outside guest memory)")]
    QueueUnusable(usize),
}

/// What a device reports to its transport, shared between the device's own
/// thread and the transport (vCPU threads).
#[derive(Debug, Default)]
pub struct DeviceSignals {
    isr: AtomicU32,
    needs_reset: AtomicBool,
}

impl DeviceSignals {
    /// New, with nothing signalled.
    pub fn new() -> Self {
        Self::default()
    }

    /// The device put buffers into a used ring.
    pub fn used_buffer(&self) {
        self.isr.fetch_or(INT_VRING, Ordering::AcqRel);
    }

    /// The device met something it cannot process (malformed chain, address
    /// outside guest memory): log why, raise `DEVICE_NEEDS_RESET` and a
    /// configuration-change interrupt. The device stops processing until reset.
    pub fn fail(&self, device: &str, reason: &dyn Display) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            tracing::warn!("virtio-{device}: device needs reset: {reason}");
        }
        self.isr.fetch_or(INT_CONFIG, Ordering::AcqRel);
    }

    /// Whether the device has failed and waits for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The interrupt-status register.
    pub fn isr(&self) -> u32 {
        self.isr.load(Ordering::Acquire)
    }

    /// InterruptACK: clear `bits`.
    pub fn ack(&self, bits: u32) {
        self.isr.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Device reset: nothing pending, not failed.
    pub fn clear(&self) {
        self.isr.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    /// Restore both from a saved state.
    pub(crate) fn set(&self, isr: u32, needs_reset: bool) {
        self.isr
            .store(isr & (INT_VRING | INT_CONFIG), Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
    }
}

/// A virtio device as the transport sees it.
///
/// Calls come from vCPU threads with the transport locked. Implementations
/// must not block for long (the device thread, if any, is only ever waited
/// for at a safe point) and must never panic on guest-controlled input.
pub trait VirtioDevice: Send {
    /// virtio device id (19 for vsock).
    fn device_type(&self) -> u32;
    /// Features the device offers (transport features included).
    fn avail_features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Guest reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Guest writes the device-specific configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// `DRIVER_OK`: start processing `queues` (validated by the transport, one
    /// per entry of [`queue_max_sizes`](Self::queue_max_sizes)) with the
    /// negotiated features.
    fn activate(&mut self, queues: Vec<Queue>, acked_features: u64) -> Result<(), VirtioError>;
    /// QueueNotify: the driver made buffers available in queue `index`.
    fn queue_notify(&mut self, index: u32);
    /// Device reset (status 0, or a queue disabled while running): stop using
    /// the queues and drop per-driver state. The device may be activated again.
    fn reset(&mut self);
    /// Where the device reports used buffers and failures.
    fn signals(&self) -> &DeviceSignals;
    /// The live state of the queues while activated (the transport's own copy
    /// goes stale once the device runs), for saving.
    fn queue_states(&self) -> Option<Vec<QueueState>>;
}

/// Serialized form of one virtqueue (mirrors [`virtio_queue::QueueState`],
/// which has no serde support). Untrusted on restore: it becomes a [`Queue`]
/// only through `Queue::try_from`, which validates every field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` negotiated.
    pub event_idx_enabled: bool,
    /// Size chosen by the driver.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for VirtqueueState {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<VirtqueueState> for QueueState {
    fn from(s: VirtqueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}
