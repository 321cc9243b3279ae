//! The virtio-mmio transport, version 2 ("modern", virtio 1.x), for split
//! virtqueues: the register window a guest driver programs, the status and
//! feature-negotiation rules, and the handover of validated queues to the
//! device on `DRIVER_OK`.
//!
//! Register map (virtio 1.2, 4.2.2): 32-bit registers below 0x100, the
//! device-specific configuration space from 0x100. Registers accept only
//! aligned 32-bit accesses; anything else reads as zero and is ignored on
//! write. A guest can misprogram the transport in any way without affecting
//! the VMM: invalid writes are ignored (logged at debug level), and a queue
//! the device cannot use ends in `DEVICE_NEEDS_RESET`.
//!
//! Interrupts are not delivered in the built-in guest ABI (the guest polls),
//! but InterruptStatus/InterruptACK are kept coherent for drivers that read them.

use std::sync::atomic::{fence, Ordering};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;

use super::{VirtioDevice, VirtioError, VirtqueueState, VIRTIO_F_VERSION_1};
use crate::devices::MmioDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version 2 (virtio 1.x).
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported by nvhv devices ("NVHV" read as a little-endian u32).
pub const MMIO_VENDOR_ID: u32 = u32::from_le_bytes(*b"NVHV");
/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x200;

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const KNOWN_STATUS: u32 = ACK | DRIVER | DRIVER_OK | FEATURES_OK | NEEDS_RESET | FAILED;

/// Errors restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The state belongs to another kind of device.
    #[error("saved transport is for device type {saved}, not {actual}")]
    DeviceType {
        /// Device type in the state.
        saved: u32,
        /// Device type of the device given.
        actual: u32,
    },
    /// The number of queues differs from the device's.
    #[error("saved transport has {saved} queues, the device has {actual}")]
    QueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        actual: usize,
    },
    /// A queue's maximum size differs from the device's.
    #[error("saved queue {0} has another maximum size than the device")]
    QueueMaxSize(usize),
    /// A queue state is invalid.
    #[error("saved queue {0} is invalid")]
    Queue(usize, #[source] virtio_queue::Error),
    /// The acknowledged features include some the device does not offer.
    #[error("saved features {0:#x} are not offered by the device")]
    Features(u64),
    /// The status register is not one the initialisation rules can reach.
    #[error("saved device status {0:#x} is inconsistent")]
    Status(u32),
    /// The device refused the restored queues.
    #[error("device refused the restored queues")]
    Activate(#[source] VirtioError),
}

/// Saved transport registers. Untrusted on restore: every field is validated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Device type, to refuse restoring into another kind of device.
    pub device_type: u32,
    /// Status register as written by the driver (without NEEDS_RESET).
    pub device_status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// SHMSel.
    pub shm_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The device had failed (DEVICE_NEEDS_RESET).
    pub needs_reset: bool,
    /// The device was running (activated and not reset since).
    pub activated: bool,
    /// Each queue, with the device's live positions when activated.
    pub queues: Vec<VirtqueueState>,
}

/// A virtio device behind a virtio-mmio v2 register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_select: u32,
    shm_sel: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("device_status", &self.device_status)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Put `device` behind a fresh (reset) register window.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).unwrap_or_default())
            .collect();
        Self {
            device,
            queues,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_select: 0,
            shm_sel: 0,
            config_generation: 0,
            activated: false,
        }
    }

    /// The status register as the guest reads it.
    pub fn status(&self) -> u32 {
        let mut s = self.device_status;
        if self.device.signals().needs_reset() {
            s |= NEEDS_RESET;
        }
        s
    }

    /// Whether the device is running.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Capture the registers and the queues (with the device's live positions).
    /// For a state consistent with guest memory, pause the device first.
    pub fn save(&self) -> MmioTransportState {
        let live = if self.activated {
            self.device.queue_states()
        } else {
            None
        };
        let queues = match live {
            Some(states) if states.len() == self.queues.len() => {
                states.into_iter().map(VirtqueueState::from).collect()
            }
            _ => self.queues.iter().map(|q| q.state().into()).collect(),
        };
        MmioTransportState {
            device_type: self.device.device_type(),
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            shm_sel: self.shm_sel,
            config_generation: self.config_generation,
            interrupt_status: self.device.signals().isr(),
            needs_reset: self.device.signals().needs_reset(),
            activated: self.activated,
            queues,
        }
    }

    /// Build a transport around `device` from a saved state, validating every
    /// field; if the device was running, activate it with the saved queues
    /// (the device then polls every queue: notifications the guest sent before
    /// the save are not lost).
    pub fn restore(
        mut device: Box<dyn VirtioDevice>,
        state: &MmioTransportState,
    ) -> Result<Self, MmioError> {
        let actual = device.device_type();
        if state.device_type != actual {
            return Err(MmioError::DeviceType {
                saved: state.device_type,
                actual,
            });
        }
        let maxes = device.queue_max_sizes().to_vec();
        if state.queues.len() != maxes.len() {
            return Err(MmioError::QueueCount {
                saved: state.queues.len(),
                actual: maxes.len(),
            });
        }
        let mut queues = Vec::with_capacity(maxes.len());
        for (i, (s, &max)) in state.queues.iter().zip(&maxes).enumerate() {
            if s.max_size != max {
                return Err(MmioError::QueueMaxSize(i));
            }
            let q = Queue::try_from(QueueState::from(*s)).map_err(|e| MmioError::Queue(i, e))?;
            queues.push(q);
        }
        if state.acked_features & !device.avail_features() != 0 {
            return Err(MmioError::Features(state.acked_features));
        }
        if !status_is_consistent(state.device_status, state.acked_features)
            || (state.activated && state.device_status & DRIVER_OK == 0)
        {
            return Err(MmioError::Status(state.device_status));
        }
        device
            .signals()
            .set(state.interrupt_status, state.needs_reset);
        let activated = state.activated && !state.needs_reset;
        if activated {
            let copies = queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MmioError::Activate(VirtioError::QueueConfig(0, e)))?;
            device
                .activate(copies, state.acked_features)
                .map_err(MmioError::Activate)?;
        }
        Ok(Self {
            device,
            queues,
            device_status: state.device_status & !NEEDS_RESET,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            acked_features: state.acked_features,
            queue_select: state.queue_select,
            shm_sel: state.shm_sel,
            config_generation: state.config_generation,
            activated,
        })
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may be written after FEATURES_OK and before DRIVER_OK,
    /// while the selected queue is not ready.
    fn queue_config_allowed(&self) -> bool {
        let s = self.device_status;
        s & FEATURES_OK != 0
            && s & (DRIVER_OK | FAILED) == 0
            && self
                .queues
                .get(self.queue_select as usize)
                .is_some_and(|q| !q.ready())
    }

    fn reset(&mut self) {
        self.device.reset();
        self.device.signals().clear();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.shm_sel = 0;
        self.activated = false;
    }

    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.device.avail_features() == 0
            && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        // NEEDS_RESET is the device's to set; the driver cannot clear bits.
        let mut new = value & !NEEDS_RESET;
        if new & !KNOWN_STATUS != 0 || new & old != old {
            tracing::debug!("virtio-mmio: status write {value:#x} over {old:#x} ignored");
            return;
        }
        let added = new & !old;
        if !status_order_ok(new) {
            tracing::debug!("virtio-mmio: status {value:#x} out of order, ignored");
            return;
        }
        if added & FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver re-reads the status and sees FEATURES_OK unset.
            tracing::debug!("virtio-mmio: features {:#x} refused", self.acked_features);
            new &= !FEATURES_OK;
            if new & DRIVER_OK != 0 {
                return;
            }
        }
        self.device_status = new;
        if added & DRIVER_OK != 0 && new & FAILED == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        let mut copies = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            match Queue::try_from(q.state()) {
                Ok(c) => copies.push(c),
                Err(e) => {
                    let err = VirtioError::QueueConfig(i, e);
                    self.device.signals().fail("mmio", &err);
                    return;
                }
            }
        }
        // ORDER: everything the driver wrote to the rings before DRIVER_OK is
        // visible to the device thread that takes the queues.
        fence(Ordering::SeqCst);
        match self.device.activate(copies, self.acked_features) {
            Ok(()) => self.activated = true,
            Err(e) => self.device.signals().fail("mmio", &e),
        }
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.device.signals().isr(),
            VIRTIO_MMIO_STATUS => self.status(),
            // No shared memory regions: length and base read as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, v: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let s = self.device_status;
                if s & DRIVER == 0 || s & (FEATURES_OK | FAILED) != 0 {
                    tracing::debug!("virtio-mmio: DriverFeatures written in status {s:#x}");
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v);
                    }
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32);
                    }
                    // No feature bits exist above 63: nothing to record.
                    _ => tracing::debug!(
                        "virtio-mmio: DriverFeatures word {} ignored",
                        self.driver_features_sel
                    ),
                }
            }
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = v,
            VIRTIO_MMIO_QUEUE_NUM => {
                if self.queue_config_allowed() {
                    let ok = u16::try_from(v)
                        .ok()
                        .and_then(|n| self.selected_queue()?.try_set_size(n).ok());
                    if ok.is_none() {
                        tracing::debug!("virtio-mmio: queue size {v} refused");
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(v),
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                if self.activated {
                    self.device.queue_notify(v & 0xffff);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.device.signals().ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_address(offset, v),
            VIRTIO_MMIO_SHM_SEL => self.shm_sel = v,
            _ => tracing::debug!("virtio-mmio: write {v:#x} to {offset:#x} ignored"),
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        match v {
            1 if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(true);
                }
            }
            0 => {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                q.set_ready(false);
                if self.activated {
                    // A driver tearing down (virtio-drivers does this on drop)
                    // may free the rings next: stop using every queue now.
                    self.device.reset();
                    self.activated = false;
                }
            }
            _ => tracing::debug!("virtio-mmio: QueueReady {v} refused"),
        }
    }

    fn write_queue_address(&mut self, offset: u32, v: u32) {
        if !self.queue_config_allowed() {
            tracing::debug!("virtio-mmio: queue address written outside queue setup");
            return;
        }
        let Some(q) = self.selected_queue() else {
            return;
        };
        let merge = |cur: u64, high: bool| {
            if high {
                (cur & 0xffff_ffff) | (u64::from(v) << 32)
            } else {
                (cur & !0xffff_ffff) | u64::from(v)
            }
        };
        let res = match offset {
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                let a = merge(q.desc_table(), offset == VIRTIO_MMIO_QUEUE_DESC_HIGH);
                q.try_set_desc_table_address(GuestAddress(a))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                let a = merge(q.avail_ring(), offset == VIRTIO_MMIO_QUEUE_AVAIL_HIGH);
                q.try_set_avail_ring_address(GuestAddress(a))
            }
            _ => {
                let a = merge(q.used_ring(), offset == VIRTIO_MMIO_QUEUE_USED_HIGH);
                q.try_set_used_ring_address(GuestAddress(a))
            }
        };
        if res.is_err() {
            tracing::debug!("virtio-mmio: misaligned queue address {v:#x} at {offset:#x} refused");
        }
    }
}

/// Each status bit requires the ones before it in the initialisation sequence.
fn status_order_ok(s: u32) -> bool {
    (s & DRIVER == 0 || s & ACK != 0)
        && (s & FEATURES_OK == 0 || s & DRIVER != 0)
        && (s & DRIVER_OK == 0 || s & FEATURES_OK != 0)
}

fn status_is_consistent(s: u32, acked: u64) -> bool {
    s & !KNOWN_STATUS == 0
        && status_order_ok(s)
        && (s & FEATURES_OK == 0 || acked & VIRTIO_F_VERSION_1 != 0)
}

impl MmioDevice for MmioTransport {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        // `offset < 0x100` here.
        let v = self.read_register(offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
