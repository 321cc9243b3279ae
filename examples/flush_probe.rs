//! The floor of a durable write on a file system: how long `fdatasync`
//! takes after a small write, measured on the machine itself.
//!
//! `cargo run --release --example flush_probe -- [--dir /var/tmp] [--rounds 400]`
//!
//! Writes a 64 MiB file (so every block is allocated and the later writes
//! change no metadata), then, `--rounds` times 0.2 ms apart, for each case:
//! one 16 KiB write; two 8 KiB writes 7 MiB apart (a redo record and a state
//! slot); the same plus 14 scattered 4 KiB pages (an applied epoch whose
//! write-back was not started) — each followed by `fdatasync`, which alone is
//! timed. Any design that acknowledges a write only once it is durable pays
//! at least the first figure per acknowledgement when one client waits for
//! each reply.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;

const MIB: u64 = 1 << 20;

/// The fdatasync floor of a file system.
#[derive(Parser)]
struct Args {
    /// Directory for the scratch file (on the file system to measure).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Timed flushes per case.
    #[arg(long, default_value_t = 400)]
    rounds: usize,
}

fn main() {
    let Args { dir, rounds } = Args::parse();
    let dir = dir.display();
    let path = format!("{dir}/nvhv-flush-probe-{}.bin", std::process::id());
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot create {path}: {e}"));
    let fill = vec![1u8; MIB as usize];
    for i in 0..64 {
        f.write_all_at(&fill, i * MIB).expect("fill");
    }
    f.sync_all().expect("fsync");
    let (b16, b8, page) = (vec![3u8; 16 << 10], vec![2u8; 8 << 10], vec![4u8; 4096]);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_page = || {
        // xorshift: scattered pages in 16..56 MiB.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        16 * MIB + (seed % 10_240) * 4096
    };
    type Case<'a> = (&'a str, Box<dyn FnMut() + 'a>);
    let cases: Vec<Case> = vec![
        (
            "one 16 KiB write",
            Box::new(|| f.write_all_at(&b16, MIB).expect("write")),
        ),
        (
            "two 8 KiB writes, 7 MiB apart",
            Box::new(|| {
                f.write_all_at(&b8, MIB).expect("write");
                f.write_all_at(&b8, 8 * MIB).expect("write");
            }),
        ),
        (
            "two 8 KiB writes + 14 scattered 4 KiB pages",
            Box::new(|| {
                f.write_all_at(&b8, MIB).expect("write");
                f.write_all_at(&b8, 8 * MIB).expect("write");
                for _ in 0..14 {
                    f.write_all_at(&page, next_page()).expect("write");
                }
            }),
        ),
    ];
    println!("fdatasync after a write, {rounds} rounds each, file in {dir}:");
    for (name, mut write) in cases {
        let mut us: Vec<f64> = (0..rounds)
            .map(|_| {
                write();
                let t = Instant::now();
                f.sync_data().expect("fdatasync");
                let d = t.elapsed().as_secs_f64() * 1e6;
                std::thread::sleep(Duration::from_micros(200));
                d
            })
            .collect();
        us.sort_by(f64::total_cmp);
        let q = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
        println!(
            "  {name:45} p50 {:6.0} µs  p90 {:6.0} µs  max {:6.0} µs",
            q(0.5),
            q(0.9),
            q(1.0)
        );
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
}
