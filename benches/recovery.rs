//! Recovery after `kill -9` with a large dataset in the guest: nvhv's `kv`
//! guest in epoch mode against `redis-server` reloading the same dataset from
//! its AOF.
//!
//! ```sh
//! cargo bench --bench recovery [-- --sizes 256M,1G,4G] [--dir /dev/shm]
//!                                 [--rounds 5] [--value-size 32K] [--conns 4]
//!                                 [--window 64] [--log-size 256M]
//!                                 [--fill-timeout 240] [--no-redis]
//!                                 [--no-full-read] [--churn SECS]
//!                                 [--activate] [--standby] [--seed N]
//! ```
//!
//! For each size S (sequentially; each size's files are deleted before the
//! next one starts, and a size is skipped with a note when `MemAvailable` or
//! the free space in `--dir` is too small for it):
//!
//! **nvhv.** `nvhv run --mem (1.5 S + 256 MiB) --persist epoch --log-size L`
//! with its image in `--dir`, filled with S bytes: S / value-size unique keys
//! (`rec:000000042`, …) whose values are deterministic pseudo-random bytes,
//! written with pipelined SETs over `--conns` connections (at most `--window`
//! commands in flight on each; every reply is read and must be `+OK`). Then
//! `DBSIZE` must equal the key count, and nvhv gets SIGKILL (no warning).
//! `--rounds` times: spawn `nvhv resume`, and measure
//! - the "resumed from epoch N, guest running X ms after process start"
//!   line: X itself (nvhv's own `main()` → vCPUs running, recovery replay
//!   included) and
//!   spawn → that line read;
//! - spawn → the first correct reply to `GET <key written before the kill>`
//!   (value compared byte for byte) on a connection opened after the spawn,
//!   polled in a tight loop (connect, GET, read; retry on refusal or reset);
//!
//! then `DBSIZE` is checked again (not timed) and nvhv is SIGKILLed for the
//! next round. With `--churn SECS` that SIGKILL comes under load instead:
//! `--conns` connections send pipelined SETs of small changing values
//! (`SET churn:<random below 100 000> v:<n>`, as `redis-benchmark -r 100000`
//! does) for SECS, and nvhv is killed while they are in flight, so the next
//! round's resume replays what a write-heavy load of small values leaves in
//! the log (many deltas over scattered pages) rather than the quiet end of
//! a bulk fill; `DBSIZE` is then checked to lie between the dataset's keys
//! and those plus 100 000. The key of round 0 is the last one acknowledged; the others are
//! spread over the dataset. A last resume reads every key back (pipelined
//! GETs, all verified): spawn → all verified ("cold": every page of the
//! dataset is faulted in on first touch), then a second full read ("warm").
//!
//! **redis.** `redis-server --appendonly yes --appendfsync everysec --save ''
//! --auto-aof-rewrite-percentage 0` (no automatic rewrite, so the AOF is the
//! plain command log) with its dir in `--dir`, filled with the same keys and
//! values the same way; after 1.5 s (everysec) it gets SIGKILL, and `--rounds`
//! times: restart with the same arguments, spawn → first correct reply to the
//! same GETs (`-LOADING` replies are polled through), DBSIZE checked, SIGKILL.
//! Then `BGREWRITEAOF` (the AOF base becomes an RDB preamble, as a redis with
//! automatic rewrite would have at some point) and the same rounds again,
//! and the same full reads. Redis' own "DB loaded from append only file: X
//! seconds" is reported too.
//!
//! With `--activate` nvhv runs under socket activation, as under a service
//! manager: this program holds the listening socket for the whole size and
//! passes it to every nvhv it starts (`benches/support`'s
//! `socket_activated`), and in each round the client connects right after
//! the previous nvhv was killed, before the resume is spawned: it waits in
//! the socket's queue instead of being refused, and the time is still
//! taken from the spawn.
//!
//! With `--standby`, after those rounds (before the full read): a plain
//! resume, then `--rounds` times a standby (`nvhv resume --standby`) is
//! started beside the running nvhv and waited for until it stands by, the
//! running nvhv gets SIGKILL, and the time from that signal to the first
//! correct GET through the standby is taken (see `standby_rounds`).
//!
//! All servers are started by this program on free loopback ports and
//! stopped by their own pids only. The machine is shared: the load average
//! is printed with each size; compare within a row.

mod support;

use support::{ensure_redis_server, free_port, is_tmpfs, nvhv, push_cmd, socket_activated};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

const MIB: u64 = 1 << 20;

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 1024
}

/// Free bytes in the file system holding `dir`.
fn fs_free(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    // SAFETY: statvfs fills the struct we pass; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Bytes allocated to the files under `p` (a file or a directory tree).
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if m.is_dir() {
        std::fs::read_dir(p)
            .map(|d| d.flatten().map(|e| allocated(&e.path())).sum())
            .unwrap_or(0)
    } else {
        m.blocks() * 512
    }
}

/// Sizes (bytes) of the files in a directory, by name.
fn dir_files(p: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    m.is_file()
                        .then(|| (e.file_name().to_string_lossy().into_owned(), m.len()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ---------------------------------------------------------------- RESP

#[derive(Debug)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(#[allow(dead_code)] i64),
}

fn read_reply(r: &mut impl BufRead) -> std::io::Result<Reply> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad RESP reply");
    let text = String::from_utf8_lossy(&line[1..]).into_owned();
    Ok(match line[0] {
        b'+' => Reply::Simple(text),
        b'-' => Reply::Error(text),
        b':' => Reply::Int(text.parse().map_err(|_| bad())?),
        b'*' => Reply::Array(text.parse().map_err(|_| bad())?),
        b'$' => {
            let n: i64 = text.parse().map_err(|_| bad())?;
            if n < 0 {
                Reply::Bulk(None)
            } else {
                let mut v = vec![0u8; n as usize + 2];
                r.read_exact(&mut v)?;
                v.truncate(n as usize);
                Reply::Bulk(Some(v))
            }
        }
        _ => return Err(bad()),
    })
}

/// One command on a fresh connection.
fn command(port: u16, args: &[&[u8]]) -> Result<Reply, String> {
    let s = TcpStream::connect_timeout(&addr(port), Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = Vec::new();
    push_cmd(&mut buf, args);
    (&s).write_all(&buf).map_err(|e| format!("write: {e}"))?;
    read_reply(&mut BufReader::new(&s)).map_err(|e| format!("read: {e}"))
}

fn dbsize(port: u16) -> Result<u64, String> {
    match command(port, &[b"DBSIZE"])? {
        Reply::Int(n) => Ok(n as u64),
        r => Err(format!("DBSIZE: {r:?}")),
    }
}

/// `used_memory` from `INFO memory`.
fn used_memory(port: u16) -> Option<u64> {
    match command(port, &[b"INFO", b"memory"]).ok()? {
        Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v).lines().find_map(|l| {
            l.strip_prefix("used_memory:")
                .and_then(|x| x.trim().parse().ok())
        }),
        _ => None,
    }
}

fn info_field(port: u16, section: &[u8], key: &str) -> Option<String> {
    match command(port, &[b"INFO", section]).ok()? {
        Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v).lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|x| x.strip_prefix(':'))
                .map(|x| x.trim().to_string())
        }),
        _ => None,
    }
}

// ---------------------------------------------------------------- dataset

/// The keys of one size: connection `c` writes indices `ranges[c]`.
#[derive(Clone)]
struct Dataset {
    seed: u64,
    value_size: usize,
    ranges: Vec<Range<u64>>,
}

impl Dataset {
    fn planned(seed: u64, bytes: u64, value_size: usize, conns: usize) -> Dataset {
        let n = bytes.div_ceil(value_size as u64);
        let per = n.div_ceil(conns as u64);
        let ranges = (0..conns as u64)
            .map(|c| (c * per).min(n)..((c + 1) * per).min(n))
            .filter(|r| !r.is_empty())
            .collect();
        Dataset {
            seed,
            value_size,
            ranges,
        }
    }

    fn n(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    fn bytes(&self) -> u64 {
        self.n() * self.value_size as u64
    }

    /// The `k`-th key index overall (`k < n`).
    fn nth(&self, mut k: u64) -> u64 {
        for r in &self.ranges {
            let len = r.end - r.start;
            if k < len {
                return r.start + k;
            }
            k -= len;
        }
        panic!("key {k} out of range")
    }

    fn key(i: u64) -> String {
        format!("rec:{i:09}")
    }

    fn value(&self, i: u64, out: &mut Vec<u8>) {
        out.clear();
        out.resize(self.value_size, 0);
        let mut x = splitmix(self.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
        for ch in out.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ch.copy_from_slice(&x.to_le_bytes()[..ch.len()]);
        }
    }

    /// The key a round asks for: round 0 the last key acknowledged, then
    /// keys spread over the dataset.
    fn probe(&self, round: usize) -> u64 {
        if round == 0 {
            let r = self.ranges.last().unwrap();
            return r.end - 1;
        }
        self.nth((round as u64).wrapping_mul(0x9E37_79B9) % self.n())
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------- pipelines

/// Runs one pipelined stream of commands per range (one connection each, at
/// most `window` commands in flight), `make` appending the command for index
/// `i`, `check` judging its reply. Stops sending at `deadline`. Returns how
/// many commands of each range were answered (and passed `check`).
fn pipeline(
    port: u16,
    ranges: &[Range<u64>],
    window: usize,
    deadline: Option<Instant>,
    make: &(dyn Fn(u64, &mut Vec<u8>) + Sync),
    check: &(dyn Fn(u64, Reply) -> Result<(), String> + Sync),
    progress: &AtomicU64,
) -> Result<Vec<u64>, String> {
    let stop = AtomicBool::new(false);
    let err: Mutex<Option<String>> = Mutex::new(None);
    let fail = |e: String| {
        stop.store(true, Ordering::Relaxed);
        err.lock().unwrap().get_or_insert(e);
    };
    let done: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = ranges
            .iter()
            .cloned()
            .map(|range| {
                let (stop, fail) = (&stop, &fail);
                s.spawn(move || -> u64 {
                    let stream =
                        match TcpStream::connect_timeout(&addr(port), Duration::from_secs(5)) {
                            Ok(st) => st,
                            Err(e) => {
                                fail(format!("connect: {e}"));
                                return 0;
                            }
                        };
                    stream.set_nodelay(true).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .unwrap();
                    let rstream = stream.try_clone().unwrap();
                    let (tx, rx) = mpsc::sync_channel::<Option<u64>>(window);
                    let reader = s.spawn(move || -> u64 {
                        let mut r = BufReader::with_capacity(256 << 10, rstream);
                        let mut n = 0;
                        while let Ok(Some(i)) = rx.recv() {
                            let rep = match read_reply(&mut r) {
                                Ok(rep) => rep,
                                Err(e) => {
                                    fail(format!("reading the reply for key {i}: {e}"));
                                    break;
                                }
                            };
                            if let Err(e) = check(i, rep) {
                                fail(e);
                                break;
                            }
                            n += 1;
                            progress.fetch_add(1, Ordering::Relaxed);
                        }
                        n
                    });
                    let mut w = &stream;
                    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
                    let mut flush = |buf: &mut Vec<u8>| -> bool {
                        let ok = buf.is_empty() || w.write_all(buf).is_ok();
                        buf.clear();
                        ok
                    };
                    let mut ok = true;
                    for i in range {
                        if stop.load(Ordering::Relaxed)
                            || deadline.is_some_and(|d| Instant::now() > d)
                        {
                            break;
                        }
                        match tx.try_send(Some(i)) {
                            Ok(()) => {}
                            Err(TrySendError::Full(v)) => {
                                ok = flush(&mut buf);
                                if !ok || tx.send(v).is_err() {
                                    break;
                                }
                            }
                            Err(TrySendError::Disconnected(_)) => break,
                        }
                        make(i, &mut buf);
                        if buf.len() >= 256 << 10 {
                            ok = flush(&mut buf);
                            if !ok {
                                break;
                            }
                        }
                    }
                    if ok {
                        ok = flush(&mut buf);
                    }
                    if !ok {
                        fail("write to the server failed".into());
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                    }
                    let _ = tx.send(None);
                    drop(tx);
                    reader.join().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    match err.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// Reports progress every 10 s while `f` runs.
fn with_progress<T>(what: &str, total: u64, unit: u64, f: impl FnOnce(&AtomicU64) -> T) -> T {
    let progress = AtomicU64::new(0);
    let finished = AtomicBool::new(false);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut last = Instant::now();
            while !finished.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() >= Duration::from_secs(10) {
                    last = Instant::now();
                    let n = progress.load(Ordering::Relaxed);
                    eprintln!(
                        "  {what}: {n}/{total} after {:.0} s ({:.0} MiB/s)",
                        t0.elapsed().as_secs_f64(),
                        (n * unit) as f64 / MIB as f64 / t0.elapsed().as_secs_f64()
                    );
                }
            }
        });
        let r = f(&progress);
        finished.store(true, Ordering::Relaxed);
        r
    })
}

/// SETs the planned dataset; returns the dataset actually written (all of it
/// unless `timeout` stopped the writers) and the time taken.
fn fill(
    port: u16,
    plan: &Dataset,
    window: usize,
    timeout: Duration,
) -> Result<(Dataset, Duration), String> {
    let make = |i: u64, buf: &mut Vec<u8>| {
        let mut v = Vec::new();
        plan.value(i, &mut v);
        push_cmd(buf, &[b"SET", Dataset::key(i).as_bytes(), &v]);
    };
    let check = |i: u64, r: Reply| match r {
        Reply::Simple(s) if s == "OK" => Ok(()),
        r => Err(format!("SET {}: {r:?}", Dataset::key(i))),
    };
    let t0 = Instant::now();
    let done = with_progress("SET", plan.n(), plan.value_size as u64, |p| {
        pipeline(
            port,
            &plan.ranges,
            window,
            Some(t0 + timeout),
            &make,
            &check,
            p,
        )
    })?;
    let took = t0.elapsed();
    let mut ds = plan.clone();
    ds.ranges = plan
        .ranges
        .iter()
        .zip(done)
        .map(|(r, d)| r.start..r.start + d)
        .collect();
    Ok((ds, took))
}

/// GETs every key and compares every value; returns the time taken.
fn read_all(port: u16, ds: &Dataset, window: usize) -> Result<Duration, String> {
    let make = |i: u64, buf: &mut Vec<u8>| push_cmd(buf, &[b"GET", Dataset::key(i).as_bytes()]);
    let check = |i: u64, r: Reply| {
        let mut want = Vec::new();
        ds.value(i, &mut want);
        match r {
            Reply::Bulk(Some(v)) if v == want => Ok(()),
            Reply::Bulk(Some(v)) => Err(format!(
                "GET {}: WRONG value ({} bytes, expected {})",
                Dataset::key(i),
                v.len(),
                want.len()
            )),
            r => Err(format!("GET {}: {r:?}", Dataset::key(i))),
        }
    };
    let t0 = Instant::now();
    let done = with_progress("GET", ds.n(), ds.value_size as u64, |p| {
        pipeline(port, &ds.ranges, window, None, &make, &check, p)
    })?;
    let n: u64 = done.iter().sum();
    if n != ds.n() {
        return Err(format!("full read: {n} of {} keys answered", ds.n()));
    }
    Ok(t0.elapsed())
}

// ---------------------------------------------------------------- processes

/// A process we started; SIGKILLed by its pid (if still running) when dropped.
struct Proc {
    child: Child,
    /// stderr lines (nvhv) as read so far.
    lines: Arc<Mutex<Vec<String>>>,
    /// (time read, line) of the first stderr line containing the marker.
    marker: Option<mpsc::Receiver<(Instant, String)>>,
}

impl Proc {
    /// Spawns `cmd`; stderr piped and collected when `marker` is given (and
    /// the first line containing it reported), else stdout/stderr to `log`.
    fn spawn(mut cmd: Command, marker: Option<&str>, log: Option<&Path>) -> Result<Proc, String> {
        cmd.stdin(Stdio::null());
        match log {
            Some(l) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(l)
                    .unwrap();
                cmd.stdout(f.try_clone().unwrap()).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            }
        }
        let mut child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut rx_marker = None;
        if let Some(err) = child.stderr.take() {
            let (tx, rx) = mpsc::channel();
            rx_marker = Some(rx);
            let marker = marker.unwrap_or("\u{0}").to_string();
            let lines = lines.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(err);
                let mut line = String::new();
                let mut sent = false;
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    if !sent && line.contains(&marker) {
                        let _ = tx.send((Instant::now(), line.trim_end().to_string()));
                        sent = true;
                    }
                    lines.lock().unwrap().push(line.trim_end().to_string());
                    line.clear();
                }
            });
        }
        Ok(Proc {
            child,
            lines,
            marker: rx_marker,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            _ => None,
        }
    }

    fn stderr(&self) -> String {
        self.lines.lock().unwrap().join(" | ")
    }

    /// SIGKILL by pid (no warning) and reap.
    fn kill9(&mut self) {
        self.send_kill9();
        let _ = self.child.wait();
    }

    /// SIGKILL, not waiting for the process to be reaped.
    fn send_kill9(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls (connect, `GET key`, read) until the value arrives and is correct.
/// Returns the number of attempts, of `-LOADING` replies seen, and the
/// failed attempts by error. Fails on a
/// wrong value, a missing key, the process exiting or the deadline.
fn first_get(
    port: u16,
    key: &str,
    want: &[u8],
    proc_: &mut Proc,
    deadline: Instant,
    early: Option<TcpStream>,
) -> Result<(u32, u32, BTreeMap<String, u32>), String> {
    let mut cmd = Vec::new();
    push_cmd(&mut cmd, &[b"GET", key.as_bytes()]);
    let (mut attempts, mut loading) = (0u32, 0u32);
    // A connection made before the spawn (`--activate`) is used first.
    let mut conn: Option<BufReader<TcpStream>> = early.map(|s| {
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        BufReader::with_capacity(256 << 10, s)
    });
    let mut last_err = String::new();
    let mut errors: BTreeMap<String, u32> = BTreeMap::new();
    loop {
        if Instant::now() > deadline {
            return Err(format!(
                "no correct reply to GET {key} before the deadline ({attempts} attempts, last: {last_err}); stderr: {}",
                proc_.stderr()
            ));
        }
        if let Some(st) = proc_.exited() {
            return Err(format!(
                "exited ({st}) before answering; stderr: {}",
                proc_.stderr()
            ));
        }
        attempts += 1;
        if conn.is_none() {
            match TcpStream::connect_timeout(&addr(port), Duration::from_secs(1)) {
                Ok(s) => {
                    s.set_nodelay(true).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    conn = Some(BufReader::with_capacity(256 << 10, s));
                }
                Err(e) => {
                    last_err = format!("connect: {e}");
                    *errors.entry(last_err.clone()).or_insert(0) += 1;
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
            }
        }
        let c = conn.as_mut().unwrap();
        let reply = c.get_mut().write_all(&cmd).and_then(|()| read_reply(c));
        match reply {
            Ok(Reply::Bulk(Some(v))) if v == want => return Ok((attempts, loading, errors)),
            Ok(Reply::Bulk(Some(v))) => {
                return Err(format!(
                    "GET {key}: WRONG value ({} bytes, expected {})",
                    v.len(),
                    want.len()
                ))
            }
            Ok(Reply::Bulk(None)) => return Err(format!("GET {key}: key MISSING (nil)")),
            Ok(Reply::Error(e)) if e.starts_with("LOADING") => {
                loading += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            Ok(r) => return Err(format!("GET {key}: unexpected reply {r:?}")),
            Err(e) => {
                last_err = format!("GET: {e}");
                *errors.entry(last_err.clone()).or_insert(0) += 1;
                conn = None;
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

// ---------------------------------------------------------------- statistics

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn p50max(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let f = |x: f64| {
        if x >= 100.0 {
            format!("{x:.0}")
        } else if x >= 10.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.2}")
        }
    };
    format!("{} / {}", f(pct(v, 0.5)), f(pct(v, 1.0)))
}

/// X of nvhv's "resumed from epoch N, guest running X ms after …" line (NaN if absent).
fn running_ms(line: &str) -> f64 {
    line.split("guest running ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------- options

struct Opts {
    sizes: Vec<(String, u64)>,
    dir: PathBuf,
    rounds: usize,
    value_size: usize,
    conns: usize,
    window: usize,
    log_size: String,
    fill_timeout: Duration,
    redis: bool,
    full_read: bool,
    churn: Option<Duration>,
    seed: u64,
    activate: bool,
    standby: bool,
}

/// Recovery after `kill -9` with a large dataset: nvhv's kv guest in epoch
/// mode against redis-server reloading the same dataset from its AOF.
///
/// See the module documentation at the top of `benches/recovery.rs` for what
/// is measured and how.
#[derive(Parser)]
#[command(name = "recovery", bin_name = "cargo bench --bench recovery --")]
struct Cli {
    /// Dataset sizes to measure, in turn (comma-separated; K, M, G suffixes).
    #[arg(long, default_value = "256M,1G,4G", value_parser = sizes_arg)]
    sizes: Sizes,
    /// Where the images and redis' files go.
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Timed recoveries per size and server (at least 1).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Bytes per value (K, M, G suffixes).
    #[arg(long, default_value = "32K", value_parser = size_arg)]
    value_size: u64,
    /// Connections that fill (and, with --churn, load) the dataset.
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Commands in flight at most on each connection.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// nvhv's `--log-size`.
    #[arg(long, default_value = "256M")]
    log_size: String,
    /// Seconds a fill may take before it is given up.
    #[arg(long, default_value_t = 240)]
    fill_timeout: u64,
    /// Measure nvhv alone (no redis-server).
    #[arg(long)]
    no_redis: bool,
    /// Skip the last resume's full read of every key.
    #[arg(long)]
    no_full_read: bool,
    /// SIGKILL nvhv under SETs of small changing values sent for SECS seconds.
    #[arg(long, value_name = "SECS")]
    churn: Option<f64>,
    /// Seed of the dataset and the churn (default: from the process id).
    #[arg(long)]
    seed: Option<u64>,
    /// Run nvhv under socket activation, the client connecting before the spawn.
    #[arg(long)]
    activate: bool,
    /// Also time takeovers by a standby (`nvhv resume --standby`).
    #[arg(long)]
    standby: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// `parse_size` for clap.
fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("bad size {s}"))
}

/// The `--sizes` given, each as written and in bytes.
#[derive(Clone)]
struct Sizes(Vec<(String, u64)>);

/// A comma-separated list of sizes, each parsed by `parse_size` and kept as
/// written too.
fn sizes_arg(s: &str) -> Result<Sizes, String> {
    s.split(',')
        .map(|x| size_arg(x).map(|b| (x.to_string(), b)))
        .collect::<Result<_, _>>()
        .map(Sizes)
}

fn opts() -> Opts {
    let cli = Cli::parse();
    Opts {
        sizes: cli.sizes.0,
        dir: cli.dir,
        rounds: cli.rounds.max(1),
        value_size: cli.value_size as usize,
        conns: cli.conns,
        window: cli.window,
        log_size: cli.log_size,
        fill_timeout: Duration::from_secs(cli.fill_timeout),
        redis: !cli.no_redis,
        full_read: !cli.no_full_read,
        churn: cli.churn.map(Duration::from_secs_f64),
        seed: cli.seed.unwrap_or(0x5eed_0000 ^ std::process::id() as u64),
        activate: cli.activate,
        standby: cli.standby,
    }
}

// ---------------------------------------------------------------- results

#[derive(Default)]
struct NvhvResult {
    keys: u64,
    data: u64,
    mem: String,
    fill: Option<Duration>,
    fill_note: Option<String>,
    used_memory: Option<u64>,
    image_alloc: u64,
    inspect: String,
    running_ms: Vec<f64>,
    line_ms: Vec<f64>,
    get_ms: Vec<f64>,
    attempts: Vec<u32>,
    /// `--churn`: SETs acknowledged before each SIGKILL under load.
    churn_acked: Vec<u64>,
    /// Failed polling attempts before the first correct GET, by error.
    errors: BTreeMap<String, u32>,
    full_cold: Option<Duration>,
    full_warm: Option<Duration>,
    /// `--standby`: the "resumed" line's death notice→running, per round.
    standby_running_ms: Vec<f64>,
    /// `--standby`: SIGKILL of the running nvhv → first correct GET.
    standby_get_ms: Vec<f64>,
    /// SIGKILL → reaped, at the end of each plain round.
    reaped_ms: Vec<f64>,
    /// `--standby`: SIGKILL of the running nvhv → it is reaped.
    standby_reaped_ms: Vec<f64>,
    error: Option<String>,
}

#[derive(Default)]
struct RedisPhase {
    get_ms: Vec<f64>,
    loaded_s: Vec<f64>,
    loading_replies: Vec<u32>,
    aof_bytes: u64,
    files: Vec<(String, u64)>,
}

#[derive(Default)]
struct RedisResult {
    fill: Option<Duration>,
    used_memory: Option<u64>,
    plain: RedisPhase,
    rewritten: RedisPhase,
    full_cold: Option<Duration>,
    full_warm: Option<Duration>,
    error: Option<String>,
}

// ---------------------------------------------------------------- nvhv side

fn nvhv_side(o: &Opts, size: u64, tag: &str, plan: &Dataset) -> (NvhvResult, Option<Dataset>) {
    let mut res = NvhvResult::default();
    let img = o.dir.join(format!("{tag}.img"));
    let ctl = PathBuf::from(format!("{}.ctl", img.display()));
    let mem_mib = (size * 3 / 2 + 256 * MIB).div_ceil(2 * MIB) * 2;
    res.mem = format!("{mem_mib}M");
    let out = (|| -> Result<Dataset, String> {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        // --activate: the socket every nvhv of this size serves, held here.
        let sock = o
            .activate
            .then(|| std::net::TcpListener::bind(addr(port)))
            .transpose()
            .map_err(|e| format!("bind {listen}: {e}"))?;
        let serve = |cmd: &mut Command| match &sock {
            Some(l) => socket_activated(cmd, l),
            None => {
                cmd.args(["--listen", &listen]);
            }
        };
        let img_s = img.to_str().unwrap();
        let mut cmd = Command::new(nvhv());
        cmd.args(["run", "--image", img_s, "--force", "--persist", "epoch"])
            .args(["--mem", &res.mem, "--log-size", &o.log_size])
            .args(["--console", "/dev/null"]);
        serve(&mut cmd);
        eprintln!("nvhv: {cmd:?}");
        let mut p = Proc::spawn(cmd, Some("running"), None)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = p.exited() {
                return Err(format!("nvhv run exited ({st}): {}", p.stderr()));
            }
            if matches!(command(port, &[b"PING"]), Ok(Reply::Simple(s)) if s == "PONG") {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("nvhv run: no PONG within 30 s: {}", p.stderr()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (ds, took) = fill(port, plan, o.window, o.fill_timeout).map_err(|e| {
            format!(
                "fill FAILED: {e}; nvhv alive: {}; stderr: {}",
                p.exited().is_none(),
                p.stderr()
            )
        })?;
        res.fill = Some(took);
        if ds.n() < plan.n() {
            res.fill_note = Some(format!(
                "fill stopped by --fill-timeout after {:.0} s: {} of {} keys ({}) written",
                took.as_secs_f64(),
                ds.n(),
                plan.n(),
                human(ds.bytes())
            ));
        }
        res.keys = ds.n();
        res.data = ds.bytes();
        eprintln!(
            "  nvhv fill: {} keys, {} in {:.1} s ({:.0} MiB/s)",
            ds.n(),
            human(ds.bytes()),
            took.as_secs_f64(),
            ds.bytes() as f64 / MIB as f64 / took.as_secs_f64()
        );
        let n = dbsize(port)?;
        if n != ds.n() {
            return Err(format!("DBSIZE {n} after the fill, expected {}", ds.n()));
        }
        res.used_memory = used_memory(port);
        // No warning.
        p.kill9();
        let _ = std::fs::remove_file(&ctl);
        res.image_alloc = allocated(&img);
        res.inspect = inspect_summary(&img);
        eprintln!("  after SIGKILL: {}", res.inspect);

        let mut w = vec![0u8; 0];
        for round in 0..o.rounds + o.full_read as usize {
            let full = round == o.rounds;
            if full && o.standby {
                // Before the full read, whose GETs leave a log of their own:
                // the standby rounds start from the log the plain ones had.
                standby_rounds(o, &img, &ds, port, &serve, &mut res)?;
            }
            let probe = ds.probe(round);
            ds.value(probe, &mut w);
            let mut cmd = Command::new(nvhv());
            cmd.args(["resume", "--image", img_s, "--console", "/dev/null"]);
            serve(&mut cmd);
            // --activate: a client that connected while nothing ran.
            let early = sock
                .as_ref()
                .map(|_| TcpStream::connect(addr(port)))
                .transpose()
                .map_err(|e| format!("round {round}: connect while nvhv is down: {e}"))?;
            let t0 = Instant::now();
            let mut p = Proc::spawn(cmd, Some("resumed"), None)?;
            if full {
                // Wait until it serves, then read everything back.
                first_get(
                    port,
                    &Dataset::key(probe),
                    &w,
                    &mut p,
                    t0 + Duration::from_secs(60),
                    early,
                )
                .map_err(|e| format!("full-read round: nvhv resume: {e}"))?;
                read_all(port, &ds, o.window)
                    .map_err(|e| format!("full read after resume: {e}; stderr {}", p.stderr()))?;
                res.full_cold = Some(t0.elapsed());
                res.full_warm = Some(read_all(port, &ds, o.window)?);
            } else {
                let (attempts, _, errors) = first_get(
                    port,
                    &Dataset::key(probe),
                    &w,
                    &mut p,
                    t0 + Duration::from_secs(60),
                    early,
                )
                .map_err(|e| format!("round {round}: nvhv resume: {e}"))?;
                let t_get = t0.elapsed();
                let (t_line, line) = p
                    .marker
                    .as_ref()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(10))
                    .map_err(|_| format!("no 'resumed' line: {}", p.stderr()))?;
                let x = running_ms(&line);
                res.running_ms.push(x);
                res.line_ms.push(ms(t_line - t0));
                res.get_ms.push(ms(t_get));
                res.attempts.push(attempts);
                eprintln!(
                    "  round {round}: resumed→running {x:.2} ms, spawn→line {:.2} ms, spawn→GET {} ok {:.2} ms ({attempts} attempts; failed: {errors:?})",
                    ms(t_line - t0),
                    Dataset::key(probe),
                    ms(t_get)
                );
                for (e, k) in errors {
                    *res.errors.entry(e).or_insert(0) += k;
                }
                let n = dbsize(port)?;
                let churned = if res.churn_acked.is_empty() {
                    0
                } else {
                    CHURN_KEYS
                };
                if n < ds.n() || n > ds.n() + churned {
                    return Err(format!(
                        "round {round}: DBSIZE {n} after resume, expected {}{}",
                        ds.n(),
                        if churned > 0 {
                            format!(" to {}", ds.n() + churned)
                        } else {
                            String::new()
                        }
                    ));
                }
                if let Some(secs) = o
                    .churn
                    .filter(|_| round + 1 < o.rounds + o.full_read as usize)
                {
                    let acked = churn_until_killed(port, o, round, secs, &mut p);
                    res.churn_acked.push(acked);
                    eprintln!(
                        "  churn: {acked} SETs acknowledged in {:.1} s, then SIGKILL; {}",
                        secs.as_secs_f64(),
                        inspect_brief(&img)
                    );
                }
            }
            let tk = Instant::now();
            p.kill9();
            res.reaped_ms.push(ms(tk.elapsed()));
            let _ = std::fs::remove_file(&ctl);
        }
        if o.standby && !o.full_read {
            standby_rounds(o, &img, &ds, port, &serve, &mut res)?;
        }
        Ok(ds)
    })();
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(&ctl);
    match out {
        Ok(ds) => (res, Some(ds)),
        Err(e) => {
            res.error = Some(e);
            (res, None)
        }
    }
}

/// `--standby`: a plain resume first; then, `--rounds` times, a standby is
/// started beside the running nvhv (and waited for until it says it stands
/// by), the running nvhv gets SIGKILL, and the time from that signal to the
/// first correct GET (through the standby, on a connection opened after
/// the signal) is taken, with the standby's own freed→running figure. The
/// standby is then the running nvhv of the next round. Quiet kills (no
/// churn).
fn standby_rounds(
    o: &Opts,
    img: &Path,
    ds: &Dataset,
    port: u16,
    serve: &dyn Fn(&mut Command),
    res: &mut NvhvResult,
) -> Result<(), String> {
    let img_s = img.to_str().unwrap();
    let ctl = PathBuf::from(format!("{}.ctl", img.display()));
    let resume = |standby: bool| {
        let mut cmd = Command::new(nvhv());
        cmd.args(["resume", "--image", img_s, "--console", "/dev/null"]);
        if standby {
            cmd.arg("--standby");
        }
        serve(&mut cmd);
        cmd
    };
    let mut w = Vec::new();
    let probe = ds.probe(0);
    ds.value(probe, &mut w);
    let mut running = Proc::spawn(resume(false), Some("resumed"), None)?;
    first_get(
        port,
        &Dataset::key(probe),
        &w,
        &mut running,
        Instant::now() + Duration::from_secs(60),
        None,
    )
    .map_err(|e| format!("standby rounds: first resume: {e}"))?;
    for round in 0..o.rounds {
        let probe = ds.probe(round);
        ds.value(probe, &mut w);
        let mut sb = Proc::spawn(resume(true), Some("standing by"), None)?;
        let (_, ready) = sb
            .marker
            .as_ref()
            .unwrap()
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| {
                format!(
                    "standby round {round}: no 'standing by' line: {}",
                    sb.stderr()
                )
            })?;
        // SIGKILL here, before the first GET (sent from a thread of its own,
        // the kill raced the GETs: a GET the running nvhv answered before it
        // died counted as the standby's, 1.6-2.3 ms "takeovers"), then the
        // reaping on a thread of its own (its exit frees its memory before
        // the kernel drops its image lock), the GETs through the standby on
        // this one.
        let t0 = Instant::now();
        running.send_kill9();
        let (got, t_reaped) = std::thread::scope(|s| {
            let reaper = s.spawn(|| {
                running.kill9();
                t0.elapsed()
            });
            let got = first_get(
                port,
                &Dataset::key(probe),
                &w,
                &mut sb,
                t0 + Duration::from_secs(60),
                None,
            )
            .map(|r| (r, t0.elapsed()));
            (got, reaper.join().unwrap())
        });
        let ((attempts, _, errors), t_get) =
            got.map_err(|e| format!("standby round {round}: {e}"))?;
        // The control socket stays: it is the standby's now (it replaced the
        // dead process's), and the next standby asks it for the listening
        // sockets.
        // The "resumed" line is read by another thread: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let line = loop {
            let found = sb
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains("resumed"))
                .cloned();
            match found {
                Some(l) => break l,
                None if Instant::now() > deadline => break String::new(),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let x = running_ms(&line);
        res.standby_running_ms.push(x);
        res.standby_get_ms.push(ms(t_get));
        res.standby_reaped_ms.push(ms(t_reaped));
        eprintln!(
            "  standby round {round}: {} | SIGKILL→reaped {:.2} ms, notice→running {x:.2} ms, SIGKILL→GET {} ok {:.2} ms ({attempts} attempts; failed: {errors:?})",
            ready.trim_start_matches("nvhv: "),
            ms(t_reaped),
            Dataset::key(probe),
            ms(t_get)
        );
        let n = dbsize(port)?;
        if n != ds.n() {
            return Err(format!(
                "standby round {round}: DBSIZE {n} after the takeover, expected {}",
                ds.n()
            ));
        }
        running = sb;
    }
    running.kill9();
    let _ = std::fs::remove_file(&ctl);
    Ok(())
}

/// `--churn`: the keys the churn load writes (`churn:0` … `churn:99999`).
const CHURN_KEYS: u64 = 100_000;

/// Sends pipelined SETs of small changing values to random churn keys over
/// `--conns` connections for `secs`, SIGKILLs `p` while they are in flight,
/// and returns how many were acknowledged (the writers' errors after the
/// kill are expected and dropped).
fn churn_until_killed(port: u16, o: &Opts, round: usize, secs: Duration, p: &mut Proc) -> u64 {
    let seed = o.seed ^ (round as u64).wrapping_mul(0xA24B_AED4_963E_E407);
    let make = |i: u64, buf: &mut Vec<u8>| {
        let key = format!("churn:{}", splitmix(seed ^ i) % CHURN_KEYS);
        let value = format!("v:{}", splitmix(!seed ^ i) % 1_000_000);
        push_cmd(buf, &[b"SET", key.as_bytes(), value.as_bytes()]);
    };
    let check = |i: u64, r: Reply| match r {
        Reply::Simple(s) if s == "OK" => Ok(()),
        r => Err(format!("churn SET {i}: {r:?}")),
    };
    let ranges: Vec<Range<u64>> = (0..o.conns as u64)
        .map(|c| c << 40..(c + 1) << 40)
        .collect();
    let acked = AtomicU64::new(0);
    std::thread::scope(|s| {
        let writers = s.spawn(|| {
            let deadline = Instant::now() + secs + Duration::from_secs(30);
            pipeline(
                port,
                &ranges,
                o.window,
                Some(deadline),
                &make,
                &check,
                &acked,
            )
        });
        // The load's length, not a synchronisation: the kill is meant to
        // land at an arbitrary point of it.
        std::thread::sleep(secs);
        p.kill9();
        let _ = writers.join();
    });
    acked.load(Ordering::Relaxed)
}

/// `nvhv inspect --json` of `img`, or what went wrong, in words.
fn inspect_json(img: &Path) -> Result<serde_json::Value, String> {
    let out = Command::new(nvhv())
        .args(["inspect", img.to_str().unwrap(), "--json"])
        .output()
        .map_err(|_| "inspect failed to run".to_string())?;
    serde_json::from_slice(&out.stdout)
        .map_err(|_| format!("inspect: {}", String::from_utf8_lossy(&out.stderr).trim()))
}

/// The log records a resume of `img` would replay, from `nvhv inspect`.
fn inspect_brief(img: &Path) -> String {
    let j = match inspect_json(img) {
        Ok(j) => j,
        Err(e) => return e,
    };
    let epochs = j["replay_epochs"].as_array().map_or(0, Vec::len);
    format!(
        "resumable {}, {} records to replay ({})",
        j["resumable"],
        epochs,
        human(j["log_pending_bytes"].as_u64().unwrap_or(0))
    )
}

fn inspect_summary(img: &Path) -> String {
    let j = match inspect_json(img) {
        Ok(j) => j,
        Err(e) => return e,
    };
    let recs: Vec<String> = j["log_records"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    format!(
                        "half {} epoch {} {} pages {}{}",
                        r["half"],
                        r["epoch"],
                        r["pages"],
                        r["state"].as_str().unwrap_or("?"),
                        if r["replay"].as_bool() == Some(true) {
                            " replay"
                        } else {
                            ""
                        }
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "epoch {}, resumable {}, replay {} ({}), log records: {}",
        j["epoch"],
        j["resumable"],
        j["replay_epochs"],
        human(j["log_pending_bytes"].as_u64().unwrap_or(0)),
        recs.join("; ")
    )
}

// ---------------------------------------------------------------- redis side

fn redis_side(o: &Opts, tag: &str, ds: &Dataset) -> RedisResult {
    let mut res = RedisResult::default();
    let rdir = o.dir.join(format!("{tag}-redis"));
    let _ = std::fs::remove_dir_all(&rdir);
    std::fs::create_dir_all(&rdir).unwrap();
    let log = rdir.join("redis.log");
    let port = free_port();
    let cmd = || {
        let mut c = Command::new("redis-server");
        c.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "no"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--auto-aof-rewrite-percentage", "0"])
            .args(["--dir", rdir.to_str().unwrap()])
            .args(["--logfile", log.to_str().unwrap()]);
        c
    };
    let aofdir = rdir.join("appendonlydir");
    let out = (|| -> Result<(), String> {
        let mut p = Proc::spawn(cmd(), None, Some(&log))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(command(port, &[b"PING"]), Ok(Reply::Simple(s)) if s == "PONG") {
            if p.exited().is_some() || Instant::now() > deadline {
                return Err(format!("redis-server did not start: {}", tail(&log)));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (wrote, took) = fill(port, ds, o.window, Duration::from_secs(3600))?;
        if wrote.n() != ds.n() {
            return Err(format!("redis fill wrote {} of {} keys", wrote.n(), ds.n()));
        }
        res.fill = Some(took);
        eprintln!(
            "  redis fill: {:.1} s ({:.0} MiB/s)",
            took.as_secs_f64(),
            ds.bytes() as f64 / MIB as f64 / took.as_secs_f64()
        );
        let n = dbsize(port)?;
        if n != ds.n() {
            return Err(format!(
                "redis DBSIZE {n} after the fill, expected {}",
                ds.n()
            ));
        }
        res.used_memory = used_memory(port);
        // appendfsync everysec: let the last second reach the AOF.
        std::thread::sleep(Duration::from_millis(1500));
        p.kill9();

        let mut w = Vec::new();
        for phase in 0..2 {
            for round in 0..o.rounds {
                let probe = ds.probe(round);
                ds.value(probe, &mut w);
                let log_len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
                let t0 = Instant::now();
                let mut p = Proc::spawn(cmd(), None, Some(&log))?;
                let (_, loading, _) = first_get(
                    port,
                    &Dataset::key(probe),
                    &w,
                    &mut p,
                    t0 + Duration::from_secs(600),
                    None,
                )
                .map_err(|e| format!("round {round}: redis restart: {e}; log: {}", tail(&log)))?;
                let t_get = t0.elapsed();
                let loaded = std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .get(log_len as usize..)
                    .unwrap_or("")
                    .lines()
                    .rev()
                    .find_map(|l| {
                        l.split("DB loaded from append only file: ")
                            .nth(1)
                            .and_then(|r| r.split_whitespace().next())
                            .and_then(|v| v.parse::<f64>().ok())
                    })
                    .unwrap_or(f64::NAN);
                let ph = if phase == 0 {
                    &mut res.plain
                } else {
                    &mut res.rewritten
                };
                ph.get_ms.push(ms(t_get));
                ph.loaded_s.push(loaded);
                ph.loading_replies.push(loading);
                eprintln!(
                    "  redis {} round {round}: spawn→GET ok {:.1} ms (redis: loaded in {loaded} s; {loading} LOADING replies)",
                    if phase == 0 { "AOF" } else { "rewritten AOF" },
                    ms(t_get)
                );
                let n = dbsize(port)?;
                if n != ds.n() {
                    return Err(format!(
                        "round {round}: redis DBSIZE {n} after restart, expected {}",
                        ds.n()
                    ));
                }
                let last_round = round + 1 == o.rounds;
                if last_round {
                    ph.aof_bytes = allocated(&aofdir);
                    ph.files = dir_files(&aofdir);
                }
                if phase == 0 && last_round {
                    // Rewrite: the base becomes an RDB preamble.
                    match command(port, &[b"BGREWRITEAOF"])? {
                        Reply::Simple(_) => {}
                        r => return Err(format!("BGREWRITEAOF: {r:?}")),
                    }
                    let deadline = Instant::now() + Duration::from_secs(600);
                    std::thread::sleep(Duration::from_millis(100));
                    while info_field(port, b"persistence", "aof_rewrite_in_progress").as_deref()
                        != Some("0")
                        || info_field(port, b"persistence", "aof_rewrite_scheduled").as_deref()
                            != Some("0")
                    {
                        if Instant::now() > deadline {
                            return Err("BGREWRITEAOF did not finish in 600 s".into());
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let st = info_field(port, b"persistence", "aof_last_bgrewrite_status");
                    if st.as_deref() != Some("ok") {
                        return Err(format!("BGREWRITEAOF status {st:?}: {}", tail(&log)));
                    }
                    std::thread::sleep(Duration::from_millis(1500));
                }
                p.kill9();
            }
        }
        if o.full_read {
            let t0 = Instant::now();
            let mut p = Proc::spawn(cmd(), None, Some(&log))?;
            let deadline = t0 + Duration::from_secs(600);
            // Wait until it serves (GETs during loading get -LOADING).
            ds.value(ds.probe(0), &mut w);
            first_get(port, &Dataset::key(ds.probe(0)), &w, &mut p, deadline, None)?;
            read_all(port, ds, o.window)?;
            res.full_cold = Some(t0.elapsed());
            res.full_warm = Some(read_all(port, ds, o.window)?);
            p.kill9();
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&rdir);
    if let Err(e) = out {
        res.error = Some(e);
    }
    res
}

fn bytes_cell(b: u64) -> String {
    if b == 0 {
        "–".into()
    } else {
        format!("{b} ({})", human(b))
    }
}

fn tail(p: &Path) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

// ---------------------------------------------------------------- main

fn main() {
    let o = opts();
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("recovery bench: /dev/kvm not available, nothing measured");
        return;
    }
    std::fs::create_dir_all(&o.dir).unwrap();
    let redis_ok = o.redis
        && match ensure_redis_server() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("{e}: measuring nvhv alone");
                false
            }
        };
    let redis_version = Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let t_start = Instant::now();
    let mut notes: Vec<String> = Vec::new();
    let mut rows: Vec<(String, NvhvResult, Option<RedisResult>, String)> = Vec::new();
    for (name, size) in &o.sizes {
        let size = *size;
        let tag = format!("nvhv-bench-recovery-{}-{name}", std::process::id());
        let log_bytes = parse_size(&o.log_size).unwrap_or(128 * MIB);
        // nvhv: its private copy of the written RAM + the image (RAM applied
        // + both log halves); redis: its heap (+25% for jemalloc's size
        // classes) + the AOF + a rewritten base while the old AOF exists.
        let need_mem = (2 * size + 2 * log_bytes).max(13 * size / 4) + 512 * MIB;
        let tmpfs = is_tmpfs(&o.dir);
        let need_mem = if tmpfs {
            need_mem
        } else {
            (size + 2 * log_bytes).max(5 * size / 4) + 512 * MIB
        };
        let need_disk = (size + 2 * log_bytes).max(2 * size) + 256 * MIB;
        let (avail, free) = (meminfo("MemAvailable"), fs_free(&o.dir));
        let load = loadavg();
        eprintln!(
            "== {name}: MemAvailable {}, free in {} {}, load {load}",
            human(avail),
            o.dir.display(),
            human(free)
        );
        if avail < need_mem || free < need_disk {
            notes.push(format!(
                "{name}: SKIPPED: needs ~{} of memory and ~{} in {} (available {} / {})",
                human(need_mem),
                human(need_disk),
                o.dir.display(),
                human(avail),
                human(free)
            ));
            continue;
        }
        let plan = Dataset::planned(o.seed ^ size, size, o.value_size, o.conns);
        let (nv, ds) = nvhv_side(&o, size, &tag, &plan);
        if let Some(e) = &nv.error {
            eprintln!("  nvhv FAILED: {e}");
            notes.push(format!("{name}: nvhv FAILED: {e}"));
        }
        if let Some(n) = &nv.fill_note {
            notes.push(format!("{name}: {n}"));
        }
        // Redis gets the dataset nvhv actually holds (all of it unless the
        // fill timed out); if nvhv failed before that, the planned one.
        let rd = redis_ok.then(|| {
            let ds = ds.clone().unwrap_or_else(|| plan.clone());
            let r = redis_side(&o, &tag, &ds);
            if let Some(e) = &r.error {
                eprintln!("  redis FAILED: {e}");
                notes.push(format!("{name}: redis FAILED: {e}"));
            }
            r
        });
        rows.push((name.clone(), nv, rd, format!("{load} → {}", loadavg())));
    }

    // ------------------------------------------------------------ report
    println!("# Recovery after SIGKILL: nvhv epoch mode vs redis-server AOF\n");
    println!(
        "{}; {} CPUs; files in {} ({}); values {} B, {} connections × {} in flight; \
         nvhv --persist epoch --log-size {} --mem 1.5×S+256M{}; {} rounds per size; total {:.0} s\n",
        if redis_ok {
            redis_version.as_str()
        } else {
            "no redis-server"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        o.dir.display(),
        if is_tmpfs(&o.dir) {
            "tmpfs"
        } else {
            "not tmpfs"
        },
        o.value_size,
        o.conns,
        o.window,
        o.log_size,
        if o.activate {
            ", socket-activated (the client connects before each resume is spawned)"
        } else {
            ""
        },
        o.rounds,
        t_start.elapsed().as_secs_f64()
    );
    println!(
        "| data | keys | nvhv resume→running ms p50 / max | nvhv spawn→\"resumed\" line ms p50 / max | nvhv spawn→first correct GET ms p50 / max | redis restart→first correct GET ms p50 / max (plain AOF) | AOF bytes | redis restart→first correct GET ms p50 / max (after BGREWRITEAOF: RDB base) | rewritten AOF bytes | redis' own \"DB loaded\" s p50 (plain / rewritten) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, nv, rd, _) in &rows {
        let empty = RedisResult::default();
        let r = rd.as_ref().unwrap_or(&empty);
        println!(
            "| {name} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            human(nv.data),
            nv.keys,
            p50max(&nv.running_ms),
            p50max(&nv.line_ms),
            p50max(&nv.get_ms),
            p50max(&r.plain.get_ms),
            bytes_cell(r.plain.aof_bytes),
            p50max(&r.rewritten.get_ms),
            bytes_cell(r.rewritten.aof_bytes),
            if r.plain.loaded_s.is_empty() {
                "–".into()
            } else {
                format!(
                    "{:.3} / {:.3}",
                    pct(&r.plain.loaded_s, 0.5),
                    pct(&r.rewritten.loaded_s, 0.5)
                )
            },
        );
    }
    if rows
        .iter()
        .any(|(_, nv, _, _)| !nv.standby_get_ms.is_empty())
    {
        println!("\nWith a standby (`nvhv resume --standby` started beside the running nvhv, which then gets SIGKILL):\n");
        println!("| data | plain rounds: SIGKILL→reaped ms p50 / max | standby rounds: SIGKILL→reaped ms p50 / max | standby: writer gone (death notice)→running ms p50 / max | standby: SIGKILL→first correct GET ms p50 / max |");
        println!("|---|---|---|---|---|");
        for (name, nv, _, _) in &rows {
            println!(
                "| {name} | {} | {} | {} | {} |",
                p50max(&nv.reaped_ms),
                p50max(&nv.standby_reaped_ms),
                p50max(&nv.standby_running_ms),
                p50max(&nv.standby_get_ms)
            );
        }
    }
    println!("\nFill, memory and full read-back (every key GET and verified):\n");
    println!("| data | nvhv fill s (MiB/s) | redis fill s (MiB/s) | nvhv used_memory | redis used_memory | nvhv image allocated | nvhv spawn→all keys read s (cold) | nvhv full read s (warm) | redis spawn→all keys read s (cold) | redis full read s (warm) | load avg (start → end) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let secs = |d: Option<Duration>| d.map_or("–".into(), |d| format!("{:.2}", d.as_secs_f64()));
    for (name, nv, rd, load) in &rows {
        let empty = RedisResult::default();
        let r = rd.as_ref().unwrap_or(&empty);
        let rate = |d: Option<Duration>| {
            d.map_or("–".into(), |d| {
                format!(
                    "{:.1} ({:.0})",
                    d.as_secs_f64(),
                    nv.data as f64 / MIB as f64 / d.as_secs_f64()
                )
            })
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {load} |",
            rate(nv.fill),
            rate(r.fill),
            nv.used_memory.map_or("–".into(), human),
            r.used_memory.map_or("–".into(), human),
            human(nv.image_alloc),
            secs(nv.full_cold),
            secs(nv.full_warm),
            secs(r.full_cold),
            secs(r.full_warm),
        );
    }
    println!("\nnvhv image after the first SIGKILL (`nvhv inspect`):\n");
    for (name, nv, rd, _) in &rows {
        println!("- {name}: {}", nv.inspect);
        if !nv.errors.is_empty() {
            let e: Vec<String> = nv.errors.iter().map(|(e, k)| format!("{e} ×{k}")).collect();
            println!(
                "  nvhv: failed polls before the first correct GET (all rounds): {}",
                e.join(", ")
            );
        }
        if let Some(r) = rd {
            let f = |v: &[(String, u64)]| {
                v.iter()
                    .map(|(n, b)| format!("{n} {b}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!("  redis appendonlydir: {}", f(&r.plain.files));
            println!("  after BGREWRITEAOF: {}", f(&r.rewritten.files));
        }
    }
    if !notes.is_empty() {
        println!("\nNotes:");
        for n in &notes {
            println!("- {n}");
        }
    }
}
