//! nvhv-kvstore: the key-value engine of nvhv's default guest.
//!
//! A `no_std` + `alloc` Redis-compatible string store that speaks RESP2
//! (and inline commands), so `redis-cli` and `redis-benchmark` work against
//! it. It does no I/O and has no clock: the caller hands it the bytes
//! received on each connection and a monotonic millisecond clock, and sends
//! back what [`feed`] appended to the output buffer.
//!
//! ```
//! use nvhv_kvstore::{feed, Conn, Store};
//! let mut store = Store::new(42, 64 << 20);
//! let mut conn = Conn::new();
//! let mut out = Vec::new();
//! feed(&mut store, &mut conn, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\nGET k\r\n", 0, &mut out);
//! assert_eq!(out, b"+OK\r\n$1\r\nv\r\n");
//! ```
//!
//! Modules: `resp` (request parser, [`Conn`]), `reply` (RESP encoder),
//! `bytes` (inline-or-heap strings),
//! `inline` (inline-command splitting), `commands` (table, dispatch and
//! the commands), `store` ([`Store`], expiry, memory accounting), `glob`
//! (KEYS/SCAN patterns), `num` (Redis-exact integer parsing).
//!
//! Driving it: one [`Store`] per VM (seed it from something unpredictable,
//! e.g. the TSC, and give it a `mem_limit` comfortably below the heap size:
//! the limit covers keys and values, not connection buffers or the hash
//! table's growth), one [`Conn`] per client connection; call [`feed`] with
//! each chunk received and send what it appended to `out`; close the
//! connection once [`Conn::closing`] is true; call [`Store::expire_some`]
//! when idle (it examines at most `budget` keys with a TTL per call).
//!
//! Times: TTLs are kept as absolute times on the caller's clock. EXAT/PXAT
//! and EXPIREAT/PEXPIREAT take absolute times on that same clock, so they
//! match Redis's meaning when the caller's clock counts Unix-epoch ms.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

mod bytes;
mod commands;
mod glob;
mod inline;
mod num;
mod reply;
mod resp;
mod store;

pub use glob::glob_match;
pub use resp::{feed, Conn, MAX_BULK, MAX_INLINE, MAX_QUERY_BUF};
pub use store::{Store, ENTRY_OVERHEAD};
