//! Connection state machine tests over a Unix socket pair (hermetic).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use super::*;
use crate::devices::virtio::vsock::packet::Op;

const GUEST_PORT: u32 = 6379;

fn pair(buf_alloc: u32) -> (Connection, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let c = Connection::new(2000, GUEST_PORT, 3, buf_alloc, HostStream::Unix(a));
    (c, b)
}

fn guest_hdr(op: Op, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: GUEST_PORT,
        dst_port: 2000,
        len,
        type_: TYPE_STREAM,
        op: op.code(),
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn next(c: &mut Connection, max: usize) -> Option<(Header, Vec<u8>)> {
    let mut p = Vec::new();
    c.next_rx_packet(Instant::now(), max, &mut p)
        .map(|h| (h, p))
}

fn establish(c: &mut Connection, guest_buf: u32) {
    let (h, _) = next(c, 1000).unwrap();
    assert_eq!(h.operation(), Some(Op::Request));
    assert_eq!(
        (h.src_cid, h.dst_cid, h.dst_port),
        (HOST_CID, 3, GUEST_PORT)
    );
    c.on_guest_packet(
        &guest_hdr(Op::Response, 0, guest_buf, 0),
        Op::Response,
        &[],
        0,
        false,
    );
    assert_eq!(c.state(), VsockState::Established);
}

fn read_all(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    out
}

#[test]
fn response_before_request_is_reset() {
    let (mut c, _peer) = pair(4096);
    c.on_guest_packet(
        &guest_hdr(Op::Response, 0, 1024, 0),
        Op::Response,
        &[],
        0,
        false,
    );
    let (h, _) = next(&mut c, 100).unwrap();
    assert_eq!(h.operation(), Some(Op::Rst));
    assert!(c.finished());
}

#[test]
fn guest_data_reaches_the_host_and_advances_fwd_cnt() {
    let (mut c, mut peer) = pair(4096);
    establish(&mut c, 1024);
    c.on_guest_packet(&guest_hdr(Op::Rw, 5, 1024, 0), Op::Rw, b"hello", 0, false);
    assert!(c.host_io());
    assert_eq!(read_all(&mut peer), b"hello");
    // A credit request is answered with our fwd_cnt.
    c.on_guest_packet(
        &guest_hdr(Op::CreditRequest, 0, 1024, 0),
        Op::CreditRequest,
        &[],
        0,
        false,
    );
    let (h, _) = next(&mut c, 100).unwrap();
    assert_eq!(h.operation(), Some(Op::CreditUpdate));
    assert_eq!((h.buf_alloc, h.fwd_cnt), (4096, 5));
}

#[test]
fn guest_exceeding_our_credit_is_reset() {
    let (mut c, _peer) = pair(8);
    establish(&mut c, 1024);
    c.on_guest_packet(&guest_hdr(Op::Rw, 6, 1024, 0), Op::Rw, b"123456", 0, false);
    c.on_guest_packet(&guest_hdr(Op::Rw, 6, 1024, 0), Op::Rw, b"789012", 0, false);
    let (h, _) = next(&mut c, 100).unwrap();
    assert_eq!(h.operation(), Some(Op::Rst));
}

#[test]
fn host_data_never_exceeds_guest_credit_and_asks_for_more() {
    let (mut c, mut peer) = pair(4096);
    establish(&mut c, 100);
    peer.write_all(&[7u8; 250]).unwrap();
    c.host_io();
    let (h, p) = next(&mut c, 1000).unwrap();
    assert_eq!(h.operation(), Some(Op::Rw));
    assert_eq!(p.len(), 100);
    assert_eq!(h.len, 100);
    // No credit left: a credit request, and nothing more until it is answered.
    c.host_io();
    let (h, _) = next(&mut c, 1000).unwrap();
    assert_eq!(h.operation(), Some(Op::CreditRequest));
    assert!(next(&mut c, 1000).is_none());
    // The guest consumed 100 bytes: 100 more may flow, in RX-buffer-sized pieces.
    c.on_guest_packet(
        &guest_hdr(Op::CreditUpdate, 0, 100, 100),
        Op::CreditUpdate,
        &[],
        0,
        false,
    );
    c.host_io();
    let (h, p) = next(&mut c, 60).unwrap();
    assert_eq!((h.operation(), p.len()), (Some(Op::Rw), 60));
    let (h, p) = next(&mut c, 60).unwrap();
    assert_eq!((h.operation(), p.len()), (Some(Op::Rw), 40));
}

#[test]
fn host_eof_becomes_shutdown_after_the_data() {
    let (mut c, mut peer) = pair(4096);
    establish(&mut c, 1024);
    peer.write_all(b"bye").unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    c.host_io();
    c.host_io();
    let (h, p) = next(&mut c, 1000).unwrap();
    assert_eq!((h.operation(), p.as_slice()), (Some(Op::Rw), &b"bye"[..]));
    let (h, _) = next(&mut c, 1000).unwrap();
    assert_eq!(h.operation(), Some(Op::Shutdown));
    assert_eq!(h.flags, SHUTDOWN_SEND);
    // The guest answers with RST: done, host socket closes.
    c.on_guest_packet(&guest_hdr(Op::Rst, 0, 1024, 3), Op::Rst, &[], 0, false);
    c.host_io();
    assert!(c.finished());
}

#[test]
fn guest_shutdown_flushes_then_closes_and_answers_rst() {
    let (mut c, mut peer) = pair(4096);
    establish(&mut c, 1024);
    c.on_guest_packet(&guest_hdr(Op::Rw, 4, 1024, 0), Op::Rw, b"last", 0, false);
    let mut sd = guest_hdr(Op::Shutdown, 0, 1024, 0);
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    c.on_guest_packet(&sd, Op::Shutdown, &[], 0, false);
    let (h, _) = next(&mut c, 1000).unwrap();
    assert_eq!(h.operation(), Some(Op::Rst));
    assert!(!c.finished(), "bytes still to flush");
    c.host_io();
    assert!(c.finished());
    assert_eq!(read_all(&mut peer), b"last");
}

#[test]
fn partial_writes_lose_no_bytes() {
    let total = 1 << 20;
    let (mut c, mut peer) = pair(256 * 1024);
    establish(&mut c, 1024);
    let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
    let mut sent = 0usize;
    let mut received = Vec::new();
    let mut guest_fwd_view = 0u32;
    let mut rounds = 0;
    while received.len() < total {
        rounds += 1;
        assert!(rounds < 100_000);
        // The guest sends as much as our advertised credit allows.
        let credit = 256 * 1024 - (sent as u32).wrapping_sub(guest_fwd_view) as usize;
        let n = credit.min(4096).min(total - sent);
        if n > 0 {
            c.on_guest_packet(
                &guest_hdr(Op::Rw, n as u32, 1024, 0),
                Op::Rw,
                &data[sent..sent + n],
                0,
                false,
            );
            sent += n;
        }
        c.host_io();
        // Our credit updates reach the guest.
        if let Some((h, _)) = next(&mut c, 0) {
            guest_fwd_view = h.fwd_cnt;
        }
        // The host reads slowly: a little every few rounds.
        if rounds % 3 == 0 {
            let mut buf = [0u8; 3000];
            if let Ok(k) = peer.read(&mut buf) {
                received.extend_from_slice(&buf[..k]);
            }
            c.writable = true;
        }
    }
    assert_eq!(received, data);
}

#[test]
fn out_buf_releases_by_epoch() {
    let mut o = OutBuf::default();
    o.push(b"aa", 0, true);
    o.push(b"bbb", 0, true);
    o.push(b"cccc", 1, true);
    assert_eq!((o.released(), o.held(), o.len()), (0, 9, 9));
    assert_eq!(o.release_through(0), 5);
    assert_eq!((o.released(), o.held()), (5, 4));
    assert_eq!(o.release_through(0), 0);
    o.push(b"d", 2, false);
    // Released output never overtakes held output before it.
    assert_eq!(o.released(), 5);
    assert_eq!(o.release_through(1), 5);
    assert_eq!((o.released(), o.held()), (10, 0));
    o.push(b"ee", 3, true);
    assert_eq!(o.release_all(), 2);
}

#[test]
fn held_output_is_not_written_nor_credited_until_released() {
    let (mut c, mut peer) = pair(4096);
    establish(&mut c, 1024);
    assert!(c.on_guest_packet(&guest_hdr(Op::Rw, 3, 1024, 0), Op::Rw, b"abc", 7, true));
    c.host_io();
    let mut b = [0u8; 8];
    assert!(peer.read(&mut b).is_err(), "held bytes reached the host");
    assert_eq!(c.held_output(), 3);
    // A guest shutdown waits for the held bytes too.
    let mut sd = guest_hdr(Op::Shutdown, 0, 1024, 0);
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    c.on_guest_packet(&sd, Op::Shutdown, &[], 7, true);
    next(&mut c, 100).unwrap();
    c.host_io();
    assert!(!c.finished());
    assert_eq!(c.out_mut().release_through(7), 3);
    c.host_io();
    assert!(c.finished());
    assert_eq!(read_all(&mut peer), b"abc");
}

#[test]
fn a_refused_request_is_offered_again_and_given_up_after_the_listen_wait() {
    let (mut c, mut peer) = pair(1024);
    let (h, _) = next(&mut c, 1000).unwrap();
    assert_eq!(h.operation(), Some(Op::Request));
    let rst = guest_hdr(Op::Rst, 0, 1024, 0);
    c.on_guest_packet(&rst, Op::Rst, &[], 0, false);
    assert_eq!(c.state(), VsockState::Requesting, "the host client waits");
    let due = c.request_retry_at().expect("an offer again");
    assert!(
        !c.has_rx_work(due - Duration::from_micros(1)),
        "not before its time"
    );
    assert!(c.has_rx_work(due));
    let mut p = Vec::new();
    let h = c.next_rx_packet(due, 1000, &mut p).unwrap();
    assert_eq!(h.operation(), Some(Op::Request));
    assert_eq!(c.request_retry_at(), None);
    // A guest that kept refusing for the whole wait: closed.
    c.created = Instant::now()
        .checked_sub(GUEST_LISTEN_WAIT)
        .expect("the clock is past the wait");
    c.on_guest_packet(&rst, Op::Rst, &[], 0, false);
    assert_eq!(c.state(), VsockState::Closed);
    assert_eq!(c.request_retry_at(), None);
    let mut b = [0u8; 1];
    assert!(peer.read(&mut b).is_err(), "the host side sees nothing yet");
}
