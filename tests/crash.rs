//! Crash safety by crashing: the kv guest in epoch mode under load from
//! several clients, SIGKILLed at random moments, resumed and checked
//! (`tests/harness`): by a plain `nvhv resume`, and by a standby (`nvhv
//! resume --standby`) started beside the running nvhv, and with the
//! give-back of cold pages at its most eager. CI runs 20 cycles of each;
//! `cargo run --release --example crash_harness -- --cycles 500
//! [--standby] [-- NVHV ARGS]` runs the long version.

mod common;
mod harness;

use common::Scratch;

/// 20 SIGKILL cycles (with a standby beside each running nvhv when
/// `standby`; `extra` more `nvhv run`/`resume` arguments), then the counts
/// printed and checked.
fn crash_cycles(tag: &str, standby: bool, extra: &[&str]) {
    let dir = Scratch::new(tag);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut h = harness::Harness::new(env!("CARGO_BIN_EXE_nvhv").into(), &dir.0, 4, seed);
    h.standby = standby;
    h.extra_args = extra.iter().map(|a| a.to_string()).collect();
    for _ in 0..20 {
        h.cycle();
    }
    h.finish();
    let t = &h.totals;
    println!("crash harness (seed {seed}, standby {standby}): {t}");
    assert!(
        t.acked_writes > 100,
        "the load was too light to mean anything: {t:?}"
    );
    assert!(t.checked_reads > 0, "no read returned a value: {t:?}");
    if standby {
        assert!(t.takeovers > 0, "no standby took over: {t:?}");
        assert!(
            t.killed_takeovers.0 + t.killed_takeovers.1 > 0,
            "no takeover was killed: {t:?}"
        );
    } else {
        assert!(
            t.killed_resumes.0 + t.killed_resumes.1 > 0,
            "no resume was killed: {t:?}"
        );
    }
    assert!(t.violations.is_empty(), "violations: {:#?}", t.violations);
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_write() {
    require_kvm!();
    crash_cycles("crash", false, &[]);
}

#[test]
fn a_standby_taking_over_under_load_loses_no_acknowledged_write() {
    require_kvm!();
    crash_cycles("crash-standby", true, &[]);
}

/// The same with epoch mode giving back its private copies of pages as soon
/// as it may (`--give-back-after 0`, `vstate::reclaim`): pages the guest
/// wrote are dropped and read back from the image all the time, under the
/// load and across the kills.
#[test]
fn giving_back_cold_pages_under_load_loses_no_acknowledged_write() {
    require_kvm!();
    crash_cycles("crash-give-back", false, &["--give-back-after", "0"]);
}
