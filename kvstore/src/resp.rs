//! RESP2 request parsing and the per-connection state ([`Conn`]).
//!
//! The parser is a resumable state machine like Redis's
//! `processMultibulkBuffer`: it remembers how far it got into a partial
//! command (remaining multibulk count, pending bulk length, the argument
//! ranges found so far) so that a command arriving a few bytes at a time is
//! never re-parsed from its start, and a large bulk only costs an O(1) check
//! per feed. Input is parsed in place: when the connection has no leftover
//! bytes, commands are executed straight from the caller's input slice and
//! only an incomplete tail is copied; otherwise input is appended once to
//! the connection buffer.
//!
//! Limits follow Redis: header and inline lines up to 64 KiB, bulk lengths
//! up to 512 MiB, multibulk counts up to `i32::MAX`, and the whole pending
//! query buffer up to 1 GiB. Violations reply `-ERR Protocol error: ...` and
//! close the connection.

use alloc::vec::Vec;

use crate::commands::{self, Args, Client};
use crate::inline::{self, SplitError};
use crate::num::parse_i64;
use crate::reply::{Out, OOM};
use crate::store::Store;

/// Longest header or inline line (Redis's `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 * 1024;
/// Longest bulk argument (Redis's default `proto-max-bulk-len`).
pub const MAX_BULK: usize = 512 * 1024 * 1024;
/// Most bytes a connection may hold for one unfinished command
/// (Redis's default `client-query-buffer-limit`).
pub const MAX_QUERY_BUF: usize = 1024 * 1024 * 1024;
/// Bulks at least this large get their whole buffer reserved up front.
const BIG_ARG: usize = 32 * 1024;
/// An idle connection buffer larger than this is freed.
const KEEP_BUF: usize = 64 * 1024;

/// Parser progress through the current (possibly partial) command. All
/// offsets are relative to the start of the data being parsed.
#[derive(Default)]
struct Parser {
    /// Where the command being parsed starts.
    cmd_start: usize,
    /// Where parsing continues.
    pos: usize,
    /// Where to resume searching for a line end (avoids rescanning a long
    /// partial line on every feed).
    scan_from: usize,
    /// Bulk arguments still expected; 0 when between commands.
    mbulk_left: usize,
    /// Length of the bulk whose `$len` header was read, if any.
    bulk_len: Option<usize>,
    /// Argument ranges of the current command.
    args: Vec<(usize, usize)>,
    /// Unescaped arguments of an inline command.
    inline: Vec<u8>,
}

impl Parser {
    fn shift(&mut self, by: usize) {
        self.cmd_start -= by;
        self.pos -= by;
        self.scan_from = self.scan_from.saturating_sub(by);
        for r in &mut self.args {
            r.0 -= by;
            r.1 -= by;
        }
    }

    /// Forgets all progress, keeping the allocations.
    fn reset(&mut self) {
        self.pos = 0;
        self.next_command();
    }

    fn next_command(&mut self) {
        self.cmd_start = self.pos;
        self.scan_from = self.pos;
        self.mbulk_left = 0;
        self.bulk_len = None;
        self.args.clear();
    }
}

/// One parse step's outcome.
enum Step {
    /// The input ends inside a command.
    NeedMore,
    /// An empty command (`*0`, `*-1` or a blank inline line) was skipped.
    Empty,
    /// A complete multibulk command is in `args` (ranges into the data).
    Multibulk,
    /// A complete inline command is in `args` (ranges into `inline`).
    Inline,
    /// Malformed input: reply this and close.
    Error(&'static [u8]),
    /// The parser's buffers could not grow.
    Oom,
}

/// Per-connection state: pending partial input, parser progress and client
/// attributes (name, QUIT).
#[derive(Default)]
pub struct Conn {
    buf: Vec<u8>,
    parser: Parser,
    client: Client,
}

impl Conn {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the connection should be closed (after QUIT or a protocol
    /// error, whose reply is already in the output). Further input is ignored.
    pub fn closing(&self) -> bool {
        self.client.closing
    }

    /// The newest [`crate::Store::version`] that a reply appended so far on this
    /// connection depends on (a running maximum): a GET, the version of
    /// the key's last change (or of the last deletion, for a miss); a write,
    /// the version after it; KEYS, SCAN, DBSIZE, INFO, CONFIG, the version
    /// at the time; PING, ECHO and the connection commands, nothing. Once
    /// the store's version at a durable checkpoint is at least this, every
    /// reply on the connection so far shows only durable data.
    pub fn dep(&self) -> u64 {
        self.client.dep
    }

    /// Bytes of unfinished input held for the next [`feed`].
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }
}

/// Finds the line end `want` (`\r` for RESP headers, `\n` for inline) at or
/// after `from`, remembering how far the search went.
fn find_line(data: &[u8], p: &mut Parser, want: u8) -> Option<usize> {
    let from = p.scan_from.max(p.pos);
    match memchr::memchr(want, &data[from..]) {
        Some(off) => Some(from + off),
        None => {
            p.scan_from = data.len();
            None
        }
    }
}

/// Fast path of [`header`] for the canonical form every client sends: a
/// prefix byte, an optional `-`, at most 18 digits without leading zeros,
/// then `\r` and at least one more byte. Anything else takes the general
/// path, which has Redis's exact behaviour.
#[inline]
fn quick_header(data: &[u8], pos: usize) -> Option<(usize, i64)> {
    let mut i = pos + 1;
    let negative = data.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let start = i;
    let mut v: i64 = 0;
    while let Some(&c) = data.get(i) {
        if !c.is_ascii_digit() {
            break;
        }
        if i - start == 18 {
            return None;
        }
        v = v * 10 + i64::from(c - b'0');
        i += 1;
    }
    let digits = i - start;
    let canonical = digits == 1 || (digits > 1 && data[start] != b'0');
    if !canonical || (negative && v == 0) || data.get(i) != Some(&b'\r') || i + 1 >= data.len() {
        return None;
    }
    Some((i, if negative { -v } else { v }))
}

/// Reads a `<prefix><number>\r\n` header line at `p.pos`. `Ok(None)`: need
/// more input; otherwise the position of its `\r` and the number, `None`
/// when malformed.
fn header(
    data: &[u8],
    p: &mut Parser,
    too_big: &'static [u8],
) -> Result<Option<(usize, Option<i64>)>, &'static [u8]> {
    if let Some((cr, n)) = quick_header(data, p.pos) {
        return Ok(Some((cr, Some(n))));
    }
    let Some(cr) = find_line(data, p, b'\r') else {
        if data.len() - p.pos > MAX_INLINE {
            return Err(too_big);
        }
        return Ok(None);
    };
    if cr + 1 >= data.len() {
        // The '\n' has not arrived yet; search from the '\r' again next time.
        p.scan_from = cr;
        return Ok(None);
    }
    // An empty line (cr == pos) has no prefix byte: the caller's prefix check fails.
    Ok(Some((cr, data.get(p.pos + 1..cr).and_then(parse_i64))))
}

/// Moves past a header line whose `\r` is at `cr` (the `\n` is not checked,
/// like Redis).
fn skip_line(p: &mut Parser, cr: usize) {
    p.pos = cr + 2;
    p.scan_from = p.pos;
}

fn step(data: &[u8], p: &mut Parser) -> Step {
    if p.mbulk_left == 0 {
        if p.pos >= data.len() {
            return Step::NeedMore;
        }
        if data[p.pos] != b'*' {
            return inline_step(data, p);
        }
        let (cr, n) = match header(data, p, b"Protocol error: too big mbulk count string") {
            Err(e) => return Step::Error(e),
            Ok(None) => return Step::NeedMore,
            Ok(Some((cr, Some(n)))) if n <= i64::from(i32::MAX) => (cr, n),
            Ok(Some(_)) => return Step::Error(b"Protocol error: invalid multibulk length"),
        };
        skip_line(p, cr);
        if n <= 0 {
            return Step::Empty;
        }
        p.mbulk_left = n as usize;
        if p.args.try_reserve(p.mbulk_left.min(1024)).is_err() {
            return Step::Oom;
        }
    }
    while p.mbulk_left > 0 {
        let len = match p.bulk_len {
            Some(len) => len,
            None => {
                let (cr, n) = match header(data, p, b"Protocol error: too big bulk count string") {
                    Err(e) => return Step::Error(e),
                    Ok(None) => return Step::NeedMore,
                    Ok(Some(found)) => found,
                };
                if data[p.pos] != b'$' {
                    return Step::Error(b"Protocol error: expected '$'");
                }
                let len = match n {
                    Some(n) if n >= 0 && n as u64 <= MAX_BULK as u64 => n as usize,
                    _ => return Step::Error(b"Protocol error: invalid bulk length"),
                };
                skip_line(p, cr);
                p.bulk_len = Some(len);
                len
            }
        };
        if data.len() - p.pos < len + 2 {
            return Step::NeedMore;
        }
        if p.args.try_reserve(1).is_err() {
            return Step::Oom;
        }
        p.args.push((p.pos, p.pos + len));
        p.pos += len + 2;
        p.scan_from = p.pos;
        p.bulk_len = None;
        p.mbulk_left -= 1;
    }
    Step::Multibulk
}

fn inline_step(data: &[u8], p: &mut Parser) -> Step {
    let Some(nl) = find_line(data, p, b'\n') else {
        if data.len() - p.pos > MAX_INLINE {
            return Step::Error(b"Protocol error: too big inline request");
        }
        return Step::NeedMore;
    };
    let mut end = nl;
    if end > p.pos && data[end - 1] == b'\r' {
        end -= 1;
    }
    let line = &data[p.pos..end];
    p.pos = nl + 1;
    match inline::split(line, &mut p.inline, &mut p.args) {
        Ok(()) if p.args.is_empty() => Step::Empty,
        Ok(()) => Step::Inline,
        Err(SplitError::Unbalanced) => Step::Error(b"Protocol error: unbalanced quotes in request"),
        Err(SplitError::Oom) => Step::Oom,
    }
}

/// Parses and executes every complete command in `data`. Returns how many
/// bytes were consumed (the start of the incomplete command, if any).
fn process(
    store: &mut Store,
    p: &mut Parser,
    client: &mut Client,
    data: &[u8],
    now: u64,
    out: &mut Out,
) -> usize {
    while !client.closing {
        match step(data, p) {
            Step::NeedMore => break,
            Step::Empty => {}
            Step::Multibulk => {
                let args = Args::new(data, &p.args);
                commands::execute(store, client, &args, now, out);
            }
            Step::Inline => {
                let args = Args::new(&p.inline, &p.args);
                commands::execute(store, client, &args, now, out);
            }
            Step::Error(msg) => {
                protocol_error(client, out, msg, data.get(p.pos).copied());
                return data.len();
            }
            Step::Oom => {
                out.raw(OOM);
                client.closing = true;
                return data.len();
            }
        }
        p.next_command();
    }
    if client.closing {
        return data.len();
    }
    p.cmd_start
}

fn protocol_error(client: &mut Client, out: &mut Out, msg: &[u8], got: Option<u8>) {
    if msg == b"Protocol error: expected '$'" {
        let c = [got.unwrap_or(b'?')];
        out.err_parts(&[b"Protocol error: expected '$', got '", &c, b"'"]);
    } else {
        out.err(msg);
    }
    client.closing = true;
}

/// Bytes still needed to complete a big pending bulk argument, if any.
fn big_bulk_hint(p: &Parser, available: usize) -> usize {
    match p.bulk_len {
        Some(len) if len >= BIG_ARG => (p.pos + len + 2).saturating_sub(available),
        _ => 0,
    }
}

/// Feeds bytes received on a connection: executes every complete command,
/// appending each reply to `out`, and keeps an incomplete tail for the next
/// call. Pipelined commands and commands split at any byte are handled.
/// After QUIT or a protocol error, [`Conn::closing`] is true and further
/// input is ignored.
pub fn feed(store: &mut Store, conn: &mut Conn, input: &[u8], now_ms: u64, out: &mut Vec<u8>) {
    store.note_time(now_ms);
    let Conn {
        buf,
        parser,
        client,
    } = conn;
    if client.closing {
        return;
    }
    let mut out = Out::new(out);
    if buf.is_empty() {
        // Fast path: execute straight from the caller's bytes.
        let consumed = process(store, parser, client, input, now_ms, &mut out);
        if consumed < input.len() {
            let tail = &input[consumed..];
            if buf.try_reserve(tail.len()).is_err() {
                out.raw(OOM);
                client.closing = true;
                return;
            }
            buf.extend_from_slice(tail);
            parser.shift(consumed);
            let _ = buf.try_reserve_exact(big_bulk_hint(parser, buf.len()));
        } else {
            parser.reset();
        }
        return;
    }
    if buf.len() + input.len() > MAX_QUERY_BUF {
        out.err(b"Protocol error: query buffer limit exceeded");
        client.closing = true;
        *buf = Vec::new();
        return;
    }
    if buf.try_reserve(input.len()).is_err() {
        out.raw(OOM);
        client.closing = true;
        *buf = Vec::new();
        return;
    }
    buf.extend_from_slice(input);
    let consumed = process(store, parser, client, buf, now_ms, &mut out);
    if client.closing || consumed == buf.len() {
        if buf.capacity() > KEEP_BUF || client.closing {
            *buf = Vec::new();
        } else {
            buf.clear();
        }
        parser.reset();
        return;
    }
    if consumed > 0 {
        buf.drain(..consumed);
        parser.shift(consumed);
    }
    let _ = buf.try_reserve_exact(big_bulk_hint(parser, buf.len()));
    if buf.capacity() > KEEP_BUF
        && buf.capacity() > 4 * buf.len()
        && big_bulk_hint(parser, buf.len()) == 0
    {
        // Give back most of a buffer grown by an earlier large command.
        let mut smaller = Vec::new();
        if smaller.try_reserve_exact(buf.len().max(1024)).is_ok() {
            smaller.extend_from_slice(buf);
            *buf = smaller;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast header path agrees with the general one wherever it answers.
    #[test]
    fn quick_header_agrees_with_string2ll() {
        let mut lines: Vec<Vec<u8>> = [
            &b"0"[..],
            b"1",
            b"-1",
            b"-0",
            b"00",
            b"01",
            b"12",
            b"+1",
            b"",
            b"-",
            b"1a",
            b"999999999999999999",
            b"9999999999999999999",
            b"-999999999999999999",
            b"536870912",
            b"2147483648",
        ]
        .iter()
        .map(|l| l.to_vec())
        .collect();
        lines.extend((0..2000).map(|n: i64| (n * 7919 - 5000).to_string().into_bytes()));
        for line in lines {
            let mut data = b"$".to_vec();
            data.extend_from_slice(&line);
            data.extend_from_slice(b"\r\n");
            let expected = parse_i64(&line);
            if let Some((cr, n)) = quick_header(&data, 0) {
                assert_eq!(cr, line.len() + 1);
                assert_eq!(Some(n), expected, "{:?}", String::from_utf8_lossy(&line));
            }
            let mut p = Parser::default();
            let got = header(&data, &mut p, b"too big").unwrap().unwrap();
            assert_eq!(got, (line.len() + 1, expected));
            // Without the byte after '\r' the fast path must not answer.
            assert_eq!(quick_header(&data[..data.len() - 1], 0), None);
        }
    }
}
