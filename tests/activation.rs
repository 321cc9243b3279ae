//! Socket activation: nvhv serving listening sockets that a service manager
//! passed in (`LISTEN_FDS`, descriptors from 3 on), as systemd does with a
//! `.socket` unit. The socket outlives nvhv, so a client that connects
//! while nvhv is down (killed, not yet resumed) waits in its accept queue
//! and is answered by the resumed guest.

mod common;

use common::Scratch;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// Starts `nvhv args` as a service manager would under socket activation:
/// `sock` as descriptor 3, `LISTEN_FDS=1` and `LISTEN_PID` set to nvhv's
/// own pid (a shell exports its pid and `exec`s nvhv, which keeps it).
fn spawn_activated(sock: OwnedFd, args: &[&str], stderr: &Path) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(r#"export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&0 0</dev/null"#)
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_nvhv"))
        .args(args)
        .stdin(Stdio::from(sock))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .expect("spawn sh")
}

/// Starts `nvhv args` serving `sock` (socket activation), its console and
/// stderr in files of `dir` named after `name`; returns it and the stderr
/// path.
fn start_serving(
    dir: &Scratch,
    sock: &TcpListener,
    name: &str,
    args: &[&str],
) -> (Started, PathBuf) {
    let console = dir.path(&format!("{name}.console"));
    let mut a = args.to_vec();
    a.extend(["--console", console.to_str().unwrap()]);
    let stderr = dir.path(&format!("{name}.stderr"));
    let child = spawn_activated(sock.try_clone().unwrap().into(), &a, &stderr);
    (Started(child), stderr)
}

/// A started nvhv, killed if still running when dropped (a failed test
/// leaves no VM behind).
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends one RESP command on `s` and reads one reply (of at most one read
/// of what arrives within `T`).
fn request(s: &mut TcpStream, cmd: &str) -> String {
    s.write_all(cmd.as_bytes()).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Connects to `port` until a PING gets PONG (the guest is up), or panics
/// with `stderr`'s text after `T`.
fn wait_pong(port: u16, child: &mut Child, stderr: &Path) {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "nvhv exited ({st}) before answering: {}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            if request(&mut s, "*1\r\n$4\r\nPING\r\n") == "+PONG\r\n" {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no PONG within {T:?}: {}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_client_connecting_while_nvhv_is_down_is_served_by_the_resumed_guest() {
    require_kvm!();
    let dir = Scratch::new("activation");
    let img = dir.path("vm.img");
    let img_s = img.to_str().unwrap();
    // The service manager's socket: it stays open here for the whole test.
    let sock = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let start = |name: &str, args: &[&str]| start_serving(&dir, &sock, name, args);
    let (mut vm, err1) = start("run", &["run", "--image", img_s, "--mem", "64M"]);
    wait_pong(port, &mut vm.0, &err1);
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    assert_eq!(
        request(&mut c, "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$7\r\nbefore!\r\n"),
        "+OK\r\n"
    );
    drop(c);

    // A crash without warning. Nothing serves the port now but the socket.
    vm.0.kill().unwrap();
    vm.0.wait().unwrap();
    let mut waiting = TcpStream::connect(("127.0.0.1", port))
        .expect("a connection to the inherited socket while nvhv is down");
    waiting.set_read_timeout(Some(T)).unwrap();
    waiting
        .write_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        .unwrap();

    let (mut vm, err2) = start("resume", &["resume", "--image", img_s]);
    let mut buf = [0u8; 64];
    let n = waiting.read(&mut buf).unwrap_or(0);
    let stderr = std::fs::read_to_string(&err2).unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        "$7\r\nbefore!\r\n",
        "the connection made while nvhv was down got no reply: {stderr}"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(vm.0.id() as i32, libc::SIGTERM) };
    let st = vm.0.wait().unwrap();
    assert!(
        st.success(),
        "suspend failed ({st}): {}",
        std::fs::read_to_string(&err2).unwrap_or_default()
    );
}

/// Polls `stderr` until it contains `what`, or panics after `T` (or if
/// `child` exits first).
fn wait_said(child: &mut Child, stderr: &Path, what: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let text = std::fs::read_to_string(stderr).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("nvhv exited ({st}) before saying {what:?}: {text}");
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} within {T:?}: {text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Two `nvhv resume --standby` of one image under socket activation, as two
/// services sharing one socket: the first resumes the (suspended) image at
/// once, the second stands by; when the first is killed, a client that
/// connects right after the kill waits in the socket's queue and is
/// answered by the second; the first, restarted, stands by in turn; an
/// orderly stop of the one serving leaves the image suspended and the
/// standby exits 0 without resuming it.
#[test]
fn a_pair_of_standbys_sharing_the_socket_serves_across_a_crash() {
    require_kvm!();
    let dir = Scratch::new("activation-standby");
    let img = dir.path("vm.img");
    let img_s = img.to_str().unwrap();
    let sock = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let start = |name: &str, args: &[&str]| start_serving(&dir, &sock, name, args);
    let (mut vm, err) = start("run", &["run", "--image", img_s, "--mem", "64M"]);
    wait_pong(port, &mut vm.0, &err);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(vm.0.id() as i32, libc::SIGTERM) };
    assert!(vm.0.wait().unwrap().success());

    let standby = ["resume", "--standby", "--image", img_s];
    let (mut a, err_a) = start("a", &standby);
    wait_pong(port, &mut a.0, &err_a);
    let said = std::fs::read_to_string(&err_a).unwrap();
    assert!(said.contains("after process start"), "{said}");
    let (mut b, err_b) = start("b", &standby);
    wait_said(&mut b.0, &err_b, "standing by");
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    assert_eq!(
        request(&mut c, "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nfrom!\r\n"),
        "+OK\r\n"
    );
    drop(c);

    // A crash without warning; a client right after it (once the killed
    // process is gone: it must not accept the connection as it dies).
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let mut waiting = TcpStream::connect(("127.0.0.1", port)).expect("connect after the kill");
    waiting.set_read_timeout(Some(T)).unwrap();
    assert_eq!(
        request(&mut waiting, "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
        "$5\r\nfrom!\r\n",
        "b: {}",
        std::fs::read_to_string(&err_b).unwrap_or_default()
    );
    let said = wait_said(&mut b.0, &err_b, "resumed");
    assert!(said.contains("after the nvhv running it died"), "{said}");

    // The first one, restarted, now stands by.
    let (mut a2, err_a2) = start("a2", &standby);
    wait_said(&mut a2.0, &err_a2, "standing by");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(b.0.id() as i32, libc::SIGTERM) };
    assert!(b.0.wait().unwrap().success());
    let st = common::wait_or_kill(&mut a2.0, T).expect("the standby exits");
    let said = std::fs::read_to_string(&err_a2).unwrap();
    assert!(st.success(), "{st}: {said}");
    assert!(
        said.contains("not left by a crash") && !said.contains("resumed"),
        "{said}"
    );
}

/// Runs `nvhv args` with `fd3` as descriptor 3 under `LISTEN_FDS=1`;
/// returns (success, stderr).
fn activated_output(fd3: OwnedFd, args: &[&str], dir: &Scratch) -> (bool, String) {
    let err = dir.path("bad.stderr");
    let mut child = spawn_activated(fd3, args, &err);
    let Some(st) = common::wait_or_kill(&mut child, T) else {
        panic!(
            "nvhv {args:?} still ran after {T:?}: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
    };
    (st.success(), std::fs::read_to_string(&err).unwrap())
}

#[test]
fn an_inherited_descriptor_that_is_not_a_listener_is_refused_before_the_image() {
    let dir = Scratch::new("activation-bad");
    let img = dir.path("vm.img");
    let file = std::fs::File::create(dir.path("not-a-socket")).unwrap();
    let (ok, err) = activated_output(
        file.into(),
        &["run", "--image", img.to_str().unwrap(), "--mem", "64M"],
        &dir,
    );
    assert!(!ok, "nvhv ran with a regular file as its listener: {err}");
    assert!(
        err.contains("descriptor 3") && err.contains("not a listening TCP or Unix stream socket"),
        "{err}"
    );
    assert!(!img.exists(), "an image was made: {err}");

    // A connected socket (systemd's Accept=yes) is not a listener either.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (ok, err) = activated_output(
        c.into(),
        &["run", "--image", img.to_str().unwrap(), "--mem", "64M"],
        &dir,
    );
    assert!(!ok && err.contains("not a listening"), "{err}");
    assert!(!img.exists(), "an image was made: {err}");
}

#[test]
fn inherited_sockets_and_listen_together_are_refused() {
    let dir = Scratch::new("activation-both");
    let img = dir.path("vm.img");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (ok, err) = activated_output(
        l.into(),
        &[
            "run",
            "--image",
            img.to_str().unwrap(),
            "--mem",
            "64M",
            "--listen",
            "127.0.0.1:0",
        ],
        &dir,
    );
    assert!(!ok, "nvhv ran with both: {err}");
    assert!(err.contains("cannot be combined"), "{err}");
    assert!(!img.exists(), "an image was made: {err}");
}
