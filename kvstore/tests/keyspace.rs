//! Keyspace commands, expiry with a fake clock, KEYS and SCAN.

mod common;
use common::{Client, Value};
use nvhv_kvstore::{feed, Conn, Store};
use std::collections::BTreeSet;

fn texts(v: &Value) -> BTreeSet<String> {
    v.items().iter().map(Value::text).collect()
}

#[test]
fn del_exists_unlink_touch() {
    let mut c = Client::new();
    c.q("MSET a 1 b 2 c 3");
    assert_eq!(c.q("EXISTS a b x"), ":2\r\n");
    assert_eq!(c.q("EXISTS a a a"), ":3\r\n", "repeats are counted");
    assert_eq!(c.q("TOUCH a x"), ":1\r\n");
    assert_eq!(c.q("DEL a x a"), ":1\r\n");
    assert_eq!(c.q("UNLINK b c"), ":2\r\n");
    assert_eq!(c.q("DBSIZE"), ":0\r\n");
    assert_eq!(
        c.q("DEL"),
        "-ERR wrong number of arguments for 'del' command\r\n"
    );
    assert_eq!(
        c.q("EXISTS"),
        "-ERR wrong number of arguments for 'exists' command\r\n"
    );
    assert_eq!(c.store.used_bytes(), 0, "all memory given back");
}

#[test]
fn type_dbsize_flush_select() {
    let mut c = Client::new();
    c.q("MSET a 1 b 2");
    assert_eq!(c.q("TYPE a"), "+string\r\n");
    assert_eq!(c.q("TYPE zz"), "+none\r\n");
    assert_eq!(c.q("DBSIZE"), ":2\r\n");
    assert_eq!(
        c.q("DBSIZE x"),
        "-ERR wrong number of arguments for 'dbsize' command\r\n"
    );
    assert_eq!(c.q("FLUSHALL foo"), "-ERR syntax error\r\n");
    assert_eq!(c.q("FLUSHDB sync extra"), "-ERR syntax error\r\n");
    assert_eq!(c.q("DBSIZE"), ":2\r\n");
    assert_eq!(c.q("FLUSHALL ASYNC"), "+OK\r\n");
    assert_eq!(c.q("DBSIZE"), ":0\r\n");
    c.q("SET a 1");
    assert_eq!(c.q("FLUSHDB"), "+OK\r\n");
    assert_eq!(c.q("GET a"), "$-1\r\n");
    assert_eq!(c.q("SELECT 0"), "+OK\r\n");
    assert_eq!(c.q("SELECT 1"), "-ERR DB index is out of range\r\n");
    assert_eq!(c.q("SELECT -1"), "-ERR DB index is out of range\r\n");
    assert_eq!(
        c.q("SELECT x"),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        c.q("SELECT 99999999999"),
        "-ERR value is out of range, value must between -2147483648 and 2147483647\r\n"
    );
}

#[test]
fn keys_glob() {
    let mut c = Client::new();
    c.q("MSET user:1 a user:2 b user:10 c admin:1 d hello e hallo f hxllo g");
    assert_eq!(texts(&c.v("KEYS *")).len(), 7);
    assert_eq!(
        texts(&c.v("KEYS user:*")),
        ["user:1", "user:10", "user:2"].map(String::from).into()
    );
    assert_eq!(
        texts(&c.v("KEYS user:?")),
        ["user:1", "user:2"].map(String::from).into()
    );
    assert_eq!(
        texts(&c.v("KEYS h[ae]llo")),
        ["hallo", "hello"].map(String::from).into()
    );
    assert_eq!(
        texts(&c.v("KEYS h[^e]llo")),
        ["hallo", "hxllo"].map(String::from).into()
    );
    assert_eq!(
        texts(&c.v("KEYS h[a-e]llo")),
        ["hallo", "hello"].map(String::from).into()
    );
    assert_eq!(c.q("KEYS nomatch*"), "*0\r\n");
    assert_eq!(
        c.q("KEYS"),
        "-ERR wrong number of arguments for 'keys' command\r\n"
    );
    // Exact bytes for a single match.
    assert_eq!(c.q("KEYS admin*"), "*1\r\n$7\r\nadmin:1\r\n");
    // Expired keys are not listed.
    c.q("PEXPIRE hello 10");
    c.now += 11;
    assert_eq!(
        texts(&c.v("KEYS h*")),
        ["hallo", "hxllo"].map(String::from).into()
    );
    // Escapes.
    c.cmd(&[b"SET", b"a*b", b"1"]);
    assert_eq!(c.cmd(&[b"KEYS", b"a\\*b"]), b"*1\r\n$3\r\na*b\r\n");
}

/// Runs a whole SCAN, returning every key returned (with repeats) and the
/// number of calls.
fn full_scan(c: &mut Client, extra: &str) -> (Vec<String>, usize) {
    let mut cursor = "0".to_string();
    let mut keys = Vec::new();
    let mut calls = 0;
    loop {
        let reply = c.v(&format!("SCAN {cursor} {extra}"));
        let items = reply.items();
        assert_eq!(items.len(), 2);
        cursor = items[0].text();
        keys.extend(items[1].items().iter().map(Value::text));
        calls += 1;
        if cursor == "0" {
            return (keys, calls);
        }
        assert!(calls < 100_000, "SCAN does not terminate");
    }
}

#[test]
fn scan_visits_every_key_exactly_once() {
    let mut c = Client::new();
    for i in 0..3000 {
        c.q(&format!("SET key:{i} v"));
    }
    for i in (0..3000).step_by(5) {
        c.q(&format!("DEL key:{i}"));
    }
    let (keys, calls) = full_scan(&mut c, "COUNT 7");
    assert_eq!(keys.len(), 2400);
    let unique: BTreeSet<_> = keys.iter().cloned().collect();
    assert_eq!(unique.len(), 2400, "no key returned twice");
    assert!(unique.iter().all(|k| {
        let n: usize = k[4..].parse().unwrap();
        n % 5 != 0
    }));
    assert!(calls >= 2400 / 7, "COUNT bounds the work per call");
    let (default, _) = full_scan(&mut c, "");
    assert_eq!(default.len(), 2400);
}

#[test]
fn scan_options() {
    let mut c = Client::new();
    for i in 0..100 {
        c.q(&format!("SET k{i} v"));
    }
    c.q("SET other v");
    let (keys, _) = full_scan(&mut c, "MATCH k1* COUNT 1000");
    let set: BTreeSet<_> = keys.into_iter().collect();
    assert_eq!(set.len(), 11, "k1 and k10..k19");
    let (keys, calls) = full_scan(&mut c, "COUNT 1000 TYPE string");
    assert_eq!((keys.len(), calls), (101, 1));
    let (keys, _) = full_scan(&mut c, "TYPE hash");
    assert!(keys.is_empty());
    assert_eq!(c.q("SCAN 0 COUNT 0"), "-ERR syntax error\r\n");
    assert_eq!(
        c.q("SCAN 0 COUNT x"),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(c.q("SCAN 0 MATCH"), "-ERR syntax error\r\n");
    assert_eq!(c.q("SCAN 0 FOO bar"), "-ERR syntax error\r\n");
    assert_eq!(c.q("SCAN 0 TYPE foo"), "-ERR unknown type name 'foo'\r\n");
    assert_eq!(c.q("SCAN x"), "-ERR invalid cursor\r\n");
    assert_eq!(c.q("SCAN -1"), "-ERR invalid cursor\r\n");
    assert_eq!(c.q("SCAN 99999999"), "*2\r\n$1\r\n0\r\n*0\r\n");
    let mut e = Client::new();
    assert_eq!(e.q("SCAN 0"), "*2\r\n$1\r\n0\r\n*0\r\n");
    e.q("SET only v");
    assert_eq!(e.q("SCAN 0"), "*2\r\n$1\r\n0\r\n*1\r\n$4\r\nonly\r\n");
}

#[test]
fn expire_ttl_with_fake_clock() {
    let mut c = Client::new();
    c.q("SET k v");
    assert_eq!(c.q("TTL k"), ":-1\r\n");
    assert_eq!(c.q("PTTL k"), ":-1\r\n");
    assert_eq!(c.q("TTL nokey"), ":-2\r\n");
    assert_eq!(c.q("PTTL nokey"), ":-2\r\n");
    assert_eq!(c.q("EXPIRE k 10"), ":1\r\n");
    assert_eq!(c.q("TTL k"), ":10\r\n");
    c.now += 9_500;
    assert_eq!(c.q("PTTL k"), ":500\r\n");
    assert_eq!(c.q("TTL k"), ":1\r\n");
    c.now += 500;
    assert_eq!(
        c.q("GET k"),
        "$1\r\nv\r\n",
        "still there at the exact expiry time"
    );
    assert_eq!(c.q("PTTL k"), ":0\r\n");
    c.now += 1;
    assert_eq!(c.q("GET k"), "$-1\r\n");
    assert_eq!(c.q("TTL k"), ":-2\r\n");
    assert_eq!(c.store.len(), 0, "lazily deleted");
    assert_eq!(c.q("EXPIRE nokey 10"), ":0\r\n");
    let info = c.v("INFO stats").text();
    assert!(info.contains("expired_keys:1\r\n"), "{info}");
}

#[test]
fn expire_variants() {
    let mut c = Client::new();
    c.q("SET k v");
    assert_eq!(c.q("PEXPIRE k 1500"), ":1\r\n");
    assert_eq!(c.q("PTTL k"), ":1500\r\n");
    let at_s = c.now / 1000 + 20;
    assert_eq!(c.q(&format!("EXPIREAT k {at_s}")), ":1\r\n");
    assert_eq!(c.q("TTL k"), ":20\r\n");
    assert_eq!(c.q("EXPIRETIME k"), format!(":{at_s}\r\n"));
    assert_eq!(c.q("PEXPIRETIME k"), format!(":{}\r\n", at_s * 1000));
    assert_eq!(c.q(&format!("PEXPIREAT k {}", c.now + 300)), ":1\r\n");
    assert_eq!(c.q("PTTL k"), ":300\r\n");
    assert_eq!(c.q("EXPIRETIME nokey"), ":-2\r\n");
    c.q("SET p v");
    assert_eq!(c.q("EXPIRETIME p"), ":-1\r\n");
    // A time in the past deletes the key at once (and still replies 1).
    assert_eq!(c.q("EXPIRE k -1"), ":1\r\n");
    assert_eq!(c.q("EXISTS k"), ":0\r\n");
    c.q("SET k v");
    assert_eq!(c.q("PEXPIREAT k 5"), ":1\r\n");
    assert_eq!(c.q("EXISTS k"), ":0\r\n");
    c.q("SET k v");
    assert_eq!(c.q("EXPIRE k 0"), ":1\r\n");
    assert_eq!(c.q("EXISTS k"), ":0\r\n");
}

#[test]
fn expire_options_and_errors() {
    let mut c = Client::new();
    c.q("SET k v");
    assert_eq!(c.q("EXPIRE k 100 XX"), ":0\r\n", "XX needs an existing TTL");
    assert_eq!(
        c.q("EXPIRE k 100 GT"),
        ":0\r\n",
        "no TTL counts as infinite"
    );
    assert_eq!(c.q("EXPIRE k 100 NX"), ":1\r\n");
    assert_eq!(c.q("EXPIRE k 200 NX"), ":0\r\n");
    assert_eq!(c.q("EXPIRE k 200 xx"), ":1\r\n");
    assert_eq!(c.q("EXPIRE k 100 GT"), ":0\r\n");
    assert_eq!(c.q("EXPIRE k 300 GT"), ":1\r\n");
    assert_eq!(c.q("EXPIRE k 400 LT"), ":0\r\n");
    assert_eq!(c.q("EXPIRE k 50 LT"), ":1\r\n");
    assert_eq!(c.q("TTL k"), ":50\r\n");
    c.q("SET p v");
    assert_eq!(
        c.q("EXPIRE p 50 LT"),
        ":1\r\n",
        "LT succeeds on a key without TTL"
    );
    assert_eq!(c.q("EXPIRE k 10 FOO"), "-ERR Unsupported option FOO\r\n");
    let incompatible = "-ERR NX and XX, GT or LT options at the same time are not compatible\r\n";
    assert_eq!(c.q("EXPIRE k 10 NX XX"), incompatible);
    assert_eq!(c.q("EXPIRE k 10 NX GT"), incompatible);
    assert_eq!(
        c.q("EXPIRE k 10 GT LT"),
        "-ERR GT and LT options at the same time are not compatible\r\n"
    );
    assert_eq!(
        c.q("EXPIRE k abc"),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        c.q("EXPIRE k 9223372036854775807"),
        "-ERR invalid expire time in 'expire' command\r\n"
    );
    assert_eq!(
        c.q("PEXPIRE k 9223372036854775807"),
        "-ERR invalid expire time in 'pexpire' command\r\n"
    );
    assert_eq!(
        c.q("EXPIRE k"),
        "-ERR wrong number of arguments for 'expire' command\r\n"
    );
    assert_eq!(c.q("TTL k"), ":50\r\n", "failed EXPIREs changed nothing");
}

#[test]
fn persist() {
    let mut c = Client::new();
    c.q("SET k v EX 100");
    assert_eq!(c.q("PERSIST k"), ":1\r\n");
    assert_eq!(c.q("PERSIST k"), ":0\r\n");
    assert_eq!(c.q("PERSIST nokey"), ":0\r\n");
    assert_eq!(c.q("TTL k"), ":-1\r\n");
    c.now += 1_000_000;
    assert_eq!(c.q("GET k"), "$1\r\nv\r\n");
}

#[test]
fn active_expiry() {
    let mut c = Client::new();
    for i in 0..200 {
        let ttl = if i % 2 == 0 { 100 } else { 100_000 };
        c.q(&format!("SET k{i} v PX {ttl}"));
    }
    c.q("SET forever v");
    let info = c.v("INFO keyspace").text();
    assert!(
        info.contains("db0:keys=201,expires=200,avg_ttl=0\r\n"),
        "{info}"
    );
    assert_eq!(c.store.expire_some(c.now, 1000), 0, "nothing due yet");
    c.now += 101;
    let mut deleted = 0;
    let mut steps = 0;
    while deleted < 100 {
        deleted += c.store.expire_some(c.now, 20);
        steps += 1;
        assert!(steps < 50);
    }
    assert_eq!(deleted, 100);
    assert_eq!(c.q("DBSIZE"), ":101\r\n");
    assert_eq!(c.store.expires_len(), 100);
    assert_eq!(c.store.expire_some(c.now, 1000), 0);
    c.now += 100_000;
    assert_eq!(c.store.expire_some(c.now, 1000), 100);
    assert_eq!(c.q("DBSIZE"), ":1\r\n");
    let info = c.v("INFO").text();
    assert!(info.contains("expired_keys:200\r\n"), "{info}");
    assert!(
        info.contains("db0:keys=1,expires=0,avg_ttl=0\r\n"),
        "{info}"
    );
}

#[test]
fn scan_skips_and_reclaims_expired_keys() {
    let mut c = Client::new();
    c.q("SET a v PX 10");
    c.q("SET b v");
    c.now += 11;
    let (keys, _) = full_scan(&mut c, "");
    assert_eq!(keys, vec!["b".to_string()]);
    assert_eq!(c.store.len(), 1);
}

#[test]
fn the_state_version_moves_with_every_write_and_never_with_a_read() {
    let mut c = Client::new();
    c.q("MSET a 1 b 2");
    c.q("SET t 1 PX 10");
    let v = c.store.version();
    for read in [
        "GET a",
        "MGET a b x",
        "EXISTS a",
        "STRLEN b",
        "TTL a",
        "PTTL t",
        "TYPE a",
        "DBSIZE",
        "KEYS *",
        "SCAN 0",
        "PING",
        "ECHO hi",
        "GET missing",
        "NOSUCHCOMMAND",
        "GET",
        "INFO",
        "SELECT 0",
        "CLIENT SETNAME me",
        "HELLO 2",
        "COMMAND COUNT",
    ] {
        c.q(read);
        assert_eq!(c.store.version(), v, "{read} changed the version");
    }
    let mut last = v;
    for change in [
        "SET a 2",
        "INCR n",
        "DEL b",
        "DEL nothing",
        "APPEND a x",
        "EXPIRE a 100",
        "PERSIST a",
        "GETDEL a",
        "FLUSHALL",
        "CONFIG GET maxmemory",
        "SETNX s 1",
    ] {
        c.q(change);
        assert_ne!(c.store.version(), last, "{change} left the version");
        last = c.store.version();
    }
    // A read that finds its key expired deletes it: the version moves.
    c.q("SET e 1 PX 10");
    let before = c.store.version();
    c.now += 20;
    assert_eq!(c.q("GET e"), "$-1\r\n");
    assert_ne!(c.store.version(), before, "a lazy expiry is a change");
    // So does active expiry.
    c.q("SET f 1 PX 10");
    let before = c.store.version();
    c.now += 20;
    assert_eq!(c.store.expire_some(c.now, 16), 1);
    assert_ne!(c.store.version(), before, "an active expiry is a change");
}

/// Feeds one inline command on `c`, returns the reply.
fn run(store: &mut Store, c: &mut Conn, line: &str) -> String {
    let mut out = Vec::new();
    feed(
        store,
        c,
        format!("{line}\r\n").as_bytes(),
        1_000_000,
        &mut out,
    );
    String::from_utf8(out).unwrap()
}

#[test]
fn a_reply_depends_on_the_keys_it_read_not_on_other_writes() {
    let mut store = Store::new(7, usize::MAX);
    let (mut w, mut r, mut p) = (Conn::new(), Conn::new(), Conn::new());
    run(&mut store, &mut w, "SET old 1");
    let committed = store.version();
    assert!(
        w.dep() >= 1 && w.dep() <= committed,
        "a write depends on itself"
    );
    assert_eq!(run(&mut store, &mut r, "GET old"), "$1\r\n1\r\n");
    assert!(r.dep() <= committed);
    // A write elsewhere leaves the reader's dependency alone …
    run(&mut store, &mut w, "SET new 2");
    assert!(w.dep() > committed);
    assert_eq!(run(&mut store, &mut r, "MGET old"), "*1\r\n$1\r\n1\r\n");
    assert!(
        r.dep() <= committed,
        "reading an old key after another write"
    );
    // … until it reads what was written.
    assert_eq!(run(&mut store, &mut r, "GET new"), "$1\r\n2\r\n");
    assert!(r.dep() > committed);
    // A miss depends on the last deletion; PING on nothing.
    let mut m = Conn::new();
    assert_eq!(run(&mut store, &mut m, "GET nothing"), "$-1\r\n");
    assert_eq!(m.dep(), 0, "no deletion yet");
    run(&mut store, &mut w, "DEL old");
    let after_del = store.version();
    assert_eq!(run(&mut store, &mut m, "GET old"), "$-1\r\n");
    assert!(m.dep() >= after_del - 1 && m.dep() <= after_del);
    run(&mut store, &mut p, "PING");
    assert_eq!(p.dep(), 0);
    // A whole-keyspace reply depends on everything so far.
    run(&mut store, &mut p, "DBSIZE");
    assert_eq!(p.dep(), store.version());
    // A TTL change is a change of the key.
    let mut t = Conn::new();
    let before = store.version();
    run(&mut store, &mut w, "EXPIRE new 100");
    run(&mut store, &mut t, "TTL new");
    assert!(t.dep() > before);
}

#[test]
fn rewriting_the_same_value_is_not_a_change_a_reader_depends_on() {
    let mut store = Store::new(7, usize::MAX);
    let (mut w, mut r) = (Conn::new(), Conn::new());
    run(&mut store, &mut w, "SET k v");
    let committed = store.version();
    run(&mut store, &mut w, "SET k v");
    run(&mut store, &mut r, "GET k");
    assert!(
        r.dep() <= committed,
        "an identical SET is no change to depend on"
    );
    assert!(w.dep() > committed, "but the SET's own reply waits for it");
    run(&mut store, &mut w, "SET k v2");
    run(&mut store, &mut r, "GET k");
    assert!(r.dep() > committed);
    // The same TTL again is no change either; another one is.
    run(&mut store, &mut w, "EXPIRE k 100");
    let before = store.version();
    let mut t = Conn::new();
    run(&mut store, &mut t, "SET k v2 KEEPTTL");
    run(&mut store, &mut t, "TTL k");
    assert!(t.dep() > before, "t's own SET");
    let mut u = Conn::new();
    run(&mut store, &mut u, "TTL k");
    assert!(
        u.dep() <= before,
        "KEEPTTL with the same value changed nothing"
    );
}
