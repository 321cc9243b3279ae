//! Shared helpers for the KVM integration tests: the `require_kvm!` gate,
//! scratch images on tmpfs, and driving the `nvhv` binary as a user would.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Skip the test when /dev/kvm is missing, unless `NVHV_REQUIRE_KVM=1` (CI),
/// in which case a missing KVM fails it.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::common::kvm_available() {
            if std::env::var("NVHV_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("NVHV_REQUIRE_KVM=1 but /dev/kvm cannot be opened");
            }
            eprintln!("SKIPPED: /dev/kvm not available");
            return;
        }
    };
}

/// True when /dev/kvm can be opened read-write.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The nvhv binary under test, started with SIGHUP at its default action
/// whatever the test runner inherited (`nohup cargo test` would otherwise
/// start every nvhv with SIGHUP ignored, which nvhv honours, and the
/// hangup tests would wait for a stop that never comes).
pub fn nvhv() -> Command {
    nvhv_under(&[])
}

/// [`nvhv()`] run by the command `wrapper` (e.g. `strace …`), the nvhv
/// binary its last argument; plain nvhv when `wrapper` is empty.
pub fn nvhv_under(wrapper: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    let bin = env!("CARGO_BIN_EXE_nvhv");
    let mut cmd = match wrapper {
        [] => Command::new(bin),
        [first, rest @ ..] => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
    };
    // SAFETY: between fork and exec only signal(2), which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            Ok(())
        });
    }
    cmd
}

/// A scratch directory on tmpfs (falls back to the temp dir), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        Scratch::under(&base, tag)
    }

    /// A scratch directory under `base`.
    pub fn under(base: &Path, tag: &str) -> Self {
        let p = base.join(format!(
            "nvhv-test-{tag}-{}-{:x}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ (std::ptr::addr_of!(base) as u128)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running nvhv process; killed on drop if still running.
pub struct Vmm {
    pub child: Child,
    pub console: PathBuf,
    pub stderr: PathBuf,
}

impl Vmm {
    /// Start `nvhv <args> --console <console>`, stderr to a file.
    pub fn start(args: &[&str], console: PathBuf) -> Vmm {
        Vmm::start_under(&[], args, console)
    }

    /// [`Vmm::start`], nvhv run by `wrapper` ([`nvhv_under`]).
    pub fn start_under(wrapper: &[&str], args: &[&str], console: PathBuf) -> Vmm {
        let stderr = console.with_extension("stderr");
        let err = std::fs::File::create(&stderr).unwrap();
        let child = nvhv_under(wrapper)
            .args(args)
            .arg("--console")
            .arg(&console)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn nvhv");
        Vmm {
            child,
            console,
            stderr,
        }
    }

    pub fn console_text(&self) -> String {
        read_or_empty(&self.console)
    }

    pub fn stderr_text(&self) -> String {
        read_or_empty(&self.stderr)
    }

    /// Poll the console until `pred` holds or `timeout` passes; panics with the
    /// console and stderr on timeout or if the process exits first.
    pub fn wait_console(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let console = self.console.clone();
        self.wait_for(what, timeout, || pred(&read_or_empty(&console)));
    }

    /// [`Vmm::wait_console`], on nvhv's stderr.
    pub fn wait_stderr(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let stderr = self.stderr.clone();
        self.wait_for(what, timeout, || pred(&read_or_empty(&stderr)));
    }

    /// The TCP port nvhv says clients connect to ("clients connect to
    /// 127.0.0.1:PORT" on its running or resumed line): the one the kernel
    /// chose for `--listen 127.0.0.1:0`. Waits up to `timeout` for the line.
    pub fn bound_port(&mut self, timeout: Duration) -> u16 {
        const SAID: &str = "clients connect to 127.0.0.1:";
        self.wait_stderr("the address clients connect to", timeout, |t| {
            t.contains(SAID)
        });
        let text = self.stderr_text();
        let after = &text[text.find(SAID).unwrap() + SAID.len()..];
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        digits
            .parse()
            .unwrap_or_else(|e| panic!("no port after {SAID:?} ({e}):\n{text}"))
    }

    fn wait_for(&mut self, what: &str, timeout: Duration, done: impl Fn() -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if done() {
                return;
            }
            let why = match self.child.try_wait() {
                Ok(Some(st)) => format!("nvhv exited ({st}) before {what}"),
                _ if Instant::now() > deadline => format!("timed out waiting for {what}"),
                _ => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            panic!(
                "{why}\nconsole:\n{}\nstderr:\n{}",
                self.console_text(),
                self.stderr_text()
            );
        }
    }

    /// Send a signal and wait for the exit status.
    pub fn signal_and_wait(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        wait_or_kill(&mut self.child, Duration::from_secs(60)).unwrap_or_else(|| {
            panic!(
                "nvhv did not exit within 60 s of signal {sig} (killed)\nstderr:\n{}",
                self.stderr_text()
            )
        })
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for `child` to exit, at most `timeout`; on timeout kills it, reaps
/// it and returns None.
fn read_or_empty(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `nvhv inspect --json IMG`, parsed; a failed inspect fails the test.
pub fn inspect_json(img: &str) -> serde_json::Value {
    let out = nvhv_output(&["inspect", "--json", img]);
    assert!(
        out.status.success(),
        "inspect {img}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Run nvhv to completion.
pub fn nvhv_output(args: &[&str]) -> Output {
    nvhv().args(args).stdin(Stdio::null()).output().unwrap()
}

/// Values printed as `counter <vcpu> <n>` for one vCPU, in order.
pub fn counters(text: &str, vcpu: u32) -> Vec<u64> {
    let prefix = format!("counter {vcpu} ");
    complete_lines(text)
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// The lines of `text` that end in a newline. nvhv writes the console a
/// line at a time (a line cut by a stop is finished after the resume), but
/// a console file read while the guest runs may end mid-write.
fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
}

/// Values printed as `ticks <n>`.
pub fn ticks(text: &str) -> Vec<u64> {
    complete_lines(text)
        .filter_map(|l| l.strip_prefix("ticks "))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// SHA-free fingerprint of a file: its full bytes.
pub fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Gives the calling thread a mount namespace of its own with every mount
/// private: what it (or a child it starts) mounts there is seen by nobody
/// else and goes away with the thread. Needs root.
pub fn private_mount_namespace() -> std::io::Result<()> {
    // SAFETY: unshare(2) and mount(2) with valid NUL-terminated strings;
    // they change only this thread's (and its children's) mount table.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs `cmd` to completion; a failure fails the test, with its stderr.
pub fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
