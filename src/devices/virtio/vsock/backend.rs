//! The vsock device thread: one epoll loop over the listeners, the accepted
//! host sockets (nonblocking, edge-triggered), the QueueNotify EventFd and
//! the control EventFd, driving [`VsockCore`] in bounded batches.
//!
//! Exit-free data path: while the core makes progress the thread polls the
//! rings in guest memory (`epoll_wait` with a zero timeout for the sockets)
//! with driver notifications suppressed, so a busy guest never exits to
//! notify; a poll that found nothing yields the core (`sched_yield`) to
//! whichever thread will bring the next work. After [`IDLE_SPIN`]
//! (configurable) without progress it re-enables notifications,
//! re-checks the rings (closing the race with a driver that published a
//! buffer just before), and only then blocks in epoll. Anything that wakes it
//! (a notification, a socket, a control request) puts it back into polling
//! with notifications suppressed.
//!
//! Pause is a flag in the core, set under the core mutex: the thread holds
//! that mutex for each whole batch and checks the flag each time it takes it,
//! so once `pause()` has set it no descriptor is half-processed and nothing
//! moves until `resume()`.

use std::io::{self, ErrorKind};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::HostStream;
use super::device::{Shared, VsockCore};

/// Default time to keep polling without progress before re-enabling
/// notifications and sleeping.
pub const IDLE_SPIN: Duration = Duration::from_micros(100);

/// While asleep, look at the rings this often anyway. A driver that does not
/// fence between publishing its available index and reading `avail_event`
/// (`virtio-drivers` 0.13 has only a Release store there, and x86 may reorder
/// a store before a later load) can miss the notification the device asked
/// for; this bounds such a lost kick to about a millisecond instead of a hang.
pub const RECHECK: Duration = Duration::from_millis(1);

/// After [`IDLE_BACKOFF`] without progress, each empty re-check doubles the
/// next one's delay up to this, so an idle device costs next to no CPU. (A
/// kick lost right after a long idle period then waits at most this long.)
pub const RECHECK_MAX: Duration = Duration::from_millis(64);

/// How long the device must have made no progress before re-checks back off.
pub const IDLE_BACKOFF: Duration = Duration::from_millis(100);

const TOKEN_NOTIFY: u64 = 0;
const TOKEN_CTRL: u64 = 1;
const TOKEN_TCP: u64 = 2;
const TOKEN_UNIX: u64 = 3;
const TOKEN_CONN: u64 = 1 << 32;
const MAX_EVENTS: usize = 128;
const ACCEPT_BATCH: usize = 64;

/// The host listeners whose connections are forwarded to the guest.
#[derive(Debug, Default)]
pub struct Listeners {
    /// TCP listener (`--listen`).
    pub tcp: Option<TcpListener>,
    /// Unix-socket listener.
    pub unix: Option<UnixListener>,
}

/// Start the device thread for `shared`; it polls for `idle_spin` without
/// progress before it sleeps.
pub fn spawn(
    shared: Arc<Shared>,
    listeners: Listeners,
    idle_spin: Duration,
) -> io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    let add = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(shared.notify_evt.as_raw_fd(), TOKEN_NOTIFY)?;
    add(shared.ctrl_evt.as_raw_fd(), TOKEN_CTRL)?;
    if let Some(l) = &listeners.tcp {
        l.set_nonblocking(true)?;
        add(l.as_raw_fd(), TOKEN_TCP)?;
    }
    if let Some(l) = &listeners.unix {
        l.set_nonblocking(true)?;
        add(l.as_raw_fd(), TOKEN_UNIX)?;
    }
    let t = DeviceThread {
        shared,
        epoll,
        listeners,
        idle_spin,
        full_warned: false,
    };
    std::thread::Builder::new()
        .name("nvhv-vsock".into())
        .spawn(move || t.run())
}

struct DeviceThread {
    shared: Arc<Shared>,
    epoll: Epoll,
    listeners: Listeners,
    idle_spin: Duration,
    full_warned: bool,
}

impl DeviceThread {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); MAX_EVENTS];
        let mut sleeping = false;
        let mut timeout_ms: i32 = -1;
        let mut last_progress = Instant::now();
        loop {
            let n = match self
                .epoll
                .wait(if sleeping { timeout_ms } else { 0 }, &mut events)
            {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => 0,
                Err(e) => {
                    tracing::warn!("vsock: epoll_wait failed: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                    0
                }
            };
            let shared = Arc::clone(&self.shared);
            let mut core = shared.lock();
            if core.paused && !core.stopping {
                while core.paused && !core.stopping {
                    core = shared.cv.wait(core).unwrap_or_else(|e| e.into_inner());
                }
                // Poll once at once (the guest may have queued work during
                // the pause), but a pause is not progress: an idle device
                // keeps its backed-off re-check period across epochs.
                sleeping = false;
            }
            if core.stopping {
                break;
            }
            for ev in &events[..n] {
                self.dispatch(&mut core, ev);
            }
            if sleeping {
                let now = Instant::now();
                let timer_due = core.next_deadline().is_some_and(|d| d <= now);
                if n == 0 && !timer_due && core.is_running() && !core.ring_work_pending() {
                    // The periodic re-check found nothing: stay asleep
                    // (reading the rings only, so no page gets dirty), and
                    // re-check less often, never past the next timer.
                    let cap = core.next_deadline().map_or(RECHECK_MAX, |d| {
                        d.saturating_duration_since(now).min(RECHECK_MAX)
                    });
                    let cap_ms =
                        i32::try_from(cap.as_micros().div_ceil(1000).max(1)).unwrap_or(i32::MAX);
                    if timeout_ms > 0 && now.duration_since(last_progress) >= IDLE_BACKOFF {
                        timeout_ms = timeout_ms.saturating_mul(2).min(cap_ms);
                    }
                    drop(core);
                    continue;
                }
                // Woken (by anything, or the timer): back to polling. Not
                // progress by itself (an epoch's resume kicks us): if the
                // poll finds nothing, the idle back-off carries on.
                sleeping = false;
                core.suppress_notifications();
            }
            let now = Instant::now();
            let progress = core.run(now);
            if progress {
                last_progress = now;
            } else if !core.is_running() {
                // Nothing to poll: wait for activation or sockets.
                sleeping = true;
                timeout_ms = -1;
            } else if now.duration_since(last_progress) >= self.idle_spin {
                if core.arm_notifications() {
                    // Work arrived while arming: keep polling.
                    core.suppress_notifications();
                    last_progress = now;
                } else {
                    sleeping = true;
                    let until = core
                        .next_deadline()
                        .map_or(RECHECK, |d| d.saturating_duration_since(now).min(RECHECK));
                    let ms = until.as_micros().div_ceil(1000).max(1);
                    timeout_ms = i32::try_from(ms).unwrap_or(i32::MAX);
                }
            }
            let idle = sleeping || !core.is_running();
            core.resolve_tx_wake(idle);
            let wake = core.take_guest_wake();
            drop(core);
            if wake {
                self.shared.wake.notify();
            }
            if !progress && !sleeping {
                // Polling without progress: let a runnable thread have the
                // core. On a 2-core host the thread that will bring the next
                // work (the vCPU answering, the client, the VMM committing)
                // is often waiting for this one's core. Measured against a
                // pause instruction (2026-12-02, `redis-benchmark` SETs of
                // changing values, 3 alternating runs each, ranges): epoch
                // mode on ext4 13.1–13.3k → 13.9–14.4k SET/s at 16 clients,
                // 1.55–1.64k → 1.77–1.89k at 1; on tmpfs 17.2–18.5k →
                // 19.3–20.4k and 2.85–3.06k → 3.20–3.73k; suspend-only
                // 55–69k → 73–88k at 16 clients, 44–55k → 63–68k at 1.
                std::thread::yield_now();
            }
        }
    }

    fn dispatch(&mut self, core: &mut VsockCore, ev: &EpollEvent) {
        match ev.data() {
            TOKEN_NOTIFY => {
                let _ = self.shared.notify_evt.read();
            }
            TOKEN_CTRL => {
                let _ = self.shared.ctrl_evt.read();
            }
            TOKEN_TCP => self.accept_tcp(core),
            TOKEN_UNIX => self.accept_unix(core),
            token if token >= TOKEN_CONN => {
                let port = (token - TOKEN_CONN) as u32;
                let set = ev.event_set();
                let fail = EventSet::HANG_UP | EventSet::ERROR;
                let readable = set.intersects(EventSet::IN | EventSet::READ_HANG_UP | fail);
                let writable = set.intersects(EventSet::OUT | fail);
                core.socket_event(port, readable, writable);
            }
            _ => {}
        }
    }

    fn accept_tcp(&mut self, core: &mut VsockCore) {
        for _ in 0..ACCEPT_BATCH {
            let Some(l) = &self.listeners.tcp else {
                return;
            };
            match l.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    if s.set_nonblocking(true).is_ok() {
                        self.add(core, HostStream::Tcp(s));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept on the TCP listener failed: {e}");
                    return;
                }
            }
        }
    }

    fn accept_unix(&mut self, core: &mut VsockCore) {
        for _ in 0..ACCEPT_BATCH {
            let Some(l) = &self.listeners.unix else {
                return;
            };
            match l.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_ok() {
                        self.add(core, HostStream::Unix(s));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept on the Unix listener failed: {e}");
                    return;
                }
            }
        }
    }

    /// Take an accepted socket as a new connection (or close it if full).
    fn add(&mut self, core: &mut VsockCore, stream: HostStream) {
        if !core.accepts_connections() {
            if !self.full_warned {
                tracing::warn!(
                    "vsock: {} connections open or device failed: refusing new ones",
                    core.connection_count()
                );
                self.full_warned = true;
            }
            return;
        }
        self.full_warned = false;
        let Some(port) = core.alloc_port() else {
            return;
        };
        let set = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        let ev = EpollEvent::new(set, TOKEN_CONN + u64::from(port));
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
        {
            tracing::warn!("vsock: cannot watch a host connection: {e}");
            return;
        }
        // Closing the socket (dropping the connection) removes it from epoll.
        core.add_connection(port, stream);
    }
}
