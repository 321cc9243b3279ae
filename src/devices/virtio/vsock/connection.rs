//! One vsock stream connection bridged to one host socket: the per-connection
//! state machine, both directions of credit-based flow control, and the host
//! socket I/O (nonblocking, edge-triggered readiness).
//!
//! Directions and counters (all `u32`, wrapping, as on the wire):
//! - guest → host: the guest may have at most `buf_alloc - (rx_cnt - fwd_cnt)`
//!   bytes in flight. Bytes land in [`OutBuf`] (our buffer, exactly
//!   `buf_alloc` big at most), and `fwd_cnt` advances only when they are
//!   written to the host socket, so the guest never gets credit we could not
//!   buffer.
//! - host → guest: we read from the host socket into a bounded staging
//!   buffer ([`STAGE_CAP`]) and send RW packets no larger than the guest's
//!   RX buffers and never beyond its credit
//!   (`peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`); staged bytes without
//!   credit make us send CREDIT_REQUEST (throttled by [`CREDIT_RETRY`]).
//!
//! Output gate: every byte the guest sends to the host passes through
//! [`OutBuf::push`], tagged with the output epoch that produced it, and is
//! written only once released: at once, or (when the device holds output
//! for output commit) after the checkpoint of its epoch committed.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Most host bytes staged per connection while waiting for guest credit or RX buffers.
pub const STAGE_CAP: usize = 64 * 1024;
/// Minimum time between two credit requests to a guest that did not grant credit.
pub const CREDIT_RETRY: Duration = Duration::from_micros(200);
/// How long a host connection keeps being offered to a guest that refuses
/// it (RST to our REQUEST: nothing listens on the port yet, e.g. while the
/// guest boots) before the host socket is closed.
pub const GUEST_LISTEN_WAIT: Duration = Duration::from_secs(2);
/// Time between two offers of such a connection.
pub const REQUEST_RETRY: Duration = Duration::from_millis(10);

/// A host-side socket.
#[derive(Debug)]
pub enum HostStream {
    /// Accepted from the TCP listener.
    Tcp(TcpStream),
    /// Accepted from the Unix listener.
    Unix(UnixStream),
}

impl HostStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.read(buf),
            HostStream::Unix(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.write(buf),
            HostStream::Unix(s) => s.write(buf),
        }
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            HostStream::Tcp(s) => s.shutdown(how),
            HostStream::Unix(s) => s.shutdown(how),
        };
    }
}

impl AsRawFd for HostStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            HostStream::Tcp(s) => s.as_raw_fd(),
            HostStream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// Bytes from the guest on their way to the host socket: the output gate.
///
/// Every byte enters through [`push`](Self::push), tagged with the output
/// epoch it was produced in, and may be written to the host only once
/// released: at once when the device does not hold output, else by
/// [`release_through`](Self::release_through) after the checkpoint of its
/// epoch committed. Offsets are totals since the connection opened.
#[derive(Debug, Default)]
pub struct OutBuf {
    buf: VecDeque<u8>,
    /// Bytes written to the host so far (the offset of `buf`'s front).
    written: u64,
    /// Bytes that may be written (released), as an offset.
    release_mark: u64,
    /// Held bytes per epoch: (epoch, end offset), oldest first.
    held: VecDeque<(u64, u64)>,
}

impl OutBuf {
    /// Total bytes pushed.
    fn pushed(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    /// Append guest bytes produced in output epoch `epoch`; with `hold` they
    /// wait for [`release_through`](Self::release_through), else they are
    /// released at once.
    pub fn push(&mut self, data: &[u8], epoch: u64, hold: bool) {
        self.buf.extend(data);
        let end = self.pushed();
        if !hold && self.held.is_empty() {
            self.release_mark = end;
            return;
        }
        // Held bytes go out in order: unheld bytes behind held ones wait
        // for the last held epoch.
        let epoch = if hold {
            epoch
        } else {
            self.held.back().map_or(epoch, |&(e, _)| e)
        };
        match self.held.back_mut() {
            Some((e, last)) if *e == epoch => *last = end,
            _ => self.held.push_back((epoch, end)),
        }
    }

    /// Release the bytes of every epoch up to and including `epoch`; returns
    /// how many bytes this released.
    pub fn release_through(&mut self, epoch: u64) -> u64 {
        let before = self.release_mark;
        while let Some(&(e, end)) = self.held.front() {
            if e > epoch {
                break;
            }
            self.release_mark = self.release_mark.max(end);
            self.held.pop_front();
        }
        self.release_mark - before
    }

    /// Release everything (the gate is switched off).
    pub fn release_all(&mut self) -> u64 {
        let before = self.release_mark;
        self.held.clear();
        self.release_mark = self.pushed();
        self.release_mark - before
    }

    /// Bytes buffered, held or released.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Nothing buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Released bytes not yet written.
    pub fn released(&self) -> usize {
        // `release_mark` never passes `pushed()`, nor falls behind `written`.
        (self.release_mark - self.written) as usize
    }

    /// Bytes waiting for a release.
    pub fn held(&self) -> u64 {
        self.pushed() - self.release_mark
    }

    /// Write released bytes until done or the socket would block. Returns
    /// the bytes written; an error is returned only if nothing was written.
    fn write_to(&mut self, s: &mut HostStream) -> io::Result<usize> {
        let mut total = 0;
        loop {
            let released = self.released();
            if released == 0 {
                return Ok(total);
            }
            let (a, b) = self.buf.as_slices();
            let chunk = if a.is_empty() { b } else { a };
            let chunk = &chunk[..chunk.len().min(released)];
            match s.write(chunk) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.buf.drain(..n);
                    self.written += n as u64;
                    total += n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A later event retries and meets the error again, if any.
                Err(_) if total > 0 => return Ok(total),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Where the vsock side of a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VsockState {
    /// REQUEST queued or sent, waiting for the guest's RESPONSE.
    Requesting,
    /// Data flows.
    Established,
    /// The vsock side is gone (RST either way); only draining to the host remains.
    Closed,
}

/// One connection: host socket ↔ guest vsock stream.
#[derive(Debug)]
pub struct Connection {
    /// Our (host CID 2) port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    guest_cid: u64,
    stream: HostStream,
    state: VsockState,
    out: OutBuf,
    buf_alloc: u32,
    rx_cnt: u32,
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    staged: VecDeque<u8>,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    send_request: bool,
    send_credit_update: bool,
    send_rst: bool,
    credit_requested_at: Option<Instant>,
    /// When the connection was first offered to the guest.
    created: Instant,
    /// The guest refused our REQUEST: offer it again then.
    request_retry_at: Option<Instant>,
    shutdown_sent: bool,
    host_eof: bool,
    host_error: bool,
    host_write_shut: bool,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    /// Edge-triggered readiness: the socket may have bytes to read.
    pub readable: bool,
    /// Edge-triggered readiness: the socket may accept bytes.
    pub writable: bool,
    /// In the device's I/O work list.
    pub queued_io: bool,
    /// In the device's RX work list.
    pub queued_rx: bool,
}

impl Connection {
    /// A host connection to be offered to the guest (REQUEST pending).
    pub fn new(
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        buf_alloc: u32,
        stream: HostStream,
    ) -> Self {
        Self {
            local_port,
            peer_port,
            guest_cid,
            stream,
            state: VsockState::Requesting,
            out: OutBuf::default(),
            buf_alloc,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            staged: VecDeque::new(),
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            send_request: true,
            send_credit_update: false,
            send_rst: false,
            credit_requested_at: None,
            created: Instant::now(),
            request_retry_at: None,
            shutdown_sent: false,
            host_eof: false,
            host_error: false,
            host_write_shut: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            readable: true,
            writable: true,
            queued_io: false,
            queued_rx: false,
        }
    }

    /// The vsock side's state.
    pub fn state(&self) -> VsockState {
        self.state
    }

    /// Whether guest packets addressed to this connection are still accepted.
    pub fn vsock_open(&self) -> bool {
        self.state != VsockState::Closed
    }

    /// Host socket fd (for epoll).
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Credit the guest has left for us: bytes we may still send it.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn reset_to_guest(&mut self) {
        self.send_rst = true;
        self.staged.clear();
    }

    fn close_vsock(&mut self) {
        self.state = VsockState::Closed;
        self.staged.clear();
        self.send_request = false;
        self.send_credit_update = false;
        self.credit_requested_at = None;
    }

    /// Guest output waiting for a release.
    pub fn held_output(&self) -> u64 {
        self.out.held()
    }

    /// The output gate of this connection.
    pub fn out_mut(&mut self) -> &mut OutBuf {
        &mut self.out
    }

    /// Handle a packet the guest sent on this connection (`payload` is the
    /// RW data, empty for other operations); RW data produced in output epoch
    /// `epoch` is held if `hold`. Returns true if bytes were held.
    pub fn on_guest_packet(
        &mut self,
        hdr: &Header,
        op: Op,
        payload: &[u8],
        epoch: u64,
        hold: bool,
    ) -> bool {
        if self.send_rst || self.state == VsockState::Closed {
            return false;
        }
        // Every packet carries the sender's current credit.
        if self.peer_buf_alloc != hdr.buf_alloc || self.peer_fwd_cnt != hdr.fwd_cnt {
            self.credit_requested_at = None;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        match op {
            Op::Response if self.state == VsockState::Requesting && !self.send_request => {
                self.state = VsockState::Established;
            }
            Op::Rw if self.state == VsockState::Established && !self.guest_shut_send => {
                let len = payload.len() as u32;
                let used = self.rx_cnt.wrapping_add(len).wrapping_sub(self.fwd_cnt);
                if used > self.buf_alloc {
                    tracing::debug!(
                        "vsock: guest port {} exceeded its credit, resetting",
                        self.peer_port
                    );
                    self.reset_to_guest();
                    return false;
                }
                self.rx_cnt = self.rx_cnt.wrapping_add(len);
                if self.host_error || self.host_write_shut {
                    // Nowhere to go: consumed all the same.
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(len);
                } else if !payload.is_empty() {
                    // The one way guest bytes go towards the host.
                    self.out.push(payload, epoch, hold);
                    return hold;
                }
            }
            Op::CreditUpdate | Op::CreditRequest if self.state == VsockState::Established => {
                if op == Op::CreditRequest {
                    self.send_credit_update = true;
                }
            }
            Op::Shutdown if self.state == VsockState::Established => {
                if hdr.flags & SHUTDOWN_RCV != 0 {
                    self.guest_shut_rcv = true;
                    self.staged.clear();
                }
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    self.guest_shut_send = true;
                }
                // Both directions done (the guest shut both, or it shut
                // sending after we sent our SHUTDOWN): complete with RST, as
                // Linux does, and keep draining to the host.
                if self.guest_shut_send && (self.guest_shut_rcv || self.shutdown_sent) {
                    self.reset_to_guest();
                }
            }
            Op::Rst
                if self.state == VsockState::Requesting
                    && !self.send_request
                    && self.created.elapsed() < GUEST_LISTEN_WAIT =>
            {
                // Nothing listens on the guest port yet (a guest still
                // booting): the host client waits, and is offered again.
                self.request_retry_at = Some(Instant::now() + REQUEST_RETRY);
            }
            Op::Rst => {
                tracing::debug!(
                    "vsock: guest reset guest port {} in state {:?}",
                    self.peer_port,
                    self.state
                );
                self.close_vsock();
            }
            _ => {
                tracing::debug!(
                    "vsock: unexpected {op:?} in state {:?} on guest port {}, resetting",
                    self.state,
                    self.peer_port
                );
                self.reset_to_guest();
            }
        }
        false
    }

    /// Host socket I/O: write released guest bytes, half-close when the guest
    /// is done sending, read what the guest's credit allows. Returns true if
    /// anything moved or changed.
    pub fn host_io(&mut self) -> bool {
        let mut progress = false;
        if self.writable && self.out.released() > 0 && !self.host_error {
            match self.out.write_to(&mut self.stream) {
                Ok(n) => {
                    progress |= n > 0;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                    if self.out.released() > 0 {
                        self.writable = false;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                Err(e) => {
                    tracing::debug!("vsock: host write on port {}: {e}", self.local_port);
                    self.host_failed();
                    progress = true;
                }
            }
        }
        if self.out.is_empty()
            && (self.guest_shut_send || self.state == VsockState::Closed)
            && !self.host_write_shut
            && !self.host_error
        {
            self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
            progress = true;
        }
        // Tell the guest about freed space before it runs dry.
        if self.state == VsockState::Established {
            let guest_view_used = self.rx_cnt.wrapping_sub(self.fwd_cnt_sent);
            if self.fwd_cnt != self.fwd_cnt_sent && guest_view_used > self.buf_alloc / 2 {
                self.send_credit_update = true;
            }
        }
        progress |= self.read_host();
        progress
    }

    fn read_host(&mut self) -> bool {
        if !self.readable
            || self.host_eof
            || self.host_error
            || self.guest_shut_rcv
            || self.send_rst
            || self.state != VsockState::Established
        {
            return false;
        }
        // Read ahead of the guest's credit (up to STAGE_CAP): staged bytes are
        // what tells the device to ask a silent guest for credit.
        let room = STAGE_CAP.saturating_sub(self.staged.len());
        if room == 0 {
            return false;
        }
        let mut buf = [0u8; 16 * 1024];
        let want = room.min(buf.len());
        match self.stream.read(&mut buf[..want]) {
            Ok(0) => {
                self.host_eof = true;
                true
            }
            Ok(n) => {
                // Even a short read leaves `readable` set: with edge-triggered
                // epoll, data and EOF can arrive under one edge, and only a
                // read that would block proves the socket drained.
                self.staged.extend(&buf[..n]);
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.readable = false;
                false
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => false,
            Err(e) => {
                tracing::debug!("vsock: host read on port {}: {e}", self.local_port);
                self.host_failed();
                true
            }
        }
    }

    fn host_failed(&mut self) {
        self.host_error = true;
        self.out = OutBuf::default();
        if self.state != VsockState::Closed {
            self.reset_to_guest();
        }
    }

    /// Whether the host socket can still make progress on its own (so the
    /// device should run [`host_io`](Self::host_io) again without an event).
    pub fn wants_io(&self) -> bool {
        (self.writable && self.out.released() > 0 && !self.host_error)
            || (self.readable
                && self.state == VsockState::Established
                && !self.host_eof
                && !self.host_error
                && !self.guest_shut_rcv
                && !self.send_rst
                && self.staged.len() < STAGE_CAP)
    }

    fn credit_request_due(&self, now: Instant) -> bool {
        !self.staged.is_empty()
            && self.peer_credit() == 0
            && self
                .credit_requested_at
                .is_none_or(|t| now.duration_since(t) >= CREDIT_RETRY)
    }

    fn shutdown_due(&self) -> bool {
        self.host_eof && self.staged.is_empty() && !self.shutdown_sent && !self.guest_shut_rcv
    }

    /// Whether the connection has a packet for the guest now.
    pub fn has_rx_work(&self, now: Instant) -> bool {
        if self.send_rst {
            return true;
        }
        match self.state {
            VsockState::Requesting => self.request_due(now),
            VsockState::Closed => false,
            VsockState::Established => {
                (!self.staged.is_empty() && self.peer_credit() > 0)
                    || self.shutdown_due()
                    || self.send_credit_update
                    || self.credit_request_due(now)
            }
        }
    }

    /// The guest driver was reset before it took this connection (still
    /// `Requesting`): offer it again, from the start, once the driver is back
    /// (the host client keeps waiting). Not for connections the guest knew.
    pub fn reoffer(&mut self) {
        debug_assert_eq!(self.state, VsockState::Requesting);
        self.send_request = true;
        self.request_retry_at = None;
        self.created = Instant::now();
        self.queued_rx = false;
        self.queued_io = false;
    }

    /// Whether a REQUEST is to be sent now: the first offer, or the next one
    /// of a connection the guest refused, once due.
    fn request_due(&self, now: Instant) -> bool {
        self.send_request || self.request_retry_at.is_some_and(|t| now >= t)
    }

    /// When a refused connection is offered to the guest again, if it waits.
    pub fn request_retry_at(&self) -> Option<Instant> {
        self.request_retry_at
            .filter(|_| self.state == VsockState::Requesting)
    }

    /// When a throttled credit request becomes due, if one is waiting.
    pub fn credit_retry_at(&self) -> Option<Instant> {
        if self.state != VsockState::Established || self.staged.is_empty() || self.peer_credit() > 0
        {
            return None;
        }
        self.credit_requested_at.map(|t| t + CREDIT_RETRY)
    }

    /// Produce the next packet for the guest with at most `max_payload` data
    /// bytes, appending the payload to `payload` (cleared first).
    pub fn next_rx_packet(
        &mut self,
        now: Instant,
        max_payload: usize,
        payload: &mut Vec<u8>,
    ) -> Option<Header> {
        payload.clear();
        let (op, flags) = if self.send_rst {
            self.send_rst = false;
            self.close_vsock();
            (Op::Rst, 0)
        } else if self.state == VsockState::Requesting && self.request_due(now) {
            self.send_request = false;
            self.request_retry_at = None;
            (Op::Request, 0)
        } else if self.state != VsockState::Established {
            return None;
        } else if !self.staged.is_empty() && self.peer_credit() > 0 && max_payload > 0 {
            let n = self
                .staged
                .len()
                .min(self.peer_credit() as usize)
                .min(max_payload);
            payload.extend(self.staged.drain(..n));
            self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
            (Op::Rw, 0)
        } else if self.shutdown_due() {
            self.shutdown_sent = true;
            if self.guest_shut_send {
                // The guest already stopped sending: both directions are done.
                self.close_vsock();
                (Op::Rst, 0)
            } else {
                (Op::Shutdown, SHUTDOWN_SEND)
            }
        } else if self.credit_request_due(now) {
            self.credit_requested_at = Some(now);
            (Op::CreditRequest, 0)
        } else if self.send_credit_update {
            (Op::CreditUpdate, 0)
        } else {
            return None;
        };
        // Every packet carries our credit, so it also serves as an update.
        self.send_credit_update = false;
        self.fwd_cnt_sent = self.fwd_cnt;
        Some(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: payload.len() as u32,
            type_: TYPE_STREAM,
            op: op.code(),
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        })
    }

    /// Nothing is left to do: the vsock side is closed (and told) and every
    /// released byte reached the host, or the host side failed.
    pub fn finished(&self) -> bool {
        self.state == VsockState::Closed
            && !self.send_rst
            && (self.out.is_empty() || self.host_error)
    }
}

#[cfg(test)]
mod tests;
