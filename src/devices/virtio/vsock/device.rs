//! The vsock device proper: [`VsockCore`] owns the three virtqueues and the
//! connection table, turns TX packets into connection events and connection
//! output into RX packets, and delivers the transport-reset event; and
//! [`VsockFrontend`], the [`VirtioDevice`] the MMIO transport drives.
//!
//! The core does no waiting: the device thread ([`super::backend`]) calls
//! [`VsockCore::run`] under the core mutex, in bounded batches, so every
//! lock release is a safe point (no descriptor half-processed). Any malformed
//! chain or out-of-range buffer fails the device (`DEVICE_NEEDS_RESET`,
//! host sockets closed) instead of being processed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};

use super::connection::{Connection, VsockState};
use super::deps::{OutputDeps, VersionMark};
use super::packet::{
    Header, Op, EVENT_LEN, EVENT_TRANSPORT_RESET, HDR_LEN, HOST_CID, MAX_PKT_PAYLOAD, TYPE_STREAM,
};
use crate::devices::virtio::queue::{self, Direction, QueueError};
use crate::devices::virtio::{
    DeviceSignals, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::GuestMemory;
use crate::vstate::wait::GuestWake;

/// virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Maximum size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the RX queue (device → guest packets).
pub const RX: usize = 0;
/// Index of the TX queue (guest → device packets).
pub const TX: usize = 1;
/// Index of the event queue.
pub const EVT: usize = 2;
/// First local port handed to host connections.
pub const FIRST_LOCAL_PORT: u32 = 1024;

const TX_BUDGET: usize = 128;
const RX_BUDGET: usize = 128;
/// Most RSTs for unknown connections kept waiting for RX buffers.
pub const MAX_ORPHAN_RST: usize = 4096;
/// Longest wait, after a restore, for the guest to take the transport reset
/// before RX (new connections) goes on anyway.
pub const RESET_ACK_TIMEOUT: Duration = Duration::from_millis(100);

/// The device state behind the core mutex.
#[derive(Debug)]
pub struct VsockCore {
    mem: GuestMemory,
    signals: Arc<DeviceSignals>,
    pub(crate) guest_cid: u64,
    guest_port: u32,
    buf_alloc: u32,
    max_connections: usize,
    queues: Vec<Queue>,
    active: bool,
    failed: bool,
    notif_enabled: [bool; 3],
    conns: HashMap<u32, Connection>,
    pub(crate) next_port: u32,
    pub(crate) orphan_rst: VecDeque<Header>,
    pub(crate) reset_event_pending: bool,
    /// After a restore, RX waits until the guest has taken the transport
    /// reset ([`RESET_ACK_TIMEOUT`]): since when, and the event queue's
    /// avail index once the event is published.
    reset_gate: Option<(Instant, Option<u16>)>,
    io_queue: VecDeque<u32>,
    rx_queue: VecDeque<u32>,
    payload: Vec<u8>,
    /// Set by `pause()`: the device thread makes no progress while set.
    pub(crate) paused: bool,
    /// Set by `stop()`: the device thread exits.
    pub(crate) stopping: bool,
    kick: bool,
    wake_guest: bool,
    /// TX buffers were returned and the guest was not woken for them yet.
    tx_wake_pending: bool,
    /// Output epoch that guest output is tagged with now.
    output_epoch: u64,
    /// Hold guest output until released (output commit); None: release at once.
    output_gate: Option<OutputGate>,
    /// The gate was told about output waiting in this epoch.
    output_signalled: bool,
    /// The guest's output-dependency area: output that depends on nothing
    /// uncommitted is not held ([`super::deps`]).
    pub(crate) deps: OutputDeps,
    /// Whether settled output ([`super::deps`]) skips the hold.
    pub(crate) release_settled: bool,
    /// Guest output bytes not held because they depended on nothing
    /// uncommitted (while a gate was set).
    unheld_bytes: u64,
    /// The earliest time a connection the guest refused is offered again.
    request_retry: Option<Instant>,
}

/// Output commit's hook into the device: while set, guest output is held
/// until [`VsockCore::release_output`], and the function is called (on the
/// device thread, with the device locked: it must not block) when output
/// starts waiting in an epoch.
#[derive(Clone)]
pub struct OutputGate(Arc<dyn Fn() + Send + Sync>);

impl OutputGate {
    /// A gate that calls `on_pending` when output starts waiting.
    pub fn new(on_pending: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(on_pending))
    }
}

impl std::fmt::Debug for OutputGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputGate")
    }
}

/// The guest output produced up to a point (taken with the device paused,
/// together with the checkpoint it belongs to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputCut {
    epoch: u64,
    /// The guest's state version at the cut.
    version: VersionMark,
}

/// Parameters of a core.
#[derive(Debug, Clone, Copy)]
pub struct CoreParams {
    /// The guest's CID.
    pub guest_cid: u64,
    /// Guest port host connections are forwarded to.
    pub guest_port: u32,
    /// Receive buffer per connection advertised to the guest.
    pub buf_alloc: u32,
    /// Most concurrent host connections.
    pub max_connections: usize,
}

impl VsockCore {
    /// A core with no queues (the driver has not started).
    pub fn new(mem: GuestMemory, signals: Arc<DeviceSignals>, p: CoreParams) -> Self {
        Self {
            mem,
            signals,
            guest_cid: p.guest_cid,
            guest_port: p.guest_port,
            buf_alloc: p.buf_alloc,
            max_connections: p.max_connections,
            queues: Vec::new(),
            active: false,
            failed: false,
            notif_enabled: [true; 3],
            conns: HashMap::new(),
            next_port: FIRST_LOCAL_PORT,
            orphan_rst: VecDeque::new(),
            reset_event_pending: false,
            reset_gate: None,
            io_queue: VecDeque::new(),
            rx_queue: VecDeque::new(),
            payload: Vec::with_capacity(MAX_PKT_PAYLOAD as usize),
            paused: false,
            stopping: false,
            kick: false,
            wake_guest: false,
            tx_wake_pending: false,
            output_epoch: 0,
            output_gate: None,
            output_signalled: false,
            deps: OutputDeps::default(),
            release_settled: true,
            unheld_bytes: 0,
            request_retry: None,
        }
    }

    /// Hold guest output behind `gate` (Some) or let it go as it comes
    /// (None: everything held so far is released).
    pub fn set_output_gate(&mut self, gate: Option<OutputGate>) {
        self.output_gate = gate;
        if self.output_gate.is_none() {
            let ports: Vec<u32> = self.conns.keys().copied().collect();
            for p in ports {
                if let Some(c) = self.conns.get_mut(&p) {
                    if c.out_mut().release_all() > 0 {
                        self.schedule_io(p);
                    }
                }
            }
        }
    }

    /// Close the current output epoch: output produced so far belongs to the
    /// returned cut, later output to the next one.
    pub fn output_cut(&mut self) -> OutputCut {
        let cut = OutputCut {
            epoch: self.output_epoch,
            version: self.deps.mark(&self.mem),
        };
        self.output_epoch += 1;
        self.output_signalled = false;
        cut
    }

    /// Let the output of `cut` and of every earlier cut go to the host, and
    /// write it to the host sockets now, in the caller's thread (a hand-off
    /// to the device thread costs tens of µs of wake-up on our hosts, and
    /// every acknowledged reply waits for it). Returns the bytes released.
    pub fn release_output(&mut self, cut: OutputCut) -> u64 {
        self.deps.commit(cut.version);
        let mut total = 0;
        let ports: Vec<u32> = self.conns.keys().copied().collect();
        for p in ports {
            if let Some(c) = self.conns.get_mut(&p) {
                let n = c.out_mut().release_through(cut.epoch);
                if n > 0 {
                    total += n;
                    self.schedule_io(p);
                }
            }
        }
        if total > 0 {
            // Non-blocking writes; what a full socket refuses stays queued
            // for the device thread (the caller kicks it).
            self.process_io(Instant::now());
        }
        total
    }

    /// The guest registers its output-dependency area at `addr` (0: none);
    /// false if the address is unusable.
    pub fn register_output_deps(&mut self, addr: u64) -> bool {
        self.deps.register(&self.mem, addr)
    }

    /// After a restore: the saved registration, whose version in RAM is
    /// the committed one.
    pub(crate) fn restore_output_deps(&mut self, addr: Option<u64>) {
        self.deps = OutputDeps::restored(&self.mem, addr);
    }

    /// Bytes of guest output sent without being held (output commit on,
    /// but they depended on nothing uncommitted), since the device started.
    pub fn unheld_output(&self) -> u64 {
        self.unheld_bytes
    }

    /// Bytes of guest output waiting for a release.
    pub fn held_output(&self) -> u64 {
        self.conns.values().map(Connection::held_output).sum()
    }

    /// Take the queues the transport validated and start.
    pub fn activate(&mut self, queues: Vec<Queue>, features: u64) -> Result<(), VirtioError> {
        if queues.len() != 3 {
            return Err(VirtioError::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        for (i, q) in queues.iter().enumerate() {
            let required = i != EVT;
            if (required && !q.ready()) || (q.ready() && !q.is_valid(&self.mem)) {
                return Err(VirtioError::QueueUnusable(i));
            }
        }
        let _ = features;
        self.queues = queues;
        self.active = true;
        self.failed = false;
        // Unknown ring contents: write the suppression state on the first run.
        self.notif_enabled = [true; 3];
        self.kick = true;
        let ports: Vec<u32> = self.conns.keys().copied().collect();
        for p in ports {
            self.schedule_rx(p);
        }
        Ok(())
    }

    /// Driver reset: forget queues and every connection the guest knew (their
    /// host sockets close). Host connections the guest never took (a client
    /// that connected while the guest booted: its driver starts with a reset)
    /// wait, and are offered again once the driver is back.
    pub fn reset(&mut self) {
        self.queues.clear();
        self.active = false;
        self.failed = false;
        self.conns
            .retain(|_, c| c.state() == VsockState::Requesting);
        for c in self.conns.values_mut() {
            c.reoffer();
        }
        self.orphan_rst.clear();
        self.io_queue.clear();
        self.rx_queue.clear();
        self.reset_event_pending = false;
        self.reset_gate = None;
        self.request_retry = None;
        self.kick = false;
    }

    /// The device stops: forget queues and close every host connection.
    pub fn close(&mut self) {
        self.reset();
        self.conns.clear();
    }

    /// After a restore: the guest must drop its connections (the event is
    /// queued), and nothing goes into RX until it has taken the event.
    pub(crate) fn restored(&mut self, now: Instant) {
        self.reset_event_pending = true;
        self.reset_gate = Some((now, None));
    }

    /// Whether RX still waits for the guest to take the transport reset.
    /// The event tells the guest to drop every connection; a connection
    /// request it saw first would be dropped with them (the host client
    /// then sees its connection closed right after connecting). A driver
    /// re-posts an event buffer once it has handled an event (Linux, the kv
    /// guest), so the event queue's avail index moving on is the signal; a
    /// driver that never does waits at most [`RESET_ACK_TIMEOUT`].
    fn rx_gated(&mut self, now: Instant) -> Result<bool, QueueError> {
        let Some((since, published)) = self.reset_gate else {
            return Ok(false);
        };
        let taken = match published {
            Some(a0) => queue::avail_idx(&self.queues[EVT], &self.mem)? != a0,
            None => false,
        };
        if taken || now.duration_since(since) >= RESET_ACK_TIMEOUT {
            self.reset_gate = None;
            return Ok(false);
        }
        Ok(true)
    }

    /// Whether the device runs (activated, not failed).
    pub fn is_running(&self) -> bool {
        self.active && !self.failed
    }

    /// Live queue states, for saving.
    pub fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.active
            .then(|| self.queues.iter().map(|q| q.state()).collect())
    }

    /// Number of host connections (any state).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether a new host connection can be taken.
    pub fn accepts_connections(&self) -> bool {
        !self.failed && self.conns.len() < self.max_connections
    }

    /// A fresh local port, not used by a live connection.
    pub fn alloc_port(&mut self) -> Option<u32> {
        for _ in 0..=self.conns.len() {
            let p = self.next_port;
            self.next_port = if p == u32::MAX {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.conns.contains_key(&p) {
                return Some(p);
            }
        }
        None
    }

    /// Add an accepted host connection; its REQUEST goes out once RX buffers exist.
    pub fn add_connection(&mut self, port: u32, stream: super::connection::HostStream) {
        let c = Connection::new(
            port,
            self.guest_port,
            self.guest_cid,
            self.buf_alloc,
            stream,
        );
        self.conns.insert(port, c);
        self.schedule_rx(port);
    }

    /// Host socket readiness for connection `port`.
    pub fn socket_event(&mut self, port: u32, readable: bool, writable: bool) {
        if let Some(c) = self.conns.get_mut(&port) {
            c.readable |= readable;
            c.writable |= writable;
            self.schedule_io(port);
        }
    }

    /// Settle a pending TX-completion wake-up: none is needed once the
    /// driver has consumed every TX completion (its `used_event` caught up
    /// with the used index: it runs and saw them), or if another wake-up goes
    /// out anyway; otherwise it is sent when the device is about to sleep
    /// (`idle`), so a guest that parked waiting for TX buffers is woken
    /// within the device's idle-spin time.
    pub fn resolve_tx_wake(&mut self, idle: bool) {
        if !self.tx_wake_pending {
            return;
        }
        if self.wake_guest || self.tx_driver_caught_up() {
            self.tx_wake_pending = false;
        } else if idle {
            self.tx_wake_pending = false;
            self.wake_guest = true;
        }
    }

    /// The driver's `used_event` (the next used entry it will look at, as
    /// `virtio-drivers` keeps it) equals our next used index.
    fn tx_driver_caught_up(&self) -> bool {
        let q = &self.queues[TX];
        // virtq_avail: flags, idx, ring[size], used_event.
        let addr = q.avail_ring() + 4 + 2 * u64::from(q.size());
        vm_memory::Bytes::read_obj::<u16>(&self.mem, vm_memory::GuestAddress(addr))
            .is_ok_and(|e| u16::from_le(e) == q.next_used())
    }

    /// Whether the guest should be woken (used buffers were added); clears it.
    pub fn take_guest_wake(&mut self) -> bool {
        std::mem::take(&mut self.wake_guest)
    }

    /// After resume: poll every queue at once.
    pub fn kick(&mut self) {
        self.kick = true;
    }

    fn schedule_io(&mut self, port: u32) {
        if let Some(c) = self.conns.get_mut(&port) {
            if !c.queued_io {
                c.queued_io = true;
                self.io_queue.push_back(port);
            }
        }
    }

    fn schedule_rx(&mut self, port: u32) {
        if let Some(c) = self.conns.get_mut(&port) {
            if !c.queued_rx {
                c.queued_rx = true;
                self.rx_queue.push_back(port);
            }
        }
    }

    fn queue_ready(&self, i: usize) -> bool {
        self.queues.get(i).is_some_and(|q| q.ready())
    }

    /// Fail the device: log, DEVICE_NEEDS_RESET, close every host socket.
    pub fn fail(&mut self, err: &QueueError) {
        self.signals.fail("vsock", err);
        self.failed = true;
        self.conns.clear();
        self.orphan_rst.clear();
        self.io_queue.clear();
        self.rx_queue.clear();
    }

    /// One batch of work on every queue and socket. Returns true if anything
    /// moved (the device keeps polling while it does).
    pub fn run(&mut self, now: Instant) -> bool {
        if !self.is_running() {
            return false;
        }
        if std::mem::take(&mut self.kick) {
            self.suppress_notifications();
        }
        match self.run_inner(now) {
            Ok(p) => p,
            Err(e) => {
                self.fail(&e);
                true
            }
        }
    }

    fn run_inner(&mut self, now: Instant) -> Result<bool, QueueError> {
        self.schedule_request_retries(now);
        let mut progress = self.process_event()?;
        progress |= self.process_tx()?;
        progress |= self.process_io(now);
        progress |= self.process_rx(now)?;
        Ok(progress)
    }

    fn used_added(&mut self) {
        self.wake_guest = true;
        self.signals.used_buffer();
    }

    fn process_event(&mut self) -> Result<bool, QueueError> {
        if !self.reset_event_pending || !self.queue_ready(EVT) {
            return Ok(false);
        }
        let q = &mut self.queues[EVT];
        let Some(chain) = queue::pop_chain(q, &self.mem, Direction::DeviceWrites)? else {
            return Ok(false);
        };
        if (chain.len() as usize) < EVENT_LEN {
            return Err(QueueError::TooShort {
                head: chain.head(),
                len: chain.len(),
                need: EVENT_LEN as u32,
            });
        }
        chain.write_at(&self.mem, 0, &EVENT_TRANSPORT_RESET.to_le_bytes())?;
        // ORDER: the event is written before add_used publishes it.
        queue::add_used(q, &self.mem, chain.head(), EVENT_LEN as u32)?;
        self.reset_event_pending = false;
        if let Some((since, _)) = self.reset_gate {
            let avail = queue::avail_idx(&self.queues[EVT], &self.mem)?;
            self.reset_gate = Some((since, Some(avail)));
        }
        self.used_added();
        Ok(true)
    }

    fn process_tx(&mut self) -> Result<bool, QueueError> {
        let mut progress = false;
        for _ in 0..TX_BUDGET {
            let q = &mut self.queues[TX];
            let Some(chain) = queue::pop_chain(q, &self.mem, Direction::DeviceReads)? else {
                break;
            };
            let head = chain.head();
            if (chain.len() as usize) < HDR_LEN {
                return Err(QueueError::TooShort {
                    head,
                    len: chain.len(),
                    need: HDR_LEN as u32,
                });
            }
            let mut hb = [0u8; HDR_LEN];
            chain.read_at(&self.mem, 0, &mut hb)?;
            let hdr = Header::from_bytes(&hb);
            let op = hdr.operation();
            let len = if op == Some(Op::Rw) { hdr.len } else { 0 };
            let room = chain.len() - HDR_LEN as u32;
            if len > room || len > MAX_PKT_PAYLOAD {
                return Err(QueueError::TooShort {
                    head,
                    len: chain.len(),
                    need: (HDR_LEN as u32).saturating_add(len),
                });
            }
            self.payload.resize(len as usize, 0);
            chain.read_at(&self.mem, HDR_LEN, &mut self.payload)?;
            // ORDER: the packet is copied out before its buffer goes back to
            // the guest, which may reuse it at once.
            queue::add_used(&mut self.queues[TX], &self.mem, head, 0)?;
            if self.queues[TX].event_idx_enabled() {
                // Decided in `resolve_tx_wake`: most drivers reclaim TX
                // buffers while they run, and a wake-up sent now would be
                // remembered and end the guest's next park at once (an exit,
                // an idle spin and, in epoch mode, a state save per request).
                self.signals.used_buffer();
                self.tx_wake_pending = true;
            } else {
                self.used_added();
            }
            progress = true;
            let payload = std::mem::take(&mut self.payload);
            self.on_guest_packet(&hdr, op, &payload);
            self.payload = payload;
        }
        Ok(progress)
    }

    fn push_orphan_rst(&mut self, hdr: &Header) {
        if self.orphan_rst.len() >= MAX_ORPHAN_RST {
            return;
        }
        self.orphan_rst.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: Op::Rst.code(),
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: 0,
        });
    }

    fn on_guest_packet(&mut self, hdr: &Header, op: Option<Op>, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!("vsock: dropping packet {} -> {}", hdr.src_cid, hdr.dst_cid);
            return;
        }
        let port = hdr.dst_port;
        let known = self
            .conns
            .get(&port)
            .is_some_and(|c| c.peer_port == hdr.src_port && c.vsock_open());
        match op {
            Some(op) if known && hdr.type_ == TYPE_STREAM => {
                // Output that depends on nothing uncommitted is not held.
                let gated = self.output_gate.is_some();
                let hold = gated
                    && !(op == Op::Rw
                        && self.release_settled
                        && self.deps.settled(&self.mem, port));
                if gated && !hold {
                    self.unheld_bytes += payload.len() as u64;
                }
                let epoch = self.output_epoch;
                if let Some(c) = self.conns.get_mut(&port) {
                    let held = c.on_guest_packet(hdr, op, payload, epoch, hold);
                    if let Some(t) = c.request_retry_at() {
                        self.request_retry = Some(self.request_retry.map_or(t, |r| r.min(t)));
                    }
                    if c.finished() {
                        self.conns.remove(&port);
                        return;
                    }
                    if held && !self.output_signalled {
                        self.output_signalled = true;
                        if let Some(gate) = &self.output_gate {
                            (gate.0)();
                        }
                    }
                }
                self.schedule_io(port);
                self.schedule_rx(port);
            }
            Some(Op::Rst) => {}
            _ => {
                // Unknown connection, type or operation (the guest may also
                // try to connect to the host: there is no host listener).
                self.push_orphan_rst(hdr);
            }
        }
    }

    fn process_io(&mut self, now: Instant) -> bool {
        let mut progress = false;
        for _ in 0..self.io_queue.len() {
            let Some(port) = self.io_queue.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get_mut(&port) else {
                continue;
            };
            c.queued_io = false;
            progress |= c.host_io();
            let (io, rx, done) = (c.wants_io(), c.has_rx_work(now), c.finished());
            if done {
                self.conns.remove(&port);
                progress = true;
                continue;
            }
            if io {
                self.schedule_io(port);
            }
            if rx {
                self.schedule_rx(port);
            }
        }
        progress
    }

    /// The next packet of the connections in the RX work list.
    fn next_conn_packet(&mut self, now: Instant, max_payload: usize) -> Option<Header> {
        while let Some(port) = self.rx_queue.pop_front() {
            let Some(c) = self.conns.get_mut(&port) else {
                continue;
            };
            c.queued_rx = false;
            let pkt = c.next_rx_packet(now, max_payload, &mut self.payload);
            let (io, rx, done) = (c.wants_io(), c.has_rx_work(now), c.finished());
            if done {
                self.conns.remove(&port);
            } else {
                if rx {
                    self.schedule_rx(port);
                }
                if io {
                    self.schedule_io(port);
                }
            }
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    fn process_rx(&mut self, now: Instant) -> Result<bool, QueueError> {
        if !self.queue_ready(RX) || self.rx_gated(now)? {
            return Ok(false);
        }
        let mut progress = false;
        for _ in 0..RX_BUDGET {
            if self.orphan_rst.is_empty() && self.rx_queue.is_empty() {
                break;
            }
            let q = &mut self.queues[RX];
            let Some(chain) = queue::pop_chain(q, &self.mem, Direction::DeviceWrites)? else {
                break;
            };
            if (chain.len() as usize) < HDR_LEN {
                return Err(QueueError::TooShort {
                    head: chain.head(),
                    len: chain.len(),
                    need: HDR_LEN as u32,
                });
            }
            let max_payload = (chain.len() - HDR_LEN as u32).min(MAX_PKT_PAYLOAD) as usize;
            let hdr = match self.orphan_rst.pop_front() {
                Some(h) => {
                    self.payload.clear();
                    Some(h)
                }
                None => self.next_conn_packet(now, max_payload),
            };
            let Some(hdr) = hdr else {
                // Nothing to send after all: give the buffer back to the ring.
                self.queues[RX].go_to_previous_position();
                break;
            };
            chain.write_at(&self.mem, 0, &hdr.to_bytes())?;
            chain.write_at(&self.mem, HDR_LEN, &self.payload)?;
            let used = HDR_LEN as u32 + self.payload.len() as u32;
            // ORDER: header and payload are in guest memory before add_used
            // publishes the used index.
            queue::add_used(&mut self.queues[RX], &self.mem, chain.head(), used)?;
            self.used_added();
            progress = true;
        }
        Ok(progress)
    }

    /// Back to polling: ask the driver not to notify on any queue.
    pub fn suppress_notifications(&mut self) {
        if !self.is_running() {
            return;
        }
        for i in 0..self.queues.len() {
            if self.notif_enabled[i] && self.queues[i].ready() {
                if let Err(e) = queue::set_notification(&self.queues[i], &self.mem, false) {
                    self.fail(&e);
                    return;
                }
                self.notif_enabled[i] = false;
            }
        }
    }

    /// Going to sleep: re-enable notifications where the device waits for the
    /// driver (TX always; RX if packets wait for buffers; the event queue if an
    /// event waits), then re-check the rings. Returns true if work arrived
    /// meanwhile: the device must not sleep.
    pub fn arm_notifications(&mut self) -> bool {
        if !self.is_running() {
            return false;
        }
        let waiting = self.reset_wait();
        let want = [
            self.rx_has_work(waiting),
            true,
            self.reset_event_pending || waiting.is_some(),
        ];
        for (i, &wanted) in want.iter().enumerate() {
            if !self.queue_ready(i) {
                continue;
            }
            let q = &self.queues[i];
            let res = if wanted {
                self.notif_enabled[i] = true;
                match waiting {
                    // RX waits for the guest to take the reset: its re-post
                    // of an event buffer is the work (see `reset_wait`).
                    Some(a0) if i == EVT => queue::notify_past(q, &self.mem, a0),
                    _ => queue::enable_and_recheck(q, &self.mem),
                }
            } else if self.notif_enabled[i] {
                self.notif_enabled[i] = false;
                queue::set_notification(q, &self.mem, false).map(|()| false)
            } else {
                Ok(false)
            };
            match res {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => {
                    self.fail(&e);
                    return false;
                }
            }
        }
        false
    }

    /// While asleep: whether a ring the device waits on has buffers (reads
    /// only). An unreadable ring counts as work, so that `run` fails the device.
    pub fn ring_work_pending(&self) -> bool {
        let waiting = self.reset_wait();
        let waits = [self.rx_has_work(waiting), true, self.reset_event_pending];
        let taken = waiting.is_some_and(|a0| {
            self.queue_ready(EVT)
                && queue::avail_idx(&self.queues[EVT], &self.mem).map_or(true, |a| a != a0)
        });
        taken
            || waits.iter().enumerate().any(|(i, &w)| {
                w && self.queue_ready(i)
                    && queue::has_available(&self.queues[i], &self.mem).unwrap_or(true)
            })
    }

    /// Whether the device has something to put into RX (packets queued, or
    /// resets of orphaned connections): never while RX waits for the guest
    /// to take the transport reset (`waiting`, from [`Self::reset_wait`]).
    fn rx_has_work(&self, waiting: Option<u16>) -> bool {
        waiting.is_none() && (!self.orphan_rst.is_empty() || !self.rx_queue.is_empty())
    }

    /// While RX waits for the guest to take the transport reset that was
    /// published (`rx_gated`): the event queue's avail index then. Until the
    /// guest moves it on (or [`RESET_ACK_TIMEOUT`] passes) nothing can go
    /// into RX, so RX buffers are no work to poll for: a restored device
    /// with a client waiting polled its rings in a loop until the guest ran,
    /// taking a core from the resume (measured on a standby's takeover,
    /// where the killed process's teardown held the other core).
    fn reset_wait(&self) -> Option<u16> {
        match self.reset_gate {
            Some((_, Some(a0))) => Some(a0),
            _ => None,
        }
    }

    /// Earliest time a throttled credit request or a refused connection's
    /// next offer becomes due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(Connection::credit_retry_at)
            .chain(self.request_retry)
            .chain(self.reset_gate.map(|(since, _)| since + RESET_ACK_TIMEOUT))
            .min()
    }

    /// Put the connections whose next offer to the guest is due on the RX
    /// work list.
    fn schedule_request_retries(&mut self, now: Instant) {
        if self.request_retry.is_none_or(|t| t > now) {
            return;
        }
        let mut due = Vec::new();
        let mut next = None;
        for (&p, c) in &self.conns {
            match c.request_retry_at() {
                Some(t) if t <= now => due.push(p),
                Some(t) => next = Some(next.map_or(t, |n: Instant| n.min(t))),
                None => {}
            }
        }
        self.request_retry = next;
        for p in due {
            self.schedule_rx(p);
        }
    }

    /// The connections the guest may know about, as (host port, guest port):
    /// after a restore they get an RST.
    pub fn guest_visible_connections(&self) -> Vec<(u32, u32)> {
        let mut v: Vec<(u32, u32)> = self
            .conns
            .values()
            .filter(|c| c.state() == VsockState::Established || c.state() == VsockState::Requesting)
            .map(|c| (c.local_port, c.peer_port))
            .chain(self.orphan_rst.iter().map(|h| (h.src_port, h.dst_port)))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Queue an RST for a connection the guest may still hold (after restore).
    pub fn reset_guest_connection(&mut self, local_port: u32, peer_port: u32) {
        self.push_orphan_rst(&Header {
            src_port: peer_port,
            dst_port: local_port,
            ..Header::default()
        });
    }
}

/// The core with its wake-up channels, shared by the frontend (vCPU threads),
/// the device thread and the handle.
#[derive(Debug)]
pub struct Shared {
    /// The device state.
    pub core: Mutex<VsockCore>,
    /// Paired with `core`: the device thread waits on it while paused.
    pub cv: std::sync::Condvar,
    /// Written on QueueNotify.
    pub notify_evt: vmm_sys_util::eventfd::EventFd,
    /// Written on activate, reset, resume and stop.
    pub ctrl_evt: vmm_sys_util::eventfd::EventFd,
    /// Status bits for the transport.
    pub signals: Arc<DeviceSignals>,
    /// Wakes a guest parked on the wait port.
    pub wake: Arc<GuestWake>,
}

impl Shared {
    /// Lock the core (a poisoned lock is still usable: the core has no
    /// invariant a panic elsewhere could break half-way).
    pub fn lock(&self) -> MutexGuard<'_, VsockCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake the device thread.
    pub fn kick_thread(&self) {
        let _ = self.ctrl_evt.write(1);
    }
}

/// The vsock device as the MMIO transport sees it.
#[derive(Debug)]
pub struct VsockFrontend {
    shared: Arc<Shared>,
    config: [u8; 8],
}

impl VsockFrontend {
    /// Frontend of `shared`, whose guest CID is the config space.
    pub fn new(shared: Arc<Shared>) -> Self {
        let cid = shared.lock().guest_cid;
        Self {
            shared,
            config: cid.to_le_bytes(),
        }
    }
}

impl VirtioDevice for VsockFrontend {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start < self.config.len() {
            let n = data.len().min(self.config.len() - start);
            data[..n].copy_from_slice(&self.config[start..start + n]);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-vsock: config write at {offset:#x} ignored (read-only)");
    }

    fn activate(&mut self, queues: Vec<Queue>, acked_features: u64) -> Result<(), VirtioError> {
        self.shared.lock().activate(queues, acked_features)?;
        self.shared.kick_thread();
        Ok(())
    }

    fn queue_notify(&mut self, _index: u32) {
        let _ = self.shared.notify_evt.write(1);
    }

    fn reset(&mut self) {
        self.shared.lock().reset();
        self.shared.kick_thread();
    }

    fn signals(&self) -> &DeviceSignals {
        &self.shared.signals
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.shared.lock().queue_states()
    }
}
