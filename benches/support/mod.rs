//! Helpers shared by the benchmarks that drive `nvhv` and `redis-server` as
//! processes (`redis.rs`, `recovery.rs`, `epoch_pause.rs`, `lifecycle.rs`).
//! Not a bench target itself: each bench includes it with `mod support;`.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Appends the RESP encoding of the command `args` (an array of bulk
/// strings) to `buf`.
pub fn push_cmd(buf: &mut Vec<u8>, args: &[&[u8]]) {
    buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
}

/// The `nvhv` binary cargo built for this bench.
pub fn nvhv() -> PathBuf {
    // NVHV_BIN=path measures another build (an A/B of two builds in one sitting).
    std::env::var_os("NVHV_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_nvhv")))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `name` found on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Makes sure `redis-server` exists: apt-get install it if missing.
pub fn ensure_redis_server() -> Result<(), String> {
    if which("redis-server").is_some() {
        return Ok(());
    }
    eprintln!("redis-server missing: apt-get install -y redis-server");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "redis-server"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
    };
    let ok = matches!(install(), Ok(s) if s.success())
        || (matches!(
            Command::new("apt-get").args(["update", "-q"]).stdout(Stdio::null()).status(),
            Ok(s) if s.success()
        ) && matches!(install(), Ok(s) if s.success()));
    if ok && which("redis-server").is_some() {
        Ok(())
    } else {
        Err("redis-server is not installed and apt-get could not install it".into())
    }
}

/// Whether `dir` is on tmpfs (by /proc/mounts, longest matching mount point).
pub fn is_tmpfs(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && dir.starts_with(f[1])).then(|| (f[1].len(), f[2] == "tmpfs"))
        })
        .max()
        .is_some_and(|(_, t)| t)
}

/// Makes `cmd` start under socket activation, as a service manager would:
/// `listener` becomes its descriptor 3 and `LISTEN_FDS=1` is set (without
/// `LISTEN_PID`, which nvhv's `listenfd` then does not check; the pid is not
/// known before the spawn). nvhv then serves `listener` instead of binding
/// `--listen`, and a client may connect before nvhv runs.
pub fn socket_activated(cmd: &mut Command, listener: &std::net::TcpListener) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    cmd.env("LISTEN_FDS", "1").env_remove("LISTEN_PID");
    // SAFETY: between fork and exec the closure calls only dup2 and fcntl,
    // which are async-signal-safe, on descriptors the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                // Already in place: clear its close-on-exec flag instead.
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
