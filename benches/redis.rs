//! `redis-benchmark` against nvhv's `kv` guest and against Debian's
//! `redis-server`, in the same run, for SET and GET at several client counts
//! and pipeline depths. Prints a markdown table of requests/s, p50 and p99
//! latency, and the ratio nvhv / redis-server; then where the CPU went.
//!
//! ```sh
//! cargo bench --bench redis [-- --persist suspend-only|epoch|suspend-only,epoch]
//!                              [--dir /dev/shm] [--seconds 1.5] [--mem 256M]
//!                              [--keyspace 100000] [--configs 1,16,16x16,50x16]
//!                              [--repeat 1] [--tests set,set-changing,get]
//!                              [--preload] [--native 1|1,4|none]
//!                              [--nvhv-args "--give-back-after off ..."]
//! ```
//!
//! `--nvhv-args` adds its words to every `nvhv run` (e.g. to compare an
//! option against its default in two runs).
//!
//! Tests (`--tests`): `set` and `get` are `redis-benchmark -t set` / `-t
//! get`, whose SETs all write one fixed value (`xxx`), so once a key exists
//! most SETs rewrite the bytes already there; `set-changing` is `SET
//! key:__rand_int__ v:__rand_int__`, a SET whose value differs from the
//! key's last one (a 14-byte value): what a workload whose writes change
//! data costs.
//!
//! Servers measured (all started by this program on free loopback ports, and
//! stopped by their pids at the end):
//! - `nvhv` — `nvhv run --mem M --persist MODE` with its image in `--dir`, one
//!   per requested persistence mode (default `suspend-only`; if a mode fails
//!   to start or to serve, that is reported and the others go on);
//! - `redis` — `redis-server --save '' --appendonly no` (no persistence);
//! - `redis-aof` — `redis-server --appendonly yes --appendfsync always` with
//!   its AOF in `--dir`, the same file system as the nvhv image (on tmpfs
//!   fsync costs nothing, so this is a lower bound of its persistence cost);
//! - `native-durable` — the kv guest's own engine run natively by this
//!   binary (`benches/native`), durable by a group-committed log of its
//!   input in a preallocated file in `--dir` (`O_DSYNC` writes; `--native
//!   1,4` adds one with up to 4 groups' writes in flight): the ceiling for
//!   a durable server of this engine on this machine, which nvhv's epoch
//!   mode (the same engine plus a VM, the same flush) can approach but not
//!   pass. `--native none` leaves it out.
//!
//! `redis-server` is installed with apt-get when missing; if that fails,
//! nvhv is measured alone. Configurations (`--configs`): `C` is `-c C`,
//! `CxP` is `-c C -P P`. Each run's `-n` is calibrated by shorter runs to
//! last about `--seconds` (with `--repeat K`, K runs and the median by
//! rate is reported); keys are random among `--keyspace` (`-r`), values 3
//! bytes (the default `-d`). Latencies are redis-benchmark's (per request;
//! with `-P` per pipelined batch). The runs of the servers are interleaved
//! per configuration, so slow phases of a shared machine hit them alike.

mod native;
mod support;

use support::{ensure_redis_server, free_port, is_tmpfs, nvhv, push_cmd, which};

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

/// True once `PING` on a fresh connection gets `+PONG`.
fn pong(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Writes every key `redis-benchmark -r keyspace` can pick (`key:` and the
/// 12 digits `__rand_int__` becomes) with the value `v:<n>`, pipelined 1 000
/// at a time on one connection; every reply must be `+OK`.
fn preload(port: u16, keyspace: u64) -> Result<Duration, String> {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut done = 0;
    while done < keyspace {
        let n = (keyspace - done).min(1000);
        let mut batch = Vec::new();
        for k in done..done + n {
            let (key, val) = (format!("key:{k:012}"), format!("v:{k}"));
            push_cmd(&mut batch, &[b"SET", key.as_bytes(), val.as_bytes()]);
        }
        s.write_all(&batch).map_err(|e| format!("send: {e}"))?;
        let mut replies = vec![0u8; n as usize * 5];
        s.read_exact(&mut replies)
            .map_err(|e| format!("reply: {e}"))?;
        if let Some(bad) = replies.chunks(5).find(|r| *r != b"+OK\r\n") {
            return Err(format!("a SET got {:?}", String::from_utf8_lossy(bad)));
        }
        done += n;
    }
    Ok(t.elapsed())
}

/// A server process we started.
struct Server {
    /// Column name in the table.
    name: String,
    port: u16,
    child: Child,
    /// Files and directories to remove at the end.
    cleanup: Vec<PathBuf>,
    log: PathBuf,
    /// Set when it failed; its remaining runs are skipped.
    failed: Option<String>,
    is_nvhv: bool,
}

impl Server {
    /// Spawns `cmd` (stdout and stderr to `log`) and polls until it answers.
    fn spawn(
        name: &str,
        mut cmd: Command,
        port: u16,
        log: PathBuf,
        cleanup: Vec<PathBuf>,
        is_nvhv: bool,
    ) -> Result<Server, String> {
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .map_err(|e| format!("{name}: cannot start: {e}"))?;
        let mut s = Server {
            name: name.into(),
            port,
            child,
            cleanup,
            log,
            failed: None,
            is_nvhv,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = s.child.try_wait() {
                let msg = format!("{name}: exited ({st}) before answering: {}", s.log_tail());
                s.stop();
                return Err(msg);
            }
            if pong(port) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let msg = format!("{name}: no PONG within 30 s: {}", s.log_tail());
                s.stop();
                return Err(msg);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM (nvhv suspends, redis-server exits), wait up to 10 s, then
    /// SIGKILL; by pid only. Removes its files.
    fn stop(&mut self) -> Option<String> {
        let mut note = None;
        if self.alive() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.alive() {
                let _ = self.child.kill();
                note = Some(format!(
                    "{}: did not exit within 10 s of SIGTERM, killed: {}",
                    self.name,
                    self.log_tail()
                ));
            }
        }
        if let Ok(st) = self.child.wait() {
            if !st.success() && note.is_none() && self.failed.is_none() {
                note = Some(format!(
                    "{}: exit status {st} on SIGTERM: {}",
                    self.name,
                    self.log_tail()
                ));
            }
        }
        for p in self.cleanup.drain(..) {
            let _ = std::fs::remove_dir_all(&p);
            let _ = std::fs::remove_file(&p);
        }
        note
    }
}

/// CPU seconds per thread of a process, by thread name (summed per name).
fn thread_cpu(pid: i32) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return m;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // Fields after the `(comm)`: state is 3rd; utime 14th, stime 15th.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let name = stat[stat.find('(').unwrap() + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
        *m.entry(name).or_insert(0.0) += ticks / hz;
    }
    m
}

/// CPU seconds of waited-for children (here: finished redis-benchmark runs).
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN is valid.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[derive(Clone, Debug, Default)]
struct Row {
    rps: f64,
    p50: f64,
    p99: f64,
    n: u64,
    /// Per thread name: % of one core during the run; `bench` = redis-benchmark.
    cpu: BTreeMap<String, f64>,
}

/// A test's table label and its `redis-benchmark` arguments.
fn test_args(test: &str) -> (&'static str, Vec<&'static str>) {
    match test {
        "set" => ("SET", vec!["-t", "set"]),
        "get" => ("GET", vec!["-t", "get"]),
        "set-changing" => (
            "SET (changing values)",
            vec!["set", "key:__rand_int__", "v:__rand_int__"],
        ),
        other => panic!("unknown test {other} (set, set-changing, get)"),
    }
}

/// One redis-benchmark run of one test; `Err` with the reason on failure.
fn bench(
    port: u16,
    test: &str,
    clients: u32,
    pipeline: u32,
    n: u64,
    keyspace: u64,
    server_pid: i32,
) -> Result<Row, String> {
    let cpu0 = thread_cpu(server_pid);
    let bench0 = children_cpu();
    let t0 = Instant::now();
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", &clients.to_string()])
        .args(["-P", &pipeline.to_string(), "-n", &n.to_string()])
        .args(["-r", &keyspace.to_string(), "--csv"])
        .args(test_args(test).1)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("redis-benchmark: {e}"))?;
    let wall = t0.elapsed().as_secs_f64();
    let bench_cpu = children_cpu() - bench0;
    let cpu1 = thread_cpu(server_pid);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || format!("{stdout}{stderr}").to_lowercase().contains("error") {
        return Err(format!(
            "redis-benchmark {test} -c {clients} -P {pipeline}: {} {} {}",
            out.status,
            stdout.trim(),
            stderr.trim()
        ));
    }
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
    // "p95_latency_ms","p99_latency_ms","max_latency_ms"; the first row
    // after that header is the one test run.
    let line = stdout
        .lines()
        .find(|l| l.starts_with('"') && !l.starts_with("\"test\""))
        .ok_or_else(|| format!("no CSV row for {test}: {stdout}"))?;
    let f: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|s| s.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    if f.len() < 7 {
        return Err(format!("short CSV row: {line}"));
    }
    let mut cpu: BTreeMap<String, f64> = cpu1
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                100.0 * (v - cpu0.get(k).copied().unwrap_or(0.0)) / wall,
            )
        })
        .filter(|(_, v)| *v >= 0.5)
        .collect();
    cpu.insert("bench".into(), 100.0 * bench_cpu / wall);
    Ok(Row {
        rps: f[0],
        p50: f[3],
        p99: f[5],
        n,
        cpu,
    })
}

/// Runs `test` for about `seconds`: starts with a short run and grows `-n`
/// (from the rate seen) until a run lasts at least 60% of `seconds`; then
/// `repeat - 1` more runs of that length. Returns the run with the median
/// rate.
#[allow(clippy::too_many_arguments)]
fn measure(
    port: u16,
    test: &str,
    clients: u32,
    pipeline: u32,
    seconds: f64,
    repeat: usize,
    keyspace: u64,
    server_pid: i32,
) -> Result<Row, String> {
    const MAX_N: u64 = 50_000_000;
    let mut n = if pipeline > 1 { 20_000 } else { 2_000 };
    let mut runs = Vec::new();
    for _ in 0..8 {
        let r = bench(port, test, clients, pipeline, n, keyspace, server_pid)?;
        let took = n as f64 / r.rps.max(1.0);
        let rps = r.rps;
        if took >= 0.6 * seconds || n >= MAX_N {
            runs.push(r);
            break;
        }
        n = ((rps * seconds) as u64).max(2 * n).min(MAX_N);
    }
    let Some(n) = runs.first().map(|r| r.n) else {
        return Err(format!("{test}: no run reached {seconds} s"));
    };
    for _ in 1..repeat {
        runs.push(bench(
            port, test, clients, pipeline, n, keyspace, server_pid,
        )?);
    }
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    Ok(runs.swap_remove(runs.len() / 2))
}

/// redis-benchmark against nvhv's kv guest, redis-server (with and without
/// AOF) and the kv engine run natively with a durable log, in the same run.
///
/// See the module documentation at the top of `benches/redis.rs` for the
/// servers, tests and configurations measured.
#[derive(Parser)]
#[command(name = "redis", bin_name = "cargo bench --bench redis --")]
struct Cli {
    /// nvhv persistence modes to measure, one nvhv each (comma-separated).
    #[arg(long, default_value = "suspend-only")]
    persist: String,
    /// Where the images, AOFs, logs and console files go.
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Seconds each run is calibrated to last.
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    /// nvhv's `--mem`.
    #[arg(long, default_value = "256M")]
    mem: String,
    /// Runs per test and configuration; the median by rate is reported.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Keys are random among this many (redis-benchmark's `-r`).
    #[arg(long, default_value_t = 100_000)]
    keyspace: u64,
    /// Client configurations: `C` (clients) or `CxP` (clients x pipeline), comma-separated.
    #[arg(long, default_value = "1,16,16x16,50x16")]
    configs: String,
    /// Tests to run: set, set-changing, get (comma-separated).
    #[arg(long, default_value = "set,set-changing,get")]
    tests: String,
    /// Write every key of the keyspace before the measured runs.
    #[arg(long)]
    preload: bool,
    /// Native durable servers by writes in flight (comma-separated), or `none`.
    #[arg(long, default_value = "1")]
    native: String,
    /// More words for every `nvhv run` (one argument, split at whitespace).
    #[arg(long, allow_hyphen_values = true)]
    nvhv_args: Option<String>,
    /// Internal: serve the native durable server on this port (the bench re-executes itself).
    #[arg(long, hide = true, value_name = "PORT", requires_all = ["log", "depth"])]
    serve_native: Option<u16>,
    /// Internal, with --serve-native: its log file.
    #[arg(long, hide = true)]
    log: Option<PathBuf>,
    /// Internal, with --serve-native: its groups' writes in flight at most.
    #[arg(long, hide = true)]
    depth: Option<usize>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Some(port) = cli.serve_native {
        // This binary, started by itself below as the native-durable server.
        let (log, depth) = (cli.log.unwrap(), cli.depth.unwrap());
        let err = native::serve(port, &log, depth);
        eprintln!("native-durable: {err:?}");
        std::process::exit(1);
    }
    let persist = cli.persist;
    let dir = cli.dir;
    let seconds = cli.seconds;
    let mem = cli.mem;
    let repeat = cli.repeat.max(1);
    let keyspace = cli.keyspace;
    let preload_keys = cli.preload;
    let nvhv_args: Vec<String> = cli
        .nvhv_args
        .map(|a| a.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let native_depths: Vec<usize> = match cli.native.as_str() {
        "none" => vec![],
        d => d.split(',').map(|x| x.parse().unwrap()).collect(),
    };
    let configs: Vec<(u32, u32)> = cli
        .configs
        .split(',')
        .map(|c| match c.split_once('x') {
            Some((c, p)) => (c.parse().unwrap(), p.parse().unwrap()),
            None => (c.parse().unwrap(), 1),
        })
        .collect();
    let tests: Vec<String> = cli
        .tests
        .split(',')
        .map(|t| {
            test_args(t);
            t.to_string()
        })
        .collect();

    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("redis bench: /dev/kvm not available, nothing measured");
        return;
    }
    if which("redis-benchmark").is_none() {
        eprintln!("redis bench: redis-benchmark not installed (apt-get install redis-tools), nothing measured");
        return;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let tag = format!("nvhv-bench-redis-{}", std::process::id());
    let mut notes: Vec<String> = Vec::new();
    let mut servers: Vec<Server> = Vec::new();

    // nvhv, one per persistence mode.
    for mode in persist.split(',') {
        let port = free_port();
        let img = dir.join(format!("{tag}-{mode}.img"));
        let mut cmd = Command::new(nvhv());
        cmd.args(["run", "--image", img.to_str().unwrap(), "--force"])
            .args(["--mem", &mem, "--persist", mode])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(&nvhv_args)
            .args([
                "--console",
                dir.join(format!("{tag}-{mode}.console")).to_str().unwrap(),
            ]);
        let cleanup = vec![
            img.clone(),
            dir.join(format!("{tag}-{mode}.console")),
            dir.join(format!("{tag}-{mode}.log")),
            PathBuf::from(format!("{}.ctl", img.display())),
        ];
        match Server::spawn(
            &format!("nvhv {mode}"),
            cmd,
            port,
            dir.join(format!("{tag}-{mode}.log")),
            cleanup,
            true,
        ) {
            Ok(s) => servers.push(s),
            Err(e) => notes.push(format!("nvhv --persist {mode} FAILED: {e}")),
        }
    }

    // redis-server without and with AOF (fsync always).
    let redis_ok = match ensure_redis_server() {
        Ok(()) => true,
        Err(e) => {
            notes.push(format!("{e}: measuring nvhv alone"));
            false
        }
    };
    if redis_ok {
        for (name, aof) in [("redis", false), ("redis-aof", true)] {
            let port = free_port();
            let rdir = dir.join(format!("{tag}-{name}"));
            std::fs::create_dir_all(&rdir).unwrap();
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--daemonize", "no", "--protected-mode", "no"])
                .args(["--dir", rdir.to_str().unwrap()]);
            if aof {
                cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
            } else {
                cmd.args(["--appendonly", "no"]);
            }
            let log = dir.join(format!("{tag}-{name}.log"));
            match Server::spawn(name, cmd, port, log.clone(), vec![rdir, log], false) {
                Ok(s) => servers.push(s),
                Err(e) => notes.push(format!("{name} FAILED: {e}")),
            }
        }
    }
    // The same engine as a native process with its own durable log: the
    // ceiling for a durable server of it on this machine (benches/native).
    for depth in &native_depths {
        let port = free_port();
        let name = if *depth == 1 {
            "native-durable".to_string()
        } else {
            format!("native-durable x{depth}")
        };
        let log_file = dir.join(format!("{tag}-native-{depth}.aof"));
        let log = dir.join(format!("{tag}-native-{depth}.log"));
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--serve-native", &port.to_string()])
            .args(["--log", log_file.to_str().unwrap()])
            .args(["--depth", &depth.to_string()]);
        match Server::spawn(&name, cmd, port, log.clone(), vec![log_file, log], false) {
            Ok(s) => servers.push(s),
            Err(e) => notes.push(format!("{name} FAILED: {e}")),
        }
    }
    if servers.is_empty() {
        eprintln!("nothing to measure: {notes:?}");
        std::process::exit(1);
    }

    let version = |prog: &str| {
        Command::new(prog)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    println!("# redis-benchmark: nvhv kv guest vs redis-server\n");
    println!(
        "{}; {}; {} CPUs; load average at start {}; files in {}; nvhv --mem {mem}; \
         -r {keyspace}{}, -d 3 (set-changing: 14-byte values); ~{seconds} s per run, median of {repeat}",
        version("redis-benchmark"),
        if redis_ok {
            version("redis-server")
        } else {
            "no redis-server".into()
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        dir.display(),
        if preload_keys {
            " (every key preloaded)"
        } else {
            ""
        }
    );
    println!();

    if preload_keys {
        for s in servers.iter_mut() {
            match preload(s.port, keyspace) {
                Ok(t) => eprintln!(
                    "{:>18} preloaded {keyspace} keys in {:.2} s",
                    s.name,
                    t.as_secs_f64()
                ),
                Err(e) => {
                    notes.push(format!("{} FAILED: preload: {e}", s.name));
                    s.failed = Some(e);
                }
            }
        }
    }

    // results[(test, c, p)][server] = Row
    type Key = (String, u32, u32);
    let mut results: BTreeMap<(usize, Key), BTreeMap<String, Row>> = BTreeMap::new();
    let mut order = 0;
    for &(c, p) in &configs {
        for test in &tests {
            let test = test.as_str();
            order += 1;
            let key = (order, (test_args(test).0.to_string(), c, p));
            for s in servers.iter_mut() {
                if s.failed.is_some() {
                    continue;
                }
                if !s.alive() {
                    s.failed = Some(format!("{} died: {}", s.name, s.log_tail()));
                    notes.push(format!(
                        "{} FAILED: died before {test} -c {c} -P {p}",
                        s.name
                    ));
                    continue;
                }
                let run = measure(s.port, test, c, p, seconds, repeat, keyspace, s.pid());
                match run {
                    Ok(r) => {
                        eprintln!(
                            "{:>18} {test} -c {c:>2} -P {p:>2}: {:>10.0} req/s  p50 {:.3} ms  p99 {:.3} ms  (n {})",
                            s.name, r.rps, r.p50, r.p99, r.n
                        );
                        results
                            .entry(key.clone())
                            .or_default()
                            .insert(s.name.clone(), r);
                    }
                    Err(e) => {
                        notes.push(format!("{} FAILED: {e}", s.name));
                        s.failed = Some(e);
                    }
                }
            }
        }
    }

    // The table: one row per test and configuration, columns per server.
    let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
    // Ratio columns: each nvhv mode against each durable reference
    // (redis-aof, native-durable), nvhv's non-durable mode against redis
    // without persistence, and epoch against suspend-only.
    let mut pairs: Vec<(String, String)> = Vec::new();
    for a in servers.iter().filter(|s| s.is_nvhv) {
        for b in servers
            .iter()
            .filter(|s| s.name == "redis-aof" || s.name.starts_with("native-durable"))
        {
            pairs.push((a.name.clone(), b.name.clone()));
        }
    }
    let has = |n: &str| names.iter().any(|x| x == n);
    if has("nvhv suspend-only") && has("redis") {
        pairs.push(("nvhv suspend-only".into(), "redis".into()));
    }
    if has("nvhv epoch") && has("nvhv suspend-only") {
        pairs.push(("nvhv epoch".into(), "nvhv suspend-only".into()));
    }
    let mut header = vec!["test".to_string(), "-c".into(), "-P".into()];
    for n in &names {
        header.push(format!("{n} req/s"));
        header.push(format!("{n} p50 / p99 ms"));
    }
    for (a, b) in &pairs {
        header.push(format!("{a} / {b}"));
    }
    println!("| {} |", header.join(" | "));
    println!("|{}", header.iter().map(|_| "---|").collect::<String>());
    for ((_, (test, c, p)), row) in &results {
        let mut cells = vec![test.clone(), c.to_string(), p.to_string()];
        for n in &names {
            match row.get(n) {
                Some(r) => {
                    cells.push(format!("{:.0}", r.rps));
                    cells.push(format!("{:.3} / {:.3}", r.p50, r.p99));
                }
                None => cells.extend(["failed".into(), "–".into()]),
            }
        }
        for (a, b) in &pairs {
            cells.push(match (row.get(a), row.get(b)) {
                (Some(x), Some(y)) if y.rps > 0.0 => format!("{:.2}", x.rps / y.rps),
                _ => "–".into(),
            });
        }
        println!("| {} |", cells.join(" | "));
    }

    // Where the CPU went: % of one core per thread during each run, and
    // what all of them together spent per request (on 2 cores, ~150–180%
    // busy means the machine is about full: the CPU, not a wait, sets the pace).
    println!("\nCPU during the runs (% of one core; `bench` is redis-benchmark itself):\n");
    println!("| test | -c | -P | server | all threads, µs of CPU per request | threads |");
    println!("|---|---|---|---|---|---|");
    for ((_, (test, c, p)), row) in &results {
        for n in &names {
            if let Some(r) = row.get(n) {
                let threads: Vec<String> =
                    r.cpu.iter().map(|(t, v)| format!("{t} {v:.0}")).collect();
                let busy: f64 = r.cpu.values().sum();
                let per_request = if r.rps > 0.0 {
                    format!("{:.1}", busy / 100.0 * 1e6 / r.rps)
                } else {
                    "–".into()
                };
                println!(
                    "| {test} | {c} | {p} | {n} | {per_request} | {} |",
                    threads.join(", ")
                );
            }
        }
    }

    for s in servers.iter_mut() {
        if let Some(n) = s.stop() {
            notes.push(n);
        }
    }
    if !notes.is_empty() {
        println!("\nNotes:");
        for n in &notes {
            println!("- {n}");
        }
    }
    if redis_ok {
        println!(
            "\nredis-aof: --appendonly yes --appendfsync always in {} ({}).",
            dir.display(),
            if is_tmpfs(&dir) {
                "tmpfs: fsync is free"
            } else {
                "fsync reaches the device"
            }
        );
    }
}
