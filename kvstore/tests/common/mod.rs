//! Test helpers: a client driving one connection with a fake clock, a RESP
//! request encoder and a reply decoder.
#![allow(dead_code)]

use nvhv_kvstore::{feed, Conn, Store};

/// One store and one connection, with a settable clock.
pub struct Client {
    pub store: Store,
    pub conn: Conn,
    pub now: u64,
}

impl Client {
    pub fn new() -> Self {
        Self::with_limit(usize::MAX)
    }

    pub fn with_limit(limit: usize) -> Self {
        Client {
            store: Store::new(0x5eed, limit),
            conn: Conn::new(),
            now: 1_000_000,
        }
    }

    /// Feeds raw bytes, returns what was replied.
    pub fn raw(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        feed(&mut self.store, &mut self.conn, input, self.now, &mut out);
        out
    }

    /// Sends one multibulk command.
    pub fn cmd(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.raw(&enc(args))
    }

    /// Sends a command given as whitespace-separated words, returns the
    /// reply as text.
    pub fn q(&mut self, line: &str) -> String {
        let args: Vec<&[u8]> = line.split_whitespace().map(str::as_bytes).collect();
        String::from_utf8_lossy(&self.cmd(&args)).into_owned()
    }

    /// Like [`Client::q`], decoded.
    pub fn v(&mut self, line: &str) -> Value {
        let args: Vec<&[u8]> = line.split_whitespace().map(str::as_bytes).collect();
        let reply = self.cmd(&args);
        let (v, rest) = parse(&reply).expect("one complete reply");
        assert!(
            rest.is_empty(),
            "more than one reply: {:?}",
            String::from_utf8_lossy(&reply)
        );
        v
    }
}

/// Encodes a multibulk request.
pub fn enc(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// A decoded RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

impl Value {
    pub fn bulk(s: &str) -> Value {
        Value::Bulk(Some(s.as_bytes().to_vec()))
    }

    /// The elements of an array reply.
    pub fn items(&self) -> &[Value] {
        match self {
            Value::Array(Some(v)) => v,
            other => panic!("not an array: {other:?}"),
        }
    }

    /// The bytes of a bulk reply, as text.
    pub fn text(&self) -> String {
        match self {
            Value::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("not a bulk string: {other:?}"),
        }
    }
}

fn line(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.windows(2).position(|w| w == b"\r\n")?;
    Some((&b[..end], &b[end + 2..]))
}

/// Decodes one reply from the front of `b`; returns it and the rest.
pub fn parse(b: &[u8]) -> Option<(Value, &[u8])> {
    let (&kind, rest) = b.split_first()?;
    let (head, rest) = line(rest)?;
    let text = String::from_utf8_lossy(head).into_owned();
    Some(match kind {
        b'+' => (Value::Simple(text), rest),
        b'-' => (Value::Error(text), rest),
        b':' => (Value::Int(text.parse().ok()?), rest),
        b'$' => {
            let n: i64 = text.parse().ok()?;
            if n < 0 {
                (Value::Bulk(None), rest)
            } else {
                let n = n as usize;
                if rest.len() < n + 2 || &rest[n..n + 2] != b"\r\n" {
                    return None;
                }
                (Value::Bulk(Some(rest[..n].to_vec())), &rest[n + 2..])
            }
        }
        b'*' => {
            let n: i64 = text.parse().ok()?;
            if n < 0 {
                (Value::Array(None), rest)
            } else {
                let mut items = Vec::new();
                let mut rest = rest;
                for _ in 0..n {
                    let (v, r) = parse(rest)?;
                    items.push(v);
                    rest = r;
                }
                (Value::Array(Some(items)), rest)
            }
        }
        _ => return None,
    })
}

/// Decodes a whole output buffer into its replies.
pub fn parse_all(mut b: &[u8]) -> Vec<Value> {
    let mut all = Vec::new();
    while !b.is_empty() {
        let (v, rest) = parse(b).expect("well-formed reply");
        all.push(v);
        b = rest;
    }
    all
}
