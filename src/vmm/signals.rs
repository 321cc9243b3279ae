//! The stop signals: SIGTERM and SIGINT (an orderly stop), SIGPWR (the
//! power-fail warning) and SIGHUP (the terminal nvhv runs in is gone: an
//! ssh session that dropped would otherwise kill it without a suspend,
//! which a suspend-only VM does not survive; left alone when nvhv was
//! started with it ignored, as by `nohup`), caught from the moment `run`
//! or `resume` starts (a
//! standby: from its takeover), not only once the VM runs. A stop signal
//! that arrives while the VM is still being made or restored is kept, and
//! the VM is suspended as soon as it runs; `run` cancels instead while its
//! new image is not yet at its path (no guest ran, so nothing is lost).
//! Before this, such a signal met the default action and killed nvhv
//! without a word.
//!
//! Signal dispositions belong to the process, so this module keeps its one
//! registration in a process-wide static: [`catch`] once, ask
//! [`arrived`] while starting, then the main loop takes (`take`) the queue with
//! every signal caught so far. One registration, so that no signal can be
//! seen by one means and missed by another.

use std::sync::Mutex;

use signal_hook::iterator::Signals;

use super::VmmError;

/// The signals that stop a VM (SIGHUP only if not ignored: see
/// [`stop_signals`]).
pub const STOP_SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGPWR, libc::SIGHUP];

/// The stop signals this process catches: all of [`STOP_SIGNALS`] but
/// SIGHUP when whoever started nvhv set it to be ignored (`nohup`: the VM
/// is to outlive the terminal).
pub fn stop_signals() -> Vec<i32> {
    let ignored = ignored_signals();
    STOP_SIGNALS
        .into_iter()
        .filter(|&s| s != libc::SIGHUP || ignored & (1 << (s - 1)) == 0)
        .collect()
}

/// The signals this process ignores, as a mask (bit `n - 1` for signal
/// `n`), from `SigIgn` in /proc/self/status; 0 if it cannot be read.
fn ignored_signals() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// What [`catch`] registered, until the main loop takes it.
struct Caught {
    signals: Signals,
    /// Signals already read from `signals` (by [`arrived`]), oldest first.
    seen: Vec<i32>,
}

static CAUGHT: Mutex<Option<Caught>> = Mutex::new(None);

/// Catches the stop signals from now on; a no-op if they are caught
/// already and not yet taken.
pub fn catch() -> Result<(), VmmError> {
    let mut caught = CAUGHT.lock().unwrap_or_else(|e| e.into_inner());
    if caught.is_none() {
        // ORDER: block, register, unblock. A signal that arrives after
        // signal-hook has installed its handler but before it has added the
        // action would be swallowed (the handler finds nothing to do: a
        // resume SIGTERMed 1.5 ms after its spawn ran on, 1 in 1 500).
        // Blocked, it waits and is delivered at the unblock, to the action.
        // Only this thread may take it meanwhile: `run` and `resume` call
        // this before they start any thread (a standby at its takeover,
        // with threads running, keeps that narrow window). Stop signals
        // blocked by whoever started nvhv are unblocked here too.
        let stop = stop_signals();
        for &s in &stop {
            // "Already blocked" is no failure.
            let _ = vmm_sys_util::signal::block_signal(s);
        }
        let registered = Signals::new(&stop).map_err(VmmError::Signals);
        for &s in &stop {
            let _ = vmm_sys_util::signal::unblock_signal(s);
        }
        *caught = Some(Caught {
            signals: registered?,
            seen: Vec::new(),
        });
    }
    Ok(())
}

/// The last stop signal caught since [`catch`], if any (and the main loop
/// has not taken them yet).
pub fn arrived() -> Option<i32> {
    let mut caught = CAUGHT.lock().unwrap_or_else(|e| e.into_inner());
    let c = caught.as_mut()?;
    let now: Vec<i32> = c.signals.pending().collect();
    c.seen.extend(now);
    c.seen.last().copied()
}

/// The caught stop signals, for the main loop: the queue, and those that
/// came before this call (oldest first); caught from now on if [`catch`]
/// was not called.
pub(super) fn take() -> Result<(Signals, Vec<i32>), VmmError> {
    catch()?;
    let mut caught = CAUGHT.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = caught.take().expect("caught just above");
    let now: Vec<i32> = c.signals.pending().collect();
    c.seen.extend(now);
    Ok((c.signals, c.seen))
}

/// The name of stop signal `s`.
pub fn name(s: i32) -> &'static str {
    match s {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGPWR => "SIGPWR",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sighup_is_a_stop_signal_unless_ignored() {
        // The test process does not ignore SIGHUP (cargo does not start it
        // under nohup); the mask parse is checked against the kernel's.
        let ignored = ignored_signals();
        let stop = stop_signals();
        assert!(stop.contains(&libc::SIGTERM) && stop.contains(&libc::SIGPWR));
        assert_eq!(
            stop.contains(&libc::SIGHUP),
            ignored & 1 == 0,
            "{ignored:x}"
        );
        assert_eq!(name(libc::SIGHUP), "SIGHUP");
    }
}
