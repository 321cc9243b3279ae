//! RESP2 reply encoder. Every write reserves with `try_reserve` first, so a
//! reply that cannot be allocated marks the writer as failed instead of
//! aborting; the dispatcher then replaces the command's partial reply by an
//! `-OOM` error.

use alloc::vec::Vec;

/// The reply a write gets when it would exceed the memory limit (Redis's text).
pub(crate) const OOM: &[u8] = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n";

/// Appends RESP2 replies to the caller's output buffer.
pub(crate) struct Out<'a> {
    buf: &'a mut Vec<u8>,
    failed: bool,
}

impl<'a> Out<'a> {
    pub(crate) fn new(buf: &'a mut Vec<u8>) -> Self {
        Out { buf, failed: false }
    }

    /// Current length of the output, to roll a reply back with [`Out::rollback`].
    #[inline]
    pub(crate) fn mark(&self) -> usize {
        self.buf.len()
    }

    /// Whether some write since the last [`Out::rollback`] could not be allocated.
    #[inline]
    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    /// Drops everything written after `mark` and clears the failure flag.
    pub(crate) fn rollback(&mut self, mark: usize) {
        self.buf.truncate(mark);
        self.failed = false;
    }

    /// Appends the concatenation of `parts` with a single reservation.
    #[inline]
    pub(crate) fn parts(&mut self, parts: &[&[u8]]) {
        if self.failed {
            return;
        }
        let n: usize = parts.iter().map(|p| p.len()).sum();
        if self.buf.try_reserve(n).is_err() {
            self.failed = true;
            return;
        }
        for p in parts {
            self.buf.extend_from_slice(p);
        }
    }

    #[inline]
    pub(crate) fn raw(&mut self, bytes: &[u8]) {
        self.parts(&[bytes]);
    }

    #[inline]
    pub(crate) fn ok(&mut self) {
        self.raw(b"+OK\r\n");
    }

    /// `+text\r\n` (text must not contain CR or LF).
    pub(crate) fn simple(&mut self, text: &[u8]) {
        self.parts(&[b"+", text, b"\r\n"]);
    }

    /// `-ERR msg\r\n`.
    pub(crate) fn err(&mut self, msg: &[u8]) {
        self.parts(&[b"-ERR ", msg, b"\r\n"]);
    }

    /// `-ERR` followed by `parts` concatenated, with CR and LF replaced by
    /// spaces (they may come from client arguments) like Redis does.
    pub(crate) fn err_parts(&mut self, parts: &[&[u8]]) {
        let start = self.mark();
        self.raw(b"-ERR ");
        let body = self.mark();
        self.parts(parts);
        if self.failed {
            self.buf.truncate(start);
            return;
        }
        for b in &mut self.buf[body..] {
            if *b == b'\r' || *b == b'\n' {
                *b = b' ';
            }
        }
        self.raw(b"\r\n");
    }

    #[inline]
    pub(crate) fn int(&mut self, v: i64) {
        let mut b = itoa::Buffer::new();
        self.parts(&[b":", b.format(v).as_bytes(), b"\r\n"]);
    }

    #[inline]
    pub(crate) fn bulk(&mut self, data: &[u8]) {
        let mut b = itoa::Buffer::new();
        self.parts(&[
            b"$",
            b.format(data.len()).as_bytes(),
            b"\r\n",
            data,
            b"\r\n",
        ]);
    }

    #[inline]
    pub(crate) fn null(&mut self) {
        self.raw(b"$-1\r\n");
    }

    #[inline]
    pub(crate) fn array(&mut self, n: usize) {
        let mut b = itoa::Buffer::new();
        self.parts(&[b"*", b.format(n).as_bytes(), b"\r\n"]);
    }

    /// Inserts `header` at `mark` (an earlier [`Out::mark`]), for replies whose
    /// element count is only known after the elements were written.
    pub(crate) fn insert_at(&mut self, mark: usize, header: &[u8]) {
        if self.failed {
            return;
        }
        if self.buf.try_reserve(header.len()).is_err() {
            self.failed = true;
            return;
        }
        self.buf.extend_from_slice(header);
        self.buf[mark..].rotate_right(header.len());
    }

    /// Inserts an array header for `n` elements at `mark`.
    pub(crate) fn insert_array_header(&mut self, mark: usize, n: usize) {
        let mut b = itoa::Buffer::new();
        let digits = b.format(n).as_bytes();
        let mut header = [0u8; 24];
        header[0] = b'*';
        header[1..1 + digits.len()].copy_from_slice(digits);
        header[1 + digits.len()..3 + digits.len()].copy_from_slice(b"\r\n");
        self.insert_at(mark, &header[..3 + digits.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let mut v = Vec::new();
        let mut o = Out::new(&mut v);
        o.ok();
        o.int(-42);
        o.bulk(b"hi");
        o.bulk(b"");
        o.null();
        o.array(2);
        o.simple(b"PONG");
        o.err(b"syntax error");
        o.err_parts(&[b"bad 'a\r\nb'"]);
        assert!(!o.failed());
        assert_eq!(
            v,
            b"+OK\r\n:-42\r\n$2\r\nhi\r\n$0\r\n\r\n$-1\r\n*2\r\n+PONG\r\n-ERR syntax error\r\n-ERR bad 'a  b'\r\n"
        );
    }

    #[test]
    fn deferred_header_and_rollback() {
        let mut v = b"+X\r\n".to_vec();
        let mut o = Out::new(&mut v);
        let m = o.mark();
        o.bulk(b"a");
        o.bulk(b"bc");
        o.insert_array_header(m, 2);
        let m2 = o.mark();
        o.int(5);
        o.rollback(m2);
        assert_eq!(v, b"+X\r\n*2\r\n$1\r\na\r\n$2\r\nbc\r\n");
    }
}
