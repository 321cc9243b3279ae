//! `native-durable`: the `kv` guest's engine (`nvhv-kvstore`) run as an
//! ordinary process, made durable the way an application would do it
//! itself: every chunk of input that changed the store is appended to a log
//! in a preallocated file with one `O_DSYNC` write per group of requests,
//! and a reply is held until the log holds every change it depends on (the
//! same rule as nvhv's output commit: [`Conn::dep`] against the version the
//! log has made durable; a GET of durable data goes out at once).
//!
//! It is a measuring instrument, not a product: it has no recovery (the log
//! is written, never read) and serves only loopback clients. What it shows
//! is the ceiling on this machine for any durable server of this engine:
//! no virtual machine, no exits, no page compares, one flush per group,
//! and up to `depth` groups' flushes in flight at once (`depth` 1 is
//! Redis's `appendfsync always` loop with a cheaper flush: writes into
//! preallocated space, no file growth). nvhv's epoch mode can only come
//! close to it, never beat it: it runs the same engine with the same
//! flush and adds the virtual machine.
//!
//! The redis bench starts it as a child process by running its own binary
//! with `--serve-native PORT LOGFILE DEPTH` ([`serve`]).

use nvhv_kvstore::{feed, Conn, Store};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Size of the preallocated log; writes wrap around at its end.
const LOG_BYTES: u64 = 64 << 20;
/// Epoll data of the listener and of the flushers' completion eventfd;
/// connections use their ids from 2 on.
const LISTENER: u64 = 0;
const FLUSHED: u64 = 1;

/// One group of logged input: its sequence number, the bytes, and the
/// store version it makes durable.
struct Group {
    seq: u64,
    bytes: Vec<u8>,
    version: u64,
}

/// What the loop thread and the flusher threads share.
#[derive(Default)]
struct Queue {
    todo: VecDeque<Group>,
    /// Sequence number → version of the groups whose write returned.
    done: BTreeMap<u64, u64>,
    /// Next free byte of the log (wrapping).
    cursor: u64,
}

struct Client {
    stream: TcpStream,
    conn: Conn,
    /// Replies not yet sent, each with the version it waits for (0: none).
    held: VecDeque<(u64, Vec<u8>)>,
    /// Bytes the socket did not take yet (sent before anything held).
    unsent: Vec<u8>,
}

/// Runs the server until the process is killed. `depth` is how many
/// groups may be being written at once.
pub fn serve(port: u16, log_path: &Path, depth: usize) -> std::io::Result<()> {
    let depth = depth.max(1);
    // SIGTERM (how the bench stops its servers) ends it with status 0.
    let mut term = signal_hook::iterator::Signals::new([libc::SIGTERM])?;
    std::thread::spawn(move || {
        if term.forever().next().is_some() {
            std::process::exit(0);
        }
    });
    let log = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DSYNC)
        .open(log_path)?;
    // Preallocate by writing: later writes overwrite blocks that exist, so
    // a flush never waits for the file system's metadata.
    let zeros = vec![0u8; 1 << 20];
    for off in (0..LOG_BYTES).step_by(zeros.len()) {
        log.write_all_at(&zeros, off)?;
    }
    log.sync_all()?;
    let log = Arc::new(log);

    let listener = TcpListener::bind(("127.0.0.1", port))?;
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new()?;
    let flushed = EventFd::new(EFD_NONBLOCK)?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        flushed.as_raw_fd(),
        EpollEvent::new(EventSet::IN, FLUSHED),
    )?;

    let shared = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
    for _ in 0..depth {
        let (shared, log, flushed) = (shared.clone(), log.clone(), flushed.try_clone()?);
        std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || flusher(&shared, &log, &flushed))?;
    }

    let start = Instant::now();
    let mut store = Store::new(0x5eed, 1 << 30);
    let mut clients: HashMap<u64, Client> = HashMap::new();
    let mut next_id = 2u64;
    let mut events = vec![EpollEvent::default(); 256];
    let mut buf = vec![0u8; 64 << 10];
    let mut out = Vec::new();
    // The group being gathered, and the bookkeeping of groups in flight.
    let mut gathering: Vec<u8> = Vec::new();
    let (mut next_seq, mut in_flight, mut released_seq) = (0u64, 0usize, 0u64);
    let mut durable = store.version();
    loop {
        // Replies a full socket did not take are retried every millisecond.
        let timeout = if clients.values().any(|c| !c.unsent.is_empty()) {
            1
        } else {
            -1
        };
        // epoll_wait is never restarted after a signal handler: the SIGTERM
        // that stops the server interrupts it before the thread above exits.
        let n = match epoll.wait(timeout, &mut events) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            n => n?,
        };
        for ev in &events[..n] {
            match ev.data() {
                LISTENER => loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(true)?;
                            stream.set_nodelay(true)?;
                            let id = next_id;
                            next_id += 1;
                            epoll.ctl(
                                ControlOperation::Add,
                                stream.as_raw_fd(),
                                EpollEvent::new(EventSet::IN, id),
                            )?;
                            clients.insert(
                                id,
                                Client {
                                    stream,
                                    conn: Conn::new(),
                                    held: VecDeque::new(),
                                    unsent: Vec::new(),
                                },
                            );
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                },
                FLUSHED => {
                    let _ = flushed.read();
                    // Durable is the newest version of the contiguous run of
                    // finished groups: a log is durable as a prefix.
                    let (lock, _) = &*shared;
                    let mut q = lock.lock().unwrap();
                    while let Some(v) = q.done.remove(&released_seq) {
                        durable = durable.max(v);
                        released_seq += 1;
                        in_flight -= 1;
                    }
                }
                id => {
                    let Some(c) = clients.get_mut(&id) else {
                        continue;
                    };
                    let mut closed = false;
                    loop {
                        match c.stream.read(&mut buf) {
                            Ok(0) => {
                                closed = true;
                                break;
                            }
                            Ok(len) => {
                                let before = store.version();
                                let now_ms = start.elapsed().as_millis() as u64;
                                out.clear();
                                feed(&mut store, &mut c.conn, &buf[..len], now_ms, &mut out);
                                if store.version() != before {
                                    // The input is the log record: (connection,
                                    // length, bytes), replayable per connection.
                                    gathering.extend_from_slice(&id.to_le_bytes());
                                    gathering.extend_from_slice(&(len as u32).to_le_bytes());
                                    gathering.extend_from_slice(&buf[..len]);
                                }
                                if !out.is_empty() {
                                    c.held.push_back((c.conn.dep(), out.clone()));
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(_) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    if closed || c.conn.closing() {
                        let _ = epoll.ctl(
                            ControlOperation::Delete,
                            c.stream.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        clients.remove(&id);
                    }
                }
            }
        }
        // Group commit: what this round gathered goes to a flusher as one
        // write, unless `depth` groups are being written; then it waits
        // (and grows) until one finishes.
        if !gathering.is_empty() && in_flight < depth {
            let (lock, cvar) = &*shared;
            lock.lock().unwrap().todo.push_back(Group {
                seq: next_seq,
                bytes: std::mem::take(&mut gathering),
                version: store.version(),
            });
            cvar.notify_one();
            next_seq += 1;
            in_flight += 1;
        }
        // Send every reply whose dependencies are durable, in order per
        // connection.
        for c in clients.values_mut() {
            while c.held.front().is_some_and(|(need, _)| *need <= durable) {
                let (_, r) = c.held.pop_front().unwrap();
                c.unsent.extend_from_slice(&r);
            }
            if !c.unsent.is_empty() {
                match c.stream.write(&c.unsent) {
                    Ok(w) => {
                        c.unsent.drain(..w);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => c.unsent.clear(),
                }
            }
        }
    }
}

/// A flusher thread: writes groups to the log with `O_DSYNC` (the write
/// returns once the bytes are on the device) and reports each finished
/// group through `flushed`.
fn flusher(shared: &(Mutex<Queue>, Condvar), log: &File, flushed: &EventFd) {
    let (lock, cvar) = shared;
    loop {
        let (group, at) = {
            let mut q = lock.lock().unwrap();
            while q.todo.is_empty() {
                q = cvar.wait(q).unwrap();
            }
            let g = q.todo.pop_front().unwrap();
            let len = g.bytes.len() as u64;
            if q.cursor + len > LOG_BYTES {
                q.cursor = 0;
            }
            let at = q.cursor;
            q.cursor += len.div_ceil(512) * 512;
            (g, at)
        };
        // A group is what one round read: at most 256 reads of 64 KiB.
        assert!(
            group.bytes.len() as u64 <= LOG_BYTES,
            "group larger than the log"
        );
        log.write_all_at(&group.bytes, at).expect("log write");
        lock.lock().unwrap().done.insert(group.seq, group.version);
        flushed.write(1).expect("eventfd");
    }
}
