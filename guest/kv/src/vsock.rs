//! A polling virtio-vsock driver (virtio 1.2, 5.10) on `virtio-drivers`'
//! virtio-mmio transport and split virtqueues.
//!
//! `virtio-drivers` 0.13 has a vsock driver (`VirtIOSocket`,
//! `VsockConnectionManager`), but it does not fit this guest: it never gives
//! the event queue any buffers, so `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (sent
//! after every resume) can never arrive; every send spins until the device has
//! consumed that one packet; its RX queue is 8 buffers of 512 bytes; and it
//! finds connections by linear search. So the transport
//! ([`MmioTransport`]), the rings ([`VirtQueue`], which does the `EVENT_IDX`
//! notification suppression) and the DMA plumbing are `virtio-drivers`', and
//! the packet layer here is small and ours:
//!
//! - RX: `Q` device-writable buffers of [`RX_BUF`] bytes (header and payload
//!   in one descriptor; virtio 1.x has no framing rules). [`Vsock::poll_rx`]
//!   hands each packet to a callback, gives the buffer back, and checks once
//!   per batch whether the device wants a notification.
//! - TX: each packet is one device-readable descriptor (header + payload copied
//!   into one buffer), queued without waiting; [`Vsock::reclaim_tx`] frees the
//!   buffers the device has used, [`Vsock::kick_tx`] notifies once per batch if
//!   the device asked for it.
//! - Event queue: [`EVQ`] 4-byte buffers; [`Vsock::poll_events`] reports a
//!   transport reset.
//!
//! Nothing here reads a device register after initialisation: polling reads
//! the used rings in guest memory; the only register access on the data path
//! is the queue-notify write, and only when the device's `avail_event` (or,
//! without `EVENT_IDX`, its `NO_NOTIFY` flag) asks for it. The interrupt
//! status register is never read (no `ack_interrupt`): there are no
//! interrupts in the built-in guest ABI.

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

use nvhv_rt::BootInfo;
use virtio_drivers::device::common::Feature;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use crate::hal::IdentityHal;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Bytes of one RX buffer (header and payload): one page.
pub const RX_BUF: usize = 4096;
/// Largest payload put into one TX packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_TX_PAYLOAD: usize = 64 * 1024;
/// TX buffers up to this size (header included) are recycled through a pool.
const SMALL_TX: usize = 4096;
/// Event-queue size (`struct virtio_vsock_event` is 4 bytes).
pub const EVQ: usize = 4;
const EVENT_LEN: usize = 4;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;

/// `type` of a stream socket, the only one served.
pub const TYPE_STREAM: u16 = 1;
/// Operations (`op`).
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset or refused.
pub const OP_RST: u16 = 3;
/// Orderly shutdown of one or both directions (`flags`).
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// The sender's `buf_alloc` / `fwd_cnt` changed.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// The sender asks for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// Shutdown flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Event id: the transport was reset; every connection is gone.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// A decoded `struct virtio_vsock_hdr` (little endian, packed, 44 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub ty: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from(le_u32(b, at)) | u64::from(le_u32(b, at + 4)) << 32
}

impl Hdr {
    /// Decodes the first [`HDR_LEN`] bytes of `b` (`None` if shorter).
    pub fn parse(b: &[u8]) -> Option<Hdr> {
        let b = b.get(..HDR_LEN)?;
        Some(Hdr {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            ty: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        })
    }

    /// Encodes into the first [`HDR_LEN`] bytes of `b`.
    pub fn write(&self, b: &mut [u8]) {
        let b = &mut b[..HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.ty.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }
}

/// Why the device could not be set up.
pub enum InitError {
    /// No virtio-mmio window holds a vsock device.
    NoDevice,
    /// The device's queues are smaller than this driver needs.
    QueueTooSmall { queue: u16, max: u32 },
    /// `virtio-drivers` refused (queue in use, DMA allocation failed, ...).
    Virtio(virtio_drivers::Error),
    /// Out of memory for the RX or event buffers.
    NoMemory,
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::NoDevice => f.write_str("no virtio-mmio window holds a vsock device"),
            InitError::QueueTooSmall { queue, max } => {
                write!(f, "queue {queue} allows only {max} entries")
            }
            InitError::Virtio(e) => write!(f, "{e}"),
            InitError::NoMemory => f.write_str("out of memory for the queue buffers"),
        }
    }
}

impl From<virtio_drivers::Error> for InitError {
    fn from(e: virtio_drivers::Error) -> Self {
        InitError::Virtio(e)
    }
}

/// Finds the virtio-vsock device among the boot info's virtio-mmio windows.
/// Reads a few registers of each window (VM exits, at start only).
pub fn probe(info: &BootInfo) -> Result<MmioTransport<'static>, InitError> {
    let count = (info.mmio_count as usize).min(info.mmio.len());
    for w in &info.mmio[..count] {
        let Some(header) = NonNull::new(w.base as *mut VirtIOHeader) else {
            continue;
        };
        // SAFETY: per the ABI, `[base, base + size)` is a virtio-mmio register
        // window (identity-mapped, device memory) that nothing else in this
        // guest touches, valid for the life of the VM.
        let Ok(transport) = (unsafe { MmioTransport::new(header, w.size as usize) }) else {
            continue;
        };
        if transport.device_type() == DeviceType::Socket {
            return Ok(transport);
        }
    }
    Err(InitError::NoDevice)
}

/// Largest queue size the device allows on all three vsock queues' data path
/// (RX and TX). Register reads: call at initialisation only.
pub fn max_data_queue_size(transport: &mut MmioTransport<'static>) -> u32 {
    transport
        .max_queue_size(RX_QUEUE)
        .min(transport.max_queue_size(TX_QUEUE))
}

/// A heap buffer shared with the device (identity-mapped: its address is
/// its guest-physical address).
struct Buf {
    ptr: NonNull<u8>,
    size: usize,
}

impl Buf {
    fn layout(size: usize) -> Layout {
        // Page-aligned when a page or more, so RX buffers are exactly one page
        // each (fewer pages dirtied per packet).
        let align = if size >= 4096 { 4096 } else { 64 };
        Layout::from_size_align(size, align).expect("buffer layout")
    }

    /// Zeroed buffer of `size` bytes, or `None` when out of memory.
    fn new(size: usize) -> Option<Buf> {
        // SAFETY: `size` is non-zero (callers pass at least EVENT_LEN).
        let p = unsafe { alloc::alloc::alloc_zeroed(Self::layout(size)) };
        NonNull::new(p).map(|ptr| Buf { ptr, size })
    }

    /// The buffer as a byte slice.
    ///
    /// # Safety
    /// The device must not be using the buffer, and no other slice of it may
    /// be live.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self) -> &mut [u8] {
        // SAFETY: `ptr` is a live, initialised (zeroed at allocation)
        // allocation of `size` bytes; exclusivity is the caller's promise.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.size) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `Buf::new` with this layout.
        unsafe { alloc::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.size)) };
    }
}

/// Counters (kept in guest RAM, for a debugger or a later INFO field).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Queue-notify writes (VM exits) per queue: RX, TX, event.
    pub notifies: [u64; 3],
    /// Packets received and sent.
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// RX buffers whose header was unusable (short, or `len` beyond the buffer).
    pub rx_malformed: u64,
    /// Transport-reset events.
    pub resets: u64,
}

/// The vsock device with `Q`-entry RX and TX queues.
pub struct Vsock<const Q: usize> {
    transport: MmioTransport<'static>,
    rx: VirtQueue<IdentityHal, Q>,
    /// RX buffer by descriptor index (the token `VirtQueue::add` returned).
    rx_bufs: [Option<Buf>; Q],
    tx: VirtQueue<IdentityHal, Q>,
    /// TX buffer by descriptor index while the device owns it.
    tx_bufs: [Option<Buf>; Q],
    /// Free [`SMALL_TX`] buffers, reused LIFO (few, hot pages).
    tx_pool: alloc::vec::Vec<Buf>,
    /// Packets added to TX since the last notification check.
    tx_unkicked: bool,
    ev: VirtQueue<IdentityHal, EVQ>,
    ev_bufs: [Option<Buf>; EVQ],
    cid: u64,
    event_idx: bool,
    pub stats: Stats,
}

impl<const Q: usize> Vsock<Q> {
    /// Negotiates features (`VERSION_1`, `RING_EVENT_IDX`), sets up the three
    /// queues, gives RX and event buffers to the device and sets `DRIVER_OK`.
    pub fn new(mut transport: MmioTransport<'static>) -> Result<Self, InitError> {
        let features = transport.begin_init(Feature::VERSION_1 | Feature::RING_EVENT_IDX);
        let event_idx = features.contains(Feature::RING_EVENT_IDX);
        for (queue, size) in [(RX_QUEUE, Q), (TX_QUEUE, Q), (EVENT_QUEUE, EVQ)] {
            let max = transport.max_queue_size(queue);
            if (max as usize) < size {
                transport.set_status(DeviceStatus::FAILED);
                return Err(InitError::QueueTooSmall { queue, max });
            }
        }
        let cid = read_cid(&transport);
        let mut rx = VirtQueue::new(&mut transport, RX_QUEUE, false, event_idx)?;
        let tx = VirtQueue::new(&mut transport, TX_QUEUE, false, event_idx)?;
        let mut ev = VirtQueue::new(&mut transport, EVENT_QUEUE, false, event_idx)?;
        let mut rx_bufs: [Option<Buf>; Q] = core::array::from_fn(|_| None);
        for _ in 0..Q {
            let buf = Buf::new(RX_BUF).ok_or(InitError::NoMemory)?;
            // SAFETY: the buffer is new; from here the device owns it until
            // its token is popped, and we keep it alive in `rx_bufs`.
            let token = unsafe { rx.add(&[], &mut [buf.slice()]) }?;
            rx_bufs[usize::from(token)] = Some(buf);
        }
        let mut ev_bufs: [Option<Buf>; EVQ] = core::array::from_fn(|_| None);
        for _ in 0..EVQ {
            let buf = Buf::new(EVENT_LEN).ok_or(InitError::NoMemory)?;
            // SAFETY: as for the RX buffers.
            let token = unsafe { ev.add(&[], &mut [buf.slice()]) }?;
            ev_bufs[usize::from(token)] = Some(buf);
        }
        transport.finish_init();
        let mut dev = Vsock {
            transport,
            rx,
            rx_bufs,
            tx,
            tx_bufs: core::array::from_fn(|_| None),
            tx_pool: alloc::vec::Vec::new(),
            tx_unkicked: false,
            ev,
            ev_bufs,
            cid,
            event_idx,
            stats: Stats::default(),
        };
        // Tell the device about the buffers (the device has not suppressed
        // anything yet, so this is normally two register writes).
        dev.notify_if_wanted(RX_QUEUE);
        dev.notify_if_wanted(EVENT_QUEUE);
        let _ = dev.tx_pool.try_reserve_exact(Q);
        Ok(dev)
    }

    /// The guest's CID, from the device configuration.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Whether `VIRTIO_F_EVENT_IDX` was negotiated.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    fn notify_if_wanted(&mut self, queue: u16) {
        // The new available index (a store) must be visible before
        // `avail_event` / the used flags are read: x86 can reorder a store
        // after a later load, and `VirtQueue` has only a release store
        // there. Without the full fence a device that re-enables
        // notifications just then can miss our kick (as Linux's
        // `virtqueue_kick_prepare` does with `virtio_mb`).
        fence(Ordering::SeqCst);
        let wanted = match queue {
            RX_QUEUE => self.rx.should_notify(),
            TX_QUEUE => self.tx.should_notify(),
            _ => self.ev.should_notify(),
        };
        if wanted {
            self.stats.notifies[usize::from(queue)] += 1;
            self.transport.notify(queue);
        }
    }

    /// Handles up to `max` received packets: `f(header, payload)` for each
    /// well-formed one, then gives the buffers back to the device. Returns
    /// how many buffers were consumed (0: nothing pending).
    pub fn poll_rx(&mut self, max: usize, mut f: impl FnMut(&Hdr, &[u8])) -> usize {
        let mut n = 0;
        while n < max {
            let Some(token) = self.rx.peek_used() else {
                break;
            };
            let buf = self.rx_bufs[usize::from(token)]
                .take()
                .expect("vsock: device used an RX descriptor it was not given");
            // SAFETY: the device has returned this buffer (it is the next used
            // element); no other slice of it exists.
            let slice = unsafe { buf.slice() };
            // SAFETY: `token` is the next used element and `slice` is the
            // buffer added with it.
            let used = unsafe { self.rx.pop_used(token, &[], &mut [&mut *slice]) }
                .expect("vsock: RX pop of the peeked token");
            n += 1;
            self.stats.rx_packets += 1;
            let data = &slice[..(used as usize).min(RX_BUF)];
            match Hdr::parse(data) {
                Some(h) if (h.len as usize) <= data.len() - HDR_LEN => {
                    f(&h, &data[HDR_LEN..HDR_LEN + h.len as usize]);
                }
                _ => self.stats.rx_malformed += 1,
            }
            // SAFETY: the slice is no longer used; the device owns the buffer
            // again until its token is popped.
            let token = unsafe { self.rx.add(&[], &mut [buf.slice()]) }
                .expect("vsock: RX queue has room for the buffer just popped");
            self.rx_bufs[usize::from(token)] = Some(buf);
        }
        if n > 0 {
            self.notify_if_wanted(RX_QUEUE);
        }
        n
    }

    /// True if the TX queue can take another packet.
    pub fn tx_room(&self) -> bool {
        self.tx.available_desc() > 0
    }

    /// Queues one packet: `hdr` (its `len` set to `payload.len()`) and the
    /// payload, copied. Returns false, queueing nothing, if the TX queue is
    /// full or there is no memory for the buffer: try again later.
    pub fn send(&mut self, hdr: &Hdr, payload: &[u8]) -> bool {
        debug_assert!(payload.len() <= MAX_TX_PAYLOAD);
        if !self.tx_room() {
            return false;
        }
        let total = HDR_LEN + payload.len();
        let buf = if total <= SMALL_TX {
            match self.tx_pool.pop() {
                Some(b) => b,
                None => match Buf::new(SMALL_TX) {
                    Some(b) => b,
                    None => return false,
                },
            }
        } else {
            match Buf::new(total) {
                Some(b) => b,
                None => return false,
            }
        };
        // SAFETY: the buffer is ours (fresh or back from the device).
        let slice = &mut unsafe { buf.slice() }[..total];
        Hdr {
            len: payload.len() as u32,
            ..*hdr
        }
        .write(slice);
        slice[HDR_LEN..].copy_from_slice(payload);
        // SAFETY: the device owns the buffer from now until its token is
        // popped in `reclaim_tx`; we keep it alive in `tx_bufs`.
        match unsafe { self.tx.add(&[slice], &mut []) } {
            Ok(token) => {
                self.tx_bufs[usize::from(token)] = Some(buf);
                self.tx_unkicked = true;
                self.stats.tx_packets += 1;
                true
            }
            Err(_) => {
                self.recycle(buf);
                false
            }
        }
    }

    /// Notifies the device of the packets queued since the last call, if its
    /// `avail_event` asks for a notification (at most one register write).
    pub fn kick_tx(&mut self) {
        if self.tx_unkicked {
            self.tx_unkicked = false;
            self.notify_if_wanted(TX_QUEUE);
        }
    }

    fn recycle(&mut self, buf: Buf) {
        if buf.size == SMALL_TX && self.tx_pool.len() < self.tx_pool.capacity() {
            self.tx_pool.push(buf);
        }
    }

    /// Frees the TX buffers the device has finished with. Returns how many.
    pub fn reclaim_tx(&mut self) -> usize {
        let mut n = 0;
        while let Some(token) = self.tx.peek_used() {
            let buf = self.tx_bufs[usize::from(token)]
                .take()
                .expect("vsock: device used a TX descriptor it was not given");
            // The descriptor covered the header and payload only; pass the
            // same length back. The HAL's unshare is a no-op, so only the
            // count of buffers matters to `pop_used`, but keep it exact.
            // SAFETY: the device is done with the buffer.
            let slice = unsafe { buf.slice() };
            // SAFETY: `token` is the next used element; `slice` starts at the
            // buffer added with it (its length does not matter to this HAL).
            unsafe { self.tx.pop_used(token, &[slice], &mut []) }
                .expect("vsock: TX pop of the peeked token");
            self.recycle(buf);
            n += 1;
        }
        n
    }

    /// Drains the event queue; true if a transport reset was among the
    /// events (every connection is gone; the guest CID is re-read).
    pub fn poll_events(&mut self) -> bool {
        let mut reset = false;
        let mut any = false;
        while let Some(token) = self.ev.peek_used() {
            let buf = self.ev_bufs[usize::from(token)]
                .take()
                .expect("vsock: device used an event descriptor it was not given");
            // SAFETY: the device returned the buffer.
            let slice = unsafe { buf.slice() };
            // SAFETY: next used element, same buffer.
            let used = unsafe { self.ev.pop_used(token, &[], &mut [&mut *slice]) }
                .expect("vsock: event pop of the peeked token");
            if used as usize >= EVENT_LEN && le_u32(slice, 0) == EVENT_TRANSPORT_RESET {
                reset = true;
            }
            any = true;
            // SAFETY: given back to the device until popped again.
            let token = unsafe { self.ev.add(&[], &mut [buf.slice()]) }
                .expect("vsock: event queue has room for the buffer just popped");
            self.ev_bufs[usize::from(token)] = Some(buf);
        }
        if any {
            self.notify_if_wanted(EVENT_QUEUE);
        }
        if reset {
            self.stats.resets += 1;
            // virtio 1.2, 5.10.6.7: the guest CID may have changed.
            self.cid = read_cid(&self.transport);
        }
        reset
    }
}

/// `guest_cid` from the configuration space (two 32-bit registers).
fn read_cid(transport: &MmioTransport<'static>) -> u64 {
    let read = || -> virtio_drivers::Result<u64> {
        let lo: u32 = transport.read_config_space(0)?;
        let hi: u32 = transport.read_config_space(4)?;
        Ok(u64::from(lo) | u64::from(hi) << 32)
    };
    transport
        .read_consistent(read)
        .unwrap_or(nvhv_rt::abi::GUEST_CID)
}

impl<const Q: usize> Drop for Vsock<Q> {
    fn drop(&mut self) {
        // Reset the device first so it stops using the rings and buffers that
        // the fields' destructors free next.
        self.transport.set_status(DeviceStatus::empty());
    }
}
