//! The Redis server over vsock: a table of stream connections on
//! [`KV_VSOCK_PORT`], each with its `nvhv_kvstore::Conn`, pending output and
//! the vsock credit state, and the rules for accepting, feeding, replying,
//! flow control and closing.
//!
//! Work is split in two phases per loop iteration, so that replies to a batch
//! of requests go out together: [`State::on_packet`] handles each received
//! packet (feeding data straight from the RX buffer to the store) and marks
//! connections that have something to send; [`State::flush`] then sends, per
//! marked connection, its control packets and as much output as the peer's
//! credit and the TX queue allow. Bytes that cannot be sent stay in the
//! connection's output buffer: reply bytes are never dropped while the
//! connection lives.
//!
//! Flow control both ways (virtio 1.2, 5.10.6.3):
//! - to the peer: at most `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in
//!   flight; when that is 0 with output pending, one CREDIT_REQUEST (repeated
//!   every [`CREDIT_RETRY_MS`] while still blocked);
//! - from the peer: we advertise [`BUF_ALLOC`] and count in `fwd_cnt` the bytes
//!   handed to the store. While a connection's unsent output exceeds
//!   [`OUT_HIGH`] (a client pipelining without reading), received bytes wait
//!   in its inbox and are not counted, so the peer's credit runs out: the
//!   inbox never exceeds `BUF_ALLOC`. Every packet we send carries `fwd_cnt`;
//!   a CREDIT_UPDATE goes out alone when half the window was consumed
//!   without one, or when asked.

use alloc::vec::Vec;
use foldhash::fast::FixedState;
use hashbrown::HashMap;
use nvhv_kvstore::{feed, Conn, Store};
use nvhv_rt::abi::KV_VSOCK_PORT;
use nvhv_rt::OutputDeps;

use crate::vsock::{
    Hdr, Vsock, MAX_TX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer space advertised per connection (Linux's default).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Unsent output above which a connection's input is held back.
const OUT_HIGH: usize = 256 * 1024;
/// Input is handed to the store this many bytes at a time, so that a burst
/// of pipelined commands with large replies stops near [`OUT_HIGH`].
const FEED_CHUNK: usize = 1024;
/// An idle output buffer with more capacity than this is freed.
const KEEP_OUT: usize = 64 * 1024;
/// Most simultaneous connections (Redis's default `maxclients` is 10000; the
/// slot table and work lists are sized for this at start).
pub const MAX_CONNS: usize = 4096;
/// After our SHUTDOWN, how long to wait for the peer's RST before sending one.
const CLOSE_TIMEOUT_MS: u64 = 2000;
/// Repeat a CREDIT_REQUEST this often while output is blocked on credit.
const CREDIT_RETRY_MS: u64 = 1000;
/// RSTs for packets of unknown connections held while the TX queue is full
/// (more are dropped: those peers have no connection to lose).
const MAX_RST_BACKLOG: usize = 256;

/// A connection's identity: peer CID, peer port, local port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    peer_cid: u64,
    peer_port: u32,
    local_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Serving.
    Open,
    /// We sent SHUTDOWN at `since` (ms); waiting for the peer's RST.
    Closing { since: u64 },
}

struct Connection {
    key: Key,
    phase: Phase,
    kv: Conn,
    /// Reply bytes; `out[out_pos..]` is not sent yet.
    out: Vec<u8>,
    out_pos: usize,
    /// Received bytes not yet handed to the store (back-pressure only).
    inbox: Vec<u8>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent, ever (wrapping).
    tx_cnt: u32,
    /// Payload bytes handed to the store (or discarded after QUIT), ever.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the peer.
    fwd_cnt_sent: u32,
    /// When we last sent a CREDIT_REQUEST that no credit answered yet.
    credit_requested_at: Option<u64>,
    need_response: bool,
    need_credit_update: bool,
    /// The peer will send no more (SHUTDOWN with the SEND flag).
    peer_eof: bool,
    /// In the work list.
    queued: bool,
}

impl Connection {
    fn new(key: Key, h: &Hdr) -> Self {
        Connection {
            key,
            phase: Phase::Open,
            kv: Conn::new(),
            out: Vec::new(),
            out_pos: 0,
            inbox: Vec::new(),
            peer_buf_alloc: h.buf_alloc,
            peer_fwd_cnt: h.fwd_cnt,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            credit_requested_at: None,
            need_response: true,
            need_credit_update: false,
            peer_eof: false,
            queued: false,
        }
    }

    fn unsent(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Bytes the peer can still take.
    fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_credit(&mut self, h: &Hdr) {
        let before = self.peer_free();
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        if self.peer_free() > before || h.op == OP_CREDIT_UPDATE {
            self.credit_requested_at = None;
        }
    }

    fn hdr(&self, cid: u64, op: u16) -> Hdr {
        Hdr {
            src_cid: cid,
            dst_cid: self.key.peer_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            ty: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Hands `input` to the store in chunks of [`FEED_CHUNK`] bytes, replies
    /// appended to `out`, while the unsent output stays below [`OUT_HIGH`].
    /// Returns how many bytes were consumed (counted in `fwd_cnt`); the
    /// caller keeps the rest. Input after QUIT is consumed and ignored.
    fn feed_some(&mut self, store: &mut Store, input: &[u8], now_ms: u64) -> usize {
        let mut at = 0;
        while at < input.len() {
            if self.kv.closing() {
                at = input.len();
                break;
            }
            if self.unsent() >= OUT_HIGH {
                break;
            }
            let end = input.len().min(at + FEED_CHUNK);
            feed(store, &mut self.kv, &input[at..end], now_ms, &mut self.out);
            at = end;
        }
        self.fwd_cnt = self.fwd_cnt.wrapping_add(at as u32);
        at
    }

    /// Feeds held-back input while the output has room.
    fn feed_inbox(&mut self, store: &mut Store, now_ms: u64) {
        if self.inbox.is_empty() {
            return;
        }
        let inbox = core::mem::take(&mut self.inbox);
        let fed = self.feed_some(store, &inbox, now_ms);
        // Keep the (bounded) allocation for the next time.
        self.inbox = inbox;
        self.inbox.drain(..fed);
    }

    /// Marks `n` more output bytes as sent; compacts the buffer.
    fn consumed_out(&mut self, n: usize) {
        self.out_pos += n;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > KEEP_OUT {
                self.out = Vec::new();
            }
        } else if self.out_pos >= KEEP_OUT && self.out_pos * 2 >= self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// Whether the connection has done all it will: nothing left to send,
    /// and QUIT (or a protocol error) or the peer's end of input.
    fn finished(&self) -> bool {
        self.unsent() == 0 && (self.kv.closing() || (self.peer_eof && self.inbox.is_empty()))
    }

    /// Whether [`service`] has something to do for this connection without
    /// another packet from the peer. Right after `service`, true means it was
    /// stopped by the device (TX queue full, no packet memory).
    fn has_work(&self) -> bool {
        if self.phase != Phase::Open {
            return false;
        }
        self.need_response
            || self.need_credit_update
            || (self.unsent() > 0 && (self.peer_free() > 0 || self.credit_requested_at.is_none()))
            || (!self.inbox.is_empty() && self.unsent() < OUT_HIGH)
            || self.finished()
            || self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= BUF_ALLOC / 2
    }
}

/// Counters (guest RAM; nothing is printed per request).
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerStats {
    pub accepted: u64,
    pub refused: u64,
    pub closed: u64,
    pub resets_sent: u64,
    pub credit_violations: u64,
    pub transport_resets: u64,
}

/// Everything but the device: connections and the store.
pub struct State {
    cid: u64,
    pub store: Store,
    slots: Vec<Option<Connection>>,
    free: Vec<u32>,
    index: HashMap<Key, u32, FixedState>,
    live: usize,
    /// Connections to visit in the next `flush`; `spare` is its double.
    work: Vec<u32>,
    spare: Vec<u32>,
    /// RSTs to send for packets that match no connection.
    rst_backlog: Vec<Hdr>,
    pub stats: ServerStats,
}

impl State {
    pub fn new(cid: u64, store: Store, seed: u64) -> Self {
        let mut s = State {
            cid,
            store,
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::with_hasher(FixedState::with_seed(seed.rotate_left(17))),
            live: 0,
            work: Vec::new(),
            spare: Vec::new(),
            rst_backlog: Vec::new(),
            stats: ServerStats::default(),
        };
        // Sized up front (at start, when memory is plentiful) so that
        // marking a connection or queueing an RST never allocates.
        s.work.reserve_exact(MAX_CONNS);
        s.spare.reserve_exact(MAX_CONNS);
        s.rst_backlog.reserve_exact(MAX_RST_BACKLOG);
        s
    }

    /// The device reported a transport reset (e.g. after a resume): every
    /// connection is gone on the host side. Forget them all, keep listening.
    pub fn transport_reset(&mut self, cid: u64) {
        self.cid = cid;
        self.slots.clear();
        self.free.clear();
        self.index.clear();
        self.live = 0;
        self.work.clear();
        self.spare.clear();
        self.rst_backlog.clear();
        self.stats.transport_resets += 1;
    }

    fn mark(&mut self, id: u32) {
        if let Some(Some(c)) = self.slots.get_mut(id as usize) {
            if !c.queued && self.work.len() < self.work.capacity() {
                c.queued = true;
                self.work.push(id);
            }
        }
    }

    fn queue_rst(&mut self, h: &Hdr) {
        if h.op == OP_RST || self.rst_backlog.len() >= self.rst_backlog.capacity() {
            return;
        }
        self.rst_backlog.push(Hdr {
            src_cid: h.dst_cid,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            ty: h.ty,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    fn remove(&mut self, id: u32) {
        if let Some(c) = self.slots.get_mut(id as usize).and_then(Option::take) {
            self.index.remove(&c.key);
            self.live -= 1;
            self.stats.closed += 1;
            // `free` has room: it never holds more ids than `slots` has.
            self.free.push(id);
        }
    }

    /// A new connection for `key`, or `None` (table full, out of memory).
    fn insert(&mut self, key: Key, h: &Hdr) -> Option<u32> {
        if self.live >= MAX_CONNS {
            return None;
        }
        self.index.try_reserve(1).ok()?;
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.try_reserve(1).ok()?;
                self.free.try_reserve(self.slots.len() + 1).ok()?;
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[id as usize] = Some(Connection::new(key, h));
        self.index.insert(key, id);
        self.live += 1;
        Some(id)
    }

    /// Handles one received packet (phase 1). Sends nothing itself.
    pub fn on_packet(&mut self, h: &Hdr, payload: &[u8], now_ms: u64) {
        if h.dst_cid != self.cid {
            return;
        }
        if h.ty != TYPE_STREAM {
            self.queue_rst(h);
            return;
        }
        let key = Key {
            peer_cid: h.src_cid,
            peer_port: h.src_port,
            local_port: h.dst_port,
        };
        let found = self.index.get(&key).copied();
        if h.op == OP_REQUEST {
            if let Some(old) = found {
                // The peer reuses the port pair: the old connection is stale
                // (e.g. a reset we did not hear about).
                self.remove(old);
            }
            if key.local_port != KV_VSOCK_PORT {
                self.stats.refused += 1;
                self.queue_rst(h);
                return;
            }
            match self.insert(key, h) {
                Some(id) => {
                    self.stats.accepted += 1;
                    self.mark(id);
                }
                None => {
                    self.stats.refused += 1;
                    self.queue_rst(h);
                }
            }
            return;
        }
        let Some(id) = found else {
            self.queue_rst(h);
            return;
        };
        let Some(c) = self.slots[id as usize].as_mut() else {
            return;
        };
        if h.op == OP_RST {
            self.remove(id);
            return;
        }
        if let Phase::Closing { .. } = c.phase {
            // We already said goodbye; a SHUTDOWN from the peer finishes it.
            if h.op == OP_SHUTDOWN {
                self.queue_rst(h);
                self.remove(id);
            }
            return;
        }
        c.update_credit(h);
        match h.op {
            OP_RW => {
                let fed = if c.inbox.is_empty() {
                    c.feed_some(&mut self.store, payload, now_ms)
                } else {
                    0
                };
                let rest = &payload[fed..];
                if !rest.is_empty() {
                    if c.inbox.len() + rest.len() > BUF_ALLOC as usize
                        || c.inbox.try_reserve(rest.len()).is_err()
                    {
                        // More than the credit we gave (or no memory to hold
                        // it): the stream cannot continue intact.
                        self.stats.credit_violations += 1;
                        self.queue_rst(h);
                        self.remove(id);
                        return;
                    }
                    c.inbox.extend_from_slice(rest);
                }
            }
            OP_CREDIT_REQUEST => c.need_credit_update = true,
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_RCV != 0 {
                    // The peer reads no more: pending replies have nowhere to
                    // go. Finish with RST (what Linux does).
                    self.queue_rst(h);
                    self.remove(id);
                    return;
                }
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.peer_eof = true;
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_RESPONSE => {
                // We never connect out.
                self.queue_rst(h);
                self.remove(id);
                return;
            }
            _ => {}
        }
        if c.has_work() {
            self.mark(id);
        }
    }

    /// Sends what can be sent (phase 2): pending RSTs, then per marked
    /// connection its control packets and output. Connections blocked on a
    /// full TX queue stay marked for the next call. Returns the number of
    /// packets queued.
    pub fn flush<const Q: usize>(&mut self, dev: &mut Vsock<Q>, now_ms: u64) -> usize {
        let mut sent = 0;
        while let Some(h) = self.rst_backlog.last() {
            if !dev.send(h, &[]) {
                break;
            }
            self.rst_backlog.pop();
            self.stats.resets_sent += 1;
            sent += 1;
        }
        let mut work = core::mem::take(&mut self.work);
        core::mem::swap(&mut self.work, &mut self.spare);
        for &id in &work {
            let Some(c) = self.slots.get_mut(id as usize).and_then(Option::as_mut) else {
                continue;
            };
            c.queued = false;
            let (n, close) = service(c, dev, &mut self.store, self.cid, now_ms);
            sent += n;
            match close {
                Close::No => {
                    if c.has_work() {
                        self.mark(id);
                    }
                }
                Close::Shutdown => {}
            }
        }
        work.clear();
        self.spare = work;
        sent
    }

    /// Periodic checks (every ~100 ms): closing connections whose peer never
    /// answered, and output blocked on credit for too long (ask again).
    pub fn housekeeping<const Q: usize>(&mut self, dev: &mut Vsock<Q>, now_ms: u64) {
        for id in 0..self.slots.len() as u32 {
            let Some(c) = self.slots[id as usize].as_mut() else {
                continue;
            };
            match c.phase {
                Phase::Closing { since } => {
                    if now_ms.saturating_sub(since) >= CLOSE_TIMEOUT_MS {
                        let h = c.hdr(self.cid, OP_RST);
                        if dev.send(&h, &[]) {
                            self.stats.resets_sent += 1;
                            self.remove(id);
                        }
                    }
                }
                Phase::Open => {
                    let retry = c
                        .credit_requested_at
                        .is_some_and(|at| now_ms.saturating_sub(at) >= CREDIT_RETRY_MS);
                    if retry {
                        c.credit_requested_at = None;
                    }
                    if c.unsent() > 0 && c.peer_free() == 0 && c.credit_requested_at.is_none() {
                        let h = c.hdr(self.cid, OP_CREDIT_REQUEST);
                        if dev.send(&h, &[]) {
                            c.fwd_cnt_sent = c.fwd_cnt;
                            c.credit_requested_at = Some(now_ms);
                        }
                    }
                }
            }
        }
    }
}

enum Close {
    No,
    /// Sent our SHUTDOWN; the connection waits for the peer's RST.
    Shutdown,
}

/// The store's state version and each connection's dependency as the VMM
/// sees them (`nvhv_rt::OutputDeps`): replies that show only committed data
/// are not held for an epoch.
pub static OUTPUT_DEPS: OutputDeps = OutputDeps::new();

/// Does what one connection can do now. Returns packets queued and whether
/// the connection is closing.
fn service<const Q: usize>(
    c: &mut Connection,
    dev: &mut Vsock<Q>,
    store: &mut Store,
    cid: u64,
    now_ms: u64,
) -> (usize, Close) {
    let mut sent = 0;
    if c.phase != Phase::Open {
        return (sent, Close::No);
    }
    if c.need_response {
        if !dev.send(&c.hdr(cid, OP_RESPONSE), &[]) {
            return (sent, Close::No);
        }
        c.need_response = false;
        c.fwd_cnt_sent = c.fwd_cnt;
        sent += 1;
    }
    // Feed held-back input and send, again while sending makes room for more.
    loop {
        c.feed_inbox(store, now_ms);
        let before = c.unsent();
        while c.unsent() > 0 {
            let n = c.unsent().min(c.peer_free() as usize).min(MAX_TX_PAYLOAD);
            if n == 0 {
                break;
            }
            let h = c.hdr(cid, OP_RW);
            // ORDER: the version and what the replies depend on are
            //        published before the data enters the TX ring (nvhv
            //        releases it at once only if that is committed).
            OUTPUT_DEPS.publish(store.version());
            OUTPUT_DEPS.raise(c.key.peer_port, c.kv.dep());
            if !dev.send(&h, &c.out[c.out_pos..c.out_pos + n]) {
                return (sent, Close::No);
            }
            sent += 1;
            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
            c.fwd_cnt_sent = c.fwd_cnt;
            c.need_credit_update = false;
            c.consumed_out(n);
        }
        if c.inbox.is_empty() || c.unsent() >= OUT_HIGH || c.unsent() == before {
            break;
        }
    }
    if c.unsent() > 0 && c.peer_free() == 0 && c.credit_requested_at.is_none() {
        if !dev.send(&c.hdr(cid, OP_CREDIT_REQUEST), &[]) {
            return (sent, Close::No);
        }
        sent += 1;
        c.fwd_cnt_sent = c.fwd_cnt;
        c.credit_requested_at = Some(now_ms);
    }
    if c.need_credit_update || c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= BUF_ALLOC / 2 {
        if !dev.send(&c.hdr(cid, OP_CREDIT_UPDATE), &[]) {
            return (sent, Close::No);
        }
        sent += 1;
        c.fwd_cnt_sent = c.fwd_cnt;
        c.need_credit_update = false;
    }
    if c.finished() {
        let mut h = c.hdr(cid, OP_SHUTDOWN);
        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        if !dev.send(&h, &[]) {
            return (sent, Close::No);
        }
        sent += 1;
        c.phase = Phase::Closing { since: now_ms };
        // Nothing more will be read or written: give the memory back now.
        c.kv = Conn::new();
        c.out = Vec::new();
        c.out_pos = 0;
        c.inbox = Vec::new();
        return (sent, Close::Shutdown);
    }
    (sent, Close::No)
}
