//! The wire protocol: pipelining, commands split at any byte, inline
//! commands, protocol errors, big values and the memory limit.

mod common;
use common::{enc, parse_all, Client, Value};
use nvhv_kvstore::{feed, Conn, Store, ENTRY_OVERHEAD};
use proptest::prelude::*;

#[test]
fn pipeline_of_1000_commands() {
    let mut c = Client::new();
    let mut input = Vec::new();
    let mut expected = Vec::new();
    for i in 0..500 {
        input.extend(enc(&[
            b"SET",
            format!("key:{i}").as_bytes(),
            format!("value-{i}").as_bytes(),
        ]));
        expected.extend_from_slice(b"+OK\r\n");
    }
    for i in 0..500 {
        input.extend(enc(&[b"GET", format!("key:{i}").as_bytes()]));
        let v = format!("value-{i}");
        expected.extend(format!("${}\r\n{v}\r\n", v.len()).into_bytes());
    }
    assert_eq!(c.raw(&input), expected);
    assert_eq!(c.store.len(), 500);
    assert_eq!(c.conn.pending_bytes(), 0);
}

/// A mix of multibulk, inline, empty and binary commands.
fn script() -> Vec<u8> {
    let mut s = Vec::new();
    s.extend(enc(&[b"SET", b"a", b"1"]));
    s.extend_from_slice(b"*0\r\n*-1\r\n");
    s.extend_from_slice(b"INCR a\r\n\r\n  \r\n");
    s.extend_from_slice(b"set \"b c\" 'd e'\nget \"b c\"\r\n");
    s.extend(enc(&[b"APPEND", b"bin", b"\r\n\0\xff"]));
    s.extend(enc(&[b"SET", b"big", &[b'x'; 300]]));
    s.extend(enc(&[b"MGET", b"a", b"b c", b"bin", b"nokey"]));
    s.extend_from_slice(b"PING\r\n");
    s.extend(enc(&[b"STRLEN", b"big"]));
    s.extend(enc(&[b"NOSUCH", b"x"]));
    s.extend(enc(&[b"DEL", b"a", b"big"]));
    s.extend(enc(&[b"ECHO", b""]));
    s
}

fn run_chunks(input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut store = Store::new(1, usize::MAX);
    let mut conn = Conn::new();
    let mut out = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain([input.len()].iter()) {
        let cut = cut.clamp(start, input.len());
        feed(&mut store, &mut conn, &input[start..cut], 0, &mut out);
        start = cut;
    }
    assert_eq!(conn.pending_bytes(), 0);
    out
}

#[test]
fn split_at_every_byte_gives_the_same_output() {
    let input = script();
    let whole = run_chunks(&input, &[]);
    let replies = parse_all(&whole);
    assert_eq!(replies.len(), 12, "{:?}", String::from_utf8_lossy(&whole));
    assert_eq!(replies[1], Value::Int(2));
    assert_eq!(replies[3], Value::bulk("d e"));
    assert_eq!(
        replies[6].items()[2],
        Value::Bulk(Some(b"\r\n\0\xff".to_vec()))
    );
    for k in 0..=input.len() {
        assert_eq!(run_chunks(&input, &[k]), whole, "split at {k}");
    }
    let every: Vec<usize> = (1..input.len()).collect();
    assert_eq!(run_chunks(&input, &every), whole, "one byte at a time");
}

/// Redis's notion of an integer value (no leading zeros, no `+`).
fn redis_int(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    if s.starts_with('+') || (s.len() > 1 && (s.starts_with('0') || s.starts_with("-0"))) {
        return None;
    }
    s.parse().ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_chunking_gives_the_same_output(mut cuts in proptest::collection::vec(0usize..2000, 0..40)) {
        let input = script();
        cuts.sort_unstable();
        prop_assert_eq!(run_chunks(&input, &cuts), run_chunks(&input, &[]));
    }

    /// Random string commands against a simple model of the keyspace.
    #[test]
    fn matches_a_model(ops in proptest::collection::vec((0u8..9, 0u8..4, 0i64..1000), 1..200)) {
        use std::collections::HashMap;
        let mut c = Client::new();
        let mut model: HashMap<String, Vec<u8>> = HashMap::new();
        for (op, k, n) in ops {
            let key = format!("k{k}");
            let val = format!("{n}");
            let (reply, expect): (Vec<u8>, Vec<u8>) = match op {
                0 => {
                    model.insert(key.clone(), val.clone().into_bytes());
                    (c.q(&format!("SET {key} {val}")).into_bytes(), b"+OK\r\n".to_vec())
                }
                1 => {
                    let e = match model.get(&key) {
                        Some(v) => [format!("${}\r\n", v.len()).into_bytes(), v.clone(), b"\r\n".to_vec()].concat(),
                        None => b"$-1\r\n".to_vec(),
                    };
                    (c.q(&format!("GET {key}")).into_bytes(), e)
                }
                2 => {
                    let e = format!(":{}\r\n", u8::from(model.remove(&key).is_some()));
                    (c.q(&format!("DEL {key}")).into_bytes(), e.into_bytes())
                }
                3 => {
                    let e = match model.get(&key).map(|v| redis_int(v)) {
                        None => {
                            model.insert(key.clone(), b"1".to_vec());
                            b":1\r\n".to_vec()
                        }
                        Some(Some(x)) => {
                            model.insert(key.clone(), format!("{}", x + 1).into_bytes());
                            format!(":{}\r\n", x + 1).into_bytes()
                        }
                        Some(None) => b"-ERR value is not an integer or out of range\r\n".to_vec(),
                    };
                    (c.q(&format!("INCR {key}")).into_bytes(), e)
                }
                4 => {
                    let v = model.entry(key.clone()).or_default();
                    v.extend_from_slice(val.as_bytes());
                    let e = format!(":{}\r\n", v.len()).into_bytes();
                    (c.q(&format!("APPEND {key} {val}")).into_bytes(), e)
                }
                5 => {
                    let e = format!(":{}\r\n", model.get(&key).map_or(0, Vec::len)).into_bytes();
                    (c.q(&format!("STRLEN {key}")).into_bytes(), e)
                }
                6 => {
                    let e = format!(":{}\r\n", u8::from(model.contains_key(&key))).into_bytes();
                    (c.q(&format!("EXISTS {key}")).into_bytes(), e)
                }
                7 => {
                    let old = model.insert(key.clone(), val.clone().into_bytes());
                    let e = match old {
                        Some(v) => [format!("${}\r\n", v.len()).into_bytes(), v, b"\r\n".to_vec()].concat(),
                        None => b"$-1\r\n".to_vec(),
                    };
                    (c.q(&format!("GETSET {key} {val}")).into_bytes(), e)
                }
                _ => {
                    let e = format!(":{}\r\n", model.len()).into_bytes();
                    (c.q("DBSIZE").into_bytes(), e)
                }
            };
            prop_assert_eq!(String::from_utf8_lossy(&reply), String::from_utf8_lossy(&expect));
        }
        let used: usize = model.iter().map(|(k, v)| k.len() + v.len() + ENTRY_OVERHEAD).sum();
        prop_assert!(c.store.used_bytes() >= used);
        prop_assert_eq!(c.store.len(), model.len());
    }
}

const TOKENS: [&[u8]; 24] = [
    b"*",
    b"$",
    b"\r\n",
    b"\r",
    b"\n",
    b"0",
    b"1",
    b"2",
    b"3",
    b"-",
    b"SET",
    b"GET",
    b"a",
    b"b",
    b"\"",
    b"'",
    b" ",
    b"\\x41",
    b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n",
    b"PING\r\n",
    b"INCR a\r\n",
    b"$1\r\n",
    b"*3\r\n",
    b"\0",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Arbitrary protocol-ish input never panics, and what it produces does
    /// not depend on how it is cut into reads.
    #[test]
    fn arbitrary_input_is_chunking_independent(
        tokens in proptest::collection::vec(0usize..TOKENS.len(), 0..80),
        mut cuts in proptest::collection::vec(0usize..400, 0..10),
    ) {
        let input: Vec<u8> = tokens.iter().flat_map(|&t| TOKENS[t].iter().copied()).collect();
        cuts.sort_unstable();
        let run = |cuts: &[usize]| {
            let mut store = Store::new(1, usize::MAX);
            let mut conn = Conn::new();
            let mut out = Vec::new();
            let mut start = 0;
            for &cut in cuts.iter().chain([input.len()].iter()) {
                let cut = cut.clamp(start, input.len());
                feed(&mut store, &mut conn, &input[start..cut], 0, &mut out);
                start = cut;
            }
            (out, conn.closing(), store.len())
        };
        prop_assert_eq!(run(&cuts), run(&[]));
    }
}

#[test]
fn inline_commands() {
    let mut c = Client::new();
    assert_eq!(c.raw(b"PING\n"), b"+PONG\r\n");
    assert_eq!(
        c.raw(b"\r\n\n   \r\nPING\r\n"),
        b"+PONG\r\n",
        "blank lines are skipped"
    );
    assert_eq!(
        c.raw(b"SET a 'hello world'\r\nGET a\r\n"),
        b"+OK\r\n$11\r\nhello world\r\n"
    );
    assert_eq!(
        c.raw(b"set b \"x\\r\\ny\\x41\"\r\nstrlen b\r\n"),
        b"+OK\r\n:5\r\n"
    );
    assert_eq!(c.raw(b"get b\r"), b"", "waits for the newline");
    assert_eq!(c.raw(b"\n"), b"$5\r\nx\r\nyA\r\n");
}

fn assert_protocol_error(input: &[u8], expected: &[u8]) {
    let mut c = Client::new();
    assert_eq!(
        String::from_utf8_lossy(&c.raw(input)),
        String::from_utf8_lossy(expected),
        "input {:?}",
        String::from_utf8_lossy(&input[..input.len().min(60)])
    );
    assert!(c.conn.closing(), "a protocol error closes the connection");
    assert_eq!(c.raw(b"PING\r\n"), b"", "input after it is ignored");
}

#[test]
fn protocol_errors() {
    assert_protocol_error(
        b"*1\r\n+PING\r\n",
        b"-ERR Protocol error: expected '$', got '+'\r\n",
    );
    assert_protocol_error(
        b"*1\r\n\r\n\r\n",
        b"-ERR Protocol error: expected '$', got ' '\r\n",
    );
    assert_protocol_error(
        b"*abc\r\n",
        b"-ERR Protocol error: invalid multibulk length\r\n",
    );
    assert_protocol_error(
        b"*2147483648\r\n",
        b"-ERR Protocol error: invalid multibulk length\r\n",
    );
    assert_protocol_error(
        b"*1\r\n$-1\r\n",
        b"-ERR Protocol error: invalid bulk length\r\n",
    );
    assert_protocol_error(
        b"*1\r\n$abc\r\n",
        b"-ERR Protocol error: invalid bulk length\r\n",
    );
    assert_protocol_error(
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$536870913\r\n",
        b"-ERR Protocol error: invalid bulk length\r\n",
    );
    assert_protocol_error(
        b"SET \"a b\r\n",
        b"-ERR Protocol error: unbalanced quotes in request\r\n",
    );
    // Replies to the commands before the error are kept.
    assert_protocol_error(
        b"PING\r\n*1\r\n$4\r\nPING\r\n*1\r\n:1\r\n",
        b"+PONG\r\n+PONG\r\n-ERR Protocol error: expected '$', got ':'\r\n",
    );
    let mut long = vec![b'a'; 70_000];
    assert_protocol_error(&long, b"-ERR Protocol error: too big inline request\r\n");
    long[0] = b'*';
    assert_protocol_error(
        &long,
        b"-ERR Protocol error: too big mbulk count string\r\n",
    );
    let mut bulk = b"*1\r\n$".to_vec();
    bulk.extend(vec![b'1'; 70_000]);
    assert_protocol_error(&bulk, b"-ERR Protocol error: too big bulk count string\r\n");
}

#[test]
fn endless_line_in_small_pieces_is_bounded() {
    let mut c = Client::new();
    let piece = vec![b'x'; 1000];
    let mut fed = 0;
    let mut out = Vec::new();
    while !c.conn.closing() {
        out.extend(c.raw(&piece));
        fed += piece.len();
        assert!(c.conn.pending_bytes() <= 66 * 1024);
        assert!(fed < 100_000);
    }
    assert_eq!(out, b"-ERR Protocol error: too big inline request\r\n");
    assert_eq!(c.conn.pending_bytes(), 0, "buffer released");
}

#[test]
fn accepted_limits() {
    let mut c = Client::new();
    // A 1 MiB bulk header is fine and waits for its data.
    assert_eq!(c.raw(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1048576\r\n"), b"");
    assert!(!c.conn.closing());
    // Multibulk counts are not capped at small numbers.
    let mut c = Client::new();
    let mut args: Vec<Vec<u8>> = vec![b"DEL".to_vec()];
    args.extend((0..5000).map(|i| format!("k{i}").into_bytes()));
    let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
    assert_eq!(c.cmd(&refs), b":0\r\n");
}

#[test]
fn sixteen_mib_value_round_trip() {
    let value: Vec<u8> = (0..16usize << 20).map(|i| (i * 7 % 251) as u8).collect();
    let request = enc(&[b"SET", b"big", &value]);
    let mut expected_get = format!("${}\r\n", value.len()).into_bytes();
    expected_get.extend_from_slice(&value);
    expected_get.extend_from_slice(b"\r\n");

    // In one feed and in 64 KiB pieces.
    for piece in [request.len(), 64 << 10] {
        let mut c = Client::with_limit(64 << 20);
        let mut out = Vec::new();
        for chunk in request.chunks(piece) {
            out.extend(c.raw(chunk));
        }
        assert_eq!(out, b"+OK\r\n");
        assert_eq!(c.conn.pending_bytes(), 0);
        assert!(c.store.used_bytes() >= value.len());
        assert!(
            c.raw(b"GET big\r\n") == expected_get,
            "GET returns the exact 16 MiB"
        );
        assert_eq!(c.q("STRLEN big"), ":16777216\r\n");
    }
}

#[test]
fn oom_refuses_writes_and_keeps_data() {
    let oom = "-OOM command not allowed when used memory > 'maxmemory'.\r\n";
    let limit = 16 * 1024;
    let mut c = Client::with_limit(limit);
    let value = "v".repeat(100);
    let mut stored = 0;
    loop {
        let r = c.q(&format!("SET key:{stored} {value}"));
        if r == oom {
            break;
        }
        assert_eq!(r, "+OK\r\n");
        stored += 1;
        assert!(stored < 1000);
    }
    assert!(stored > 10);
    assert!(c.store.used_bytes() <= limit);
    let used = c.store.used_bytes();
    assert_eq!(c.q("DBSIZE"), format!(":{stored}\r\n"));
    for i in 0..stored {
        assert_eq!(c.q(&format!("GET key:{i}")), format!("$100\r\n{value}\r\n"));
    }
    // Other growing writes are refused too, and change nothing.
    assert_eq!(c.q(&format!("APPEND key:0 {}", "x".repeat(2000))), oom);
    assert_eq!(c.q(&format!("MSET n1 {value} n2 {value} n3 {value}")), oom);
    assert_eq!(c.q("EXISTS n1 n2 n3"), ":0\r\n");
    assert_eq!(c.q(&format!("SET key:0 {}", "y".repeat(20_000))), oom);
    assert_eq!(c.q("STRLEN key:0"), ":100\r\n");
    assert_eq!(c.store.used_bytes(), used);
    // Writes that do not grow memory still work.
    assert_eq!(c.q(&format!("SET key:1 {}", "z".repeat(100))), "+OK\r\n");
    assert_eq!(c.q("SET key:2 short"), "+OK\r\n");
    assert_eq!(
        c.q("INCR key:2"),
        "-ERR value is not an integer or out of range\r\n"
    );
    // Freeing memory makes room again.
    assert_eq!(c.q("DEL key:3 key:4"), ":2\r\n");
    assert_eq!(c.q(&format!("SET fresh {value}")), "+OK\r\n");
    let info = c.v("INFO memory").text();
    assert!(info.contains(&format!("maxmemory:{limit}\r\n")), "{info}");
}

#[test]
fn value_larger_than_the_limit_is_refused_whole() {
    let mut c = Client::with_limit(1 << 20);
    let big = vec![b'q'; 2 << 20];
    assert_eq!(
        c.cmd(&[b"SET", b"k", &big]),
        b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
    );
    assert!(c.store.is_empty());
    assert_eq!(c.store.used_bytes(), 0);
    assert!(!c.conn.closing(), "OOM does not close the connection");
    assert_eq!(c.q("PING"), "+PONG\r\n");
}
