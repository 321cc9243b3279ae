//! Fuzz the machine-state decoder: arbitrary bytes, raw and wrapped in a
//! valid state header (magic, version, length, CRC) so the postcard payload
//! decoder itself is reached. It must never panic, and whatever decodes must
//! re-encode to a state that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvhv::persist::{framed, MachineState, STATE_VERSION};

fuzz_target!(|data: &[u8]| {
    let vcpus = u32::from(data.first().copied().unwrap_or(1) % 4);
    let _ = MachineState::decode(data, vcpus);

    let wrapped = framed(STATE_VERSION, data);
    if let Ok(s) = MachineState::decode(&wrapped, vcpus) {
        let again = s.encode().expect("a decoded state encodes");
        let s2 = MachineState::decode(&again, vcpus).expect("re-encoded state decodes");
        assert_eq!(s, s2);
    }
});
