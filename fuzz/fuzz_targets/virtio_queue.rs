//! Drives the virtio-vsock device's queue processing (TX packets in, RX
//! packets and the transport-reset event out) over descriptor tables,
//! available rings and packet bytes taken from the input.
//! Invariant: no panic and no hang, whatever the rings hold; malformed
//! chains end in DEVICE_NEEDS_RESET (checked inside `run_queues`' callers).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvhv::devices::virtio::vsock::fuzzing::run_queues;

fuzz_target!(|data: &[u8]| {
    let _ = run_queues(data);
});
