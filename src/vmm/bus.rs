//! The port and MMIO bus of the built-in ABI's devices: what a vCPU thread
//! does with each port I/O and MMIO exit (the serial console, the wait,
//! exit and panic ports, the output-dependency port, the virtio-mmio
//! window of the vsock device).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::boot::guest_abi::Layout;
use crate::devices::serial::Console;
use crate::devices::virtio::vsock::{DepsPort, Vsock};
use crate::devices::MmioDevice;
use crate::vstate::vcpu::{ExitAction, ExitHandler, StopReason};

/// An MMIO device shared between the bus (vCPU threads) and its owner.
type SharedMmio = Arc<Mutex<dyn MmioDevice>>;

/// Port and MMIO dispatch for the built-in ABI's devices.
pub(super) struct Bus {
    pub(super) console: Mutex<Console>,
    /// MMIO devices: (base, size, device).
    mmio: Vec<(u64, u64, SharedMmio)>,
    /// Where [`nvhv_abi::OUTPUT_DEPS_PORT`] writes go (the vsock device).
    deps: Option<DepsPort>,
}

impl Bus {
    pub(super) fn new(console: Console, layout: &Layout, vsock: Option<&Vsock>) -> Arc<Bus> {
        let mut mmio: Vec<(u64, u64, SharedMmio)> = Vec::new();
        if let Some(v) = vsock {
            let w = layout.mmio_window(0);
            mmio.push((w.base, w.size, v.transport()));
        }
        Arc::new(Bus {
            console: Mutex::new(console),
            mmio,
            deps: vsock.map(Vsock::deps_port),
        })
    }

    fn mmio_device(&self, addr: u64) -> Option<(u64, &SharedMmio)> {
        self.mmio
            .iter()
            .find(|(base, size, _)| addr >= *base && addr - base < *size)
            .map(|(base, _, d)| (addr - base, d))
    }
}

impl ExitHandler for Bus {
    fn pio_in(&self, port: u16, data: &mut [u8]) {
        let base = nvhv_abi::SERIAL_PORT;
        if (base..base + 8).contains(&port) && !data.is_empty() {
            data[0] = self
                .console
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read((port - base) as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn pio_out(&self, port: u16, data: &[u8]) -> ExitAction {
        let base = nvhv_abi::SERIAL_PORT;
        let word = || {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(b)
        };
        match port {
            p if (base..base + 8).contains(&p) => {
                if let Some(&v) = data.first() {
                    self.console
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .write((p - base) as u8, v);
                }
                ExitAction::Continue
            }
            nvhv_abi::WAIT_PORT => match word() {
                0 => ExitAction::Wait(None),
                nvhv_abi::WAIT_FOREVER => ExitAction::Halt,
                us => ExitAction::Wait(Some(Duration::from_micros(us as u64))),
            },
            nvhv_abi::EXIT_PORT => ExitAction::Stop(StopReason::GuestExit(word())),
            nvhv_abi::PANIC_PORT => ExitAction::Stop(StopReason::GuestPanic(word())),
            nvhv_abi::OUTPUT_DEPS_PORT => {
                let addr = word() as u64;
                match &self.deps {
                    Some(d) if d.register(addr) => {
                        tracing::debug!("guest output-dependency area registered at {addr:#x}");
                    }
                    Some(_) => tracing::warn!(
                        "guest output-dependency area at {addr:#x} refused (misaligned or not in RAM): all output is held"
                    ),
                    None => {}
                }
                ExitAction::Continue
            }
            _ => ExitAction::Continue,
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.mmio_device(addr) {
            Some((off, d)) => d
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .mmio_read(off, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((off, d)) = self.mmio_device(addr) {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .mmio_write(off, data);
        }
    }
}
