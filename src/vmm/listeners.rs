//! Where the vsock device's host listeners come from: the `--listen` and
//! `--unix` addresses, bound here, or listening sockets that a service
//! manager passed in (socket activation: the `LISTEN_FDS` protocol of
//! systemd, read with the `listenfd` crate).
//!
//! Why inherit them: a socket the service manager holds outlives nvhv.
//! Between a crash and the `nvhv resume` the manager starts next, a client
//! that connects waits in that socket's accept queue and is served by the
//! resumed guest, instead of being refused and backing off (many client
//! libraries wait 100 ms or more before they try again, far longer than
//! the resume). A socket nvhv binds itself exists only while nvhv runs.
//!
//! The inherited sockets must be taken before the process starts threads:
//! `listenfd` removes `LISTEN_FDS` and `LISTEN_PID` from the environment,
//! and changing the environment is not safe while other threads may read
//! it. `main` calls [`Inherited::from_env`] first thing.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The host listeners of the vsock device: TCP, Unix, or both.
#[derive(Debug)]
pub struct Listeners {
    /// TCP listener (`--listen`, or an inherited TCP socket).
    pub tcp: Option<TcpListener>,
    /// Unix-socket listener (`--unix`, or an inherited Unix stream socket).
    pub unix: Option<UnixListener>,
}

/// Listeners that cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// `--listen` or `--unix` could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address or path.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An inherited descriptor is neither a listening TCP socket nor a
    /// listening Unix stream socket.
    #[error(
        "descriptor {fd} passed by the service manager (LISTEN_FDS) is not a listening TCP or Unix stream socket{}",
        .detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
    )]
    NotAListener {
        /// The descriptor number (3 is the first).
        fd: usize,
        /// What was found instead, when known.
        detail: Option<String>,
    },
    /// More than one inherited socket of one kind.
    #[error("the service manager passed more than one {kind} listening socket; nvhv serves at most one TCP and one Unix listener")]
    TooMany {
        /// "TCP" or "Unix".
        kind: &'static str,
    },
    /// Inherited sockets and `--listen`/`--unix` together.
    #[error("--listen and --unix cannot be combined with listening sockets passed by the service manager (LISTEN_FDS): give one or the other")]
    Both,
}

/// Listening sockets inherited from a service manager, taken from the
/// environment once and handed out once (to the vsock device).
#[derive(Clone, Default)]
pub struct Inherited(Option<Arc<Mutex<Option<Listeners>>>>);

impl std::fmt::Debug for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_some() {
            "Inherited(listeners)"
        } else {
            "Inherited(none)"
        })
    }
}

impl Inherited {
    /// Takes the sockets `LISTEN_FDS` announces (from descriptor 3 on; when
    /// `LISTEN_PID` is set it must be this process's pid, or nothing is
    /// taken). Each must be a listening TCP or Unix stream socket, at most
    /// one of each. Call before any thread starts (see the module header).
    pub fn from_env() -> Result<Inherited, ListenError> {
        let mut fds = listenfd::ListenFd::from_env();
        if fds.len() == 0 {
            return Ok(Inherited(None));
        }
        let mut got = Listeners {
            tcp: None,
            unix: None,
        };
        for i in 0..fds.len() {
            let fd = i + 3;
            let not_listening = |e: Option<io::Error>| ListenError::NotAListener {
                fd,
                detail: e.map(|e| e.to_string()),
            };
            if let Ok(Some(l)) = fds.take_tcp_listener(i) {
                keep(&mut got.tcp, l, fd, "TCP")?;
                continue;
            }
            match fds.take_unix_listener(i) {
                Ok(Some(l)) => keep(&mut got.unix, l, fd, "Unix")?,
                Ok(None) => return Err(not_listening(None)),
                Err(e) => return Err(not_listening(Some(e))),
            }
        }
        Ok(Inherited(Some(Arc::new(Mutex::new(Some(got))))))
    }

    /// Whether a service manager passed listening sockets.
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// The inherited listeners, the first time only.
    fn take(&self) -> Option<Listeners> {
        self.0
            .as_ref()
            .and_then(|m| m.lock().unwrap_or_else(|e| e.into_inner()).take())
    }
}

/// Puts the socket inherited as descriptor `fd` into `slot`, if it
/// listens and the slot (one per `kind`) is still free.
fn keep<S: std::os::fd::AsFd>(
    slot: &mut Option<S>,
    l: S,
    fd: usize,
    kind: &'static str,
) -> Result<(), ListenError> {
    match is_listening(&l) {
        Ok(true) => {}
        Ok(false) => return Err(ListenError::NotAListener { fd, detail: None }),
        Err(e) => {
            return Err(ListenError::NotAListener {
                fd,
                detail: Some(e.to_string()),
            })
        }
    }
    if slot.replace(l).is_some() {
        return Err(ListenError::TooMany { kind });
    }
    Ok(())
}

/// Whether `s` is a listening socket (`SO_ACCEPTCONN`): a service manager
/// that passes connected sockets (systemd's `Accept=yes`) is misconfigured
/// for nvhv, which accepts its clients itself.
fn is_listening<S: std::os::fd::AsFd>(s: &S) -> io::Result<bool> {
    socket2::SockRef::from(s).is_listener()
}

/// The listeners for the vsock device: the inherited ones if a service
/// manager passed any (then `listen` and `unix` must be `None`), otherwise
/// `listen` (or `default` when `None`) and `unix`, bound here. A file
/// already at the Unix path is replaced.
pub fn listeners(
    inherited: &Inherited,
    listen: Option<&str>,
    unix: Option<&Path>,
    default: &str,
) -> Result<Listeners, ListenError> {
    if inherited.is_some() {
        if listen.is_some() || unix.is_some() {
            return Err(ListenError::Both);
        }
        if let Some(l) = inherited.take() {
            return Ok(l);
        }
    }
    let addr = listen.unwrap_or(default);
    let tcp = TcpListener::bind(addr).map_err(|source| ListenError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    let unix = match unix {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            Some(UnixListener::bind(p).map_err(|source| ListenError::Bind {
                addr: p.display().to_string(),
                source,
            })?)
        }
        None => None,
    };
    Ok(Listeners {
        tcp: Some(tcp),
        unix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_without_inherited_sockets_the_addresses_are_bound() {
        let l = listeners(&Inherited::default(), Some("127.0.0.1:0"), None, "x").unwrap();
        let tcp = l.tcp.expect("a TCP listener");
        assert!(is_listening(&tcp).unwrap());
        assert!(l.unix.is_none());
    }

    #[test]
    fn test_a_bad_address_is_named_in_the_error() {
        let e =
            listeners(&Inherited::default(), Some("127.0.0.1:notaport"), None, "x").unwrap_err();
        assert!(e.to_string().contains("127.0.0.1:notaport"), "{e}");
    }

    #[test]
    fn test_inherited_sockets_exclude_listen_and_unix() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let inherited = Inherited(Some(Arc::new(Mutex::new(Some(Listeners {
            tcp: Some(l),
            unix: None,
        })))));
        assert!(matches!(
            listeners(&inherited, Some("127.0.0.1:0"), None, "x"),
            Err(ListenError::Both)
        ));
        let got = listeners(&inherited, None, None, "127.0.0.1:1").unwrap();
        assert!(got.tcp.is_some());
    }

    #[test]
    fn test_a_connected_socket_is_not_a_listener() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(is_listening(&l).unwrap());
        assert!(!is_listening(&c).unwrap());
    }
}
