//! virtio-vsock (device id 19) with a userspace backend that bridges host
//! sockets to vsock stream connections into the guest.
//!
//! Each connection accepted on the host listener (TCP, `--listen`, and
//! optionally a Unix socket) becomes a vsock connection from the host (CID 2,
//! a fresh local port per connection) to the guest's CID, on the configured
//! guest port (the built-in key-value guest listens on
//! [`nvhv_abi::KV_VSOCK_PORT`]). Flow control is the spec's credit scheme in
//! both directions; a guest RST closes the host socket, host EOF becomes a
//! SHUTDOWN, and a guest SHUTDOWN/RST half-closes or closes the host socket
//! after the bytes already accepted are flushed.
//!
//! Using it from the VMM:
//! ```ignore
//! let vsock = Vsock::new(mem.clone(), wake.clone(), VsockConfig::new(Some(listener), None))?;
//! bus.insert(base, MMIO_WINDOW_SIZE, vsock.transport()); // Arc<Mutex<MmioTransport>>
//! // checkpoint: vcpus paused, then
//! vsock.pause();                      // device at a safe point, nothing moves
//! let state: VsockState = vsock.save();
//! let cut = vsock.output_cut();       // OutputCommit (with an OutputGate set)
//! vsock.resume();
//! // ... once the checkpoint is durable:
//! vsock.release_output(cut);
//! // after a crash or on `nvhv resume`:
//! let vsock = Vsock::restore(VsockArgs { mem, wake, cfg }, &state)?;
//! ```
//! [`Vsock`] also implements [`crate::persist::Persist`].
//!
//! Output commit: with [`VsockConfig::output_gate`] (or
//! [`Vsock::set_output_gate`]) set, bytes the guest sends to a host socket are
//! held, tagged with the output epoch that produced them, until
//! [`OutputCommit::release_output`] releases their cut; the gate's function is
//! called once per epoch when output starts waiting (group commit). Guest
//! credit shrinks while bytes are held, so a guest never has more in flight
//! than `buf_alloc` per connection. Without a gate output goes out at once.
//!
//! Output that depends on nothing uncommitted (the guest says so through its
//! output-dependency area, [`deps`]) is not held.
//!
//! Layout: [`packet`] (wire format), [`connection`] (one bridged connection,
//! credit, host I/O, the output hook), [`deps`] (which output need not wait),
//! [`device`] (queues and connection table), [`backend`] (the device thread and its exit-free polling loop),
//! [`persist`] (save/restore).

pub mod backend;
pub mod connection;
pub mod deps;
pub mod device;
pub mod packet;
pub mod persist;

#[doc(hidden)]
pub mod fuzzing;

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::backend::Listeners;
use self::device::{CoreParams, Shared, VsockCore, VsockFrontend};
use super::mmio::{MmioError, MmioTransport};
use super::DeviceSignals;
use crate::devices::GuestMemory;
use crate::vstate::wait::GuestWake;

pub use self::device::{OutputCut, OutputGate};
pub use self::persist::{VsockDeviceState, VsockState};

/// Receive buffer per connection advertised to the guest by default.
pub const DEFAULT_BUF_ALLOC: u32 = 256 * 1024;
/// Concurrent host connections accepted by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Errors creating or restoring the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved or does not fit in 32 bits.
    #[error("guest CID {0} is not usable")]
    GuestCid(u64),
    /// A configuration value is out of range.
    #[error("invalid vsock configuration: {0}")]
    Config(&'static str),
    /// An EventFd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// The device thread could not be started (epoll, listener setup, spawn).
    #[error("cannot start the vsock device thread")]
    Thread(#[source] io::Error),
    /// The saved transport is invalid.
    #[error("invalid saved transport")]
    Transport(#[source] MmioError),
    /// The saved device state is invalid.
    #[error("invalid saved vsock state: {0}")]
    State(&'static str),
}

/// How the device is set up.
#[derive(Debug)]
pub struct VsockConfig {
    /// The guest's CID (config space `guest_cid`).
    pub guest_cid: u64,
    /// Guest port every host connection is forwarded to.
    pub guest_port: u32,
    /// Host TCP listener (`--listen`, default 127.0.0.1:6380).
    pub listen: Option<TcpListener>,
    /// Optional host Unix-socket listener.
    pub unix: Option<UnixListener>,
    /// Receive buffer per connection advertised to the guest (bytes the
    /// device buffers towards the host socket, at most).
    pub buf_alloc: u32,
    /// Most concurrent host connections; more are refused (closed).
    pub max_connections: usize,
    /// How long the device keeps polling the rings without progress before
    /// it re-enables notifications and sleeps ([`backend::IDLE_SPIN`]).
    pub idle_spin: Duration,
    /// Output commit: hold guest output until [`OutputCommit::release_output`]
    /// (see [`OutputGate`]); None releases it as it comes.
    pub output_gate: Option<OutputGate>,
    /// With a gate: release at once output that depends on nothing
    /// uncommitted (the guest's state version, [`deps`]); false holds every
    /// byte until the epoch that produced it commits.
    pub release_settled: bool,
}

impl VsockConfig {
    /// The defaults: [`nvhv_abi::GUEST_CID`], [`nvhv_abi::KV_VSOCK_PORT`],
    /// and the host listeners `listen` (TCP) and `unix`.
    pub fn new(listen: Option<TcpListener>, unix: Option<UnixListener>) -> Self {
        Self {
            guest_cid: nvhv_abi::GUEST_CID,
            guest_port: nvhv_abi::KV_VSOCK_PORT,
            listen,
            unix,
            buf_alloc: DEFAULT_BUF_ALLOC,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_spin: backend::IDLE_SPIN,
            output_gate: None,
            release_settled: true,
        }
    }

    fn validate(&self) -> Result<(), VsockError> {
        check_guest_cid(self.guest_cid)?;
        if self.buf_alloc == 0 || self.buf_alloc > 64 * 1024 * 1024 {
            return Err(VsockError::Config("buf_alloc must be in 1..=64 MiB"));
        }
        if self.max_connections == 0 || self.max_connections > 65536 {
            return Err(VsockError::Config("max_connections must be in 1..=65536"));
        }
        if self.idle_spin > Duration::from_secs(1) {
            return Err(VsockError::Config("idle_spin must be at most 1 s"));
        }
        Ok(())
    }
}

/// What [`Vsock::restore`] needs besides the state.
#[derive(Debug)]
pub struct VsockArgs {
    /// Guest memory (with its dirty bitmap).
    pub mem: GuestMemory,
    /// Wakes the guest's parked vCPUs.
    pub wake: Arc<GuestWake>,
    /// Listeners and limits (the guest CID comes from the state).
    pub cfg: VsockConfig,
}

fn check_guest_cid(cid: u64) -> Result<(), VsockError> {
    // 0, 1, 2 are reserved; the upper 32 bits are reserved; u32::MAX is "any".
    if cid < 3 || cid >= u64::from(u32::MAX) {
        return Err(VsockError::GuestCid(cid));
    }
    Ok(())
}

/// The running vsock device: owns the device thread; hands out the MMIO
/// transport for the bus. Dropping it stops the thread and closes every host
/// connection.
#[derive(Debug)]
pub struct Vsock {
    transport: Arc<Mutex<MmioTransport>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Duplicates of the host listeners (the device thread owns the
    /// originals), for [`Vsock::listening_sockets`].
    listening: (Option<TcpListener>, Option<UnixListener>),
}

impl Vsock {
    /// A new device (guest driver not started yet), with its device thread
    /// listening on `cfg.listen` / `cfg.unix`.
    pub fn new(
        mem: GuestMemory,
        wake: Arc<GuestWake>,
        cfg: VsockConfig,
    ) -> Result<Self, VsockError> {
        cfg.validate()?;
        let (shared, listeners, idle_spin) = Self::shared(mem, wake, cfg, None)?;
        let transport = MmioTransport::new(Box::new(VsockFrontend::new(Arc::clone(&shared))));
        Self::start(transport, shared, listeners, idle_spin)
    }

    fn shared(
        mem: GuestMemory,
        wake: Arc<GuestWake>,
        cfg: VsockConfig,
        guest_cid: Option<u64>,
    ) -> Result<(Arc<Shared>, Listeners, Duration), VsockError> {
        let signals = Arc::new(DeviceSignals::new());
        let params = CoreParams {
            guest_cid: guest_cid.unwrap_or(cfg.guest_cid),
            guest_port: cfg.guest_port,
            buf_alloc: cfg.buf_alloc,
            max_connections: cfg.max_connections,
        };
        let mut core = VsockCore::new(mem, Arc::clone(&signals), params);
        core.set_output_gate(cfg.output_gate);
        core.release_settled = cfg.release_settled;
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            cv: Condvar::new(),
            notify_evt: EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?,
            ctrl_evt: EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?,
            signals,
            wake,
        });
        let listeners = Listeners {
            tcp: cfg.listen,
            unix: cfg.unix,
        };
        Ok((shared, listeners, cfg.idle_spin))
    }

    fn start(
        transport: MmioTransport,
        shared: Arc<Shared>,
        listeners: Listeners,
        idle_spin: Duration,
    ) -> Result<Self, VsockError> {
        // A listener that cannot be duplicated is only not handed on.
        let listening = (
            listeners.tcp.as_ref().and_then(|l| l.try_clone().ok()),
            listeners.unix.as_ref().and_then(|l| l.try_clone().ok()),
        );
        let thread = backend::spawn(Arc::clone(&shared), listeners, idle_spin)
            .map_err(VsockError::Thread)?;
        Ok(Self {
            transport: Arc::new(Mutex::new(transport)),
            shared,
            thread: Some(thread),
            listening,
        })
    }

    /// New descriptors of the device's listening sockets (TCP, Unix), for a
    /// standby to share (`vmm::control`): connections queue on the one
    /// socket, and the device thread accepts them while it runs.
    pub fn listening_sockets(&self) -> (Option<TcpListener>, Option<UnixListener>) {
        (
            self.listening.0.as_ref().and_then(|l| l.try_clone().ok()),
            self.listening.1.as_ref().and_then(|l| l.try_clone().ok()),
        )
    }

    /// Where host clients connect, for the user: the TCP address as bound
    /// (the port the kernel chose for `--listen HOST:0`) and the Unix path,
    /// e.g. `127.0.0.1:6380 and /run/kv.sock`.
    pub fn addresses(&self) -> String {
        let tcp = self.listening.0.as_ref().map(|l| match l.local_addr() {
            Ok(a) => a.to_string(),
            Err(e) => format!("a TCP socket whose address is unknown ({e})"),
        });
        let unix = self.listening.1.as_ref().map(|l| match l.local_addr() {
            Ok(a) => match a.as_pathname() {
                Some(p) => p.display().to_string(),
                None => "an unnamed Unix socket".to_string(),
            },
            Err(e) => format!("a Unix socket whose path is unknown ({e})"),
        });
        match (tcp, unix) {
            (Some(t), Some(u)) => format!("{t} and {u}"),
            (Some(one), None) | (None, Some(one)) => one,
            (None, None) => "no listener".to_string(),
        }
    }

    /// The register window to put on the MMIO bus.
    pub fn transport(&self) -> Arc<Mutex<MmioTransport>> {
        Arc::clone(&self.transport)
    }

    /// Stop the device at a safe point: when this returns no descriptor is
    /// half-processed and neither guest memory nor device state changes until
    /// [`resume`](Self::resume). Host sockets keep queueing in the kernel.
    pub fn pause(&self) {
        self.shared.lock().paused = true;
    }

    /// Continue after [`pause`](Self::pause); every queue is polled at once.
    pub fn resume(&self) {
        let mut core = self.shared.lock();
        core.paused = false;
        core.kick();
        drop(core);
        self.shared.cv.notify_all();
        self.shared.kick_thread();
    }

    /// Whether the device is paused.
    pub fn is_paused(&self) -> bool {
        self.shared.lock().paused
    }

    /// Host connections currently bridged (any state).
    pub fn connection_count(&self) -> usize {
        self.shared.lock().connection_count()
    }

    /// Hold guest output behind `gate` from now on (Some), or release it as it
    /// comes (None; whatever is held goes out now).
    pub fn set_output_gate(&self, gate: Option<OutputGate>) {
        self.shared.lock().set_output_gate(gate);
        self.shared.kick_thread();
    }

    /// Bytes of guest output waiting for a release.
    pub fn held_output(&self) -> u64 {
        self.shared.lock().held_output()
    }

    /// Bytes of guest output sent at once although output commit was on:
    /// they depended on nothing uncommitted ([`deps`]).
    pub fn unheld_output(&self) -> u64 {
        self.shared.lock().unheld_output()
    }

    /// The handle through which the guest's [`nvhv_abi::OUTPUT_DEPS_PORT`]
    /// writes reach this device.
    pub fn deps_port(&self) -> DepsPort {
        DepsPort(Arc::clone(&self.shared))
    }

    /// Stop the device thread and close every host connection.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        self.shared.lock().stopping = true;
        self.shared.cv.notify_all();
        self.shared.kick_thread();
        if t.join().is_err() {
            tracing::warn!("vsock: device thread panicked");
        }
        self.shared.lock().close();
    }
}

/// Where the guest registers its output-dependency area (see [`deps`]).
#[derive(Clone)]
pub struct DepsPort(Arc<Shared>);

impl DepsPort {
    /// The guest wrote `addr` to [`nvhv_abi::OUTPUT_DEPS_PORT`]: register
    /// it (0: unregister). False if the address is unusable (misaligned or
    /// outside RAM): then nothing is registered.
    pub fn register(&self, addr: u64) -> bool {
        self.0.lock().register_output_deps(addr)
    }
}

/// Output commit for a device whose output leaves the machine: the
/// checkpoint engine takes a cut with the device paused, and releases it once
/// that checkpoint is durable. (A trait, so that every output device, vsock
/// today, offers the same two steps.)
pub trait OutputCommit {
    /// At a checkpoint (device paused): everything the guest sent so far
    /// belongs to the returned cut.
    fn output_cut(&self) -> OutputCut;
    /// Once the checkpoint of `cut` is durable: let its output (and that of
    /// earlier cuts) go out. Returns the bytes released.
    fn release_output(&self, cut: OutputCut) -> u64;
}

impl OutputCommit for Vsock {
    fn output_cut(&self) -> OutputCut {
        self.shared.lock().output_cut()
    }

    fn release_output(&self, cut: OutputCut) -> u64 {
        let n = self.shared.lock().release_output(cut);
        if n > 0 {
            self.shared.kick_thread();
        }
        n
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;
