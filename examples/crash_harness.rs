//! Standalone crash harness (the long run of `tests/crash.rs`):
//!
//! `cargo run --release --example crash_harness -- [--cycles 500] [--clients 4] [--seed N] [--dir /dev/shm] [--standby] [-- extra nvhv args]`
//!
//! Drives the kv guest in epoch mode with several clients, SIGKILLs nvhv at
//! random moments, resumes, and checks every acknowledged write. Prints the
//! counts; exits 1 on any violation.

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::path::PathBuf;

use clap::Parser;

/// Drive the kv guest with several clients, SIGKILL nvhv at random moments,
/// resume, and check every acknowledged write; exit 1 on any violation.
#[derive(Parser)]
struct Args {
    /// SIGKILL / resume cycles.
    #[arg(long, default_value_t = 500)]
    cycles: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Seed of the workload and the kill times (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the image goes (a directory is made in it and removed after).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Start `nvhv resume --standby` beside each running nvhv: it takes
    /// over at the SIGKILL, or is itself killed during its takeover (half
    /// the time) and a plain resume follows.
    #[arg(long)]
    standby: bool,
    /// More `nvhv run` / `resume` arguments, after `--`.
    #[arg(last = true)]
    extra: Vec<String>,
}

fn main() {
    let Args {
        cycles,
        clients,
        seed,
        dir: base,
        standby,
        extra,
    } = Args::parse();
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let exe = std::env::current_exe().unwrap();
    let nvhv = exe.parent().unwrap().parent().unwrap().join("nvhv");
    assert!(nvhv.exists(), "build nvhv first: cargo build --release");
    let dir = base.join(format!("nvhv-crash-harness-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut h = harness::Harness::new(nvhv, &dir, clients, seed);
    h.extra_args = extra;
    h.standby = standby;
    let t0 = std::time::Instant::now();
    for i in 0..cycles {
        h.cycle();
        if (i + 1) % 50 == 0 {
            eprintln!(
                "{} cycles, {} violations so far ({:.0} s)",
                i + 1,
                h.totals.violations.len(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    h.finish();
    let t = &h.totals;
    println!(
        "crash harness (seed {seed}, {clients} clients, standby {standby}) in {:.0} s: {t}",
        t0.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    if !t.violations.is_empty() {
        for v in t.violations.iter().take(20) {
            eprintln!("violation: {v}");
        }
        std::process::exit(1);
    }
}
