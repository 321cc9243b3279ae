//! The built-in `kv` guest served to real Redis clients, end to end: `nvhv
//! run` on a free loopback port with its image on tmpfs, driven by the
//! `redis` crate (sync API), by raw RESP bytes, and by Debian's `redis-cli`
//! and `redis-benchmark`. Covers every command the guest implements against
//! Redis's replies and error wording, pipelining, many concurrent
//! connections, a 16 MiB value, running out of memory, and suspend → resume
//! with the data intact.
//!
//! Every test starts its own VM on its own port and image. Nothing waits by a
//! fixed sleep: readiness, expiry and exits are polled with deadlines.
//! `redis-cli`/`redis-benchmark` come from Debian's `redis-tools`; when they
//! are missing, their tests print SKIPPED, unless `NVHV_REQUIRE_KVM=1` (CI),
//! where that is a failure.

mod common;

use common::{Scratch, Vmm};
use redis::{Connection, RedisError, RedisResult, Value};
use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Deadline for the VM to answer, and read timeout of client connections.
const T: Duration = Duration::from_secs(30);

/// A port nobody listens on right now (the kernel picks it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A kv guest VM being served on `127.0.0.1:port`.
struct Kv {
    // Field order is drop order: the VM is killed before its directory goes.
    vm: Vmm,
    port: u16,
    img: PathBuf,
    dir: Scratch,
    /// Console/stderr files used so far (one pair per start).
    starts: usize,
}

impl Kv {
    /// `nvhv run` the kv guest with `mem` of RAM and wait until it answers PING.
    fn start(tag: &str, mem: &str) -> Kv {
        Kv::start_with(tag, mem, &[])
    }

    /// [`Kv::start`] with more `nvhv run` arguments.
    fn start_with(tag: &str, mem: &str, extra: &[&str]) -> Kv {
        let dir = Scratch::new(&format!("kv-{tag}"));
        let img = dir.path("vm.img");
        let (vm, port) = launch(&dir, 0, None, |port| {
            let mut a = run_args(&img, mem, port);
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        });
        Kv {
            vm,
            port,
            img,
            dir,
            starts: 1,
        }
    }

    /// Suspend with SIGTERM: nvhv must exit 0 after a durable commit.
    fn suspend(&mut self) {
        let st = self.vm.signal_and_wait(libc::SIGTERM);
        let err = self.vm.stderr_text();
        assert!(st.success(), "suspend failed ({st}): {err}");
        assert!(err.contains("durable"), "no durable commit reported: {err}");
    }

    /// `nvhv resume --image … --listen 127.0.0.1:port` (the same port when
    /// given, else a new one) and wait until it answers PING.
    fn resume(&mut self, same_port: bool) {
        self.resume_with(same_port, &[]);
    }

    /// [`Kv::resume`] with more `nvhv resume` arguments.
    fn resume_with(&mut self, same_port: bool, extra: &[&str]) {
        let img = self.img.to_str().unwrap().to_string();
        let fixed = same_port.then_some(self.port);
        let (vm, port) = launch(&self.dir, self.starts, fixed, |port| {
            let mut a: Vec<String> = vec![
                "resume".into(),
                "--image".into(),
                img.clone(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
            ];
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        });
        self.vm = vm;
        self.port = port;
        self.starts += 1;
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A new client connection with generous timeouts.
    fn conn(&self) -> Connection {
        let c = redis::Client::open(self.url()).unwrap();
        let con = c
            .get_connection_with_timeout(T)
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.url(), self.diag()));
        con.set_read_timeout(Some(T)).unwrap();
        con.set_write_timeout(Some(T)).unwrap();
        con
    }

    /// Asserts that `key` holds `want` (read on `c`), with the VM's output
    /// in the failure message.
    fn expect_value(&self, c: &mut Connection, key: &str, want: &str) {
        assert_eq!(
            bulk(c, &["GET", key]).as_deref(),
            Some(want),
            "{key}\n{}",
            self.diag()
        );
    }

    /// Console and stderr of the current process, for failure messages.
    fn diag(&self) -> String {
        format!(
            "console:\n{}\nstderr:\n{}",
            self.vm.console_text(),
            self.vm.stderr_text()
        )
    }

    /// Panics (with the VM's output) unless the nvhv process still runs.
    fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.vm.child.try_wait() {
            panic!("nvhv exited ({st})\n{}", self.diag());
        }
    }
}

/// `nvhv run` of the kv guest in image `img` with `mem` of RAM, listening
/// on `127.0.0.1:port`.
fn run_args(img: &Path, mem: &str, port: u16) -> Vec<String> {
    vec![
        "run".into(),
        "--image".into(),
        img.to_str().unwrap().into(),
        "--mem".into(),
        mem.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ]
}

/// Starts nvhv with the arguments `args(port)` and polls until a client
/// gets PONG back. The port is `fixed`, else 0: the kernel picks a free
/// one as nvhv binds it, and nvhv's stderr says which.
fn launch(
    dir: &Scratch,
    n: usize,
    fixed: Option<u16>,
    args: impl Fn(u16) -> Vec<String>,
) -> (Vmm, u16) {
    let a = args(fixed.unwrap_or(0));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut vm = Vmm::start(&a, dir.path(&format!("console{n}.log")));
    let port = match fixed {
        Some(p) => p,
        None => vm.bound_port(T),
    };
    let url = format!("redis://127.0.0.1:{port}/");
    let deadline = Instant::now() + T;
    while !ping(&url) {
        if let Ok(Some(st)) = vm.child.try_wait() {
            panic!(
                "nvhv {a:?} exited ({st}) before answering\nconsole:\n{}\nstderr:\n{}",
                vm.console_text(),
                vm.stderr_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "nvhv {a:?} did not answer PING within {T:?}\nconsole:\n{}\nstderr:\n{}",
            vm.console_text(),
            vm.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (vm, port)
}

/// One PING on a fresh connection, with short timeouts.
fn ping(url: &str) -> bool {
    let short = Duration::from_millis(500);
    let Ok(c) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut con) = c.get_connection_with_timeout(short) else {
        return false;
    };
    let _ = con.set_read_timeout(Some(short));
    matches!(redis::cmd("PING").query::<Value>(&mut con), Ok(Value::SimpleString(s)) if s == "PONG")
}

// ---------------------------------------------------------------------------
// Small query helpers over the redis crate.

fn cmd(args: &[&[u8]]) -> redis::Cmd {
    let mut c = redis::cmd(std::str::from_utf8(args[0]).unwrap());
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}

/// Runs one command; `args` are string-ish.
fn q(con: &mut Connection, args: &[&str]) -> RedisResult<Value> {
    let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
    cmd(&a).query(con)
}

fn ok(con: &mut Connection, args: &[&str]) {
    match q(con, args) {
        Ok(Value::Okay) => {}
        other => panic!("{args:?}: expected OK, got {other:?}"),
    }
}

fn int(con: &mut Connection, args: &[&str]) -> i64 {
    match q(con, args) {
        Ok(Value::Int(n)) => n,
        other => panic!("{args:?}: expected an integer, got {other:?}"),
    }
}

/// A bulk reply as a string, `None` for a nil.
fn bulk(con: &mut Connection, args: &[&str]) -> Option<String> {
    match q(con, args) {
        Ok(Value::BulkString(b)) => Some(String::from_utf8(b).unwrap()),
        Ok(Value::Nil) => None,
        other => panic!("{args:?}: expected a bulk string or nil, got {other:?}"),
    }
}

fn simple(con: &mut Connection, args: &[&str]) -> String {
    match q(con, args) {
        Ok(Value::SimpleString(s)) => s,
        Ok(Value::Okay) => "OK".into(),
        other => panic!("{args:?}: expected a status reply, got {other:?}"),
    }
}

/// An array of bulk strings (nil elements as `None`).
fn strings(con: &mut Connection, args: &[&str]) -> Vec<Option<String>> {
    match q(con, args) {
        Ok(Value::Array(items)) => items.into_iter().map(opt_string).collect(),
        other => panic!("{args:?}: expected an array, got {other:?}"),
    }
}

fn opt_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8(b).unwrap()),
        Value::Nil => None,
        other => panic!("expected a bulk string or nil, got {other:?}"),
    }
}

/// A server error as Redis prints it: `CODE detail`.
fn err_text(e: &RedisError) -> String {
    format!("{} {}", e.code().unwrap_or("?"), e.detail().unwrap_or(""))
}

/// Runs a command that must fail with a server error; returns `CODE detail`.
fn error(con: &mut Connection, args: &[&str]) -> String {
    match q(con, args) {
        Err(e) if e.code().is_some() => err_text(&e),
        other => panic!("{args:?}: expected an error reply, got {other:?}"),
    }
}

/// Deterministic, incompressible bytes (xorshift64*).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A field of an INFO reply.
fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Polls `f` every 10 ms until it returns `Some`, panicking after `timeout`.
fn poll<R>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<R>) -> R {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(r) = f() {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The path of a Debian `redis-tools` program, or `None` (and SKIPPED on
/// stderr) if it is missing; a failure when `NVHV_REQUIRE_KVM=1`.
fn redis_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("NVHV_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("NVHV_REQUIRE_KVM=1 but {name} is not installed (apt-get install redis-tools)");
        }
        eprintln!("SKIPPED: {name} not installed (apt-get install redis-tools)");
    }
    found
}

// ---------------------------------------------------------------------------
// Commands, through the redis crate.

#[test]
fn string_commands_reply_like_redis() {
    require_kvm!();
    let kv = Kv::start("strings", "64M");
    let c = &mut kv.conn();

    assert_eq!(simple(c, &["PING"]), "PONG");
    assert_eq!(bulk(c, &["PING", "hi there"]).as_deref(), Some("hi there"));
    assert_eq!(
        bulk(c, &["ECHO", "hello\r\nworld"]).as_deref(),
        Some("hello\r\nworld")
    );
    assert_eq!(bulk(c, &["ECHO", ""]).as_deref(), Some(""));

    // SET / GET, binary-safe.
    ok(c, &["SET", "k", "v"]);
    assert_eq!(bulk(c, &["GET", "k"]).as_deref(), Some("v"));
    assert_eq!(bulk(c, &["GET", "missing"]), None);
    let bin: Vec<u8> = (0..=255u8).collect();
    let r: Value = cmd(&[b"SET", b"bin\x00key", &bin]).query(c).unwrap();
    assert_eq!(r, Value::Okay);
    let r: Vec<u8> = cmd(&[b"GET", b"bin\x00key"]).query(c).unwrap();
    assert_eq!(r, bin);
    ok(c, &["set", "k", "v2"]); // case-insensitive names
    assert_eq!(bulk(c, &["gEt", "k"]).as_deref(), Some("v2"));

    // SET NX / XX / GET.
    assert_eq!(q(c, &["SET", "k", "x", "NX"]).unwrap(), Value::Nil);
    assert_eq!(bulk(c, &["GET", "k"]).as_deref(), Some("v2"));
    ok(c, &["SET", "nx", "1", "NX"]);
    assert_eq!(q(c, &["SET", "xx", "1", "XX"]).unwrap(), Value::Nil);
    assert_eq!(int(c, &["EXISTS", "xx"]), 0);
    ok(c, &["SET", "nx", "2", "XX"]);
    assert_eq!(bulk(c, &["GET", "nx"]).as_deref(), Some("2"));
    assert_eq!(bulk(c, &["SET", "nx", "3", "GET"]).as_deref(), Some("2"));
    assert_eq!(bulk(c, &["GET", "nx"]).as_deref(), Some("3"));
    assert_eq!(bulk(c, &["SET", "fresh", "1", "GET"]), None);
    assert_eq!(bulk(c, &["GET", "fresh"]).as_deref(), Some("1"));
    // NX GET on an existing key: old value, no write (Redis 7).
    assert_eq!(
        bulk(c, &["SET", "fresh", "2", "NX", "GET"]).as_deref(),
        Some("1")
    );
    assert_eq!(bulk(c, &["GET", "fresh"]).as_deref(), Some("1"));
    assert_eq!(error(c, &["SET", "k", "v", "NX", "XX"]), "ERR syntax error");
    assert_eq!(error(c, &["SET", "k", "v", "BOGUS"]), "ERR syntax error");
    assert_eq!(error(c, &["SET", "k", "v", "EX"]), "ERR syntax error");

    // SET EX / PX set a TTL; a plain SET clears it.
    ok(c, &["SET", "ttl", "v", "EX", "100"]);
    let t = int(c, &["TTL", "ttl"]);
    assert!((99..=100).contains(&t), "TTL after EX 100: {t}");
    ok(c, &["SET", "pttl", "v", "PX", "100000"]);
    let t = int(c, &["PTTL", "pttl"]);
    assert!((95_000..=100_000).contains(&t), "PTTL after PX 100000: {t}");
    ok(c, &["SET", "ttl", "v"]);
    assert_eq!(int(c, &["TTL", "ttl"]), -1);
    assert_eq!(
        error(c, &["SET", "k", "v", "EX", "0"]),
        "ERR invalid expire time in 'set' command"
    );
    assert_eq!(
        error(c, &["SET", "k", "v", "PX", "-5"]),
        "ERR invalid expire time in 'set' command"
    );
    assert_eq!(
        error(c, &["SET", "k", "v", "EX", "abc"]),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        error(c, &["SET", "k", "v", "EX", "10", "PX", "10"]),
        "ERR syntax error"
    );
    ok(c, &["SET", "kt", "v", "EX", "100"]);
    ok(c, &["SET", "kt", "w", "KEEPTTL"]);
    assert!(int(c, &["TTL", "kt"]) > 0);

    // SETNX, SETEX, PSETEX.
    assert_eq!(int(c, &["SETNX", "snx", "a"]), 1);
    assert_eq!(int(c, &["SETNX", "snx", "b"]), 0);
    assert_eq!(bulk(c, &["GET", "snx"]).as_deref(), Some("a"));
    ok(c, &["SETEX", "sex", "50", "v"]);
    assert!((49..=50).contains(&int(c, &["TTL", "sex"])));
    ok(c, &["PSETEX", "psex", "50000", "v"]);
    assert!((45_000..=50_000).contains(&int(c, &["PTTL", "psex"])));
    assert_eq!(
        error(c, &["SETEX", "sex", "0", "v"]),
        "ERR invalid expire time in 'setex' command"
    );

    // GETSET, GETDEL, GETEX.
    assert_eq!(bulk(c, &["GETSET", "gs", "1"]), None);
    assert_eq!(bulk(c, &["GETSET", "gs", "2"]).as_deref(), Some("1"));
    assert_eq!(bulk(c, &["GET", "gs"]).as_deref(), Some("2"));
    assert_eq!(bulk(c, &["GETDEL", "gs"]).as_deref(), Some("2"));
    assert_eq!(bulk(c, &["GETDEL", "gs"]), None);
    ok(c, &["SET", "gx", "v"]);
    assert_eq!(bulk(c, &["GETEX", "gx", "EX", "100"]).as_deref(), Some("v"));
    assert!(int(c, &["TTL", "gx"]) > 90);
    assert_eq!(bulk(c, &["GETEX", "gx", "PERSIST"]).as_deref(), Some("v"));
    assert_eq!(int(c, &["TTL", "gx"]), -1);

    // INCR family.
    assert_eq!(int(c, &["INCR", "n"]), 1);
    assert_eq!(int(c, &["INCR", "n"]), 2);
    assert_eq!(int(c, &["INCRBY", "n", "10"]), 12);
    assert_eq!(int(c, &["INCRBY", "n", "-20"]), -8);
    assert_eq!(int(c, &["DECR", "n"]), -9);
    assert_eq!(int(c, &["DECRBY", "n", "5"]), -14);
    assert_eq!(bulk(c, &["GET", "n"]).as_deref(), Some("-14"));
    assert_eq!(int(c, &["DECR", "fresh-decr"]), -1);
    ok(c, &["SET", "n", "9223372036854775806"]);
    assert_eq!(int(c, &["INCR", "n"]), i64::MAX);
    assert_eq!(
        error(c, &["INCR", "n"]),
        "ERR increment or decrement would overflow"
    );
    assert_eq!(
        bulk(c, &["GET", "n"]).as_deref(),
        Some("9223372036854775807")
    );
    assert_eq!(
        error(c, &["INCR", "k"]),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        error(c, &["INCRBY", "n", "x"]),
        "ERR value is not an integer or out of range"
    );
    ok(c, &["SET", "sp", " 1"]);
    assert_eq!(
        error(c, &["INCR", "sp"]),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        error(c, &["DECRBY", "z", "-9223372036854775808"]),
        "ERR decrement would overflow"
    );
    ok(c, &["SET", "inc-ttl", "1", "EX", "100"]);
    assert_eq!(int(c, &["INCR", "inc-ttl"]), 2);
    assert!(int(c, &["TTL", "inc-ttl"]) > 0, "INCR must keep the TTL");

    // APPEND, STRLEN.
    assert_eq!(int(c, &["APPEND", "ap", "Hello"]), 5);
    assert_eq!(int(c, &["APPEND", "ap", " World"]), 11);
    assert_eq!(bulk(c, &["GET", "ap"]).as_deref(), Some("Hello World"));
    assert_eq!(int(c, &["STRLEN", "ap"]), 11);
    assert_eq!(int(c, &["STRLEN", "missing"]), 0);
    assert_eq!(int(c, &["STRLEN", "bin\x00key"]), 256);

    // MSET, MSETNX, MGET.
    ok(c, &["MSET", "a", "1", "b", "2", "c", "3"]);
    assert_eq!(
        strings(c, &["MGET", "a", "b", "missing", "c"]),
        vec![Some("1".into()), Some("2".into()), None, Some("3".into())]
    );
    assert_eq!(
        error(c, &["MSET", "a", "1", "b"]),
        "ERR wrong number of arguments for 'mset' command"
    );
    assert_eq!(int(c, &["MSETNX", "a", "9", "new", "9"]), 0);
    assert_eq!(int(c, &["EXISTS", "new"]), 0);
    assert_eq!(bulk(c, &["GET", "a"]).as_deref(), Some("1"));
    assert_eq!(int(c, &["MSETNX", "new", "9", "new2", "8"]), 1);
    assert_eq!(
        strings(c, &["MGET", "new", "new2"]),
        vec![Some("9".into()), Some("8".into())]
    );

    // DEL, UNLINK, EXISTS, TOUCH, TYPE.
    assert_eq!(int(c, &["EXISTS", "a", "a", "b", "missing"]), 3);
    assert_eq!(int(c, &["TOUCH", "a", "missing"]), 1);
    assert_eq!(int(c, &["DEL", "a", "b", "missing"]), 2);
    assert_eq!(int(c, &["DEL", "a"]), 0);
    assert_eq!(int(c, &["UNLINK", "c", "new"]), 2);
    assert_eq!(int(c, &["EXISTS", "a", "b", "c"]), 0);
    assert_eq!(simple(c, &["TYPE", "new2"]), "string");
    assert_eq!(simple(c, &["TYPE", "missing"]), "none");
}

#[test]
fn keyspace_commands_keys_scan_dbsize_flushall() {
    require_kvm!();
    let kv = Kv::start("keyspace", "64M");
    let c = &mut kv.conn();

    assert_eq!(int(c, &["DBSIZE"]), 0);
    assert_eq!(strings(c, &["KEYS", "*"]), Vec::<Option<String>>::new());
    // 1000 `user:` keys and 200 `other:` keys, in pipelines.
    let mut p = redis::pipe();
    for i in 0..1000 {
        p.cmd("SET").arg(format!("user:{i}")).arg(i).ignore();
    }
    for i in 0..200 {
        p.cmd("SET").arg(format!("other:{i}")).arg(i).ignore();
    }
    p.query::<()>(c).unwrap();
    assert_eq!(int(c, &["DBSIZE"]), 1200);

    let users: BTreeSet<String> = (0..1000).map(|i| format!("user:{i}")).collect();
    let all: BTreeSet<String> = users
        .iter()
        .cloned()
        .chain((0..200).map(|i| format!("other:{i}")))
        .collect();

    // KEYS with glob patterns.
    let keys = |c: &mut Connection, pat: &str| -> Vec<String> {
        let mut v: Vec<String> = strings(c, &["KEYS", pat])
            .into_iter()
            .map(Option::unwrap)
            .collect();
        v.sort();
        v
    };
    assert_eq!(keys(c, "*"), all.iter().cloned().collect::<Vec<_>>());
    assert_eq!(keys(c, "user:*"), users.iter().cloned().collect::<Vec<_>>());
    assert_eq!(
        keys(c, "other:1?"),
        (10..20)
            .map(|i| format!("other:{i}"))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    assert_eq!(
        keys(c, "user:99[0-2]"),
        vec!["user:990", "user:991", "user:992"]
    );
    assert_eq!(keys(c, "user:[^0-8]"), vec!["user:9"]);
    assert!(keys(c, "nomatch*").is_empty());

    // SCAN to cursor 0 returns every key exactly once, with several COUNTs.
    let scan_all = |c: &mut Connection, extra: &[&str]| -> Vec<String> {
        let mut cursor = "0".to_string();
        let mut seen = Vec::new();
        let mut calls = 0;
        loop {
            let mut args = vec!["SCAN", cursor.as_str()];
            args.extend_from_slice(extra);
            let (next, batch): (String, Vec<String>) = {
                let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
                cmd(&a).query(c).unwrap()
            };
            seen.extend(batch);
            calls += 1;
            assert!(calls < 100_000, "SCAN does not terminate");
            if next == "0" {
                return seen;
            }
            cursor = next;
        }
    };
    for extra in [
        &[][..],
        &["COUNT", "7"],
        &["COUNT", "1000"],
        &["COUNT", "1"],
    ] {
        let seen = scan_all(c, extra);
        let set: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(set.len(), seen.len(), "SCAN {extra:?} returned duplicates");
        assert_eq!(set, all, "SCAN {extra:?} missed or invented keys");
    }
    let seen = scan_all(c, &["MATCH", "user:*", "COUNT", "50"]);
    let set: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!((set.len(), &set), (seen.len(), &users), "SCAN MATCH user:*");
    assert_eq!(scan_all(c, &["TYPE", "string"]).len(), 1200);
    assert!(scan_all(c, &["TYPE", "hash"]).is_empty());
    assert_eq!(error(c, &["SCAN", "x"]), "ERR invalid cursor");
    assert_eq!(error(c, &["SCAN", "0", "COUNT", "0"]), "ERR syntax error");
    assert_eq!(error(c, &["SCAN", "0", "BOGUS", "1"]), "ERR syntax error");
    assert_eq!(
        error(c, &["SCAN", "0", "TYPE", "nosuch"]),
        "ERR unknown type name 'nosuch'"
    );

    // FLUSHALL / FLUSHDB.
    ok(c, &["FLUSHALL"]);
    assert_eq!(int(c, &["DBSIZE"]), 0);
    assert!(keys(c, "*").is_empty());
    assert!(scan_all(c, &[]).is_empty());
    assert_eq!(bulk(c, &["GET", "user:1"]), None);
    ok(c, &["SET", "x", "1"]);
    ok(c, &["FLUSHDB", "ASYNC"]);
    assert_eq!(int(c, &["DBSIZE"]), 0);
    ok(c, &["FLUSHALL", "SYNC"]);
    assert_eq!(error(c, &["FLUSHALL", "LATER"]), "ERR syntax error");
    // The store is usable after a flush.
    ok(c, &["SET", "after", "flush"]);
    assert_eq!(int(c, &["DBSIZE"]), 1);
}

#[test]
fn ttl_expire_and_keys_actually_expiring() {
    require_kvm!();
    let kv = Kv::start("expiry", "64M");
    let c = &mut kv.conn();

    assert_eq!(int(c, &["TTL", "missing"]), -2);
    assert_eq!(int(c, &["PTTL", "missing"]), -2);
    ok(c, &["SET", "k", "v"]);
    assert_eq!(int(c, &["TTL", "k"]), -1);
    assert_eq!(int(c, &["PTTL", "k"]), -1);
    assert_eq!(int(c, &["EXPIRE", "missing", "10"]), 0);
    assert_eq!(int(c, &["EXPIRE", "k", "100"]), 1);
    assert!((99..=100).contains(&int(c, &["TTL", "k"])));
    let pt = int(c, &["PTTL", "k"]);
    assert!((95_000..=100_000).contains(&pt), "PTTL {pt}");
    let at = int(c, &["EXPIRETIME", "k"]);
    let pat = int(c, &["PEXPIRETIME", "k"]);
    assert!(at > 0 && (pat / 1000 - at).abs() <= 1, "{at} {pat}");
    assert_eq!(int(c, &["PEXPIRE", "k", "200000"]), 1);
    assert!(int(c, &["TTL", "k"]) > 150);
    assert_eq!(int(c, &["EXPIRE", "k", "50", "GT"]), 0);
    assert_eq!(int(c, &["EXPIRE", "k", "50", "LT"]), 1);
    assert_eq!(int(c, &["EXPIRE", "k", "60", "NX"]), 0);
    assert_eq!(
        error(c, &["EXPIRE", "k", "60", "NX", "XX"]),
        "ERR NX and XX, GT or LT options at the same time are not compatible"
    );
    assert_eq!(
        error(c, &["EXPIRE", "k", "x"]),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(int(c, &["PERSIST", "k"]), 1);
    assert_eq!(int(c, &["PERSIST", "k"]), 0);
    assert_eq!(int(c, &["TTL", "k"]), -1);
    assert_eq!(
        int(c, &["EXPIRE", "k", "-1"]),
        1,
        "a negative EXPIRE deletes"
    );
    assert_eq!(bulk(c, &["GET", "k"]), None);

    // A key with PX 400 exists right after SET (same pipeline, so no client
    // delay in between), then disappears: lazily on access.
    let t0 = Instant::now();
    let (set, pttl): (Value, i64) = redis::pipe()
        .cmd("SET")
        .arg("short")
        .arg("v")
        .arg("PX")
        .arg(400)
        .cmd("PTTL")
        .arg("short")
        .query(c)
        .unwrap();
    assert_eq!(set, Value::Okay);
    assert!(
        (1..=400).contains(&pttl),
        "PTTL right after SET PX 400: {pttl}"
    );
    poll("GET short to return nil", Duration::from_secs(10), || {
        bulk(c, &["GET", "short"]).is_none().then_some(())
    });
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "expired after {took:?}, TTL was 400 ms"
    );
    assert_eq!(int(c, &["TTL", "short"]), -2);

    // EXPIRE on an existing key, then wait for TTL -2.
    ok(c, &["SET", "e1", "v"]);
    assert_eq!(int(c, &["PEXPIRE", "e1", "300"]), 1);
    poll("TTL e1 to become -2", Duration::from_secs(10), || {
        (int(c, &["TTL", "e1"]) == -2).then_some(())
    });

    // Active expiry: keys nobody touches are reclaimed (DBSIZE counts keys
    // that have expired but were not reclaimed yet, as in Redis).
    let before: i64 = int(c, &["DBSIZE"]);
    let mut p = redis::pipe();
    for i in 0..200 {
        p.cmd("SET")
            .arg(format!("vol:{i}"))
            .arg("x")
            .arg("PX")
            .arg(200 + i)
            .ignore();
    }
    p.cmd("SET").arg("stays").arg("1").ignore();
    p.query::<()>(c).unwrap();
    assert_eq!(int(c, &["DBSIZE"]), before + 201);
    poll(
        "active expiry to reclaim 200 keys",
        Duration::from_secs(15),
        || (int(c, &["DBSIZE"]) == before + 1).then_some(()),
    );
    let info = bulk(c, &["INFO", "stats"]).unwrap();
    let expired: u64 = info_field(&info, "expired_keys").unwrap().parse().unwrap();
    assert!(expired >= 200, "expired_keys {expired}\n{info}");
    assert_eq!(bulk(c, &["GET", "stays"]).as_deref(), Some("1"));
}

/// EXPIREAT/PEXPIREAT/EXAT/PXAT take Unix times and EXPIRETIME/PEXPIRETIME
/// report them, as in Redis (clients compute them from the wall clock).
#[test]
fn expireat_and_expiretime_use_unix_time() {
    require_kvm!();
    let kv = Kv::start("unixtime", "64M");
    let c = &mut kv.conn();
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    ok(c, &["SET", "k", "v"]);
    assert_eq!(int(c, &["EXPIRE", "k", "100"]), 1);
    let at = int(c, &["EXPIRETIME", "k"]);
    let want = unix() + 100;
    assert!(
        (want - 5..=want + 5).contains(&at),
        "EXPIRETIME {at}, Unix time + 100 is {want}"
    );
    let pat = int(c, &["PEXPIRETIME", "k"]);
    assert!((pat / 1000 - at).abs() <= 1, "{pat} vs {at}");
    // An absolute time one minute ahead gives a TTL of about 60 s.
    let in_a_minute = (unix() + 60).to_string();
    assert_eq!(int(c, &["EXPIREAT", "k", &in_a_minute]), 1);
    let ttl = int(c, &["TTL", "k"]);
    assert!((55..=60).contains(&ttl), "TTL {ttl} after EXPIREAT now+60");
    ok(c, &["SET", "x", "v", "EXAT", &in_a_minute]);
    let ttl = int(c, &["TTL", "x"]);
    assert!((55..=60).contains(&ttl), "TTL {ttl} after SET EXAT now+60");
    // A past absolute time deletes the key.
    assert_eq!(int(c, &["EXPIREAT", "k", "1"]), 1);
    assert_eq!(
        int(c, &["EXISTS", "k"]),
        0,
        "EXPIREAT 1 did not delete the key"
    );
    let past = ((unix() - 10) * 1000).to_string();
    assert_eq!(int(c, &["PEXPIREAT", "x", &past]), 1);
    assert_eq!(
        int(c, &["EXISTS", "x"]),
        0,
        "PEXPIREAT in the past did not delete"
    );
}

#[test]
fn server_and_connection_commands() {
    require_kvm!();
    let kv = Kv::start("server", "64M");
    let c = &mut kv.conn();
    ok(c, &["MSET", "a", "1", "b", "2"]);
    ok(c, &["SET", "t", "1", "EX", "1000"]);

    // INFO: all sections by default; one section on request.
    let info = bulk(c, &["INFO"]).unwrap();
    for s in ["# Server", "# Memory", "# Stats", "# Keyspace"] {
        assert!(info.contains(s), "INFO lacks {s}:\n{info}");
    }
    assert!(
        info_field(&info, "redis_version").unwrap().starts_with('7'),
        "{info}"
    );
    assert_eq!(
        info_field(&info, "db0").as_deref(),
        Some("keys=3,expires=1,avg_ttl=0")
    );
    let used: u64 = info_field(&info, "used_memory").unwrap().parse().unwrap();
    let max: u64 = info_field(&info, "maxmemory").unwrap().parse().unwrap();
    assert!(used > 0 && used < max, "used_memory {used} maxmemory {max}");
    assert!(
        max > 32 << 20 && max < 64 << 20,
        "maxmemory {max} for a 64M VM"
    );
    let ks = bulk(c, &["INFO", "keyspace"]).unwrap();
    assert!(
        ks.starts_with("# Keyspace") && !ks.contains("# Server"),
        "{ks}"
    );
    let commands: u64 = info_field(&info, "total_commands_processed")
        .unwrap()
        .parse()
        .unwrap();
    let info2 = bulk(c, &["INFO", "stats"]).unwrap();
    let commands2: u64 = info_field(&info2, "total_commands_processed")
        .unwrap()
        .parse()
        .unwrap();
    assert!(commands2 > commands, "{commands} → {commands2}");

    // COMMAND, COMMAND COUNT / INFO / LIST / DOCS.
    let implemented = [
        "get",
        "set",
        "ping",
        "echo",
        "getset",
        "del",
        "exists",
        "incr",
        "incrby",
        "decr",
        "decrby",
        "append",
        "strlen",
        "mset",
        "mget",
        "keys",
        "scan",
        "dbsize",
        "flushall",
        "ttl",
        "pttl",
        "expire",
        "info",
        "command",
        "select",
        "quit",
        "setnx",
        "setex",
        "psetex",
        "getdel",
        "getex",
        "unlink",
        "touch",
        "msetnx",
        "flushdb",
        "expiretime",
        "pexpiretime",
        "pexpire",
        "expireat",
        "pexpireat",
        "persist",
        "type",
        "client",
        "config",
        "hello",
        "auth",
    ];
    let count = int(c, &["COMMAND", "COUNT"]);
    let Value::Array(table) = q(c, &["COMMAND"]).unwrap() else {
        panic!("COMMAND is not an array")
    };
    assert_eq!(table.len() as i64, count);
    let mut names = HashSet::new();
    for entry in &table {
        let Value::Array(f) = entry else {
            panic!("entry {entry:?}")
        };
        assert_eq!(f.len(), 10, "COMMAND entry in Redis 7's shape: {entry:?}");
        let Value::BulkString(n) = &f[0] else {
            panic!("{entry:?}")
        };
        names.insert(String::from_utf8(n.clone()).unwrap());
    }
    for n in implemented {
        assert!(names.contains(n), "COMMAND does not list {n}: {names:?}");
    }
    let list: HashSet<String> = strings(c, &["COMMAND", "LIST"])
        .into_iter()
        .map(Option::unwrap)
        .collect();
    assert_eq!(list, names);
    let Value::Array(gi) = q(c, &["COMMAND", "INFO", "get", "nosuch"]).unwrap() else {
        panic!()
    };
    assert_eq!(gi.len(), 2);
    let Value::Array(get) = &gi[0] else {
        panic!("{gi:?}")
    };
    assert_eq!(get[0], Value::BulkString(b"get".to_vec()));
    assert_eq!(get[1], Value::Int(2));
    assert_eq!(gi[1], Value::Nil);
    assert_eq!(q(c, &["COMMAND", "DOCS"]).unwrap(), Value::Array(vec![]));
    assert!(error(c, &["COMMAND", "NOPE"]).starts_with("ERR unknown subcommand 'NOPE'"));

    // SELECT: only database 0.
    ok(c, &["SELECT", "0"]);
    assert_eq!(error(c, &["SELECT", "1"]), "ERR DB index is out of range");
    assert_eq!(
        error(c, &["SELECT", "x"]),
        "ERR value is not an integer or out of range"
    );

    // CLIENT, CONFIG, HELLO, AUTH.
    let id = int(c, &["CLIENT", "ID"]);
    assert!(id > 0);
    assert_eq!(int(c, &["CLIENT", "ID"]), id);
    assert_eq!(q(c, &["CLIENT", "GETNAME"]).unwrap(), Value::Nil);
    ok(c, &["CLIENT", "SETNAME", "tester"]);
    assert_eq!(bulk(c, &["CLIENT", "GETNAME"]).as_deref(), Some("tester"));
    let other_id = int(&mut kv.conn(), &["CLIENT", "ID"]);
    assert_ne!(other_id, id, "two connections share a CLIENT ID");
    let cfg = strings(c, &["CONFIG", "GET", "maxmemory"]);
    assert_eq!(cfg[0].as_deref(), Some("maxmemory"));
    assert_eq!(cfg[1].as_deref(), Some(max.to_string().as_str()));
    let cfg = strings(c, &["CONFIG", "GET", "save", "appendonly"]);
    assert_eq!(cfg.len(), 4, "{cfg:?}");
    let Value::Array(hello) = q(c, &["HELLO", "2"]).unwrap() else {
        panic!()
    };
    assert_eq!(hello.len(), 14);
    assert_eq!(hello[0], Value::BulkString(b"server".to_vec()));
    assert_eq!(
        error(c, &["HELLO", "3"]),
        "NOPROTO unsupported protocol version"
    );
    ok(c, &["AUTH", "default", "anything"]);
    assert!(
        error(c, &["AUTH", "pw"]).starts_with("ERR AUTH <password> called without any password")
    );

    // QUIT: +OK, then the server closes the connection; others go on.
    let mut qc = kv.conn();
    ok(&mut qc, &["QUIT"]);
    let after = q(&mut qc, &["PING"]);
    assert!(
        matches!(&after, Err(e) if e.code().is_none()),
        "the connection still answers after QUIT: {after:?}"
    );
    assert_eq!(simple(c, &["PING"]), "PONG");
    assert_eq!(simple(&mut kv.conn(), &["PING"]), "PONG");
}

#[test]
fn errors_are_worded_like_redis() {
    require_kvm!();
    let kv = Kv::start("errors", "64M");
    let c = &mut kv.conn();
    assert_eq!(
        error(c, &["NOSUCHCMD", "a", "b"]),
        "ERR unknown command 'NOSUCHCMD', with args beginning with: 'a' 'b' "
    );
    assert_eq!(
        error(c, &["foo"]),
        "ERR unknown command 'foo', with args beginning with: "
    );
    for (args, name) in [
        (&["GET"][..], "get"),
        (&["GET", "a", "b"], "get"),
        (&["set", "k"], "set"),
        (&["INCR"], "incr"),
        (&["MGET"], "mget"),
        (&["DEL"], "del"),
        (&["ECHO"], "echo"),
        (&["EXPIRE", "k"], "expire"),
        (&["SELECT"], "select"),
        (&["DBSIZE", "x"], "dbsize"),
        (&["PING", "a", "b"], "ping"),
    ] {
        assert_eq!(
            error(c, args),
            format!("ERR wrong number of arguments for '{name}' command"),
            "{args:?}"
        );
    }
    // The connection is fine after errors.
    ok(c, &["SET", "k", "v"]);
    assert_eq!(bulk(c, &["GET", "k"]).as_deref(), Some("v"));
}

/// A client that connects while the VM boots, before the guest listens on
/// its vsock port, waits and is served: the device offers the connection
/// again until the guest takes it (it used to be reset; seen in 2 of 5 runs
/// of `benches/epoch_pause.rs`, which connects as soon as the port is open).
#[test]
fn a_client_connecting_while_the_guest_boots_is_served() {
    require_kvm!();
    let dir = Scratch::new("kv-early");
    let img = dir.path("vm.img");
    let port = free_port();
    // Not `launch`: that waits for PING, and this client must come first.
    let args = run_args(&img, "64M", port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vmm::start(&args, dir.path("console.log"));
    let deadline = Instant::now() + T;
    // The first connection the port accepts (refused only until nvhv binds it).
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => {
                if let Ok(Some(st)) = vm.child.try_wait() {
                    panic!("nvhv exited ({st}): {}", vm.stderr_text());
                }
                assert!(Instant::now() < deadline, "never listened: {e}");
                std::thread::yield_now();
            }
        }
    };
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"PING\r\n").unwrap();
    let mut got = [0u8; 7];
    if let Err(e) = s.read_exact(&mut got) {
        let addrs = (s.local_addr(), s.peer_addr());
        vm.signal_and_wait(libc::SIGTERM);
        panic!("the first connection {addrs:?}: {e}\n{}", vm.stderr_text());
    }
    assert_eq!(&got, b"+PONG\r\n");
}

/// Exact bytes on the wire, including inline commands (what `telnet`/`nc`
/// users type) and errors, over a plain TCP socket.
#[test]
fn raw_resp_bytes_on_the_wire() {
    require_kvm!();
    let kv = Kv::start("raw", "64M");
    let mut s = TcpStream::connect(("127.0.0.1", kv.port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut exchange = |req: &[u8], want: &[u8]| {
        s.write_all(req).unwrap();
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap_or_else(|e| {
            panic!(
                "reading the reply to {:?}: {e}",
                String::from_utf8_lossy(req)
            )
        });
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want),
            "reply to {:?}",
            String::from_utf8_lossy(req)
        );
    };
    exchange(b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n");
    exchange(b"PING\r\n", b"+PONG\r\n");
    exchange(
        b"SET greeting \"hello world\"\r\nGET greeting\r\n",
        b"+OK\r\n$11\r\nhello world\r\n",
    );
    exchange(b"*2\r\n$3\r\nGET\r\n$7\r\nmissing\r\n", b"$-1\r\n");
    exchange(b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n", b":1\r\n");
    exchange(
        b"MGET greeting nope\r\n",
        b"*2\r\n$11\r\nhello world\r\n$-1\r\n",
    );
    exchange(
        b"*3\r\n$3\r\nFOO\r\n$1\r\nx\r\n$1\r\ny\r\n",
        b"-ERR unknown command 'FOO', with args beginning with: 'x' 'y' \r\n",
    );
    exchange(
        b"GET\r\n",
        b"-ERR wrong number of arguments for 'get' command\r\n",
    );
    // A command split across writes.
    exchange(b"*3\r\n$3\r\nSET\r\n$1\r\nk", b"");
    exchange(b"\r\n$2\r\nvv\r\n", b"+OK\r\n");
    exchange(b"*1\r\n$4\r\nQUIT\r\n", b"+OK\r\n");
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "bytes after QUIT's reply: {rest:?}");
    // A protocol error closes that connection only.
    let mut s = TcpStream::connect(("127.0.0.1", kv.port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"*1\r\n$x\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("-ERR Protocol error"), "{reply:?}");
    assert_eq!(bulk(&mut kv.conn(), &["GET", "k"]).as_deref(), Some("vv"));
}

// ---------------------------------------------------------------------------
// Load: pipelining, concurrency, large values, memory exhaustion.

#[test]
fn pipeline_of_10000_commands() {
    require_kvm!();
    let kv = Kv::start("pipeline", "64M");
    let c = &mut kv.conn();
    // 10 000 commands in one pipeline: SET, INCR, GET, in turn.
    let mut p = redis::pipe();
    for i in 0..10_000u32 {
        match i % 3 {
            0 => p.cmd("SET").arg(format!("p:{i}")).arg(format!("value-{i}")),
            1 => p.cmd("INCR").arg("p:counter"),
            _ => p.cmd("GET").arg(format!("p:{}", i - 2)),
        };
    }
    let replies: Vec<Value> = p.query(c).unwrap();
    assert_eq!(replies.len(), 10_000);
    let mut incrs = 0;
    for (i, r) in replies.iter().enumerate() {
        let want = match i % 3 {
            0 => Value::Okay,
            1 => {
                incrs += 1;
                Value::Int(incrs)
            }
            _ => Value::BulkString(format!("value-{}", i - 2).into_bytes()),
        };
        assert_eq!(r, &want, "reply {i}");
    }
    assert_eq!(int(c, &["DBSIZE"]), 3334 + 1);

    // A pipeline whose replies (10 000 × 1 KiB) far exceed every buffer on the
    // way: the client writes everything before reading anything.
    let v = pseudo_random(1024, 7);
    let r: Value = cmd(&[b"SET", b"kib", &v]).query(c).unwrap();
    assert_eq!(r, Value::Okay);
    let mut p = redis::pipe();
    for _ in 0..10_000 {
        p.cmd("GET").arg("kib");
    }
    let replies: Vec<Vec<u8>> = p.query(c).unwrap();
    assert_eq!(replies.len(), 10_000);
    assert!(
        replies.iter().all(|r| *r == v),
        "a pipelined GET returned wrong bytes"
    );

    // Errors inside a pipeline do not disturb the commands around them.
    let replies: Vec<RedisResult<Value>> = redis::pipe()
        .cmd("SET")
        .arg("x")
        .arg("1")
        .cmd("NOSUCH")
        .cmd("INCR")
        .arg("kib")
        .cmd("GET")
        .arg("x")
        .ignore_errors()
        .query(c)
        .unwrap();
    assert_eq!(replies[0].as_ref().unwrap(), &Value::Okay);
    assert!(err_text(replies[1].as_ref().unwrap_err()).starts_with("ERR unknown command 'NOSUCH'"));
    assert_eq!(
        err_text(replies[2].as_ref().unwrap_err()),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        replies[3].as_ref().unwrap(),
        &Value::BulkString(b"1".to_vec())
    );
}

#[test]
fn concurrent_256_connections_each_with_its_own_key() {
    require_kvm!();
    let kv = Kv::start("conc", "256M");
    const N: usize = 256;
    const ROUNDS: usize = 20;
    let start = Arc::new(Barrier::new(N));
    let url = kv.url();
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let start = start.clone();
            let url = url.clone();
            std::thread::Builder::new()
                .spawn(move || -> Result<(), String> {
                    let client = redis::Client::open(url).unwrap();
                    let con = client.get_connection_with_timeout(T);
                    // Every thread holds an open connection before any works.
                    start.wait();
                    let mut c = con.map_err(|e| format!("thread {i}: connect: {e}"))?;
                    c.set_read_timeout(Some(T)).unwrap();
                    let key = format!("conn:{i}");
                    for r in 0..ROUNDS {
                        let val = format!("{i}-{r}-{}", "x".repeat(i % 64));
                        let set: Value = redis::cmd("SET")
                            .arg(&key)
                            .arg(&val)
                            .query(&mut c)
                            .map_err(|e| format!("thread {i} SET: {e}"))?;
                        let got: Option<String> = redis::cmd("GET")
                            .arg(&key)
                            .query(&mut c)
                            .map_err(|e| format!("thread {i} GET: {e}"))?;
                        if set != Value::Okay || got.as_deref() != Some(val.as_str()) {
                            return Err(format!(
                                "thread {i} round {r}: SET {set:?}, GET {got:?}, want {val}"
                            ));
                        }
                        let n: i64 = redis::cmd("INCR")
                            .arg("shared")
                            .query(&mut c)
                            .map_err(|e| format!("thread {i} INCR: {e}"))?;
                        if n < 1 {
                            return Err(format!("thread {i}: INCR gave {n}"));
                        }
                    }
                    Ok(())
                })
                .unwrap()
        })
        .collect();
    let errors: Vec<String> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap().err())
        .collect();
    assert!(
        errors.is_empty(),
        "{} of {N} clients failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let c = &mut kv.conn();
    assert_eq!(int(c, &["DBSIZE"]), N as i64 + 1);
    assert_eq!(bulk(c, &["GET", "shared"]), Some((N * ROUNDS).to_string()));
    let keys: Vec<String> = (0..N).map(|i| format!("conn:{i}")).collect();
    let mut mget = redis::cmd("MGET");
    for k in &keys {
        mget.arg(k);
    }
    let vals: Vec<Option<String>> = mget.query(c).unwrap();
    for (i, v) in vals.iter().enumerate() {
        let want = format!("{i}-{}-{}", ROUNDS - 1, "x".repeat(i % 64));
        assert_eq!(v.as_deref(), Some(want.as_str()), "conn:{i}");
    }
}

#[test]
fn value_of_16_mib_round_trips() {
    require_kvm!();
    let mut kv = Kv::start("big", "256M");
    let c = &mut kv.conn();
    let big = pseudo_random(16 << 20, 16);
    let t = Instant::now();
    let r: Value = redis::cmd("SET").arg("big").arg(&big[..]).query(c).unwrap();
    assert_eq!(r, Value::Okay);
    let set_time = t.elapsed();
    assert_eq!(int(c, &["STRLEN", "big"]), 16 << 20);
    let t = Instant::now();
    let got: Vec<u8> = redis::cmd("GET").arg("big").query(c).unwrap();
    let get_time = t.elapsed();
    assert_eq!(got.len(), big.len());
    assert!(got == big, "the 16 MiB value came back different");
    eprintln!("16 MiB value: SET {set_time:?}, GET {get_time:?}");
    // Read it from another connection too, then grow and drop it.
    let got: Vec<u8> = redis::cmd("GET").arg("big").query(&mut kv.conn()).unwrap();
    assert!(got == big);
    assert_eq!(int(c, &["APPEND", "big", "!"]), (16 << 20) + 1);
    let info = bulk(c, &["INFO", "memory"]).unwrap();
    let used: u64 = info_field(&info, "used_memory").unwrap().parse().unwrap();
    assert!(
        used > 16 << 20,
        "used_memory {used} with a 16 MiB value stored"
    );
    assert_eq!(int(c, &["DEL", "big"]), 1);
    let info = bulk(c, &["INFO", "memory"]).unwrap();
    let used: u64 = info_field(&info, "used_memory").unwrap().parse().unwrap();
    assert!(
        used < 1 << 20,
        "used_memory {used} after deleting the 16 MiB value"
    );
    // A second one (memory is reusable), through a pipeline with a small one.
    let big2 = pseudo_random(16 << 20, 17);
    let (a, b): (Vec<u8>, String) = redis::pipe()
        .cmd("SET")
        .arg("big2")
        .arg(&big2[..])
        .ignore()
        .cmd("GET")
        .arg("big2")
        .cmd("ECHO")
        .arg("after")
        .query(c)
        .unwrap();
    assert!(a == big2);
    assert_eq!(b, "after");
    kv.assert_alive();
}

#[test]
fn out_of_memory_refuses_writes_and_keeps_serving() {
    require_kvm!();
    let mut kv = Kv::start("oom", "64M");
    let c = &mut kv.conn();
    const MIB: usize = 1 << 20;
    let value = |i: usize| pseudo_random(MIB, i as u64 + 100);
    ok(c, &["SET", "small", "survivor"]);
    let mut stored = 0;
    let oom = loop {
        assert!(stored < 200, "200 MiB stored in a 64 MiB VM without -OOM");
        let r: RedisResult<Value> = redis::cmd("SET")
            .arg(format!("big:{stored}"))
            .arg(value(stored))
            .query(c);
        match r {
            Ok(Value::Okay) => stored += 1,
            Err(e) if e.code().is_some() => break err_text(&e),
            other => panic!("SET big:{stored}: {other:?}\n{}", kv.diag()),
        }
    };
    assert_eq!(
        oom,
        "OOM command not allowed when used memory > 'maxmemory'."
    );
    assert!(
        stored >= 16,
        "only {stored} MiB stored in a 64 MiB VM before -OOM"
    );
    kv.assert_alive();
    // Same connection and new ones still answer; every earlier key is intact.
    assert_eq!(simple(c, &["PING"]), "PONG");
    assert_eq!(simple(&mut kv.conn(), &["PING"]), "PONG");
    assert_eq!(int(c, &["DBSIZE"]), stored as i64 + 1);
    for i in 0..stored {
        let got: Vec<u8> = redis::cmd("GET").arg(format!("big:{i}")).query(c).unwrap();
        assert!(got == value(i), "big:{i} changed after -OOM");
    }
    assert_eq!(bulk(c, &["GET", "small"]).as_deref(), Some("survivor"));
    assert_eq!(
        int(c, &["EXISTS", &format!("big:{stored}")]),
        0,
        "the refused SET wrote"
    );
    let info = bulk(c, &["INFO", "memory"]).unwrap();
    let used: u64 = info_field(&info, "used_memory").unwrap().parse().unwrap();
    let max: u64 = info_field(&info, "maxmemory").unwrap().parse().unwrap();
    assert!(used <= max, "used_memory {used} > maxmemory {max}");
    // MSET is refused as a whole. (Its 2 MiB query buffer may not fit in
    // the fragmented heap either: then it is -OOM and the connection closes.)
    let half = pseudo_random(MIB / 2, 1);
    let mut mc = kv.conn();
    let r: RedisResult<Value> = redis::cmd("MSET")
        .arg("m1")
        .arg(&half[..])
        .arg("m2")
        .arg(&half[..])
        .arg("m3")
        .arg(&half[..])
        .arg("m4")
        .arg(&half[..])
        .query(&mut mc);
    match r {
        Err(e) => assert_eq!(err_text(&e), oom),
        Ok(v) => panic!("MSET of 2 MiB on a full store: {v:?}"),
    }
    assert_eq!(
        int(c, &["EXISTS", "m1", "m2", "m3", "m4"]),
        0,
        "a refused MSET wrote some keys"
    );

    // A value larger than all the memory left: refused (-OOM, or the
    // connection is dropped), and the VM still serves.
    let huge = pseudo_random(32 * MIB, 2);
    let mut hc = kv.conn();
    let r: RedisResult<Value> = redis::cmd("SET").arg("huge").arg(&huge[..]).query(&mut hc);
    assert!(r.is_err(), "a 32 MiB SET on a full 64 MiB VM: {r:?}");
    kv.assert_alive();
    let c2 = &mut kv.conn();
    assert_eq!(simple(c2, &["PING"]), "PONG");
    assert_eq!(int(c2, &["EXISTS", "huge"]), 0);
    assert_eq!(int(c2, &["DBSIZE"]), stored as i64 + 1);

    // Freeing memory makes writes succeed again.
    assert_eq!(int(c2, &["DEL", "big:0", "big:1"]), 2);
    let r: Value = redis::cmd("SET")
        .arg("again")
        .arg(value(0))
        .query(c2)
        .unwrap();
    assert_eq!(r, Value::Okay);
    ok(c2, &["SET", "tiny", "1"]);
    assert_eq!(int(c2, &["INCR", "tiny"]), 2);
    for i in 2..stored {
        let got: Vec<u8> = redis::cmd("GET").arg(format!("big:{i}")).query(c2).unwrap();
        assert!(got == value(i), "big:{i} changed");
    }
    kv.assert_alive();
}

// ---------------------------------------------------------------------------
// Persistence.

#[test]
fn data_survives_suspend_and_resume() {
    require_kvm!();
    let mut kv = Kv::start("suspend", "64M");
    let mut c = kv.conn();
    let mut p = redis::pipe();
    for i in 0..2000 {
        p.cmd("SET")
            .arg(format!("key:{i}"))
            .arg(format!("value:{i}"))
            .ignore();
    }
    for _ in 0..100 {
        p.cmd("INCR").arg("counter").ignore();
    }
    p.query::<()>(&mut c).unwrap();
    let blob = pseudo_random(1 << 20, 3);
    let r: Value = redis::cmd("SET")
        .arg("blob")
        .arg(&blob[..])
        .query(&mut c)
        .unwrap();
    assert_eq!(r, Value::Okay);
    ok(&mut c, &["SET", "with-ttl", "v", "EX", "1000"]);
    let check = |c: &mut Connection, extra: &[(&str, &str)]| {
        assert_eq!(int(c, &["DBSIZE"]), 2003 + extra.len() as i64);
        for chunk in (0..2000).collect::<Vec<_>>().chunks(500) {
            let mut m = redis::cmd("MGET");
            for i in chunk {
                m.arg(format!("key:{i}"));
            }
            let vals: Vec<Option<String>> = m.query(c).unwrap();
            for (i, v) in chunk.iter().zip(vals) {
                assert_eq!(v, Some(format!("value:{i}")), "key:{i}");
            }
        }
        let n: i64 = bulk(c, &["GET", "counter"]).unwrap().parse().unwrap();
        assert!(n >= 100, "counter {n}");
        let got: Vec<u8> = redis::cmd("GET").arg("blob").query(c).unwrap();
        assert!(got == blob, "blob changed");
        let ttl = int(c, &["TTL", "with-ttl"]);
        assert!((1..=1000).contains(&ttl), "TTL of with-ttl: {ttl}");
        for (k, v) in extra {
            assert_eq!(bulk(c, &["GET", k]).as_deref(), Some(*v), "{k}");
        }
    };
    check(&mut c, &[]);

    // Suspend while a client is connected; resume on the same address.
    kv.suspend();
    let first_port = kv.port;
    kv.resume(true);
    assert_eq!(kv.port, first_port);
    assert!(
        q(&mut c, &["PING"]).is_err(),
        "a connection from before the suspend still answers"
    );
    let mut c = kv.conn();
    check(&mut c, &[]);
    assert_eq!(int(&mut c, &["INCR", "counter"]), 101);
    ok(&mut c, &["SET", "after-resume", "yes"]);
    // Many new connections work.
    for i in 0..20 {
        assert_eq!(
            bulk(&mut kv.conn(), &["ECHO", &i.to_string()]),
            Some(i.to_string())
        );
    }

    // Again, now onto another port.
    kv.suspend();
    kv.resume(false);
    let mut c = kv.conn();
    check(&mut c, &[("after-resume", "yes")]);
    assert_eq!(bulk(&mut c, &["GET", "counter"]).as_deref(), Some("101"));
    kv.suspend();
}

/// A client connection over the Unix socket at `sock`.
fn unix_conn(sock: &Path) -> Connection {
    let url = format!("redis+unix://{}", sock.display());
    let c = redis::Client::open(url.as_str()).unwrap();
    let con = c
        .get_connection_with_timeout(T)
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    con.set_read_timeout(Some(T)).unwrap();
    con
}

/// `--unix PATH` serves clients on a Unix socket beside the TCP address,
/// and the running and resumed lines name both (the TCP port as bound, for
/// `--listen 127.0.0.1:0`); what a client wrote there survives a suspend.
#[test]
fn a_unix_socket_serves_clients_and_nvhv_names_where_clients_connect() {
    require_kvm!();
    // Declared first, dropped last: the VM goes before the socket's directory.
    let sock_dir = Scratch::new("kv-unix-sock");
    let sock = sock_dir.path("kv.sock");
    let unix = ["--unix", sock.to_str().unwrap()];
    let mut kv = Kv::start_with("unix", "64M", &unix);
    let said = |port: u16| format!("clients connect to 127.0.0.1:{port} and {}", sock.display());
    let err = kv.vm.stderr_text();
    assert!(
        err.contains(&format!(
            "nvhv: running (image {}); {}",
            kv.img.display(),
            said(kv.port)
        )),
        "{err}"
    );
    ok(&mut unix_conn(&sock), &["SET", "over", "unix"]);
    kv.suspend();

    kv.resume_with(false, &unix);
    let err = kv.vm.stderr_text();
    assert!(
        err.contains("nvhv: resumed from epoch ") && err.contains(&said(kv.port)),
        "{err}"
    );
    kv.expect_value(&mut unix_conn(&sock), "over", "unix");
}

/// Output commit holds only what depends on uncommitted state (the kv guest
/// publishes its state version and per-connection dependencies,
/// `nvhv_abi::OUTPUT_DEPS_PORT`). Resumed with epochs that end on their own
/// only after 60 s, the VM answers PING and a GET of committed data at once;
/// a SET's reply, and a GET of the key it wrote on another connection, stay
/// held, while a GET of committed data on a third connection is answered.
/// SIGTERM's final epoch releases the held replies; after a kill -9
/// instead, the SET is gone and the held GET reply never reached its client.
#[test]
fn replies_to_reads_of_committed_data_are_not_held() {
    require_kvm!();
    let mut kv = Kv::start("deps", "64M");
    ok(&mut kv.conn(), &["SET", "old", "1"]);
    kv.suspend();
    let slow = ["--epoch-min", "60s", "--epoch-max", "60s"];
    for kill in [false, true] {
        // Its PING (a pure read) must come back for the launch to succeed.
        kv.resume_with(false, &slow);
        let mut c = kv.conn();
        assert_eq!(bulk(&mut c, &["GET", "old"]).as_deref(), Some("1"));
        assert_eq!(
            strings(&mut c, &["MGET", "old", "none"]),
            vec![Some("1".to_string()), None]
        );
        let open = || {
            let s = TcpStream::connect(("127.0.0.1", kv.port)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s
        };
        let (mut w, mut r) = (open(), open());
        w.write_all(b"SET new 2\r\n").unwrap();
        // The SET reached the guest once the version moved; a GET on its
        // own connection is answered behind the SET's held reply only.
        let held = |s: &mut TcpStream, what: &str| {
            let mut b = [0u8; 64];
            match s.read(&mut b) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                other => panic!(
                    "{what} was not held: {other:?} {:?}",
                    String::from_utf8_lossy(&b)
                ),
            }
        };
        held(&mut w, "the SET's reply");
        r.write_all(b"GET new\r\n").unwrap();
        held(&mut r, "a GET of an uncommitted SET");
        assert_eq!(
            bulk(&mut kv.conn(), &["GET", "old"]).as_deref(),
            Some("1"),
            "a GET of committed data waited for another client's SET"
        );
        if kill {
            kv.vm.signal_and_wait(libc::SIGKILL);
            let mut b = [0u8; 64];
            assert!(
                !matches!(r.read(&mut b), Ok(n) if n > 0),
                "the held GET reply escaped after the kill"
            );
            kv.resume(false);
            let mut c = kv.conn();
            assert_eq!(
                bulk(&mut c, &["GET", "new"]),
                None,
                "an unacknowledged SET survived"
            );
            assert_eq!(bulk(&mut c, &["GET", "old"]).as_deref(), Some("1"));
        } else {
            kv.suspend();
            let err = kv.vm.stderr_text();
            let unheld = summary_count(&err, "sent at once");
            // PING, GET and MGET replies at least ("+PONG\r\n", "$1\r\n1\r\n", …).
            assert!(unheld >= 20, "only {unheld} bytes went out unheld: {err}");
            for (s, want) in [(&mut w, "+OK\r\n"), (&mut r, "$1\r\n2\r\n")] {
                s.set_read_timeout(Some(T)).unwrap();
                let mut b = vec![0u8; want.len()];
                s.read_exact(&mut b).unwrap();
                assert_eq!(String::from_utf8_lossy(&b), want);
            }
            kv.resume(false);
            let mut c = kv.conn();
            assert_eq!(bulk(&mut c, &["GET", "new"]).as_deref(), Some("2"));
            assert_eq!(int(&mut c, &["DEL", "new"]), 1);
            kv.suspend();
        }
    }
}

/// Bytes sent without waiting for a commit, from the exit summary.
/// The count printed just before `what` in nvhv's epoch summary on its
/// stderr (`… 12 sent at once …`, `… 40 idle epochs without a capture …`);
/// panics if the summary lacks it.
fn summary_count(err: &str, what: &str) -> u64 {
    err.find(what)
        .and_then(|i| err[..i].split_whitespace().next_back())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count before '{what}' in the summary: {err}"))
}

/// `--hold-all-output` holds even the replies to reads of committed data.
#[test]
fn hold_all_output_holds_every_reply() {
    require_kvm!();
    let mut kv = Kv::start_with("holdall", "64M", &["--hold-all-output"]);
    let mut c = kv.conn();
    ok(&mut c, &["SET", "k", "v"]);
    for _ in 0..20 {
        assert_eq!(bulk(&mut c, &["GET", "k"]).as_deref(), Some("v"));
    }
    kv.suspend();
    let err = kv.vm.stderr_text();
    assert_eq!(summary_count(&err, "sent at once"), 0, "{err}");
}

// ---------------------------------------------------------------------------
// Debian's redis-cli and redis-benchmark.

/// Runs redis-cli against the VM; returns (exit status ok, stdout).
fn cli(tool: &Path, port: u16, args: &[&str], stdin: &[u8]) -> (bool, String) {
    let mut child = Command::new(tool)
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = wait_output(
        child,
        Duration::from_secs(60),
        &format!("redis-cli {args:?}"),
    );
    writer.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.stderr.is_empty()
            || !String::from_utf8_lossy(&out.stderr).contains("Could not connect"),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), stdout)
}

/// Waits for a child with a deadline (killing it, by its pid, on timeout).
fn wait_output(
    mut child: std::process::Child,
    timeout: Duration,
    what: &str,
) -> std::process::Output {
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let Some(status) = common::wait_or_kill(&mut child, timeout) else {
        panic!("{what} did not finish within {timeout:?}");
    };
    std::process::Output {
        status,
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

#[test]
fn redis_cli_talks_to_the_guest() {
    require_kvm!();
    let Some(rc) = redis_tool("redis-cli") else {
        return;
    };
    let kv = Kv::start("cli", "64M");
    let p = kv.port;
    let run = |args: &[&str]| cli(&rc, p, args, b"");
    assert_eq!(run(&["PING"]), (true, "PONG\n".into()));
    assert_eq!(
        run(&["ECHO", "hello world"]),
        (true, "hello world\n".into())
    );
    assert_eq!(
        run(&["SET", "greeting", "hello world"]),
        (true, "OK\n".into())
    );
    assert_eq!(run(&["GET", "greeting"]).1, "hello world\n");
    assert_eq!(run(&["GET", "missing"]).1, "\n");
    assert_eq!(run(&["INCR", "n"]).1, "1\n");
    assert_eq!(run(&["INCRBY", "n", "41"]).1, "42\n");
    assert_eq!(run(&["MSET", "a", "1", "b", "2"]).1, "OK\n");
    assert_eq!(run(&["MGET", "a", "missing", "b"]).1, "1\n\n2\n");
    assert_eq!(run(&["TTL", "a"]).1, "-1\n");
    assert_eq!(run(&["SELECT", "0"]).1, "OK\n");
    assert_eq!(run(&["SELECT", "1"]).1, "ERR DB index is out of range\n\n");
    assert_eq!(
        run(&["NOSUCH", "a", "b"]).1,
        "ERR unknown command 'NOSUCH', with args beginning with: 'a' 'b' \n\n"
    );
    assert_eq!(
        run(&["GET"]).1,
        "ERR wrong number of arguments for 'get' command\n\n"
    );
    // Commands on stdin, one per line, on one connection.
    let (st, out) = cli(
        &rc,
        p,
        &[],
        b"SET x 10\nINCR x\nAPPEND x 0\nGET x\nSTRLEN x\n",
    );
    assert!(st);
    assert_eq!(out, "OK\n11\n3\n110\n3\n");
    // -r: repeat.
    run(&["-r", "250", "INCR", "rep"]);
    assert_eq!(run(&["GET", "rep"]).1, "250\n");
    // -x: a binary value from stdin, read back raw.
    let blob: Vec<u8> = pseudo_random(64 << 10, 9)
        .into_iter()
        .map(|b| if b == b'\n' { b'.' } else { b })
        .collect();
    let (st, out) = cli(&rc, p, &["-x", "SET", "blob"], &blob);
    assert!(st && out == "OK\n", "{out}");
    let o = Command::new(&rc)
        .args(["-p", &p.to_string(), "--raw", "GET", "blob"])
        .output()
        .unwrap();
    assert_eq!(o.stdout.len(), blob.len() + 1);
    assert!(o.stdout[..blob.len()] == blob[..], "binary value differs");
    assert_eq!(run(&["STRLEN", "blob"]).1, format!("{}\n", blob.len()));

    // --pipe: 10 000 commands as RESP on stdin, all in one go.
    let mut proto = Vec::new();
    for i in 0..10_000 {
        let (k, v) = (format!("pipe:{i}"), format!("v{i}"));
        proto.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                k.len(),
                v.len()
            )
            .as_bytes(),
        );
    }
    let (st, out) = cli(&rc, p, &["--pipe"], &proto);
    assert!(st, "{out}");
    assert!(out.contains("errors: 0, replies: 10000"), "{out}");
    assert_eq!(run(&["GET", "pipe:9999"]).1, "v9999\n");

    // --scan: every pipe: key exactly once.
    let (st, out) = run(&["--scan", "--pattern", "pipe:*"]);
    assert!(st);
    let keys: Vec<&str> = out.lines().collect();
    let set: HashSet<&str> = keys.iter().copied().collect();
    assert_eq!((keys.len(), set.len()), (10_000, 10_000));
    assert!(set.contains("pipe:0") && set.contains("pipe:9999"));

    // DBSIZE, INFO, KEYS, --bigkeys (SCAN + TYPE + STRLEN).
    let total = 10_000 + 7; // greeting n a b x rep blob
    assert_eq!(run(&["DBSIZE"]).1, format!("{total}\n"));
    let info = run(&["INFO", "keyspace"]).1;
    assert!(info.contains(&format!("db0:keys={total},")), "{info}");
    let mut k: Vec<String> = run(&["KEYS", "?"]).1.lines().map(String::from).collect();
    k.sort();
    assert_eq!(k, ["a", "b", "n", "x"]);
    let (st, out) = run(&["--bigkeys"]);
    assert!(st, "{out}");
    assert!(
        out.contains("Biggest string found '\"blob\"' has 65536 bytes"),
        "{out}"
    );
    assert!(out.contains(&format!("{total} strings")), "{out}");

    assert_eq!(run(&["FLUSHALL"]).1, "OK\n");
    assert_eq!(run(&["DBSIZE"]).1, "0\n");
    assert_eq!(run(&["QUIT"]).1, "OK\n");
}

#[test]
fn redis_benchmark_set_get_incr_pipelined_runs_without_errors() {
    require_kvm!();
    let Some(rb) = redis_tool("redis-benchmark") else {
        return;
    };
    let kv = Kv::start("bench", "256M");
    let child = Command::new(&rb)
        .args(["-h", "127.0.0.1", "-p", &kv.port.to_string()])
        .args([
            "-t",
            "set,get,incr",
            "-P",
            "16",
            "-c",
            "50",
            "-n",
            "100000",
            "--csv",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(120), "redis-benchmark");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "redis-benchmark failed\n{stdout}\n{stderr}\n{}",
        kv.diag()
    );
    for text in [&stdout, &stderr] {
        assert!(
            !text.to_lowercase().contains("error"),
            "redis-benchmark reported errors:\n{stdout}\n{stderr}"
        );
    }
    let mut tests = Vec::new();
    for line in stdout.lines().skip(1) {
        let f: Vec<&str> = line.split(',').map(|s| s.trim_matches('"')).collect();
        let rps: f64 = f[1].parse().unwrap_or_else(|_| panic!("{line}"));
        assert!(rps > 0.0, "{line}");
        tests.push(f[0].to_string());
    }
    assert_eq!(tests, ["SET", "GET", "INCR"], "{stdout}");
    eprintln!("{stdout}");
    // Every INCR landed: the benchmark's counter key counts exactly 100 000.
    let c = &mut kv.conn();
    assert_eq!(
        bulk(c, &["GET", "counter:__rand_int__"]).as_deref(),
        Some("100000")
    );
    assert_eq!(int(c, &["STRLEN", "key:__rand_int__"]), 3, "-d 3 values");
    let info = bulk(c, &["INFO", "stats"]).unwrap();
    let done: u64 = info_field(&info, "total_commands_processed")
        .unwrap()
        .parse()
        .unwrap();
    assert!(done >= 300_000, "total_commands_processed {done}");
    assert_eq!(
        info_field(&info, "rejected_calls").as_deref(),
        Some("0"),
        "{info}"
    );
}

/// An idle VM in epoch mode is not captured while its vCPU stays parked:
/// the epoch summary counts the epochs that ended without a capture.
#[test]
fn idle_epochs_take_no_capture() {
    require_kvm!();
    let mut kv = Kv::start("idle", "64M");
    // The idle period is what is tested here (40 epochs of 10 ms), not a
    // wait for something to happen.
    std::thread::sleep(Duration::from_millis(400));
    kv.suspend();
    let err = kv.vm.stderr_text();
    let skips = summary_count(&err, "idle epochs without a capture");
    assert!(skips >= 10, "only {skips} idle epochs skipped: {err}");
}

/// The dirty budget ends an epoch also when it began with the VM idle
/// (every vCPU parked: the epoch thread then sleeps until a vCPU leaves its
/// park, instead of checking the budget every 2 ms). One SET of 16 MiB sends
/// no reply until all of it is in guest memory (~8 000 pages written), so
/// only the budget can split it over several epochs. With the un-park watch
/// disabled, one epoch carried 6 883–8 343 pages (3 runs). An epoch carries
/// more than the budget: the guest writes on between two checks, and while
/// an epoch commits until the throttle brakes it.
///
/// CI (the dev build, `opt-level = 1`, beside the other tests of this file)
/// once saw 4 439 pages: a guest that parks every few hundred µs while the
/// value streams in woke the VMM so often that the budget check, counted
/// from each wake-up, never came due. With the check counted from the last
/// one and the throttle, six runs of this file in the dev build gave 378–660
/// (before: 686–2 775 with the throttle alone, 432–889 with the check fix
/// alone); the bound asserted, 4 096, still fails the disabled watch by far.
#[test]
fn dirty_budget_bounds_epochs_that_begin_idle() {
    require_kvm!();
    let mut kv = Kv::start_with(
        "budget",
        "256M",
        &["--dirty-budget", "64", "--epoch-max", "5s"],
    );
    // The idle period is what is tested (the watch is armed after 2 quiet
    // ms), not a wait for something to happen.
    std::thread::sleep(Duration::from_millis(50));
    let mut c = kv.conn();
    let big = vec![b'x'; 16 << 20];
    let ok: String = redis::cmd("SET")
        .arg("big")
        .arg(&big)
        .query(&mut c)
        .unwrap_or_else(|e| panic!("SET: {e}\n{}", kv.diag()));
    assert_eq!(ok, "OK");
    kv.suspend();
    let err = kv.vm.stderr_text();
    let max: u64 = err
        .split("dirty pages+1 ")
        .nth(1)
        .and_then(|t| t.split(" max ").nth(1))
        .and_then(|t| t.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dirty-page summary: {err}"));
    let ends: u64 = err
        .split([';', '\n'])
        .find_map(|p| p.trim().split_once(" epochs ended by the dirty budget"))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no budget count in the summary: {err}"));
    assert!(
        max < 4096 && ends >= 2,
        "an epoch carried {max} pages, {ends} ended by the budget: {err}"
    );
    // The epochs the budget cut mid-SET still add up to the whole value.
    kv.resume(false);
    let got: Vec<u8> = redis::cmd("GET")
        .arg("big")
        .query(&mut kv.conn())
        .unwrap_or_else(|e| panic!("GET after resume: {e}\n{}", kv.diag()));
    assert!(got == big, "the 16 MiB value came back changed");
}

/// A small file system mounted in this test thread's own mount namespace
/// (nothing outside the thread sees it, and it cannot outlive the test
/// process) on a fresh directory, both removed again on drop: a tmpfs, or
/// an ext4 on a loop device over a file in the temp dir.
struct SmallFs {
    dir: PathBuf,
    /// The ext4 file system's backing file.
    backing: Option<PathBuf>,
}

impl SmallFs {
    /// A tmpfs of `size` (`mount -o size=…`). None when this process may
    /// not mount (not root): the caller skips, unless `NVHV_REQUIRE_ROOT=1`
    /// (CI runs as root), where that fails.
    fn tmpfs(tag: &str, size: &str) -> Option<SmallFs> {
        let fs = SmallFs::private_dir(tag)?;
        fs.mount_tmpfs(0, size);
        Some(fs)
    }

    /// An ext4 of `mib` MiB (`mkfs.ext4`, `mount -o loop`), or None as for
    /// [`SmallFs::tmpfs`].
    fn ext4(tag: &str, mib: u64) -> Option<SmallFs> {
        let mut fs = SmallFs::private_dir(tag)?;
        let file = fs.dir.with_extension("ext4");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        fs.backing = Some(file.clone());
        common::run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&file));
        common::run_ok(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&file)
                .arg(&fs.dir),
        );
        Some(fs)
    }

    /// This thread's own mount namespace, and the directory to mount on.
    fn private_dir(tag: &str) -> Option<SmallFs> {
        if let Err(e) = common::private_mount_namespace() {
            if std::env::var("NVHV_REQUIRE_ROOT").as_deref() == Ok("1") {
                panic!("NVHV_REQUIRE_ROOT=1 but a private file system cannot be mounted: {e}");
            }
            eprintln!("SKIPPED: mounting a small file system needs root ({e})");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("nvhv-smallfs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Some(SmallFs { dir, backing: None })
    }

    /// `mount -t tmpfs -o size=…` (or, with `MS_REMOUNT`, a new size).
    fn mount_tmpfs(&self, flags: libc::c_ulong, size: &str) {
        let target = std::ffi::CString::new(self.dir.to_str().unwrap()).unwrap();
        let data = std::ffi::CString::new(format!("size={size}")).unwrap();
        // SAFETY: mount(2) with valid NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            r,
            0,
            "mount tmpfs size={size}: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.dir.to_str().unwrap()).unwrap();
        // SAFETY: umount2(2) of the file system this value mounted, by its
        // path (a loop device mounted with -o loop is freed with it).
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(f) = &self.backing {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// An image whose file system fills under the running VM, on tmpfs in both
/// modes and on ext4 in epoch mode: `run --reserve` refuses up front a RAM
/// region the file system cannot hold (and leaves no file); a sparse image
/// is warned about and runs until the file system is full; then nvhv exits
/// 1 naming the full file system, with the image resumable (on tmpfs the
/// guest's next page cannot be backed and its state is committed; on ext4
/// applying an epoch to the RAM image fails, and that epoch stays in the
/// redo log). With room made (the tmpfs grown, the ext4 image copied to a
/// larger file system), `resume` brings back every acknowledged SET.
#[test]
fn a_full_file_system_stops_the_guest_and_keeps_every_acknowledged_write() {
    require_kvm!();
    for (fs_kind, mode, says) in [
        ("tmpfs", "epoch", "whose file system is full"),
        ("tmpfs", "suspend-only", "whose file system is full"),
        ("ext4", "epoch", "is full; make room"),
    ] {
        let case = format!("{fs_kind}-{mode}");
        // ORDER (drop): kv (the VM, its logs) before the file system under it.
        let fs = match fs_kind {
            "tmpfs" => SmallFs::tmpfs(&case, "40M"),
            _ => SmallFs::ext4(&case, 48),
        };
        let Some(fs) = fs else {
            return;
        };
        let dir = Scratch::new(&format!("full-{case}"));
        let img = fs.dir.join("vm.img");
        let img_s = img.to_str().unwrap().to_string();
        let small_log = [
            "--persist",
            mode,
            "--log-size",
            "4M",
            "--dirty-budget",
            "512",
        ];

        let mut args = vec!["run", "--image", &img_s, "--mem", "256M", "--reserve"];
        args.extend(small_log);
        let out = common::nvhv_output(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{case}: {err}");
        assert!(
            err.contains("cannot reserve 256 MiB for guest RAM"),
            "{case}: {err}"
        );
        assert!(!img.exists(), "{case}: a failed --reserve left {img:?}");

        let (vm, port) = launch(&dir, 0, None, |port| {
            let mut a = run_args(&img, "256M", port);
            a.extend(small_log.iter().map(|s| s.to_string()));
            a
        });
        let mut kv = Kv {
            vm,
            port,
            img: img.clone(),
            dir,
            starts: 1,
        };
        let err = kv.vm.stderr_text();
        assert!(
            err.contains("warning: the image may still need"),
            "{case}: {err}"
        );

        // 32 KiB values until the VM stops (~30 MiB of room).
        let value = |i: usize| pseudo_random(32 << 10, i as u64);
        let mut c = kv.conn();
        let mut acked = 0;
        loop {
            let r: RedisResult<Value> = redis::cmd("SET")
                .arg(format!("v{acked}"))
                .arg(value(acked))
                .query(&mut c);
            match r {
                Ok(v) => assert_eq!(v, Value::Okay, "{case}: SET v{acked}"),
                Err(e) => {
                    assert!(e.code().is_none(), "{case}: the guest refused a write: {e}");
                    break;
                }
            }
            acked += 1;
            assert!(
                acked < 4000,
                "{case}: 125 MiB written into a 40 MiB file system"
            );
        }
        let st = kv.vm.child.wait().unwrap();
        let err = kv.vm.stderr_text();
        assert_eq!(st.code(), Some(1), "{case}: {err}");
        assert!(err.contains(says), "{case}: {err}");
        assert!(
            acked > 100,
            "{case}: only {acked} SETs before the file system filled"
        );
        eprintln!("{case}: {acked} SETs acknowledged before the file system filled");
        let j = common::inspect_json(&img_s);
        assert_eq!(j["resumable"], true, "{case}: {j}");

        if fs_kind == "tmpfs" {
            fs.mount_tmpfs(libc::MS_REMOUNT, "300M");
        } else {
            // Moved to a larger file system, as a user would.
            kv.img = kv.dir.path("moved.img");
            let out = Command::new("cp")
                .arg("--sparse=always")
                .arg(&img)
                .arg(&kv.img)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        kv.resume(false);
        let err = kv.vm.stderr_text();
        assert!(
            !err.contains("warning"),
            "{case}: room was made, yet: {err}"
        );
        let mut c = kv.conn();
        for i in 0..acked {
            let got: Vec<u8> = redis::cmd("GET")
                .arg(format!("v{i}"))
                .query(&mut c)
                .unwrap();
            assert!(
                got == value(i),
                "{case}: v{i} of {acked} acknowledged is not what was written"
            );
        }
        ok(&mut c, &["SET", "after-room", "yes"]);
        kv.suspend();
        drop(kv);
        drop(fs);
    }
}

/// `run --force --reserve` where the new image fits only in the room the
/// old one holds: the old image keeps that room until its replacement is
/// complete, so the run is refused up front, saying to remove it first, and
/// the old image is left unchanged and resumable. With room for both, the
/// new image replaces it.
#[test]
fn force_reserve_refuses_what_fits_only_in_the_old_images_room() {
    require_kvm!();
    let Some(fs) = SmallFs::tmpfs("beside", "80M") else {
        return;
    };
    let img = fs.dir.join("vm.img");
    let img_s = img.to_str().unwrap();
    let run = |mem: &str| {
        // A console of its own per run: the wait below must see this run's
        // guest, not an earlier one's lines.
        let console = fs.dir.join(format!("c{mem}.log"));
        let args = [
            "run",
            "--image",
            img_s,
            "--force",
            "--reserve",
            "--mem",
            mem,
            "--guest",
            "counter",
            "--persist",
            "suspend-only",
        ];
        common::Vmm::start(&args, console)
    };
    // Runs until the guest prints, then suspends.
    let run_and_suspend = |mem: &str| {
        let mut vm = run(mem);
        vm.wait_console("counter output", T, |t| t.contains("counter 0 "));
        let st = vm.signal_and_wait(libc::SIGTERM);
        assert!(
            st.success(),
            "{st}: {} / {}",
            vm.stderr_text(),
            vm.console_text()
        );
    };
    run_and_suspend("48M");
    let before = std::fs::read(&img).unwrap();

    let mut vm = run("48M");
    let st = vm.child.wait().unwrap();
    let err = vm.stderr_text();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("beside the image it replaces"), "{err}");
    assert!(err.contains("remove it first"), "{err}");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the old image changed"
    );
    let j = common::inspect_json(img_s);
    assert_eq!(j["resumable"], true, "{j}");

    // 16 MiB fits beside it.
    run_and_suspend("16M");
    let j = common::inspect_json(img_s);
    assert_eq!(j["ram_bytes"], 16 << 20, "{j}");
    drop(fs);
}

/// `--idle-poll 0`: idle vCPU and device threads sleep at once instead of
/// polling, so every request wakes them. Concurrent clients' writes are
/// answered, and survive a SIGKILL and a resume that also polls nothing.
#[test]
fn no_idle_polling_still_serves_and_survives_a_kill() {
    require_kvm!();
    let mut kv = Kv::start_with("idle-poll-0", "64M", &["--idle-poll", "0"]);
    std::thread::scope(|s| {
        for t in 0..4 {
            let kv = &kv;
            s.spawn(move || {
                let mut c = kv.conn();
                for i in 0..200 {
                    ok(&mut c, &["SET", &format!("k{t}:{i}"), &format!("v{i}")]);
                    assert!(int(&mut c, &["INCR", "shared"]) > 0);
                    // Let the guest go idle and park now and then.
                    if i % 50 == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            });
        }
    });
    kv.vm.signal_and_wait(libc::SIGKILL);
    kv.resume_with(false, &["--idle-poll", "0"]);
    let mut c = kv.conn();
    for t in 0..4 {
        for i in [0, 99, 199] {
            kv.expect_value(&mut c, &format!("k{t}:{i}"), &format!("v{i}"));
        }
    }
    kv.expect_value(&mut c, "shared", "800");
}

/// With two vCPUs the kv guest serves on vCPU 0 and halts vCPU 1 for good
/// (`nvhv_abi::WAIT_FOREVER`): device work must not wake it, yet every
/// epoch still captures it (parked), a SIGKILL and a resume keep the data,
/// and the resumed guest (vCPU 1 halted again) serves.
#[test]
fn a_halted_second_vcpu_is_captured_and_resumed() {
    require_kvm!();
    let mut kv = Kv::start_with("vcpus-2", "64M", &["--vcpus", "2"]);
    let mut c = kv.conn();
    for i in 0..300 {
        ok(&mut c, &["SET", &format!("k{i}"), &format!("v{i}")]);
    }
    drop(c);
    kv.vm.signal_and_wait(libc::SIGKILL);
    kv.resume(false);
    let mut c = kv.conn();
    for i in [0, 150, 299] {
        kv.expect_value(&mut c, &format!("k{i}"), &format!("v{i}"));
    }
    ok(&mut c, &["SET", "after", "resume"]);
    kv.suspend();
    kv.resume(false);
    kv.expect_value(&mut kv.conn(), "after", "resume");
}

// ---------------------------------------------------------------------------
// `nvhv resume --standby`

/// Starts `nvhv resume --standby` for `img`, to listen on `port` once it
/// takes over, and waits until it says it stands by.
fn standby(dir: &Scratch, n: usize, img: &Path, port: u16) -> Vmm {
    let listen = format!("127.0.0.1:{port}");
    let a = [
        "resume",
        "--standby",
        "--image",
        img.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    let mut vm = Vmm::start(&a, dir.path(&format!("standby{n}.log")));
    poll("the standby to stand by", T, || {
        if let Ok(Some(st)) = vm.child.try_wait() {
            panic!("standby exited ({st}): {}", vm.stderr_text());
        }
        vm.stderr_text().contains("standing by").then_some(())
    });
    vm
}

/// A standby beside the running nvhv takes over when it is killed without
/// warning, with every acknowledged write, and serves on the same address;
/// a second standby does the same for the first; a third one, when the VM
/// is then suspended in order, leaves the image suspended and exits 0, and
/// a plain resume continues it.
#[test]
fn a_standby_takes_over_after_a_kill_with_every_acknowledged_write() {
    require_kvm!();
    let mut kv = Kv::start("standby", "64M");
    for round in 0..2 {
        std::thread::scope(|s| {
            for t in 0..3 {
                let kv = &kv;
                s.spawn(move || {
                    let mut c = kv.conn();
                    for i in 0..100 {
                        ok(
                            &mut c,
                            &["SET", &format!("r{round}:k{t}:{i}"), &format!("v{i}")],
                        );
                        assert!(int(&mut c, &["INCR", "shared"]) > 0);
                    }
                });
            }
        });
        let sb = standby(&kv.dir, round, &kv.img, kv.port);
        let said = sb.stderr_text();
        assert!(
            said.contains("sharing the running nvhv's listening sockets"),
            "{said}"
        );
        kv.vm.signal_and_wait(libc::SIGKILL);
        // The listening socket outlives the killed nvhv (the standby holds
        // it): a client connecting now waits in its queue, never refused.
        let mut early = TcpStream::connect(("127.0.0.1", kv.port))
            .unwrap_or_else(|e| panic!("connect right after the kill: {e}"));
        early.set_read_timeout(Some(T)).unwrap();
        early.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
        let mut pong = [0u8; 7];
        early.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"+PONG\r\n");
        kv.vm = sb;
        poll("the standby to serve", T, || ping(&kv.url()).then_some(()));
        kv.assert_alive();
        // The guest may answer before the main thread has printed its line.
        poll("the standby's resumed line", T, || {
            let err = kv.vm.stderr_text();
            (err.contains("guest running") && err.contains("after the nvhv running it died"))
                .then_some(())
        });
        let mut c = kv.conn();
        for r in 0..=round {
            for t in 0..3 {
                for i in [0, 57, 99] {
                    kv.expect_value(&mut c, &format!("r{r}:k{t}:{i}"), &format!("v{i}"));
                }
            }
        }
        kv.expect_value(&mut c, "shared", &(300 * (round + 1)).to_string());
    }
    // An orderly stop is not a crash: the standby leaves the image alone.
    let mut sb = standby(&kv.dir, 2, &kv.img, kv.port);
    kv.suspend();
    let st = common::wait_or_kill(&mut sb.child, T).expect("the standby exits");
    let err = sb.stderr_text();
    assert!(st.success(), "standby exited {st}: {err}");
    assert!(err.contains("not left by a crash"), "{err}");
    assert!(!err.contains("resumed"), "{err}");
    let out = common::nvhv_output(&["inspect", kv.img.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("suspended"), "{text}");
    kv.resume(false);
    kv.expect_value(&mut kv.conn(), "shared", "600");
}

/// One standby waits at a time: a second one says it is second in line
/// and stands by only once the first has taken the image over, then takes
/// it over in turn when the first is killed. While a standby holds its
/// claim, no other process can open the image.
#[test]
fn a_second_standby_waits_its_turn_and_nobody_else_opens_the_image() {
    require_kvm!();
    let mut kv = Kv::start("standby-queue", "64M");
    ok(&mut kv.conn(), &["SET", "k", "v0"]);
    let first = standby(&kv.dir, 0, &kv.img, kv.port);
    let listen = format!("127.0.0.1:{}", kv.port);
    let img = kv.img.to_str().unwrap().to_owned();
    let mut second = Vmm::start(
        &["resume", "--standby", "--image", &img, "--listen", &listen],
        kv.dir.path("standby-second.log"),
    );
    poll("the second standby to wait its turn", T, || {
        let said = second.stderr_text();
        assert!(!said.contains("standing by"), "{said}");
        said.contains("another standby is first in line")
            .then_some(())
    });
    // The image is claimed and held: a plain resume and an inspect both
    // see it in use.
    let out = common::nvhv_output(&["resume", "--image", &img, "--console", "/dev/null"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("in use"), "{err}");
    kv.vm.signal_and_wait(libc::SIGKILL);
    kv.vm = first;
    poll("the first standby to serve", T, || {
        ping(&kv.url()).then_some(())
    });
    ok(&mut kv.conn(), &["SET", "k", "v1"]);
    poll("the second standby to stand by", T, || {
        if let Ok(Some(st)) = second.child.try_wait() {
            panic!("second standby exited ({st}): {}", second.stderr_text());
        }
        second.stderr_text().contains("standing by").then_some(())
    });
    kv.vm.signal_and_wait(libc::SIGKILL);
    kv.vm = second;
    poll("the second standby to serve", T, || {
        ping(&kv.url()).then_some(())
    });
    kv.assert_alive();
    kv.expect_value(&mut kv.conn(), "k", "v1");
}

/// A standby needs an epoch-mode image: a crash leaves a suspend-only image
/// not resumable, so standing by for a running one is refused at once,
/// saying why (and the running VM goes on).
#[test]
fn a_standby_refuses_a_suspend_only_image() {
    require_kvm!();
    let mut kv = Kv::start_with("standby-so", "64M", &["--persist", "suspend-only"]);
    let listen = format!("127.0.0.1:{}", free_port());
    let out = common::nvhv_output(&[
        "resume",
        "--standby",
        "--image",
        kv.img.to_str().unwrap(),
        "--listen",
        &listen,
        "--console",
        "/dev/null",
    ]);
    kv.assert_alive();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--standby") && err.contains("suspend-only"),
        "{err}"
    );
}

/// A standby built its VM over the file at the path when it started; if
/// another image replaces that file before the takeover, it resumes the
/// image at the path (with a VM built for it), not the one it built for.
#[test]
fn a_standby_resumes_the_image_at_the_path_when_the_file_was_replaced() {
    require_kvm!();
    // B: an image left by a crash, holding who=B.
    let mut b = Kv::start("standby-b", "64M");
    ok(&mut b.conn(), &["SET", "who", "B"]);
    b.vm.signal_and_wait(libc::SIGKILL);
    // A runs, holding who=A, with 32M of RAM (another geometry than B's).
    let mut a = Kv::start("standby-a", "32M");
    ok(&mut a.conn(), &["SET", "who", "A"]);
    let port = free_port();
    let mut sb = standby(&a.dir, 0, &a.img, port);
    std::fs::rename(&b.img, &a.img).unwrap();
    // A's nvhv still runs on the old file; kill it so that the standby,
    // if it waits on that file, gets its lock and finds B at the path.
    a.vm.signal_and_wait(libc::SIGKILL);
    let url = format!("redis://127.0.0.1:{port}/");
    poll("the standby to serve", T, || {
        if let Ok(Some(st)) = sb.child.try_wait() {
            panic!("standby exited ({st}): {}", sb.stderr_text());
        }
        ping(&url).then_some(())
    });
    let mut c = redis::Client::open(url)
        .unwrap()
        .get_connection_with_timeout(T)
        .unwrap();
    assert_eq!(bulk(&mut c, &["GET", "who"]).as_deref(), Some("B"));
    assert_eq!(int(&mut c, &["DBSIZE"]), 1);
}

/// nvhv's anonymous memory (`RssAnon`), in KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no RssAnon in {status}"))
}

/// Epoch mode gives back its private copies of pages that have gone cold
/// (`vstate::reclaim`): after a bulk load of 64 MiB, nvhv's anonymous
/// memory falls by most of it, and every value reads back unchanged — after
/// the give-back, after rewriting a quarter of them (their pages copied
/// again), and after a suspend and resume.
#[test]
fn cold_pages_are_given_back_and_read_back_unchanged() {
    require_kvm!();
    const N: usize = 16_384;
    const LEN: usize = 4096;
    let mut kv = Kv::start_with("reclaim", "256M", &["--give-back-after", "500ms"]);
    let mut c = kv.conn();
    let key = |i: usize| format!("k{i}");
    let value = |i: usize, round: u64| pseudo_random(LEN, (i as u64) << 8 | round);
    let set = |c: &mut Connection, keys: &[usize], round: u64| {
        for chunk in keys.chunks(512) {
            let mut p = redis::pipe();
            for &i in chunk {
                p.cmd("SET").arg(key(i)).arg(value(i, round)).ignore();
            }
            p.query::<()>(c).unwrap();
        }
    };
    let check = |kv: &Kv, c: &mut Connection, round_of: &dyn Fn(usize) -> u64| {
        for chunk in (0..N).collect::<Vec<_>>().chunks(256) {
            let mut m = redis::cmd("MGET");
            for &i in chunk {
                m.arg(key(i));
            }
            let got: Vec<Vec<u8>> = m.query(c).unwrap();
            for (&i, v) in chunk.iter().zip(got) {
                assert!(v == value(i, round_of(i)), "k{i} changed\n{}", kv.diag());
            }
        }
    };
    let all: Vec<usize> = (0..N).collect();
    set(&mut c, &all, 0);
    let pid = kv.vm.child.id();
    let loaded = rss_anon_kib(pid);
    let data_kib = (N * LEN / 1024) as u64;
    assert!(
        loaded >= data_kib / 2,
        "{loaded} KiB anonymous after the load"
    );
    // Three quarters of the data given back (the rest: nvhv's own memory,
    // the kv guest's index pages, which stay hot a while).
    let low = poll("the cold pages given back", T, || {
        let now = rss_anon_kib(pid);
        (now + data_kib * 3 / 4 <= loaded.max(data_kib)).then_some(now)
    });
    eprintln!("RssAnon {loaded} KiB after the load, {low} KiB after the give-back");
    check(&kv, &mut c, &|_| 0);
    let quarter: Vec<usize> = (0..N).step_by(4).collect();
    set(&mut c, &quarter, 1);
    let round_of = |i: usize| u64::from(i % 4 == 0);
    check(&kv, &mut c, &round_of);
    kv.suspend();
    let err = kv.vm.stderr_text();
    let given = summary_count(&err, "pages' private copies given back");
    assert!(
        given as usize >= N * 3 / 4,
        "{given} pages given back: {err}"
    );
    // Resumed with the give-back off: the values read back all the same,
    // and nothing is given back.
    kv.resume_with(true, &["--give-back-after", "off"]);
    let mut c = kv.conn();
    check(&kv, &mut c, &round_of);
    kv.suspend();
    let err = kv.vm.stderr_text();
    assert_eq!(
        summary_count(&err, "pages' private copies given back"),
        0,
        "{err}"
    );
}
