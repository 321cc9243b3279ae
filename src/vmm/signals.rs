//! The stop signals: SIGTERM and SIGINT (an orderly stop) and SIGPWR (the
//! power-fail warning), caught from the moment `run` or `resume` starts (a
//! standby: from its takeover), not only once the VM runs. A stop signal
//! that arrives while the VM is still being made or restored is kept, and
//! the VM is suspended as soon as it runs; `run` cancels instead while its
//! new image is not yet at its path (no guest ran, so nothing is lost).
//! Before this, such a signal met the default action and killed nvhv
//! without a word.
//!
//! Signal dispositions belong to the process, so this module keeps its
//! registration in process-wide statics: [`catch`] once, then the main
//! loop [`take`]s the queue of caught signals.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use signal_hook::iterator::Signals;

use super::VmmError;

/// The signals that stop a VM.
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGPWR];

/// The caught signals, queued until the main loop takes them.
static QUEUE: Mutex<Option<Signals>> = Mutex::new(None);

/// The last stop signal caught (0: none yet).
static LAST: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

/// Catches the stop signals from now on (once per process; later calls do
/// nothing).
pub fn catch() -> Result<(), VmmError> {
    let mut queue = QUEUE.lock().unwrap_or_else(|e| e.into_inner());
    if LAST.get().is_some() {
        return Ok(());
    }
    let last = Arc::new(AtomicUsize::new(0));
    for s in STOP_SIGNALS {
        signal_hook::flag::register_usize(s, Arc::clone(&last), s as usize)
            .map_err(VmmError::Signals)?;
    }
    *queue = Some(Signals::new(STOP_SIGNALS).map_err(VmmError::Signals)?);
    let _ = LAST.set(last);
    Ok(())
}

/// The last stop signal caught since [`catch`], if any.
pub fn arrived() -> Option<i32> {
    let s = LAST.get()?.load(Ordering::SeqCst);
    (s != 0).then_some(s as i32)
}

/// The queue of caught stop signals (those that arrived before this call
/// included), for the main loop to read; caught from now on if [`catch`]
/// was not called.
pub(super) fn take() -> Result<Signals, VmmError> {
    catch()?;
    let mut queue = QUEUE.lock().unwrap_or_else(|e| e.into_inner());
    match queue.take() {
        Some(s) => Ok(s),
        // Taken before (a second machine in one process): a new queue.
        None => Signals::new(STOP_SIGNALS).map_err(VmmError::Signals),
    }
}

/// The name of stop signal `s`.
pub fn name(s: i32) -> &'static str {
    match s {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGPWR => "SIGPWR",
        _ => "signal",
    }
}
