//! The guest's wait port: where an idle vCPU thread parks until a device has
//! work for the guest, the guest's timeout passes, or the VMM wants the vCPU
//! (pause, stop).
//!
//! Wake-ups are a generation counter, and each waiter remembers the last
//! generation it saw ([`Waiter`]). A wake-up that arrives while a vCPU is not
//! parked (say, just after the guest polled its rings and before its `out` to
//! the wait port) is therefore never lost, and with several vCPUs one vCPU's
//! wake-up does not consume another's.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Shared between the devices (which call [`GuestWake::notify`]) and the vCPU
/// threads (which call [`GuestWake::wait`] on a guest `out` to the wait port).
#[derive(Debug, Default)]
pub struct GuestWake {
    generation: Mutex<u64>,
    cond: Condvar,
}

/// One waiter's memory of the wake-ups it has already seen.
#[derive(Debug, Default, Clone, Copy)]
pub struct Waiter {
    seen: u64,
}

impl GuestWake {
    /// New, with no wake-up pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wake every parked vCPU now, and every vCPU that parks later without
    /// having seen this wake-up.
    pub fn notify(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        *g = g.wrapping_add(1);
        self.cond.notify_all();
    }

    /// Make parked waiters re-check their `interrupted` condition without
    /// counting as a wake-up (the VMM wants a parked vCPU, the guest does not).
    pub fn poke(&self) {
        let _g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        self.cond.notify_all();
    }

    /// Park until a wake-up `waiter` has not seen yet, or `timeout` (None: no
    /// limit). Returns true if woken by a notification.
    pub fn wait(&self, waiter: &mut Waiter, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.wait_until(waiter, deadline, &|| false) == Wake::Notified
    }

    /// Park until a wake-up `waiter` has not seen, `deadline`, or (checked on
    /// every [`poke`](Self::poke)) `interrupted()`.
    pub fn wait_until(
        &self,
        waiter: &mut Waiter,
        deadline: Option<Instant>,
        interrupted: &dyn Fn() -> bool,
    ) -> Wake {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        while *g == waiter.seen {
            if interrupted() {
                return Wake::Interrupted;
            }
            match deadline {
                None => g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Wake::TimedOut;
                    }
                    g = self
                        .cond
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        waiter.seen = *g;
        Wake::Notified
    }
}

/// Why [`GuestWake::wait_until`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A device has work for the guest.
    Notified,
    /// The guest's timeout passed.
    TimedOut,
    /// The VMM wants the waiter (pause, stop).
    Interrupted,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn notify_before_wait_is_not_lost() {
        let w = GuestWake::new();
        let mut me = Waiter::default();
        w.notify();
        assert!(w.wait(&mut me, Some(Duration::from_millis(0))));
        assert!(!w.wait(&mut me, Some(Duration::from_millis(1))));
    }

    #[test]
    fn one_waiter_does_not_consume_anothers_wakeup() {
        let w = GuestWake::new();
        let (mut a, mut b) = (Waiter::default(), Waiter::default());
        w.notify();
        assert!(w.wait(&mut a, Some(Duration::ZERO)));
        assert!(w.wait(&mut b, Some(Duration::ZERO)));
        assert!(!w.wait(&mut a, Some(Duration::ZERO)));
    }

    #[test]
    fn poke_interrupts_without_consuming_a_wakeup() {
        let w = Arc::new(GuestWake::new());
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (w2, f2) = (w.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            let mut me = Waiter::default();
            let r = w2.wait_until(&mut me, None, &|| {
                f2.load(std::sync::atomic::Ordering::SeqCst)
            });
            (r, me)
        });
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        w.poke();
        let (r, mut me) = t.join().unwrap();
        assert_eq!(r, Wake::Interrupted);
        assert!(
            !w.wait(&mut me, Some(Duration::ZERO)),
            "poke counted as a wake-up"
        );
    }

    #[test]
    fn notify_from_another_thread_wakes() {
        let w = Arc::new(GuestWake::new());
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.wait(&mut Waiter::default(), None));
        w.notify();
        assert!(t.join().unwrap());
    }
}
