//! The control socket: a Unix socket next to the image (`<image>.ctl`) through
//! which `nvhv suspend --image PATH` asks the process running that image for
//! an orderly suspend. One request per connection, one line each way.
//!
//! The socket file is only created by the process that holds the image lock,
//! so a stale socket left by a killed process is safely replaced.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

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
    pub fn start(
        image: &Path,
        on_suspend: impl Fn(Sender<String>) + Send + 'static,
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
                    let _ = serve(conn, &on_suspend, &counted);
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
) -> std::io::Result<()> {
    let mut line = String::new();
    // A request is one short line; never read more than 256 bytes.
    BufReader::new(std::io::Read::take(&conn, 256)).read_line(&mut line)?;
    let mut w = &conn;
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
        other => writeln!(w, "error: unknown request '{other}'"),
    }
}

/// Client side: ask the process running `image` to suspend; returns its reply.
pub fn request_suspend(image: &Path, timeout: Duration) -> Result<String, ControlError> {
    let path = socket_path(image);
    let conn =
        UnixStream::connect(&path).map_err(|_| ControlError::NotRunning(image.to_path_buf()))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(ControlError::Io)?;
    (&conn).write_all(b"suspend\n").map_err(ControlError::Io)?;
    let mut reply = String::new();
    BufReader::new(&conn)
        .read_line(&mut reply)
        .map_err(ControlError::Io)?;
    let reply = reply.trim().to_string();
    if reply.is_empty() {
        return Err(ControlError::Refused(
            "the VMM closed the connection".into(),
        ));
    }
    if let Some(e) = reply.strip_prefix("error: ") {
        return Err(ControlError::Refused(e.to_string()));
    }
    Ok(reply)
}
