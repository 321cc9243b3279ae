//! The control socket: a Unix socket next to the image (`<image>.ctl`) through
//! which `nvhv suspend --image PATH` asks the process running that image for
//! an orderly suspend, and a standby (`nvhv resume --standby`) asks for its
//! listening sockets and its death notice (`super::notice`). One request per
//! connection: a line in; a line out (`suspend`), or one byte per
//! descriptor with the descriptor attached (`SCM_RIGHTS`: `t` TCP, `u`
//! Unix, `n` the notice) and `.` at the end (`listeners`, `notice`).
//!
//! The socket file is only created by the process that owns the image (it
//! holds the image lock, or, a standby taking over, the successor claim that
//! keeps every other opener out), so a stale socket left by a killed process
//! is safely replaced, and whatever answers on it is the image's writer.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::listeners::Listeners;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Binding the socket failed.
    #[error("cannot create control socket {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No process serves this image.
    #[error("no running nvhv serves {0} (no control socket answers)")]
    NotRunning(PathBuf),
    /// The request failed on the way.
    #[error("control request failed")]
    Io(#[source] std::io::Error),
    /// The VMM answered with an error.
    #[error("{0}")]
    Refused(String),
}

/// Socket path for an image.
pub fn socket_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

/// A running control server; removes its socket file when dropped.
pub struct Server {
    path: PathBuf,
    /// Requests being answered: the VMM waits for them before it exits, or
    /// the client could see the connection close without its reply.
    in_flight: Arc<(Mutex<usize>, Condvar)>,
}

impl Server {
    /// Listen on the image's socket; `on_suspend` is called with a sender for
    /// the reply line each time a client asks for a suspend.
    /// `notice`: the death notice the image's writer holds, handed to a
    /// standby that asks for it.
    pub fn start(
        image: &Path,
        on_suspend: impl Fn(Sender<String>) + Send + 'static,
        listening: Listeners,
        notice: Option<OwnedFd>,
    ) -> Result<Server, ControlError> {
        let path = socket_path(image);
        let _ = std::fs::remove_file(&path);
        let in_flight: Arc<(Mutex<usize>, Condvar)> = Arc::default();
        let counted = Arc::clone(&in_flight);
        let listener = UnixListener::bind(&path).map_err(|source| ControlError::Bind {
            path: path.clone(),
            source,
        })?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let _ = serve(conn, &on_suspend, &counted, &listening, notice.as_ref());
                }
            })
            .map_err(|source| ControlError::Bind {
                path: path.clone(),
                source,
            })?;
        Ok(Server { path, in_flight })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // ORDER: the VMM drops the server after it sent its last reply; let
        // the control thread write it before the process exits (bounded, so
        // a client that stopped reading cannot hold the exit).
        let (n, cv) = &*self.in_flight;
        let g = n.lock().unwrap_or_else(|e| e.into_inner());
        let _ = cv.wait_timeout_while(g, Duration::from_secs(1), |n| *n > 0);
    }
}

fn serve(
    conn: UnixStream,
    on_suspend: &impl Fn(Sender<String>),
    in_flight: &(Mutex<usize>, Condvar),
    listening: &Listeners,
    notice: Option<&OwnedFd>,
) -> std::io::Result<()> {
    let mut line = String::new();
    // A request is one short line; never read more than 256 bytes.
    BufReader::new(std::io::Read::take(&conn, 256)).read_line(&mut line)?;
    let mut w = &conn;
    let send = |tag: &[u8], fd: RawFd| {
        conn.send_with_fd(tag, fd)
            .map(drop)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    };
    match line.trim() {
        "suspend" => {
            let (tx, rx) = std::sync::mpsc::channel();
            // ORDER: counted before the VMM hears of the request, so it
            // cannot exit between its reply and our write.
            *in_flight.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            on_suspend(tx);
            let reply = rx
                .recv()
                .unwrap_or_else(|_| "error: the VMM stopped before replying".into());
            let r = writeln!(w, "{reply}");
            *in_flight.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            in_flight.1.notify_all();
            r
        }
        "listeners" => {
            if let Some(l) = &listening.tcp {
                send(b"t", l.as_raw_fd())?;
            }
            if let Some(l) = &listening.unix {
                send(b"u", l.as_raw_fd())?;
            }
            w.write_all(b".")
        }
        "notice" => {
            if let Some(fd) = notice {
                send(b"n", fd.as_raw_fd())?;
            }
            w.write_all(b".")
        }
        other => writeln!(w, "error: unknown request '{other}'"),
    }
}

/// Connects to the control socket of the process running `image` and sends
/// `request`; replies are read with `timeout`.
fn send_request(
    image: &Path,
    timeout: Duration,
    request: &str,
) -> Result<UnixStream, ControlError> {
    let conn = UnixStream::connect(socket_path(image))
        .map_err(|_| ControlError::NotRunning(image.to_path_buf()))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(ControlError::Io)?;
    writeln!(&conn, "{request}").map_err(ControlError::Io)?;
    Ok(conn)
}

/// The error of a control connection the serving nvhv closed before its
/// answer ended.
fn closed() -> ControlError {
    ControlError::Refused("the VMM closed the connection".into())
}

/// Client side: sends `request` and receives the descriptors of the reply,
/// each with its one-byte tag (one of `tags`), up to the closing `.`;
/// `what` names them in the error any other answer causes (an nvhv that
/// does not know the request answers with an error line).
fn request_descriptors(
    image: &Path,
    timeout: Duration,
    request: &str,
    (what, tags): (&str, &[u8]),
) -> Result<Vec<(u8, OwnedFd)>, ControlError> {
    let conn = send_request(image, timeout, request)?;
    let mut got = Vec::new();
    loop {
        // One byte per call: each call gets at most one message's descriptor.
        let mut tag = [0u8; 1];
        let (n, file) = conn
            .recv_with_fd(&mut tag)
            .map_err(|e| ControlError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
        match (n, tag[0], file) {
            (1, b'.', None) => return Ok(got),
            (1, t, Some(f)) if tags.contains(&t) => got.push((t, OwnedFd::from(f))),
            (0, ..) => return Err(closed()),
            _ => return Err(ControlError::Refused(format!("no {what} handed on"))),
        }
    }
}

/// Client side: the listening sockets of the process running `image`
/// (new descriptors of the same sockets).
pub fn request_listeners(image: &Path, timeout: Duration) -> Result<Listeners, ControlError> {
    let mut got = Listeners {
        tcp: None,
        unix: None,
    };
    let what = ("listening sockets", b"tu".as_slice());
    for (tag, fd) in request_descriptors(image, timeout, "listeners", what)? {
        if tag == b't' {
            got.tcp = Some(TcpListener::from(fd));
        } else {
            got.unix = Some(UnixListener::from(fd));
        }
    }
    Ok(got)
}

/// Client side: the death notice of the process running `image`, if it
/// holds one (`None`: it runs without, e.g. in suspend-only mode).
pub fn request_notice(image: &Path, timeout: Duration) -> Result<Option<OwnedFd>, ControlError> {
    let what = ("death notice", b"n".as_slice());
    let got = request_descriptors(image, timeout, "notice", what)?;
    Ok(got.into_iter().last().map(|(_, fd)| fd))
}

/// Client side: ask the process running `image` to suspend; returns its reply.
pub fn request_suspend(image: &Path, timeout: Duration) -> Result<String, ControlError> {
    let conn = send_request(image, timeout, "suspend")?;
    let mut reply = String::new();
    BufReader::new(&conn)
        .read_line(&mut reply)
        .map_err(ControlError::Io)?;
    let reply = reply.trim().to_string();
    if reply.is_empty() {
        return Err(closed());
    }
    if let Some(e) = reply.strip_prefix("error: ") {
        return Err(ControlError::Refused(e.to_string()));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `listeners` request hands over new descriptors of the very
    /// sockets: a client connecting to the address is accepted through the
    /// received one.
    #[test]
    fn listening_sockets_are_handed_over() {
        let dir = std::env::temp_dir().join(format!("nvhv-ctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("vm.img");
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let unix_path = dir.join("kv.sock");
        let unix = UnixListener::bind(&unix_path).unwrap();
        let both = Listeners {
            tcp: Some(tcp),
            unix: Some(unix),
        };
        let server = Server::start(&image, |_| {}, both, None).unwrap();
        let got = request_listeners(&image, Duration::from_secs(10)).unwrap();
        let t = got.tcp.expect("the TCP listener");
        let u = got.unix.expect("the Unix listener");
        assert_eq!(t.local_addr().unwrap(), addr);
        assert_eq!(
            u.local_addr().unwrap().as_pathname(),
            Some(unix_path.as_path())
        );
        let c = std::net::TcpStream::connect(addr).unwrap();
        let (a, _) = t.accept().unwrap();
        assert_eq!(a.peer_addr().unwrap(), c.local_addr().unwrap());
        // Without sockets: an empty answer, not an error.
        drop(server);
        let none = Listeners {
            tcp: None,
            unix: None,
        };
        let _server = Server::start(&image, |_| {}, none, None).unwrap();
        let got = request_listeners(&image, Duration::from_secs(10)).unwrap();
        assert!(got.tcp.is_none() && got.unix.is_none());
        // Nor is a missing death notice.
        assert!(request_notice(&image, Duration::from_secs(10))
            .unwrap()
            .is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The `notice` request hands over the writer's death notice: waiting on
    /// the received page ends when the writer lets go.
    #[test]
    fn the_death_notice_is_handed_over() {
        let dir = std::env::temp_dir().join(format!("nvhv-ctl-notice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("vm.img");
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            let held = crate::nvram::notice::Held::hold().unwrap();
            let none = Listeners {
                tcp: None,
                unix: None,
            };
            let server = Server::start(&image, |_| {}, none, Some(held.share().unwrap())).unwrap();
            tx.send(()).unwrap();
            go_rx.recv().unwrap();
            drop(held);
            drop(server);
        });
        rx.recv().unwrap();
        let image = dir.join("vm.img");
        let fd = request_notice(&image, Duration::from_secs(10))
            .unwrap()
            .expect("the notice");
        let waiter = std::thread::spawn(move || crate::nvram::notice::wait(fd).unwrap());
        go_tx.send(()).unwrap();
        writer.join().unwrap();
        assert_eq!(
            waiter.join().unwrap(),
            crate::nvram::notice::Ended::Released
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
