//! Epoch pause against dirty pages, next to the memory-copy bound measured on
//! the same machine in the same run.
//!
//! `cargo bench --bench epoch_pause [-- --dir /dev/shm] [--hot-pages N]`
//!
//! Runs the kv guest in epoch mode with `NVHV_LOG=debug` (one line per
//! epoch: pages logged, pause), writes values of 0–16 MiB so that epochs
//! carry from a few to thousands of dirty pages, and reports the median pause
//! per bucket of logged pages beside the time this process needs to copy the
//! same number of 4 KiB pages (the floor of a copy-based checkpoint).

mod support;

use support::{free_port, nvhv};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

/// On drop (also when a panic unwinds): SIGKILL the VM if it still runs,
/// and remove its image.
struct Cleanup {
    img: String,
    pid: Option<u32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            // SAFETY: kill(2) on our own child, which has not been reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(&self.img);
    }
}

/// SET key to `len` bytes and read the +OK.
fn set(s: &mut TcpStream, key: &str, len: usize) {
    let mut cmd = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${len}\r\n", key.len()).into_bytes();
    cmd.extend(std::iter::repeat_n(b'x', len));
    cmd.extend_from_slice(b"\r\n");
    s.write_all(&cmd).unwrap();
    let mut reply = [0u8; 5];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"+OK\r\n");
}

/// Median time to copy `pages` 4 KiB pages, over a few runs.
fn copy_bound_us(pages: usize) -> f64 {
    let src = vec![7u8; pages.max(1) * 4096];
    let mut dst = vec![0u8; src.len()];
    let mut t: Vec<f64> = (0..9)
        .map(|_| {
            let t0 = Instant::now();
            for (d, s) in dst.chunks_mut(4096).zip(src.chunks(4096)) {
                d.copy_from_slice(s);
            }
            std::hint::black_box(&dst);
            t0.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

/// Epoch pause against dirty pages, next to the memory-copy bound measured
/// on the same machine in the same run.
///
/// See the module documentation at the top of `benches/epoch_pause.rs` for
/// what is measured.
#[derive(Parser)]
#[command(name = "epoch_pause", bin_name = "cargo bench --bench epoch_pause --")]
struct Cli {
    /// Where the image goes.
    #[arg(long, default_value = "/dev/shm")]
    dir: String,
    /// nvhv's `--hot-pages` (pages left writable and compared every pause); its default otherwise.
    #[arg(long, value_name = "N")]
    hot_pages: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let cli = Cli::parse();
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("epoch_pause bench: /dev/kvm not available, nothing measured");
        return;
    }
    let dir = cli.dir;
    // --hot-pages N: the budget of pages left writable (and compared every
    // pause), passed on to nvhv; its default otherwise.
    let hot: Vec<String> = cli
        .hot_pages
        .map(|n| vec!["--hot-pages".into(), n])
        .unwrap_or_default();
    let img = format!("{dir}/nvhv-bench-epoch-pause-{}.img", std::process::id());
    let _ = std::fs::remove_file(&img);
    let port = free_port();
    let mut child = Command::new(nvhv())
        .args([
            "run",
            "--image",
            &img,
            "--mem",
            "512M",
            "--persist",
            "epoch",
        ])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--console",
            "/dev/null",
        ])
        .args(&hot)
        .env("NVHV_LOG", "nvhv::vmm=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cleanup = Cleanup {
        img: img.clone(),
        pid: Some(child.id()),
    };
    let stderr = child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut s = loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            break s;
        }
        assert!(Instant::now() < deadline, "kv guest never listened");
        std::thread::sleep(Duration::from_millis(10));
    };
    for round in 0..3 {
        for (i, len) in [
            0usize,
            4 << 10,
            64 << 10,
            256 << 10,
            1 << 20,
            4 << 20,
            16 << 20,
        ]
        .iter()
        .enumerate()
        {
            for j in 0..5 {
                set(&mut s, &format!("k{round}:{i}:{j}"), *len);
            }
        }
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    cleanup.pid = None;
    drop(cleanup);
    let lines = lines.join().unwrap();

    let field = |l: &str, k: &str| -> Option<u64> {
        let i = l.find(k)? + k.len();
        l[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let mut samples: Vec<(u64, u64, u64)> = lines
        .iter()
        .filter(|l| l.contains("epoch committed"))
        .filter_map(|l| {
            Some((
                field(l, "pages=")?,
                field(l, "pause_us=")?,
                field(l, "hot=")?,
            ))
        })
        .collect();
    samples.sort();
    println!(
        "nvhv epoch pause vs dirty pages (kv guest, image in {dir}; hot-page budget {}; {} epochs)",
        hot.get(1).map_or("nvhv's default", String::as_str),
        samples.len()
    );
    println!("| pages logged | epochs | hot pages (copied and compared) p50 | pause p50 µs | pause max µs | copy bound for the logged pages µs |");
    println!("|---|---|---|---|---|---|");
    for (lo, hi) in [
        (0, 16),
        (16, 64),
        (64, 256),
        (256, 1024),
        (1024, 4096),
        (4096, u64::MAX),
    ] {
        let mut b: Vec<u64> = samples
            .iter()
            .filter(|(p, _, _)| *p >= lo && *p < hi)
            .map(|&(_, u, _)| u)
            .collect();
        let mut hot: Vec<u64> = samples
            .iter()
            .filter(|(p, _, _)| *p >= lo && *p < hi)
            .map(|&(_, _, h)| h)
            .collect();
        hot.sort();
        if b.is_empty() {
            continue;
        }
        b.sort();
        let mid = samples
            .iter()
            .filter(|(p, _, _)| *p >= lo && *p < hi)
            .map(|&(p, _, _)| p)
            .nth(b.len() / 2)
            .unwrap_or(lo) as usize;
        let hi_s = if hi == u64::MAX {
            "∞".to_string()
        } else {
            hi.to_string()
        };
        println!(
            "| {lo}–{hi_s} | {} | {} | {} | {} | {:.1} (at {mid} pages) |",
            b.len(),
            hot[hot.len() / 2],
            b[b.len() / 2],
            b[b.len() - 1],
            copy_bound_us(mid)
        );
    }
}
