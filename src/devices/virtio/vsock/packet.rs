//! The virtio-vsock wire format (virtio 1.2, 5.10.6): the 44-byte packet
//! header `struct virtio_vsock_hdr` (little endian, packed), its operations,
//! shutdown flags, and the event-queue event. Parsing is by explicit byte
//! offsets, so any 44 bytes from a guest decode to some header; whether it
//! makes sense is for the device to judge.

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// CID of the host (the VMM), source of every host-initiated connection.
pub const HOST_CID: u64 = 2;
/// Largest payload of one packet accepted from the guest or sent to it
/// (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// `type` of a stream socket, the only type supported.
pub const TYPE_STREAM: u16 = 1;
/// Shutdown flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Event id on the event queue: the transport was reset, drop every connection.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event`.
pub const EVENT_LEN: usize = 4;

/// Packet operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Connection request.
    Request,
    /// Connection accepted.
    Response,
    /// Connection reset (or refused).
    Rst,
    /// Orderly shutdown of one or both directions (`flags`).
    Shutdown,
    /// Data (`len` payload bytes follow the header).
    Rw,
    /// The sender's `buf_alloc`/`fwd_cnt` changed.
    CreditUpdate,
    /// The sender asks for a credit update.
    CreditRequest,
}

impl Op {
    /// Wire value.
    pub fn code(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }

    /// Decode a wire value (`None`: invalid or unknown).
    pub fn from_code(v: u16) -> Option<Self> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`Op::code`]).
    pub op: u16,
    /// Operation flags (shutdown flags).
    pub flags: u32,
    /// Receive buffer space of the sender, per connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn le_u32(b: &[u8; HDR_LEN], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u16(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Decode the wire bytes.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// Encode to wire bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The decoded operation, if valid.
    pub fn operation(&self) -> Option<Op> {
        Op::from_code(self.op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_at_spec_offsets() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 6379,
            dst_port: 1025,
            len: 7,
            type_: TYPE_STREAM,
            op: Op::Rw.code(),
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x1_0000,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[20..24], &1025u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn every_op_code_round_trips_and_unknown_is_none() {
        for v in 0..16u16 {
            match Op::from_code(v) {
                Some(op) => assert_eq!(op.code(), v),
                None => assert!(v == 0 || v > 7),
            }
        }
    }
}
