//! Crash harness: clients drive the kv guest in epoch mode while the harness
//! kills nvhv with SIGKILL at random moments, resumes it, and checks that
//! every acknowledged write survived, that nothing appears that was never
//! written, that counters lie between their acknowledged and sent
//! increments, and that every value a read returned survived too (a GET of
//! another client's newest SET, or of its counter, may see a write that is
//! not acknowledged yet: nvhv must hold such a reply until that write is
//! committed, while replies to reads of committed data go out at once). Shared by `tests/crash.rs` (CI, ≥ 20 cycles) and
//! `examples/crash_harness.rs` (standalone, ≥ 500 cycles).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// A minimal RESP2 client over TCP: exactly one reply per command, so the
/// harness knows which writes were acknowledged.
pub struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    pub fn connect(port: u16) -> std::io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(Client {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    pub fn cmd(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let mut b = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            b.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            b.extend_from_slice(a);
            b.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&b)?;
        self.read()
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(l.trim_end_matches("\r\n").to_string())
    }

    fn read(&mut self) -> std::io::Result<Reply> {
        let l = self.line()?;
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad RESP");
        let (t, rest) = l.split_at(1.min(l.len()));
        Ok(match t {
            "+" => Reply::Status(rest.into()),
            "-" => Reply::Error(rest.into()),
            ":" => Reply::Int(rest.parse().map_err(|_| bad())?),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut v = vec![0u8; n as usize + 2];
                    std::io::Read::read_exact(&mut self.r, &mut v)?;
                    v.truncate(n as usize);
                    Reply::Bulk(Some(v))
                }
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                let mut v = Vec::new();
                for _ in 0..n.max(0) {
                    v.push(self.read()?);
                }
                Reply::Array(v)
            }
            _ => return Err(bad()),
        })
    }
}

/// What one client sent and what was acknowledged, across all cycles.
#[derive(Default, Debug)]
pub struct ClientLog {
    /// SET key → (value, acknowledged).
    pub sets: HashMap<String, (String, bool)>,
    /// MSET pair (key a, key b) → (value, acknowledged).
    pub msets: Vec<(String, String, String, bool)>,
    /// INCRs sent / acknowledged since the counter's value was last known.
    pub incr_sent: u64,
    pub incr_acked: u64,
    /// Counter value known at the start of the cycle (verified).
    pub counter_base: u64,
    /// Next sequence number.
    pub seq: u64,
    /// The key of this client's newest SET (others read it).
    pub last_set: Option<String>,
    /// Values this client's reads returned since the last check: (key,
    /// value) of other clients' SETs, and (client, value) of their counters.
    pub seen_sets: Vec<(String, Vec<u8>)>,
    pub seen_counters: Vec<(usize, u64)>,
}

/// Totals over a run.
#[derive(Default, Debug, Clone)]
pub struct Totals {
    pub cycles: u64,
    pub acked_writes: u64,
    pub unacked_writes: u64,
    /// Sent but unacknowledged writes found present after a crash.
    pub unacked_present: u64,
    /// Sent but unacknowledged writes found absent after a crash.
    pub unacked_absent: u64,
    pub checked_keys: u64,
    /// Values returned by reads (of other clients' newest writes) and
    /// checked after the next crash.
    pub checked_reads: u64,
    /// Resumes themselves SIGKILLed at a random moment (before their guest
    /// ran / after), each followed by another resume.
    pub killed_resumes: (u64, u64),
    /// With [`Harness::standby`]: kills a standby took over from.
    pub takeovers: u64,
    /// With [`Harness::standby`]: standbys themselves SIGKILLed at a random
    /// moment of their takeover (before their guest ran / after), each
    /// followed by a plain resume.
    pub killed_takeovers: (u64, u64),
    pub violations: Vec<String>,
}

/// The counts, in the words both the test and the long run print.
impl std::fmt::Display for Totals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} SIGKILL cycles, {} acknowledged writes, unacknowledged writes found present {} / absent {}, {} key checks, {} values returned by reads checked, {} resumes killed before their guest ran and {} after (each resumed again), {} standby takeovers, {} standbys killed in their takeover before their guest ran and {} after, {} violations",
            self.cycles,
            self.acked_writes,
            self.unacked_present,
            self.unacked_absent,
            self.checked_keys,
            self.checked_reads,
            self.killed_resumes.0,
            self.killed_resumes.1,
            self.takeovers,
            self.killed_takeovers.0,
            self.killed_takeovers.1,
            self.violations.len()
        )
    }
}

/// Small xorshift PRNG (deterministic per seed).
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Drive the store until `stop` or a connection error, logging into `log`.
fn drive(port: u16, c: usize, logs: &[Mutex<ClientLog>], stop: &AtomicBool, seed: u64) {
    let log = &logs[c];
    let Ok(mut cl) = Client::connect(port) else {
        return;
    };
    let mut rng = Rng::new(seed);
    while !stop.load(Ordering::Relaxed) {
        if rng.below(4) == 0 {
            // A read of another client's newest write.
            let o = rng.below(logs.len() as u64) as usize;
            let key = logs[o].lock().unwrap().last_set.clone();
            match (rng.below(2), key) {
                (0, Some(k)) => match cl.cmd(&[b"GET", k.as_bytes()]) {
                    Ok(Reply::Bulk(Some(v))) => log.lock().unwrap().seen_sets.push((k, v)),
                    Ok(Reply::Bulk(None)) => {}
                    _ => return,
                },
                _ => match cl.cmd(&[b"GET", format!("ctr:{o}").as_bytes()]) {
                    Ok(Reply::Bulk(Some(v))) => {
                        let n = String::from_utf8_lossy(&v).parse().unwrap_or(u64::MAX);
                        log.lock().unwrap().seen_counters.push((o, n));
                    }
                    Ok(Reply::Bulk(None)) => {}
                    _ => return,
                },
            }
            continue;
        }
        let seq = {
            let mut l = log.lock().unwrap();
            l.seq += 1;
            l.seq
        };
        match rng.below(3) {
            0 => {
                let k = format!("k:{c}:{seq}");
                let v = format!("v{seq}-{:x}", rng.next());
                {
                    let mut l = log.lock().unwrap();
                    l.sets.insert(k.clone(), (v.clone(), false));
                    // ORDER: published to readers before it is sent, so a
                    //        read may race the SET.
                    l.last_set = Some(k.clone());
                }
                match cl.cmd(&[b"SET", k.as_bytes(), v.as_bytes()]) {
                    Ok(Reply::Status(s)) if s == "OK" => {
                        log.lock().unwrap().sets.get_mut(&k).unwrap().1 = true;
                    }
                    _ => return,
                }
            }
            1 => {
                log.lock().unwrap().incr_sent += 1;
                match cl.cmd(&[b"INCR", format!("ctr:{c}").as_bytes()]) {
                    Ok(Reply::Int(_)) => log.lock().unwrap().incr_acked += 1,
                    _ => return,
                }
            }
            _ => {
                let a = format!("m:{c}:{seq}:a");
                let b = format!("m:{c}:{seq}:b");
                let v = format!("mv{seq}-{:x}", rng.next());
                let idx = {
                    let mut l = log.lock().unwrap();
                    l.msets.push((a.clone(), b.clone(), v.clone(), false));
                    l.msets.len() - 1
                };
                match cl.cmd(&[
                    b"MSET",
                    a.as_bytes(),
                    v.as_bytes(),
                    b.as_bytes(),
                    v.as_bytes(),
                ]) {
                    Ok(Reply::Status(s)) if s == "OK" => log.lock().unwrap().msets[idx].3 = true,
                    _ => return,
                }
            }
        }
    }
}

fn get(cl: &mut Client, k: &str) -> Option<Vec<u8>> {
    mget(cl, &[k]).pop().unwrap()
}

/// Values of `keys`, fetched with MGET in chunks (one round trip per chunk:
/// every reply waits for an epoch commit, so per-key GETs would be slow).
fn mget(cl: &mut Client, keys: &[&str]) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(500) {
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(chunk.iter().map(|k| k.as_bytes()));
        match cl.cmd(&args) {
            Ok(Reply::Array(vs)) if vs.len() == chunk.len() => {
                for v in vs {
                    match v {
                        Reply::Bulk(b) => out.push(b),
                        other => panic!("MGET element {other:?}"),
                    }
                }
            }
            other => panic!("MGET: unexpected {other:?}"),
        }
    }
    out
}

/// Check the store against the logs after a resume; fold what is now known
/// into the logs (unacknowledged writes become known-present or are dropped
/// as known-absent) and return the violations.
fn verify(port: u16, logs: &[Mutex<ClientLog>], t: &mut Totals) {
    let mut cl = Client::connect(port).expect("connect after resume");
    let mut expected_keys: HashSet<String> = HashSet::new();
    let mut counters = vec![0u64; logs.len()];
    for (c, log) in logs.iter().enumerate() {
        let mut l = log.lock().unwrap();
        // SETs.
        let mut gone = Vec::new();
        let keys: Vec<String> = l.sets.keys().cloned().collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let values = mget(&mut cl, &refs);
        for (k, got) in keys.iter().zip(values) {
            let (v, acked) = l.sets.get_mut(k).unwrap();
            t.checked_keys += 1;
            match got {
                Some(got) if got == v.as_bytes() => {
                    if !*acked {
                        t.unacked_present += 1;
                    }
                    *acked = true
                }
                Some(got) => t.violations.push(format!(
                    "{k}: value {:?} was never written (expected {v})",
                    String::from_utf8_lossy(&got)
                )),
                None if *acked => t.violations.push(format!("{k}: acknowledged SET lost")),
                None => {
                    t.unacked_absent += 1;
                    gone.push(k.clone())
                }
            }
        }
        for k in gone {
            l.sets.remove(&k);
        }
        expected_keys.extend(l.sets.keys().cloned());
        // MSETs: both keys or neither.
        let mut keep = Vec::new();
        let pairs: Vec<_> = l.msets.drain(..).collect();
        let flat: Vec<&str> = pairs
            .iter()
            .flat_map(|(a, b, _, _)| [a.as_str(), b.as_str()])
            .collect();
        let mut values = mget(&mut cl, &flat).into_iter();
        for (a, b, v, acked) in pairs {
            t.checked_keys += 2;
            let (ga, gb) = (values.next().unwrap(), values.next().unwrap());
            match (ga, gb) {
                (Some(x), Some(y)) if x == v.as_bytes() && y == v.as_bytes() => {
                    keep.push((a, b, v, true))
                }
                (None, None) if !acked => {}
                (None, None) => t
                    .violations
                    .push(format!("{a}/{b}: acknowledged MSET lost")),
                (x, y) => t.violations.push(format!(
                    "{a}/{b}: MSET half applied or wrong: {x:?} {y:?} (expected {v})"
                )),
            }
        }
        for (a, b, _, _) in &keep {
            expected_keys.insert(a.clone());
            expected_keys.insert(b.clone());
        }
        l.msets = keep;
        // Counter.
        let ck = format!("ctr:{c}");
        let value = match get(&mut cl, &ck) {
            Some(v) => String::from_utf8_lossy(&v)
                .parse::<u64>()
                .unwrap_or(u64::MAX),
            None => 0,
        };
        let lo = l.counter_base + l.incr_acked;
        let hi = l.counter_base + l.incr_sent;
        if value < lo || value > hi {
            t.violations.push(format!(
                "{ck} = {value}, outside [{lo} acknowledged, {hi} sent]"
            ));
        }
        counters[c] = value;
        l.counter_base = value;
        l.incr_sent = 0;
        l.incr_acked = 0;
        if value > 0 {
            expected_keys.insert(ck);
        }
    }
    // Every value a read returned is still there (SET keys are written
    // once; counters only grow).
    for log in logs {
        let mut l = log.lock().unwrap();
        let sets = std::mem::take(&mut l.seen_sets);
        let refs: Vec<&str> = sets.iter().map(|(k, _)| k.as_str()).collect();
        for ((k, seen), got) in sets.iter().zip(mget(&mut cl, &refs)) {
            t.checked_reads += 1;
            if got.as_deref() != Some(&seen[..]) {
                t.violations.push(format!(
                    "a GET of {k} returned {:?}, after the crash it is {:?}",
                    String::from_utf8_lossy(seen),
                    got.map(|g| String::from_utf8_lossy(&g).into_owned())
                ));
            }
        }
        for (o, seen) in std::mem::take(&mut l.seen_counters) {
            t.checked_reads += 1;
            if counters[o] < seen {
                t.violations.push(format!(
                    "a GET of ctr:{o} returned {seen}, after the crash it is {}",
                    counters[o]
                ));
            }
        }
    }
    // Nothing that was never written.
    let mut cursor = b"0".to_vec();
    let mut seen = 0u64;
    loop {
        let r = cl
            .cmd(&[b"SCAN", &cursor, b"COUNT", b"1000"])
            .expect("SCAN");
        let Reply::Array(parts) = r else {
            panic!("SCAN reply {r:?}")
        };
        let (Reply::Bulk(Some(next)), Reply::Array(keys)) = (&parts[0], &parts[1]) else {
            panic!("SCAN reply shape {parts:?}")
        };
        for k in keys {
            if let Reply::Bulk(Some(k)) = k {
                seen += 1;
                let k = String::from_utf8_lossy(k).into_owned();
                if !expected_keys.contains(&k) {
                    t.violations.push(format!(
                        "key {k} exists but was never written (or was lost and came back)"
                    ));
                }
            }
        }
        if next == b"0" {
            break;
        }
        cursor = next.clone();
    }
    if seen != expected_keys.len() as u64 {
        t.violations.push(format!(
            "SCAN saw {seen} keys, expected {}",
            expected_keys.len()
        ));
    }
}

/// A harness run: image, port, clients.
pub struct Harness {
    pub nvhv: PathBuf,
    pub image: PathBuf,
    pub port: u16,
    pub clients: usize,
    pub extra_args: Vec<String>,
    pub logs: Vec<Mutex<ClientLog>>,
    pub totals: Totals,
    pub rng: Rng,
    pub log_dir: PathBuf,
    /// Start `nvhv resume --standby` beside each running nvhv before the
    /// load; it takes over at the SIGKILL (or is itself killed at a random
    /// moment of its takeover, half the time).
    pub standby: bool,
    /// A standby that took over at the last kill: the next cycle's nvhv.
    next: Option<(Child, PathBuf)>,
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_ready(port: u16, child: &mut Child, what: &str, err: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = Client::connect(port) {
            if let Ok(Reply::Status(s)) = c.cmd(&[b"PING"]) {
                if s == "PONG" {
                    return;
                }
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{what}: nvhv exited ({st}): {}",
                std::fs::read_to_string(err).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what}: kv guest never answered PING"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Harness {
    pub fn new(nvhv: PathBuf, dir: &Path, clients: usize, seed: u64) -> Harness {
        Harness {
            nvhv,
            image: dir.join("crash.img"),
            port: free_port(),
            clients,
            extra_args: Vec::new(),
            logs: (0..clients)
                .map(|_| Mutex::new(ClientLog::default()))
                .collect(),
            totals: Totals::default(),
            rng: Rng::new(seed),
            log_dir: dir.to_path_buf(),
            standby: false,
            next: None,
        }
    }

    /// `nvhv resume --standby` for the image, waited for until it says it
    /// stands by.
    fn spawn_standby(&self, n: u64) -> (Child, PathBuf) {
        let err = self.log_dir.join(format!("nvhv-{n}-standby.stderr"));
        let listen = format!("127.0.0.1:{}", self.port);
        let mut args = vec![
            "resume",
            "--standby",
            "--image",
            self.image.to_str().unwrap(),
        ];
        args.extend(["--listen", &listen, "--console", "/dev/null"]);
        args.extend(self.extra_args.iter().map(String::as_str));
        let mut child = Command::new(&self.nvhv)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("spawn nvhv --standby");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("standing by")
        {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "standby exited ({st}): {}",
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the standby never stood by");
            std::thread::sleep(Duration::from_millis(2));
        }
        (child, err)
    }

    fn spawn(&self, first: bool, n: u64) -> (Child, PathBuf) {
        let err = self.log_dir.join(format!("nvhv-{n}.stderr"));
        let listen = format!("127.0.0.1:{}", self.port);
        let img = self.image.to_str().unwrap();
        let mut args: Vec<&str> = if first {
            vec![
                "run",
                "--image",
                img,
                "--guest",
                "kv",
                "--mem",
                "128M",
                "--persist",
                "epoch",
            ]
        } else {
            vec!["resume", "--image", img]
        };
        args.extend(["--listen", &listen, "--console", "/dev/null"]);
        let extra: Vec<&str> = self.extra_args.iter().map(String::as_str).collect();
        args.extend(extra);
        let child = Command::new(&self.nvhv)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("spawn nvhv");
        (child, err)
    }

    /// A resume SIGKILLed at a random moment of its first 8 ms (opening
    /// and locking the image, replaying the log, restoring the machine,
    /// the guest's first instructions): the next resume must recover
    /// from whatever it left.
    fn killed_resume(&mut self, n: u64) {
        let (mut child, err) = self.spawn(false, n);
        if self.kill_soon(&mut child, &err) {
            self.totals.killed_resumes.1 += 1;
        } else {
            self.totals.killed_resumes.0 += 1;
        }
    }

    /// SIGKILLs `child` at a random moment of its next 8 ms and reaps it;
    /// whether it had said it resumed (its guest ran) by then.
    fn kill_soon(&mut self, child: &mut Child, err: &Path) -> bool {
        std::thread::sleep(Duration::from_micros(self.rng.below(8_000)));
        let _ = child.kill();
        let _ = child.wait();
        std::fs::read_to_string(err)
            .unwrap_or_default()
            .contains("nvhv: resumed")
    }

    /// One cycle: (re)start (every other resume is first itself killed at
    /// a random moment), load, SIGKILL at a random moment, resume, verify.
    pub fn cycle(&mut self) {
        let n = self.totals.cycles;
        let (mut child, err) = match self.next.take() {
            Some(took_over) => took_over,
            None => {
                if n > 0 && self.rng.below(2) == 0 {
                    self.killed_resume(n);
                }
                self.spawn(n == 0, n)
            }
        };
        wait_ready(self.port, &mut child, "start", &err);
        if n > 0 {
            // The resume of the previous kill is verified here, before new load.
            verify(self.port, &self.logs, &mut self.totals);
        }
        let mut standby = self.standby.then(|| self.spawn_standby(n));
        let stop = Arc::new(AtomicBool::new(false));
        let run_for = Duration::from_millis(30 + self.rng.below(300));
        std::thread::scope(|s| {
            for c in 0..self.clients {
                let logs = &self.logs[..];
                let stop = &stop;
                let port = self.port;
                let seed = self.rng.next();
                s.spawn(move || drive(port, c, logs, stop, seed));
            }
            std::thread::sleep(run_for);
            // SIGKILL: no warning, no chance to flush anything.
            let _ = child.kill();
            let _ = child.wait();
            stop.store(true, Ordering::Relaxed);
        });
        if let Some((mut sb, sb_err)) = standby.take() {
            if self.rng.below(2) == 0 {
                // The standby killed during its takeover: a plain resume next.
                if self.kill_soon(&mut sb, &sb_err) {
                    self.totals.killed_takeovers.1 += 1;
                } else {
                    self.totals.killed_takeovers.0 += 1;
                }
            } else {
                self.totals.takeovers += 1;
                self.next = Some((sb, sb_err));
            }
        }
        for log in &self.logs {
            let l = log.lock().unwrap();
            self.totals.acked_writes += l.sets.values().filter(|s| s.1).count() as u64;
        }
        self.totals.cycles += 1;
    }

    /// Resume once more and verify the last kill, then stop cleanly.
    pub fn finish(&mut self) {
        let n = self.totals.cycles;
        let (mut child, err) = match self.next.take() {
            Some(took_over) => took_over,
            None => self.spawn(false, n),
        };
        wait_ready(self.port, &mut child, "final resume", &err);
        verify(self.port, &self.logs, &mut self.totals);
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let st = child.wait().unwrap();
        assert!(
            st.success(),
            "final suspend failed: {}",
            std::fs::read_to_string(err).unwrap_or_default()
        );
        let mut acked = 0;
        let mut unacked = 0;
        for log in &self.logs {
            let l = log.lock().unwrap();
            acked +=
                l.sets.values().filter(|s| s.1).count() + l.msets.iter().filter(|m| m.3).count();
            unacked += l.sets.values().filter(|s| !s.1).count();
        }
        self.totals.acked_writes = acked as u64;
        self.totals.unacked_writes = unacked as u64;
    }
}
