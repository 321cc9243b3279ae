//! A rough throughput check (ignored by default; run with
//! `cargo test --release -p nvhv-kvstore --test throughput -- --ignored --nocapture`).

mod common;
use common::enc;
use nvhv_kvstore::{feed, Conn, Store};
use std::time::Instant;

#[test]
#[ignore]
fn pipelined_set_get_throughput() {
    let mut store = Store::new(7, 1 << 30);
    let mut conn = Conn::new();
    let keys = 100_000;
    let batch = 100;
    let value = [b'x'; 64];
    let mut out = Vec::with_capacity(1 << 20);
    let mut ops = 0u64;
    let start = Instant::now();
    for round in 0..10 {
        for base in (0..keys).step_by(batch) {
            let mut input = Vec::new();
            for i in base..base + batch {
                let key = format!("key:{:012}", (i * 7919 + round) % keys);
                input.extend(enc(&[b"SET", key.as_bytes(), &value]));
                input.extend(enc(&[b"GET", key.as_bytes()]));
            }
            out.clear();
            feed(&mut store, &mut conn, &input, 0, &mut out);
            ops += 2 * batch as u64;
            assert!(out.starts_with(b"+OK\r\n$64\r\n"));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = ops as f64 / secs;
    println!(
        "{ops} ops in {secs:.3} s: {:.0} ops/s (request encoding included)",
        rate
    );
    assert_eq!(store.len(), keys);
    assert!(rate > 100_000.0, "only {rate:.0} ops/s");
}

/// Engine-only cost of pre-encoded pipelines (no request building in the loop).
#[test]
#[ignore]
fn engine_ns_per_command() {
    let cases: [(&str, Vec<u8>); 4] = [
        ("SET same key", enc(&[b"SET", b"key:__rand_int__", b"xxx"])),
        ("GET same key", enc(&[b"GET", b"key:__rand_int__"])),
        ("INCR", enc(&[b"INCR", b"counter:__rand_int__"])),
        ("PING inline", b"PING\r\n".to_vec()),
    ];
    for (name, one) in cases {
        let mut store = Store::new(7, 1 << 30);
        let mut conn = Conn::new();
        let input: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1000).collect();
        let mut out = Vec::with_capacity(1 << 20);
        feed(&mut store, &mut conn, &input, 0, &mut out);
        let rounds = 2000;
        let start = Instant::now();
        for _ in 0..rounds {
            out.clear();
            feed(&mut store, &mut conn, &input, 0, &mut out);
        }
        let ns = start.elapsed().as_nanos() as f64 / (rounds * 1000) as f64;
        println!("{name}: {ns:.1} ns/command");
        assert!(ns < 2000.0, "{name}: {ns:.1} ns/command");
    }
}

/// Inserting many distinct keys (table and slab growth included).
#[test]
#[ignore]
fn insert_throughput() {
    let n = 1_000_000;
    let value = [b'v'; 100];
    let mut input = Vec::new();
    for i in 0..n {
        input.extend(enc(&[b"SET", format!("key:{i:012}").as_bytes(), &value]));
    }
    let mut store = Store::new(7, usize::MAX);
    let mut conn = Conn::new();
    let mut out = Vec::with_capacity(5 * n);
    let start = Instant::now();
    for chunk in input.chunks(16 * 1024) {
        feed(&mut store, &mut conn, chunk, 0, &mut out);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} inserts in {secs:.3} s: {:.0} ns/insert",
        secs * 1e9 / n as f64
    );
    assert_eq!(store.len(), n);
    assert_eq!(out.len(), 5 * n);
}
