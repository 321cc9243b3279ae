//! The guest's wait port: where an idle vCPU thread parks until a device has
//! work for the guest, the guest's timeout passes, or the VMM wants the vCPU
//! (pause, stop).
//!
//! A wake-up that arrives while nobody is parked is remembered, so a device
//! that queues work just before the guest parks never loses the wake-up.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Shared between the devices (which call [`GuestWake::notify`]) and the vCPU threads
/// (which call [`GuestWake::wait`] on a guest `out` to the wait port).
#[derive(Debug, Default)]
pub struct GuestWake {
    pending: Mutex<bool>,
    cond: Condvar,
}

impl GuestWake {
    /// New, with no wake-up pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wake every parked vCPU now, or the next one that parks.
    pub fn notify(&self) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *p = true;
        self.cond.notify_all();
    }

    /// Park until [`notify`](Self::notify) or `timeout` (None: no limit). Consumes
    /// the pending wake-up. Returns true if woken by a notification.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match timeout {
            None => {
                while !*p {
                    p = self.cond.wait(p).unwrap_or_else(|e| e.into_inner());
                }
            }
            Some(t) => {
                let deadline = std::time::Instant::now() + t;
                while !*p {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        return false;
                    }
                    p = self
                        .cond
                        .wait_timeout(p, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        *p = false;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_before_wait_is_not_lost() {
        let w = GuestWake::new();
        w.notify();
        assert!(w.wait(Some(Duration::from_millis(0))));
        assert!(!w.wait(Some(Duration::from_millis(1))));
    }

    #[test]
    fn notify_from_another_thread_wakes() {
        let w = std::sync::Arc::new(GuestWake::new());
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.wait(None));
        w.notify();
        assert!(t.join().unwrap());
    }
}
