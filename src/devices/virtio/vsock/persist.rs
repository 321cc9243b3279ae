//! Save and restore of the vsock device: [`VsockState`] = the MMIO transport
//! registers with each queue's live `QueueState`, plus the device's own state.
//!
//! Host connections cannot survive a VMM restart. A restored device therefore
//! (1) delivers `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue as
//! soon as the guest offers an event buffer, and (2) sends an RST for every
//! connection the guest may still hold (for drivers that never post event
//! buffers, such as `virtio-drivers` 0.13). Both are generated at restore
//! time, so they cannot be lost by saving "before the notification went out"
//! (Firecracker #4812). The restored device is activated with the saved
//! queues and polls every queue at once, then re-arms notifications with
//! `avail_event = next_avail` before it first sleeps, so a stale event index
//! cannot suppress the guest's next TX notification (Firecracker #5969).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::device::{VsockFrontend, FIRST_LOCAL_PORT, MAX_ORPHAN_RST};
use super::{check_guest_cid, Vsock, VsockArgs, VsockError};
use crate::devices::virtio::mmio::{MmioTransport, MmioTransportState};
use crate::persist::Persist;

/// The vsock device's own saved state. Untrusted on restore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockDeviceState {
    /// The guest CID the driver read from the config space.
    pub guest_cid: u64,
    /// Next local port for a host connection (ports stay fresh across restore).
    pub next_port: u32,
    /// A TRANSPORT_RESET event was waiting for an event buffer.
    pub reset_event_pending: bool,
    /// Connections the guest may hold, as (host port, guest port).
    pub connections: Vec<(u32, u32)>,
    /// Guest-physical address of the guest's output-dependency area, if it
    /// registered one ([`super::deps`]).
    pub output_deps: Option<u64>,
}

/// Everything saved for the vsock device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// virtio-mmio registers and queues.
    pub transport: MmioTransportState,
    /// Device-specific state.
    pub device: VsockDeviceState,
}

impl Vsock {
    /// Capture the device. Pauses it for the moment of the capture if it is
    /// running; for a state consistent with a guest-memory checkpoint, call
    /// [`pause`](Self::pause) first and [`resume`](Self::resume) after the
    /// memory is captured too.
    pub fn save(&self) -> VsockState {
        let was_paused = self.is_paused();
        if !was_paused {
            self.pause();
        }
        let transport = self
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save();
        let device = {
            let core = self.shared.lock();
            VsockDeviceState {
                guest_cid: core.guest_cid,
                next_port: core.next_port,
                reset_event_pending: core.reset_event_pending,
                connections: core.guest_visible_connections(),
                output_deps: core.deps.addr(),
            }
        };
        if !was_paused {
            self.resume();
        }
        VsockState { transport, device }
    }

    /// Build a running device from `state`, validating it; the device
    /// resets the guest's connections (see the module doc) and polls every
    /// queue as soon as it starts.
    pub fn restore(args: VsockArgs, state: &VsockState) -> Result<Self, VsockError> {
        let d = &state.device;
        check_guest_cid(d.guest_cid)?;
        if d.next_port < FIRST_LOCAL_PORT {
            return Err(VsockError::State("next_port below the first local port"));
        }
        if d.connections.len() > MAX_ORPHAN_RST {
            return Err(VsockError::State("too many saved connections"));
        }
        let VsockArgs { mem, wake, mut cfg } = args;
        if cfg.guest_cid != d.guest_cid {
            tracing::info!(
                "vsock: keeping the saved guest CID {} (configured {})",
                d.guest_cid,
                cfg.guest_cid
            );
            cfg.guest_cid = d.guest_cid;
        }
        cfg.validate()?;
        let (shared, listeners, idle_spin) = Self::shared(mem, wake, cfg, Some(d.guest_cid))?;
        {
            let mut core = shared.lock();
            core.next_port = d.next_port;
            core.restored(std::time::Instant::now());
            core.restore_output_deps(d.output_deps);
            for &(local, peer) in &d.connections {
                core.reset_guest_connection(local, peer);
            }
        }
        let frontend = Box::new(VsockFrontend::new(Arc::clone(&shared)));
        let transport =
            MmioTransport::restore(frontend, &state.transport).map_err(VsockError::Transport)?;
        Self::start(transport, shared, listeners, idle_spin)
    }
}

impl Persist<'_> for Vsock {
    type State = VsockState;
    type Args = VsockArgs;
    type Error = VsockError;

    fn save(&self) -> Result<VsockState, VsockError> {
        Ok(Vsock::save(self))
    }

    fn restore(args: VsockArgs, state: &VsockState) -> Result<Self, VsockError> {
        Vsock::restore(args, state)
    }
}
