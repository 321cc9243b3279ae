//! Suspend and resume latency of the `counter` guest at several RAM sizes,
//! measured through the `nvhv` binary as a user runs it.
//!
//! `cargo bench --bench lifecycle [-- --rounds N --sizes 64M,4G --dir /dev/shm]`
//!
//! For each size: run a new VM, then `rounds` times resume it and suspend it
//! with SIGTERM. Reported per size (p50 / p90 / max over the rounds):
//! - resume, internal: nvhv's own `main()` → vCPU threads started;
//! - resume, external: `spawn()` of the process → its "resumed" line read
//!   (adds exec, dynamic loading and pipe latency);
//! - suspend: SIGTERM received → state durable (nvhv's own report).
//!
//! The machine is shared and noisy: compare sizes within one run.

mod support;

use support::nvhv;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

fn ms_after(line: &str, key: &str) -> Option<f64> {
    let i = line.find(key)? + key.len();
    line[i..].split_whitespace().next()?.parse().ok()
}

struct Round {
    resume_internal_ms: f64,
    resume_external_ms: f64,
    suspend_ms: f64,
}

/// Start nvhv with `args`; wait for a stderr line containing `ready`; let it
/// run `run_for`; SIGTERM; return (spawn→ready, the ready line, the suspend line).
fn cycle(args: &[&str], ready: &str, run_for: Duration) -> (Duration, String, String) {
    let t0 = Instant::now();
    let mut child = Command::new(nvhv())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let mut ready_line = String::new();
    let mut t_ready = Duration::ZERO;
    while err.read_line(&mut line).unwrap() > 0 {
        if line.contains(ready) {
            t_ready = t0.elapsed();
            ready_line = line.clone();
            break;
        }
        line.clear();
    }
    assert!(!ready_line.is_empty(), "nvhv {args:?} never said '{ready}'");
    std::thread::sleep(run_for);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    let mut suspend_line = String::new();
    line.clear();
    while err.read_line(&mut line).unwrap() > 0 {
        if line.contains("durable") {
            suspend_line = line.clone();
        }
        rest.push_str(&line);
        line.clear();
    }
    let st = child.wait().unwrap();
    assert!(st.success(), "nvhv {args:?} failed: {rest}");
    (t_ready, ready_line, suspend_line)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Suspend and resume latency of the counter guest at several RAM sizes,
/// measured through the `nvhv` binary.
///
/// See the module documentation at the top of `benches/lifecycle.rs` for
/// what is reported.
#[derive(Parser)]
#[command(name = "lifecycle", bin_name = "cargo bench --bench lifecycle --")]
struct Cli {
    /// Resume / suspend cycles per size.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Guest RAM sizes, as nvhv's `--mem` takes them (comma-separated).
    #[arg(long, default_value = "64M,4G")]
    sizes: String,
    /// Where the images go.
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let Cli {
        rounds, sizes, dir, ..
    } = Cli::parse();
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("lifecycle bench: /dev/kvm not available, nothing measured");
        return;
    }
    println!(
        "nvhv lifecycle benchmark: counter guest, 1 vCPU, {rounds} rounds per size, images in {}",
        dir.display()
    );
    println!(
        "{:>6}  {:>26}  {:>26}  {:>26}",
        "RAM",
        "resume internal ms p50/p90/max",
        "resume external ms p50/p90/max",
        "suspend ms p50/p90/max"
    );
    for size in sizes.split(',') {
        let img = dir.join(format!(
            "nvhv-bench-lifecycle-{}-{size}.img",
            std::process::id()
        ));
        let img_s = img.to_str().unwrap();
        let _ = std::fs::remove_file(&img);
        let (_, _, first) = cycle(
            &[
                "run",
                "--image",
                img_s,
                "--mem",
                size,
                "--guest",
                "counter",
                "--console",
                "/dev/null",
            ],
            "running",
            Duration::from_millis(300),
        );
        assert!(first.contains("durable"), "first suspend: {first}");
        let mut rs = Vec::new();
        for _ in 0..rounds {
            let (ext, ready, susp) = cycle(
                &["resume", "--image", img_s, "--console", "/dev/null"],
                "resumed",
                Duration::from_millis(50),
            );
            rs.push(Round {
                resume_internal_ms: ms_after(&ready, "running ").unwrap_or(f64::NAN),
                resume_external_ms: ext.as_secs_f64() * 1e3,
                suspend_ms: ms_after(&susp, "durable ").unwrap_or(f64::NAN),
            });
        }
        remove(&img);
        let mut a: Vec<f64> = rs.iter().map(|r| r.resume_internal_ms).collect();
        let mut b: Vec<f64> = rs.iter().map(|r| r.resume_external_ms).collect();
        let mut c: Vec<f64> = rs.iter().map(|r| r.suspend_ms).collect();
        let f = |v: &mut Vec<f64>| {
            format!(
                "{:.2} / {:.2} / {:.2}",
                pct(v, 0.5),
                pct(v, 0.9),
                pct(v, 1.0)
            )
        };
        println!(
            "{size:>6}  {:>26}  {:>26}  {:>26}",
            f(&mut a),
            f(&mut b),
            f(&mut c)
        );
    }
}

fn remove(p: &Path) {
    let _ = std::fs::remove_file(p);
}
