//! The guest's wait port: where an idle vCPU thread parks until a device has
//! work for the guest, the guest's timeout passes, or the VMM wants the vCPU
//! (pause, stop).
//!
//! Wake-ups are a generation counter, and each waiter remembers the last
//! generation it saw ([`Waiter`]). A wake-up that arrives while a vCPU is not
//! parked (say, just after the guest polled its rings and before its `out` to
//! the wait port) is therefore never lost, and with several vCPUs one vCPU's
//! wake-up does not consume another's.
//!
//! A parked thread first spins for [`PARK_SPIN`] (or what `--idle-poll`
//! says, [`GuestWake::with_spin`]), yielding its core to any runnable
//! thread, before it sleeps on the condition variable: on our hosts
//! waking a thread on an idle core costs tens of µs, and under load the next
//! request usually arrives within that window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a parked vCPU thread polls for a wake-up before it sleeps.
///
/// Waking a sleeping thread costs ~30–50 µs here (the target core is idle in
/// the outer hypervisor; `perf sched timehist` showed 48 µs from the device
/// thread's wake-up to the vCPU running, in a 1-client SET cycle of ~290 µs
/// on tmpfs). Measured with alternating runs of `redis-benchmark -t set
/// -r 100000` (2026-12-07): epoch mode on tmpfs, 1 client 3.7–4.4k → 4.6–5.8k
/// SET/s with 200 µs, 16 clients 24–36k → 24–35k (medians 26.1k → 28.7k);
/// suspend-only on tmpfs 16 clients 28–31k → 31–39k; ext4 (where the flush
/// dominates) within noise; an idle VM's CPU time unchanged (the guest parks
/// for 100 ms at a time when idle). 100 and 400 µs were no better.
pub const PARK_SPIN: Duration = Duration::from_micros(200);

/// Shared between the devices (which call [`GuestWake::notify`]) and the vCPU
/// threads (which call [`GuestWake::wait`] on a guest `out` to the wait port).
#[derive(Debug)]
pub struct GuestWake {
    generation: Mutex<u64>,
    /// `generation`, readable without the lock: what the spin polls.
    /// ORDER: stored under the lock, before `cond` is notified.
    published: AtomicU64,
    cond: Condvar,
    /// Where halted vCPUs sleep ([`GuestWake::halt`]): only
    /// [`poke`](GuestWake::poke) wakes them.
    halted: Condvar,
    spin: Duration,
}

impl Default for GuestWake {
    fn default() -> Self {
        Self::with_spin(PARK_SPIN)
    }
}

/// One waiter's memory of the wake-ups it has already seen.
#[derive(Debug, Default, Clone, Copy)]
pub struct Waiter {
    seen: u64,
}

impl GuestWake {
    /// New, with no wake-up pending, spinning [`PARK_SPIN`] before sleeping.
    pub fn new() -> Self {
        Self::default()
    }

    /// New, spinning `spin` before sleeping (zero: sleep at once).
    pub fn with_spin(spin: Duration) -> Self {
        GuestWake {
            generation: Mutex::new(0),
            published: AtomicU64::new(0),
            cond: Condvar::new(),
            halted: Condvar::new(),
            spin,
        }
    }

    /// How long a waiter polls before it sleeps.
    pub fn spin(&self) -> Duration {
        self.spin
    }

    /// Wake every parked vCPU now, and every vCPU that parks later without
    /// having seen this wake-up.
    pub fn notify(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        *g = g.wrapping_add(1);
        self.published.store(*g, Ordering::SeqCst);
        self.cond.notify_all();
    }

    /// Make parked waiters re-check their `interrupted` condition without
    /// counting as a wake-up (the VMM wants a parked vCPU, the guest does not).
    pub fn poke(&self) {
        let _g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        self.cond.notify_all();
        self.halted.notify_all();
    }

    /// Park for good: until `interrupted()` (checked on every
    /// [`poke`](Self::poke)); wake-ups ([`notify`](Self::notify)) do not
    /// reach a halted thread. Always returns [`Wake::Interrupted`].
    pub fn halt(&self, interrupted: &dyn Fn() -> bool) -> Wake {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        // ORDER: `interrupted` is looked at under the lock `poke` takes, so a
        //        poke after it finds this thread waiting.
        while !interrupted() {
            g = self.halted.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        Wake::Interrupted
    }

    /// Park until a wake-up `waiter` has not seen yet, or `timeout` (None: no
    /// limit). Returns true if woken by a notification.
    pub fn wait(&self, waiter: &mut Waiter, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.wait_until(waiter, deadline, &|| false) == Wake::Notified
    }

    /// Park until a wake-up `waiter` has not seen, `deadline`, or (checked on
    /// every [`poke`](Self::poke), and all along the spin) `interrupted()`.
    pub fn wait_until(
        &self,
        waiter: &mut Waiter,
        deadline: Option<Instant>,
        interrupted: &dyn Fn() -> bool,
    ) -> Wake {
        if !self.spin.is_zero() {
            let end = Instant::now() + self.spin;
            let end = deadline.map_or(end, |d| d.min(end));
            // A wake-up seen here is taken under the lock below, as if the
            // thread had slept.
            while self.published.load(Ordering::SeqCst) == waiter.seen {
                if interrupted() {
                    return Wake::Interrupted;
                }
                if Instant::now() >= end {
                    break;
                }
                std::thread::yield_now();
            }
        }
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
    fn the_spin_sees_wakeups_interrupts_and_deadlines() {
        let spin = Duration::from_secs(30);
        // A deadline inside the spin ends it.
        let w = GuestWake::with_spin(spin);
        let t = Instant::now();
        assert!(!w.wait(&mut Waiter::default(), Some(Duration::from_millis(20))));
        assert!(t.elapsed() < spin, "spun past the deadline");
        // A wake-up from another thread during the spin.
        let w = Arc::new(GuestWake::with_spin(spin));
        let w2 = w.clone();
        let t = Instant::now();
        let h = std::thread::spawn(move || {
            let mut me = Waiter::default();
            let woken = w2.wait(&mut me, None);
            (woken, me)
        });
        std::thread::sleep(Duration::from_millis(5));
        w.notify();
        let (woken, mut me) = h.join().unwrap();
        assert!(woken);
        assert!(t.elapsed() < spin, "the spin missed the wake-up");
        assert!(
            !w.wait(&mut me, Some(Duration::ZERO)),
            "a wake-up seen while spinning was not consumed"
        );
        // An interrupt during the spin.
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (w2, f2) = (w.clone(), flag.clone());
        let h = std::thread::spawn(move || {
            w2.wait_until(&mut me, None, &|| {
                f2.load(std::sync::atomic::Ordering::SeqCst)
            })
        });
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(h.join().unwrap(), Wake::Interrupted);
        assert!(t.elapsed() < spin, "the spin missed the interrupt");
    }

    #[test]
    fn a_halted_waiter_sleeps_through_wakeups_until_poked() {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        let w = Arc::new(GuestWake::new());
        let stop = Arc::new(AtomicBool::new(false));
        let looks = Arc::new(AtomicUsize::new(0));
        let (w2, s2, l2) = (w.clone(), stop.clone(), looks.clone());
        let h = std::thread::spawn(move || {
            w2.halt(&|| {
                l2.fetch_add(1, Ordering::SeqCst);
                s2.load(Ordering::SeqCst)
            })
        });
        // Its first look happens under the lock; every notify below takes
        // the lock, so each finds the thread asleep.
        while looks.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        for _ in 0..100 {
            w.notify();
        }
        stop.store(true, Ordering::SeqCst);
        w.poke();
        assert_eq!(h.join().unwrap(), Wake::Interrupted);
        let n = looks.load(Ordering::SeqCst);
        assert!(n <= 3, "the halted thread woke for wake-ups ({n} looks)");
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
