//! Crash safety by crashing: the kv guest in epoch mode under load from
//! several clients, SIGKILLed at random moments, resumed and checked
//! (`tests/harness`). CI runs 20 cycles; `cargo run --release --example
//! crash_harness -- --cycles 500` runs the long version.

mod common;
mod harness;

use common::Scratch;

#[test]
fn sigkill_under_load_loses_no_acknowledged_write() {
    require_kvm!();
    let dir = Scratch::new("crash");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut h = harness::Harness::new(env!("CARGO_BIN_EXE_nvhv").into(), &dir.0, 4, seed);
    for _ in 0..20 {
        h.cycle();
    }
    h.finish();
    let t = &h.totals;
    println!(
        "crash harness (seed {seed}): {} SIGKILL cycles, {} acknowledged writes, unacknowledged writes found present {} / absent {}, {} key checks, {} values returned by reads checked, {} resumes killed before their guest ran and {} after (each resumed again), {} violations",
        t.cycles,
        t.acked_writes,
        t.unacked_present,
        t.unacked_absent,
        t.checked_keys,
        t.checked_reads,
        t.killed_resumes.0,
        t.killed_resumes.1,
        t.violations.len()
    );
    assert!(
        t.acked_writes > 100,
        "the load was too light to mean anything: {t:?}"
    );
    assert!(t.checked_reads > 0, "no read returned a value: {t:?}");
    assert!(
        t.killed_resumes.0 + t.killed_resumes.1 > 0,
        "no resume was killed: {t:?}"
    );
    assert!(t.violations.is_empty(), "violations: {:#?}", t.violations);
}
