//! The stop signals: SIGTERM and SIGINT (an orderly stop), SIGPWR (the
//! power-fail warning) and SIGHUP (the terminal nvhv runs in is gone: an
//! ssh session that dropped would otherwise kill it without a suspend,
//! which a suspend-only VM does not survive; left alone when nvhv was
//! started with it ignored, as by `nohup`), caught from the moment `run`
//! or `resume` starts (a standby: from its takeover), not only once the VM
//! runs. A stop signal that arrives while the VM is still being made or
//! restored waits, and the VM is suspended as soon as it runs; `run`
//! cancels instead while its new image is not yet at its path (no guest
//! ran, so nothing is lost). Before this, such a signal met the default
//! action and killed nvhv without a word.
//!
//! How: [`catch`] blocks the stop signals in the calling thread, and so in
//! every thread it starts later (vCPUs, devices, helpers), then registers
//! signal-hook's handler. They stay pending, visible to [`arrived`], until
//! the main loop's signals thread unblocks them for itself alone
//! (`take`, `Taken::receive_here`): only that thread ever runs the
//! handler. So no other thread's system call is cut short by one (a
//! `KVM_CREATE_VM` interrupted by a SIGTERM failed with EINTR), and no
//! signal can land while the handler is half registered (signal-hook
//! installs the handler before it adds the action; a signal in between
//! found nothing to do and was lost: a resume SIGTERMed at that moment ran
//! on). Signal dispositions belong to the process, so the registration
//! lives in a process-wide static.

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
    let ignored = status_mask(&["SigIgn:"]);
    STOP_SIGNALS
        .into_iter()
        .filter(|&s| s != libc::SIGHUP || ignored & bit(s) == 0)
        .collect()
}

/// The bit of signal `s` in the masks of /proc/self/status.
fn bit(s: i32) -> u64 {
    1 << (s - 1)
}

/// The union of signal masks of /proc/self/status (`SigIgn:`, `ShdPnd:`,
/// …), read once: bit `n - 1` for signal `n`; a field that cannot be read
/// counts as 0.
fn status_mask(fields: &[&str]) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter_map(|l| fields.iter().find_map(|f| l.strip_prefix(f)))
        .filter_map(|m| u64::from_str_radix(m.trim(), 16).ok())
        .fold(0, |all, m| all | m)
}

/// What [`catch`] registered, until the main loop takes it.
struct Caught {
    signals: Signals,
    stop: Vec<i32>,
}

static CAUGHT: Mutex<Option<Caught>> = Mutex::new(None);

/// Catches the stop signals from now on (see the module header); a no-op
/// if they are caught already and not yet taken.
pub fn catch() -> Result<(), VmmError> {
    let mut caught = CAUGHT.lock().unwrap_or_else(|e| e.into_inner());
    if caught.is_none() {
        let stop = stop_signals();
        // ORDER: blocked before the handler is registered, and left blocked
        // here and in every thread started from here on.
        for &s in &stop {
            // "Already blocked" is no failure.
            let _ = vmm_sys_util::signal::block_signal(s);
        }
        *caught = Some(Caught {
            signals: Signals::new(&stop).map_err(VmmError::Signals)?,
            stop,
        });
    }
    Ok(())
}

/// The stop signals now pending (sent, not yet handled), lowest first.
fn pending(stop: &[i32]) -> Vec<i32> {
    let mask = status_mask(&["ShdPnd:", "SigPnd:"]);
    let mut v: Vec<i32> = stop
        .iter()
        .copied()
        .filter(|&s| mask & bit(s) != 0)
        .collect();
    v.sort_unstable();
    v
}

/// A stop signal that has arrived since [`catch`] and waits for the main
/// loop, if any.
pub fn arrived() -> Option<i32> {
    let caught = CAUGHT.lock().unwrap_or_else(|e| e.into_inner());
    pending(&caught.as_ref()?.stop).first().copied()
}

/// The caught stop signals, handed to the main loop by [`take`].
pub(super) struct Taken {
    /// The queue the handler fills, once this thread receives them.
    pub(super) signals: Signals,
    /// Those that arrived before [`take`] (they are in the queue as soon
    /// as [`Taken::receive_here`] runs).
    pub(super) early: Vec<i32>,
    stop: Vec<i32>,
}

impl Taken {
    /// Unblocks the stop signals in the calling thread alone (the main
    /// loop's signals thread): the kernel delivers them to it, pending ones
    /// at once, and the handler queues them.
    pub(super) fn receive_here(&self) {
        for &s in &self.stop {
            let _ = vmm_sys_util::signal::unblock_signal(s);
        }
    }
}

/// The caught stop signals, for the main loop; caught from now on if
/// [`catch`] was not called.
pub(super) fn take() -> Result<Taken, VmmError> {
    catch()?;
    let mut caught = CAUGHT.lock().unwrap_or_else(|e| e.into_inner());
    let c = caught.take().expect("caught just above");
    Ok(Taken {
        early: pending(&c.stop),
        signals: c.signals,
        stop: c.stop,
    })
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
        // The masks are read from the kernel: cargo does not start the
        // tests under nohup, and this process blocks nothing here.
        let ignored = status_mask(&["SigIgn:"]);
        let stop = stop_signals();
        assert!(stop.contains(&libc::SIGTERM) && stop.contains(&libc::SIGPWR));
        assert_eq!(
            stop.contains(&libc::SIGHUP),
            ignored & bit(libc::SIGHUP) == 0
        );
        assert_eq!(name(libc::SIGHUP), "SIGHUP");
        assert!(pending(&stop).is_empty());
    }
}
