//! Machine state: the [`Persist`] trait each component implements next to
//! itself, and [`MachineState`], the one aggregate written into an image's
//! state slot.
//!
//! Encoding of a state slot: `"NVHVSTAT"`, u32 state version, u32 reserved,
//! u64 payload length, u32 CRC32C of the payload, then the payload (postcard
//! encoding of [`MachineState`]). The meta record that names the slot also
//! carries the slot's CRC; the inner one lets a state blob be checked on its
//! own (tests, fuzzing). Everything read back is untrusted: lengths are capped
//! before anything is allocated, and every component validates its own part.

use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialState;
use crate::devices::virtio::vsock::VsockState;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// Magic at the start of an encoded machine state.
pub const STATE_MAGIC: [u8; 8] = *b"NVHVSTAT";
/// Version of the [`MachineState`] encoding this binary writes. It also
/// reads version 2, whose vsock state had no output-dependency word, and
/// version 1, whose serial state had no unfinished console line either.
pub const STATE_VERSION: u32 = 3;
const HEADER_LEN: usize = 28;

/// A component whose state is saved into and restored from NVRAM.
///
/// `restore` constructs the component from its state (it never mutates a live
/// one); `State` is a plain serde DTO kept apart from the live type. The
/// lifetime lets `Args` borrow what the component is built in (the VM).
pub trait Persist<'a>: Sized {
    /// The saved form.
    type State;
    /// What `restore` needs besides the state (file descriptors, the VM, …).
    type Args;
    /// Why save or restore failed.
    type Error;
    /// Capture the state. Components whose state lives in KVM may fail here.
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Build the component from a saved state, validating it.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Errors decoding a machine state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Too short to hold the state header.
    #[error("machine state is truncated ({0} bytes)")]
    Truncated(usize),
    /// Wrong magic.
    #[error("machine state has a bad magic")]
    BadMagic,
    /// Written by another version of nvhv.
    #[error("machine state version {0}, this nvhv reads versions 1 to {STATE_VERSION}")]
    Version(u32),
    /// Payload length does not match.
    #[error("machine state payload length {0} does not match the slot")]
    Length(u64),
    /// Payload CRC mismatch.
    #[error("machine state checksum mismatch")]
    Crc,
    /// postcard could not decode it.
    #[error("machine state cannot be decoded")]
    Decode(#[source] postcard::Error),
    /// postcard could not encode it.
    #[error("machine state cannot be encoded")]
    Encode(#[source] postcard::Error),
    /// Decoded, but inconsistent with the image.
    #[error("machine state is inconsistent: {0}")]
    Inconsistent(String),
}

/// Saved state of the built-in guest's devices.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// The serial console.
    pub serial: SerialState,
    /// The virtio-vsock device, when the VM has one.
    pub vsock: Option<VsockState>,
}

/// Everything needed to continue a VM, apart from guest RAM (which lives in
/// the image's RAM region).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// VM-wide KVM state (kvmclock).
    pub vm: VmState,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Device state.
    pub devices: DeviceStates,
}

impl MachineState {
    /// Encode with the state header.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let payload = postcard::to_allocvec(self).map_err(StateError::Encode)?;
        Ok(framed(STATE_VERSION, &payload))
    }

    /// Decode and check a state written by [`encode`](Self::encode), expecting `vcpus` vCPUs.
    pub fn decode(bytes: &[u8], vcpus: u32) -> Result<Self, StateError> {
        if bytes.len() < HEADER_LEN {
            return Err(StateError::Truncated(bytes.len()));
        }
        if bytes[..8] != STATE_MAGIC {
            return Err(StateError::BadMagic);
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if !(1..=STATE_VERSION).contains(&version) {
            return Err(StateError::Version(version));
        }
        let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
        let payload = &bytes[HEADER_LEN..];
        if len != payload.len() as u64 {
            return Err(StateError::Length(len));
        }
        if crc32c::crc32c(payload) != crc {
            return Err(StateError::Crc);
        }
        let s: MachineState = match version {
            1 => postcard::from_bytes::<v1::MachineState>(payload)
                .map(|s| v2::MachineState::from(s).into()),
            2 => postcard::from_bytes::<v2::MachineState>(payload).map(Into::into),
            _ => postcard::from_bytes(payload),
        }
        .map_err(StateError::Decode)?;
        if s.vcpus.len() != vcpus as usize {
            return Err(StateError::Inconsistent(format!(
                "{} vCPU states for a {}-vCPU image",
                s.vcpus.len(),
                vcpus
            )));
        }
        Ok(s)
    }
}

/// The state header for `version` and `payload`, then the payload: what
/// [`MachineState::encode`] writes (tests and the fuzz target frame their own
/// payloads with it).
pub fn framed(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The version-2 encoding: no output-dependency word in the vsock state.
mod v2 {
    use serde::{Deserialize, Serialize};

    use crate::devices::serial::SerialState;
    use crate::devices::virtio::mmio::MmioTransportState;
    use crate::vstate::vcpu::VcpuState;
    use crate::vstate::vm::VmState;

    #[derive(Serialize, Deserialize)]
    pub struct VsockDeviceState {
        pub guest_cid: u64,
        pub next_port: u32,
        pub reset_event_pending: bool,
        pub connections: Vec<(u32, u32)>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct VsockState {
        pub transport: MmioTransportState,
        pub device: VsockDeviceState,
    }

    /// Generic over the serial state, so version 1 is this layout with its
    /// own serial state.
    #[derive(Serialize, Deserialize)]
    pub struct DeviceStates<S = SerialState> {
        pub serial: S,
        pub vsock: Option<VsockState>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct MachineState<S = SerialState> {
        pub vm: VmState,
        pub vcpus: Vec<VcpuState>,
        pub devices: DeviceStates<S>,
    }

    impl From<VsockState> for crate::devices::virtio::vsock::VsockState {
        fn from(s: VsockState) -> Self {
            let d = s.device;
            crate::devices::virtio::vsock::VsockState {
                transport: s.transport,
                device: crate::devices::virtio::vsock::VsockDeviceState {
                    guest_cid: d.guest_cid,
                    next_port: d.next_port,
                    reset_event_pending: d.reset_event_pending,
                    connections: d.connections,
                    output_deps: None,
                },
            }
        }
    }

    impl From<MachineState> for super::MachineState {
        fn from(s: MachineState) -> Self {
            super::MachineState {
                vm: s.vm,
                vcpus: s.vcpus,
                devices: super::DeviceStates {
                    serial: s.devices.serial,
                    vsock: s.devices.vsock.map(Into::into),
                },
            }
        }
    }
}

/// The version-1 encoding, read for images suspended by older builds:
/// version 2's layout with an older serial state.
mod v1 {
    use serde::{Deserialize, Serialize};

    /// Version 1 of `SerialState`: no unfinished line.
    #[derive(Serialize, Deserialize)]
    pub struct SerialState {
        pub regs: [u8; 9],
        pub in_buffer: Vec<u8>,
    }

    #[cfg(test)] // the tests write version-1 states
    pub type DeviceStates = super::v2::DeviceStates<SerialState>;
    pub type MachineState = super::v2::MachineState<SerialState>;

    impl From<MachineState> for super::v2::MachineState {
        fn from(s: MachineState) -> Self {
            super::v2::MachineState {
                vm: s.vm,
                vcpus: s.vcpus,
                devices: super::v2::DeviceStates {
                    serial: super::SerialState {
                        regs: s.devices.serial.regs,
                        in_buffer: s.devices.serial.in_buffer,
                        line: Vec::new(),
                    },
                    vsock: s.devices.vsock,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_state_is_read_with_no_unfinished_line() {
        let mut s = sample();
        s.devices.serial.regs[8] = 0x5a;
        s.devices.serial.in_buffer = vec![1, 2];
        let old = v1::MachineState {
            vm: s.vm.clone(),
            vcpus: s.vcpus.clone(),
            devices: v1::DeviceStates {
                serial: v1::SerialState {
                    regs: s.devices.serial.regs,
                    in_buffer: s.devices.serial.in_buffer.clone(),
                },
                vsock: None,
            },
        };
        let mut b = framed(1, &postcard::to_allocvec(&old).unwrap());
        let d = MachineState::decode(&b, 2).unwrap();
        assert_eq!(d, s);
        assert!(d.devices.serial.line.is_empty());
        // The same bytes labelled version 2 do not decode as version 2.
        b[8] = 2;
        assert!(MachineState::decode(&b, 2).is_err());
    }

    #[test]
    fn a_version_2_state_is_read_with_no_output_dependency_word() {
        let mut s = sample();
        let vsock = crate::devices::virtio::vsock::VsockState {
            transport: Default::default(),
            device: crate::devices::virtio::vsock::VsockDeviceState {
                guest_cid: 3,
                next_port: 2000,
                reset_event_pending: true,
                connections: vec![(1024, 7)],
                output_deps: None,
            },
        };
        s.devices.vsock = Some(vsock.clone());
        let old = v2::MachineState {
            vm: s.vm.clone(),
            vcpus: s.vcpus.clone(),
            devices: v2::DeviceStates {
                serial: s.devices.serial.clone(),
                vsock: Some(v2::VsockState {
                    transport: vsock.transport.clone(),
                    device: v2::VsockDeviceState {
                        guest_cid: 3,
                        next_port: 2000,
                        reset_event_pending: true,
                        connections: vec![(1024, 7)],
                    },
                }),
            },
        };
        let mut b = framed(2, &postcard::to_allocvec(&old).unwrap());
        assert_eq!(MachineState::decode(&b, 2).unwrap(), s);
        // The same bytes labelled version 3 lack the word: refused.
        b[8] = 3;
        assert!(MachineState::decode(&b, 2).is_err());
        // And a version-3 state keeps a registered word.
        s.devices.vsock.as_mut().unwrap().device.output_deps = Some(0x20_1000);
        let d = MachineState::decode(&s.encode().unwrap(), 2).unwrap();
        assert_eq!(d, s);
    }

    fn sample() -> MachineState {
        let mut v: VcpuState = VcpuState {
            cpuid: vec![Default::default(); 3],
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: vec![0; 1024],
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![Default::default(); 41],
            events: Default::default(),
        };
        v.regs.rip = 0x20_1234;
        v.regs.r12 = 42;
        v.msrs[3].index = 0x4b56_4d01;
        v.msrs[3].data = 0x8001;
        v.lapic.regs[0x20] = 7;
        v.xsave[40] = 0xdead;
        MachineState {
            vm: VmState {
                clock: Default::default(),
            },
            vcpus: vec![v.clone(), v],
            devices: DeviceStates::default(),
        }
    }

    #[test]
    fn encode_decode_encode_is_identity() {
        let s = sample();
        let a = s.encode().unwrap();
        let d = MachineState::decode(&a, 2).unwrap();
        assert_eq!(d, s);
        assert_eq!(d.encode().unwrap(), a);
    }

    #[test]
    fn every_header_corruption_is_refused() {
        let a = sample().encode().unwrap();
        assert!(matches!(
            MachineState::decode(&a[..10], 2),
            Err(StateError::Truncated(10))
        ));
        let mut b = a.clone();
        b[0] ^= 1;
        assert!(matches!(
            MachineState::decode(&b, 2),
            Err(StateError::BadMagic)
        ));
        let mut b = a.clone();
        b[8] = 9;
        assert!(matches!(
            MachineState::decode(&b, 2),
            Err(StateError::Version(9))
        ));
        let mut b = a.clone();
        b[HEADER_LEN + 5] ^= 0x10;
        assert!(matches!(MachineState::decode(&b, 2), Err(StateError::Crc)));
        assert!(matches!(
            MachineState::decode(&a[..a.len() - 1], 2),
            Err(StateError::Length(_))
        ));
        assert!(matches!(
            MachineState::decode(&a, 1),
            Err(StateError::Inconsistent(_))
        ));
    }

    #[test]
    fn garbage_payload_with_valid_crc_is_a_decode_error_not_a_panic() {
        let payload = vec![0xffu8; 64];
        let b = framed(STATE_VERSION, &payload);
        assert!(matches!(
            MachineState::decode(&b, 1),
            Err(StateError::Decode(_))
        ));
    }
}
