//! A fake guest vsock driver for the device tests: it programs the MMIO
//! registers like a real driver and uses the rings straight in guest memory,
//! notifying the device only when the device asks (the `virtio-drivers` 0.13
//! rule: `avail_idx >= avail_event + 1` with EVENT_IDX, else the used flags).

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::queue::testing::DriverQueue;
use crate::devices::virtio::vsock::packet::{Header, Op, HDR_LEN, HOST_CID, TYPE_STREAM};
use crate::devices::{GuestMemory, MmioDevice};
use crate::vstate::wait::GuestWake;

pub const QSIZE: u16 = 64;
pub const RX_BUF: u64 = 0x10_0000;
pub const RX_BUF_SIZE: u32 = 512;
pub const TX_AREA: u64 = 0x20_0000;
pub const TX_SLOT: u64 = 0x2000;
pub const EVT_BUF: u64 = 0x30_0000;
pub const MEM_SIZE: usize = 0x40_0000;
pub const GUEST_PORT: u32 = 6379;

pub struct GuestDriver {
    pub mem: GuestMemory,
    pub t: Arc<Mutex<MmioTransport>>,
    pub wake: Arc<GuestWake>,
    pub rx: DriverQueue,
    pub tx: DriverQueue,
    pub evt: DriverQueue,
    pub notifies: [usize; 3],
    pub event_idx: bool,
    pub tx_free: Vec<u16>,
    /// Descriptor of the event last taken by `peek_event`.
    pub last_event_id: u16,
}

fn wr(t: &Arc<Mutex<MmioTransport>>, off: u32, v: u32) {
    t.lock()
        .unwrap()
        .mmio_write(u64::from(off), &v.to_le_bytes());
}

fn rd(t: &Arc<Mutex<MmioTransport>>, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.lock().unwrap().mmio_read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

impl GuestDriver {
    pub fn new(mem: GuestMemory, t: Arc<Mutex<MmioTransport>>, wake: Arc<GuestWake>) -> Self {
        Self {
            mem,
            t,
            wake,
            rx: DriverQueue::new(0x1000, QSIZE),
            tx: DriverQueue::new(0x4000, QSIZE),
            evt: DriverQueue::new(0x7000, QSIZE),
            notifies: [0; 3],
            event_idx: false,
            tx_free: (0..QSIZE / 2).rev().collect(),
            last_event_id: 0,
        }
    }

    pub fn status(&self) -> u32 {
        rd(&self.t, VIRTIO_MMIO_STATUS)
    }

    pub fn guest_cid(&self) -> u64 {
        let mut b = [0u8; 8];
        self.t.lock().unwrap().mmio_read(0x100, &mut b);
        u64::from_le_bytes(b)
    }

    /// Full initialisation with `features` (must include VERSION_1), RX
    /// buffers posted before DRIVER_OK.
    pub fn init(&mut self, features: u64) {
        let t = &self.t;
        assert_eq!(rd(t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(t, VIRTIO_MMIO_DEVICE_ID), 19);
        wr(t, VIRTIO_MMIO_STATUS, 0);
        wr(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = rd(t, VIRTIO_MMIO_DEVICE_FEATURES);
        wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = rd(t, VIRTIO_MMIO_DEVICE_FEATURES);
        let offered = u64::from(lo) | u64::from(hi) << 32;
        let f = offered & features;
        self.event_idx = f & (1 << 29) != 0;
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        wr(t, VIRTIO_MMIO_STATUS, s);
        assert_ne!(rd(t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        for (i, q) in [self.rx, self.tx, self.evt].iter().enumerate() {
            // Fresh driver-side ring state (a re-init after reset starts over).
            self.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(q.desc))
                .unwrap();
            wr(t, VIRTIO_MMIO_QUEUE_SEL, i as u32);
            assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
            wr(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
            wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc as u32);
            wr(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
            wr(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail as u32);
            wr(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
            wr(t, VIRTIO_MMIO_QUEUE_USED_LOW, q.used as u32);
            wr(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
            wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        self.rx = DriverQueue::new(0x1000, QSIZE);
        self.tx = DriverQueue::new(0x4000, QSIZE);
        self.evt = DriverQueue::new(0x7000, QSIZE);
        self.tx_free = (0..QSIZE / 2).rev().collect();
        for i in 0..QSIZE {
            let addr = RX_BUF + u64::from(i) * u64::from(RX_BUF_SIZE);
            self.rx.write_desc(
                &self.mem,
                i,
                addr,
                RX_BUF_SIZE,
                VRING_DESC_F_WRITE as u16,
                0,
            );
            self.rx.publish(&self.mem, i);
        }
        wr(t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(self.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    fn queue(&self, i: usize) -> &DriverQueue {
        [&self.rx, &self.tx, &self.evt][i]
    }

    /// Notify queue `i` if the device asked for it.
    pub fn notify_if_needed(&mut self, i: usize) {
        fence(Ordering::SeqCst);
        let q = self.queue(i);
        let should = if self.event_idx {
            q.avail_idx >= q.avail_event(&self.mem).wrapping_add(1)
        } else {
            q.used_flags(&self.mem) & 1 == 0
        };
        if should {
            wr(&self.t, VIRTIO_MMIO_QUEUE_NOTIFY, i as u32);
            self.notifies[i] += 1;
        }
    }

    /// Post `n` event buffers.
    pub fn post_event_buffers(&mut self, n: u16) {
        for i in 0..n {
            let addr = EVT_BUF + 8 * u64::from(i);
            self.mem
                .write_slice(&[0xff; 8], GuestAddress(addr))
                .unwrap();
            self.evt
                .write_desc(&self.mem, i, addr, 8, VRING_DESC_F_WRITE as u16, 0);
            self.evt.publish(&self.mem, i);
        }
        self.notify_if_needed(2);
    }

    /// The next event the device delivered; like Linux, the buffer is
    /// posted again once the event is handled (read).
    pub fn poll_event(&mut self) -> Option<u32> {
        let v = self.peek_event()?;
        let id = self.last_event_id;
        self.evt.publish(&self.mem, id);
        self.notify_if_needed(2);
        Some(v)
    }

    /// The next event the device delivered, its buffer kept (not re-posted).
    pub fn peek_event(&mut self) -> Option<u32> {
        let (id, len) = self.evt.pop_used(&self.mem)?;
        assert_eq!(len, 4);
        let v: u32 = self
            .mem
            .read_obj(GuestAddress(EVT_BUF + 8 * u64::from(id)))
            .unwrap();
        self.last_event_id = id as u16;
        Some(u32::from_le(v))
    }

    fn reclaim_tx(&mut self) {
        while let Some((id, len)) = self.tx.pop_used(&self.mem) {
            assert_eq!(len, 0, "the device writes nothing into TX buffers");
            self.tx_free.push(id as u16 / 2);
        }
    }

    /// Put a packet in the TX queue without waiting; returns the head index.
    pub fn send_async(&mut self, hdr: &Header, payload: &[u8]) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let slot = loop {
            self.reclaim_tx();
            if let Some(s) = self.tx_free.pop() {
                break s;
            }
            assert!(Instant::now() < deadline, "TX ring never drained");
            std::thread::yield_now();
        };
        let head = slot * 2;
        let base = TX_AREA + u64::from(slot) * TX_SLOT;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(base))
            .unwrap();
        let flags = if payload.is_empty() {
            0
        } else {
            VRING_DESC_F_NEXT as u16
        };
        self.tx
            .write_desc(&self.mem, head, base, HDR_LEN as u32, flags, head + 1);
        if !payload.is_empty() {
            assert!(payload.len() as u64 <= TX_SLOT - 64);
            self.mem
                .write_slice(payload, GuestAddress(base + 64))
                .unwrap();
            self.tx
                .write_desc(&self.mem, head + 1, base + 64, payload.len() as u32, 0, 0);
        }
        self.tx.publish(&self.mem, head);
        self.notify_if_needed(1);
        head
    }

    /// Send and wait until the device consumed the packet (what
    /// `virtio-drivers` does: `add_notify_wait_pop`).
    pub fn send(&mut self, hdr: &Header, payload: &[u8]) {
        let head = self.send_async(hdr, payload);
        let slot = head / 2;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.tx_free.contains(&slot) {
            self.reclaim_tx();
            assert!(Instant::now() < deadline, "device never consumed TX packet");
            std::hint::spin_loop();
        }
    }

    /// Next RX packet, reposting its buffer; None if none arrives in `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((id, len)) = self.rx.pop_used(&self.mem) {
                let addr = RX_BUF + u64::from(id) * u64::from(RX_BUF_SIZE);
                let mut buf = vec![0u8; len as usize];
                self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
                let mut hb = [0u8; HDR_LEN];
                hb.copy_from_slice(&buf[..HDR_LEN]);
                let hdr = Header::from_bytes(&hb);
                assert_eq!(hdr.len as usize + HDR_LEN, len as usize);
                self.rx.publish(&self.mem, id as u16);
                self.notify_if_needed(0);
                return Some((hdr, buf[HDR_LEN..].to_vec()));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            // Park like the built-in guest does on the wait port.
            self.wake.wait(
                &mut crate::vstate::wait::Waiter::default(),
                Some((deadline - now).min(Duration::from_millis(5))),
            );
        }
    }

    /// Wait for the next packet that is not a credit update.
    pub fn expect(&mut self, op: Op) -> (Header, Vec<u8>) {
        let (h, p) = self
            .recv(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no {op:?} from the device"));
        assert_eq!(h.operation(), Some(op), "got {h:?}");
        (h, p)
    }
}

/// The guest's side of one connection.
#[derive(Debug, Clone, Copy)]
pub struct GuestConn {
    pub host_port: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    pub rx_cnt: u32,
    pub tx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
}

impl GuestConn {
    pub fn new(host_port: u32, buf_alloc: u32) -> Self {
        Self {
            host_port,
            buf_alloc,
            fwd_cnt: 0,
            rx_cnt: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        }
    }

    pub fn hdr(&self, op: Op, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: GUEST_PORT,
            dst_port: self.host_port,
            len,
            type_: TYPE_STREAM,
            op: op.code(),
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    pub fn update_peer(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    pub fn peer_free(&self) -> u32 {
        self.peer_buf_alloc - self.tx_cnt.wrapping_sub(self.peer_fwd_cnt)
    }
}
