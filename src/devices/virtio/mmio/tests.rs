//! Transport tests: registers, feature negotiation, the status state machine,
//! queue setup windows, failure reporting, reset, save/restore validation.

use std::sync::{Arc, Mutex};

use super::*;
use crate::devices::virtio::{DeviceSignals, VIRTIO_RING_F_EVENT_IDX};

#[derive(Debug, Default)]
struct Log {
    activations: Vec<(usize, u64, Vec<bool>)>,
    notifies: Vec<u32>,
    resets: usize,
    refuse: bool,
}

struct FakeDevice {
    log: Arc<Mutex<Log>>,
    signals: DeviceSignals,
    queues: Option<Vec<QueueState>>,
}

impl FakeDevice {
    fn new() -> (Box<Self>, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let d = Box::new(Self {
            log: Arc::clone(&log),
            signals: DeviceSignals::new(),
            queues: None,
        });
        (d, log)
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 0b101
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, queues: Vec<Queue>, acked: u64) -> Result<(), VirtioError> {
        let mut log = self.log.lock().unwrap();
        if log.refuse {
            return Err(VirtioError::QueueUnusable(0));
        }
        let idx = queues.iter().map(|q| q.event_idx_enabled()).collect();
        log.activations.push((queues.len(), acked, idx));
        self.queues = Some(queues.iter().map(|q| q.state()).collect());
        Ok(())
    }
    fn queue_notify(&mut self, index: u32) {
        self.log.lock().unwrap().notifies.push(index);
    }
    fn reset(&mut self) {
        self.log.lock().unwrap().resets += 1;
        self.queues = None;
    }
    fn signals(&self) -> &DeviceSignals {
        &self.signals
    }
    fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.queues.clone()
    }
}

fn rd(t: &mut MmioTransport, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.mmio_read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u32, v: u32) {
    t.mmio_write(u64::from(off), &v.to_le_bytes());
}

fn setup_queue(t: &mut MmioTransport, sel: u32, base: u64) {
    wr(t, VIRTIO_MMIO_QUEUE_SEL, sel);
    wr(t, VIRTIO_MMIO_QUEUE_NUM, 8);
    wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base as u32);
    wr(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, (base >> 32) as u32);
    wr(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (base + 0x100) as u32);
    wr(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
    wr(t, VIRTIO_MMIO_QUEUE_USED_LOW, (base + 0x200) as u32);
    wr(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
    wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

/// Negotiate `features`, set up both queues, DRIVER_OK.
fn bring_up(t: &mut MmioTransport, features: u64) {
    wr(t, VIRTIO_MMIO_STATUS, ACK);
    wr(t, VIRTIO_MMIO_STATUS, ACK | DRIVER);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    wr(t, VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
    assert_ne!(rd(t, VIRTIO_MMIO_STATUS) & FEATURES_OK, 0);
    setup_queue(t, 0, 0x1000);
    setup_queue(t, 1, 0x2000);
    wr(
        t,
        VIRTIO_MMIO_STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
}

#[test]
fn identification_registers() {
    let (d, _) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_VENDOR_ID), MMIO_VENDOR_ID);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
    // Narrow or misaligned register accesses read zero.
    let mut b = [0xffu8; 2];
    t.mmio_read(0, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    t.mmio_read(2, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn device_features_by_selector() {
    let (d, _) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let lo = rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
    wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let hi = rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
    wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    let all = u64::from(lo) | u64::from(hi) << 32;
    assert_eq!(all, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 0b101);
}

#[test]
fn negotiation_activates_with_queues_and_event_idx() {
    let (d, log) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    let f = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
    bring_up(&mut t, f);
    assert!(t.is_activated());
    assert_eq!(t.acked_features(), f);
    assert_eq!(
        rd(&mut t, VIRTIO_MMIO_STATUS),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK
    );
    let log = log.lock().unwrap();
    assert_eq!(log.activations, vec![(2, f, vec![true, true])]);
}

#[test]
fn features_ok_refused_without_version_1_or_with_unoffered_bits() {
    for bad in [
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_F_VERSION_1 | 0b10,
        VIRTIO_F_VERSION_1 | 1 << 40,
    ] {
        let (d, _) = FakeDevice::new();
        let mut t = MmioTransport::new(d);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, bad as u32);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, (bad >> 32) as u32);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS),
            ACK | DRIVER,
            "features {bad:#x}"
        );
        // And DRIVER_OK cannot follow.
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(!t.is_activated());
    }
}

#[test]
fn status_bits_out_of_order_or_cleared_are_ignored() {
    let (d, _) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    wr(&mut t, VIRTIO_MMIO_STATUS, DRIVER);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | FEATURES_OK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER);
    wr(&mut t, VIRTIO_MMIO_STATUS, DRIVER);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRIVER);
    // The driver cannot set NEEDS_RESET; unknown bits are refused.
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER | NEEDS_RESET);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRIVER);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER | 0x10);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRIVER);
    // FAILED is accepted.
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER | FAILED);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRIVER | FAILED);
}

#[test]
fn queue_registers_only_in_the_setup_window() {
    let (d, _) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    // Before FEATURES_OK: ignored.
    setup_queue(&mut t, 0, 0x1000);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
    // Invalid sizes and misaligned addresses are refused.
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 12);
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 32);
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 0x1_0004);
    wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008);
    assert_eq!(t.queues[0].size(), 16);
    assert_eq!(t.queues[0].desc_table(), 0);
    setup_queue(&mut t, 0, 0x1000);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    assert_eq!(t.queues[0].size(), 8);
    assert_eq!(t.queues[0].used_ring(), 0x1200);
    // Once ready, the queue's registers are frozen.
    wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000);
    assert_eq!(t.queues[0].desc_table(), 0x1000);
    // Out-of-range selector: reads zero, writes ignored.
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn notify_reaches_the_device_only_when_running() {
    let (d, log) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    bring_up(&mut t, VIRTIO_F_VERSION_1);
    wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(log.lock().unwrap().notifies, vec![1]);
    // Without EVENT_IDX the queues are activated without it.
    assert_eq!(log.lock().unwrap().activations[0].2, vec![false, false]);
}

#[test]
fn interrupt_status_ack_and_needs_reset() {
    let (d, _) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    bring_up(&mut t, VIRTIO_F_VERSION_1);
    t.device.signals().used_buffer();
    assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING_BIT);
    wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING_BIT);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    t.device.signals().fail("test", &"broken chain");
    assert_ne!(rd(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    assert_ne!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & 2, 0);
}

const INT_VRING_BIT: u32 = 1;

#[test]
fn reset_clears_everything_and_reactivation_works() {
    let (d, log) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    bring_up(&mut t, VIRTIO_F_VERSION_1);
    t.device.signals().fail("test", &"x");
    wr(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert!(!t.is_activated());
    assert_eq!(t.acked_features(), 0);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    assert!(log.lock().unwrap().resets >= 1);
    bring_up(&mut t, VIRTIO_F_VERSION_1);
    assert!(t.is_activated());
    assert_eq!(log.lock().unwrap().activations.len(), 2);
}

#[test]
fn device_refusing_queues_sets_needs_reset() {
    let (d, log) = FakeDevice::new();
    log.lock().unwrap().refuse = true;
    let mut t = MmioTransport::new(d);
    bring_up(&mut t, VIRTIO_F_VERSION_1);
    assert!(!t.is_activated());
    assert_ne!(rd(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
}

#[test]
fn queue_disabled_while_running_stops_the_device() {
    let (d, log) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    bring_up(&mut t, VIRTIO_F_VERSION_1);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    assert!(!t.is_activated());
    assert_eq!(log.lock().unwrap().resets, 1);
}

#[test]
fn config_space_is_forwarded_with_relative_offset() {
    let (d, _) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    let mut b = [0u8; 2];
    t.mmio_read(0x104, &mut b);
    assert_eq!(b, [4, 5]);
}

#[test]
fn save_restore_round_trips_and_reactivates() {
    let (d, _) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    bring_up(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    let s = t.save();
    assert!(s.activated);
    assert_eq!(s.queues.len(), 2);
    let (d2, log2) = FakeDevice::new();
    let t2 = MmioTransport::restore(d2, &s).unwrap();
    assert!(t2.is_activated());
    assert_eq!(t2.save(), s);
    assert_eq!(log2.lock().unwrap().activations.len(), 1);
}

#[test]
fn restore_refuses_each_corrupted_field() {
    let (d, _) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    bring_up(&mut t, VIRTIO_F_VERSION_1);
    let good = t.save();
    let corruptions: [fn(&mut MmioTransportState); 11] = [
        |s| s.device_type = 19,
        |s| {
            s.queues.pop();
        },
        |s| s.queues[0].max_size = 32,
        |s| s.queues[0].size = 3,
        |s| s.queues[1].desc_table = 0x1001,
        |s| s.queues[1].used_ring = 0x1002,
        |s| s.acked_features |= 1 << 40,
        |s| s.device_status = ACK | FEATURES_OK,
        |s| s.device_status |= 0x100,
        |s| s.acked_features = 0,
        |s| s.device_status = ACK | DRIVER,
    ];
    for (i, c) in corruptions.iter().enumerate() {
        let mut s = good.clone();
        c(&mut s);
        let (d, _) = FakeDevice::new();
        assert!(
            MmioTransport::restore(d, &s).is_err(),
            "corruption {i} accepted"
        );
    }
    let (d, _) = FakeDevice::new();
    assert!(MmioTransport::restore(d, &good).is_ok());
}

#[test]
fn restore_of_a_failed_device_keeps_needs_reset_and_stays_inactive() {
    let (d, log) = FakeDevice::new();
    let mut t = MmioTransport::new(d);
    bring_up(&mut t, VIRTIO_F_VERSION_1);
    t.device.signals().fail("test", &"x");
    let s = t.save();
    assert!(s.needs_reset);
    let (d2, log2) = FakeDevice::new();
    let mut t2 = MmioTransport::restore(d2, &s).unwrap();
    assert!(!t2.is_activated());
    assert_ne!(rd(&mut t2, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    assert!(log2.lock().unwrap().activations.is_empty());
    drop(log);
}
