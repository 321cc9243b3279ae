//! The throttle: holds the guest back when it dirties pages faster than
//! epochs commit them, so that the dirty budget bounds what one epoch
//! carries (and with it the time from a power-fail warning to a durable
//! commit).
//!
//! Between epochs the VMM's main thread checks the budget itself. While an
//! epoch commits (write, persist, release, apply) that thread is busy, and
//! the guest runs on: a slow commit let the next epoch grow past the budget,
//! each large epoch making the next commit slower still (one 64 MiB SET on
//! ext4 with a budget of 4 096, two runs each (the first with this thread
//! woken at every commit): epochs of up to 5 811 and
//! 3 129 pages without the throttle, 2 167 and 1 821 with it; with a budget
//! of 64, 1 934 / 1 165 against 645 / 467). So during a commit the
//! [`Throttle`] thread counts the guest's dirty pages every [`CHECK`], and
//! when they reach the budget it engages the [`Brake`]: every vCPU thread is
//! kicked out of `KVM_RUN` (as for a pause) and waits at the top of its run
//! loop. The VMM then begins the next epoch at once; its capture pauses the
//! braked vCPUs as usual, and the brake is released as they resume.
//!
//! What one epoch carries is then at most the budget plus what the guest
//! writes in one check interval and a kick (plus the scheduling delay of
//! the throttle thread on a busy host).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kvm_ioctls::VmFd;
use vmm_sys_util::timerfd::TimerFd;

use super::dirty::{count_dirty, DirtyError};

/// How long a commit runs before the throttle first counts dirty pages,
/// and how often it counts again while the commit lasts. Most commits end
/// sooner (~0.3–1.5 ms under load here) and are never looked at.
pub const CHECK: Duration = Duration::from_millis(1);

/// Errors of the throttle.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// The VM file descriptor could not be duplicated for the thread.
    #[error("duplicating the VM file descriptor for the throttle failed")]
    Dup(#[source] std::io::Error),
    /// The throttle thread could not be started.
    #[error("starting the throttle thread failed")]
    Spawn(#[source] std::io::Error),
    /// The throttle's timer failed.
    #[error("the throttle's timer failed")]
    Timer(#[source] std::io::Error),
    /// Counting the dirty pages failed.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
}

/// Holds every vCPU thread out of `KVM_RUN` while engaged.
#[derive(Default)]
pub struct Brake {
    /// Read by each vCPU thread at the top of its run loop.
    engaged: AtomicBool,
    /// How often it was engaged.
    engagements: AtomicU64,
    /// The vCPU threads to kick (registered while they live), and the lock
    /// under which the brake changes state and its waiters sleep.
    threads: Mutex<Vec<libc::pthread_t>>,
    cv: Condvar,
}

/// A vCPU thread's registration with the [`Brake`]; dropped when the
/// thread leaves its run loop, after which it is never kicked again.
pub struct Registration<'a> {
    brake: &'a Brake,
    me: libc::pthread_t,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut threads = self.brake.lock();
        // SAFETY: pthread_equal only compares two thread ids.
        threads.retain(|&t| unsafe { libc::pthread_equal(t, self.me) } == 0);
    }
}

impl Brake {
    fn lock(&self) -> MutexGuard<'_, Vec<libc::pthread_t>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU thread before it first enters `KVM_RUN` (with its
    /// kick handler's `kvm_run` pointer set): from now on an engagement
    /// kicks it.
    pub fn register(&self) -> Registration<'_> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().push(me);
        Registration { brake: self, me }
    }

    /// Whether the brake is engaged.
    pub fn is_engaged(&self) -> bool {
        self.engaged.load(Ordering::SeqCst)
    }

    /// How often the brake has been engaged.
    pub fn engagements(&self) -> u64 {
        self.engagements.load(Ordering::Relaxed)
    }

    /// Engage the brake (if it is not already) and kick every registered
    /// vCPU thread with `signal` (the vCPU kick signal), so that one in
    /// `KVM_RUN` returns and finds the brake at the top of its loop.
    ///
    /// ORDER: the flag is set before the kicks (as for a pause): a thread
    /// between its check and `KVM_RUN` has `immediate_exit` set by its kick
    /// and returns at once.
    pub fn engage(&self, signal: libc::c_int) {
        let threads = self.lock();
        if self.engaged.swap(true, Ordering::SeqCst) {
            return;
        }
        self.engagements.fetch_add(1, Ordering::Relaxed);
        for &t in threads.iter() {
            // SAFETY: `t` is a live thread: a vCPU thread removes itself
            // from the list (under this lock, which is held here) before it
            // ends. A parked thread just sees its wait interrupted and waits
            // on; its next KVM_RUN returns at once and it stops here then.
            unsafe { libc::pthread_kill(t, signal) };
        }
    }

    /// Release the brake: every held vCPU thread runs on.
    pub fn release(&self) {
        let _g = self.lock();
        if self.engaged.swap(false, Ordering::SeqCst) {
            self.cv.notify_all();
        }
    }

    /// Called by a vCPU thread that found the brake engaged: wait until it
    /// is released or `interrupted` says the VMM wants the thread (a pause
    /// or a stop, whose sender calls [`poke`](Self::poke) after setting
    /// what `interrupted` reads).
    pub fn hold(&self, interrupted: &dyn Fn() -> bool) {
        let mut g = self.lock();
        while self.is_engaged() && !interrupted() {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Wake every held thread to look at its `interrupted` condition again.
    pub fn poke(&self) {
        let _g = self.lock();
        self.cv.notify_all();
    }
}

/// Counts the guest's dirty pages from its own thread while an epoch
/// commits, and engages the [`Brake`] at the budget.
///
/// The thread sleeps on a timer that only runs while a commit is armed, so
/// a commit shorter than [`CHECK`] costs two `timerfd_settime` calls and no
/// wake-up. (A first version woke the thread at every arm: 16 clients fell
/// from 14.4–14.7k to 12.9–13.0k SET/s on ext4.)
pub struct Throttle {
    /// The main thread's handle on the timer (the thread waits on a
    /// duplicate of it).
    timer: TimerFd,
    shared: Arc<Mutex<Watch>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Watch {
    /// The commit being watched (0: none).
    armed: u64,
    /// The last commit number handed out.
    commits: u64,
    stop: bool,
}

fn timer_error(e: vmm_sys_util::errno::Error) -> ThrottleError {
    ThrottleError::Timer(e.into())
}

fn lock(w: &Mutex<Watch>) -> MutexGuard<'_, Watch> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

impl Throttle {
    /// Start the throttle thread for the VM `vm` with `npages` pages of RAM
    /// in slot 0: at `budget` dirty pages (counted as the budget check
    /// between epochs counts them, hot pages included) it engages `brake`,
    /// kicking with `signal`.
    pub fn start(
        vm: &VmFd,
        npages: usize,
        budget: usize,
        brake: Arc<Brake>,
        signal: libc::c_int,
    ) -> Result<Self, ThrottleError> {
        // SAFETY: the VM fd is open for as long as `vm` lives, and the
        // borrow ends with this statement (the duplicate is our own).
        let fd: OwnedFd = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(ThrottleError::Dup)?;
        let timer = TimerFd::new().map_err(timer_error)?;
        // SAFETY: as above, for the timer's fd.
        let waiting: OwnedFd = unsafe { BorrowedFd::borrow_raw(timer.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(ThrottleError::Dup)?;
        // SAFETY: `waiting` is a timerfd (a duplicate of `timer`'s) that we
        // own; the TimerFd takes it over.
        let mut waiting = unsafe { TimerFd::from_raw_fd(waiting.into_raw_fd()) };
        let shared = Arc::new(Mutex::new(Watch::default()));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nvhv-throttle".into())
            .spawn(move || {
                if let Err(e) = watch(&s, &mut waiting, &fd, npages, budget, &brake, signal) {
                    // The main thread's own budget check reads the same log
                    // and reports the error; the guest is not braked again.
                    tracing::warn!("throttle stopped: {e}");
                }
            })
            .map_err(ThrottleError::Spawn)?;
        Ok(Throttle {
            timer,
            shared,
            thread: Some(thread),
        })
    }

    /// A commit begins (the guest runs again): count its dirty pages
    /// [`CHECK`] from now and every [`CHECK`] after that until
    /// [`disarm`](Self::disarm).
    pub fn arm(&mut self) -> Result<(), ThrottleError> {
        {
            let mut w = lock(&self.shared);
            w.commits += 1;
            w.armed = w.commits;
        }
        self.timer.reset(CHECK, Some(CHECK)).map_err(timer_error)
    }

    /// The commit has ended. ORDER: once this returns the thread engages the
    /// brake no more for it (it engages only under the lock, for the commit
    /// still armed).
    pub fn disarm(&mut self) -> Result<(), ThrottleError> {
        lock(&self.shared).armed = 0;
        self.timer.clear().map_err(timer_error)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        // Wake the thread at once to see `stop`.
        if self.timer.reset(Duration::from_nanos(1), None).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// The throttle thread: at each tick of the timer (which runs only while a
/// commit is armed) count the dirty pages, and engage the brake at the
/// budget.
fn watch(
    shared: &Mutex<Watch>,
    timer: &mut TimerFd,
    fd: &OwnedFd,
    npages: usize,
    budget: usize,
    brake: &Brake,
    signal: libc::c_int,
) -> Result<(), ThrottleError> {
    let mut bits = vec![0u64; npages.div_ceil(64)];
    loop {
        timer.wait().map_err(timer_error)?;
        let commit = {
            let w = lock(shared);
            if w.stop {
                return Ok(());
            }
            w.armed
        };
        // A tick of a commit that ended meanwhile is not acted on.
        if commit == 0 || brake.is_engaged() {
            continue;
        }
        let n = count_dirty(fd, npages, &mut bits)?;
        let w = lock(shared);
        if w.armed == commit && n >= budget {
            brake.engage(signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held thread waits until the brake is released, and a poke with
    /// its interruption set lets it go at once.
    #[test]
    fn hold_waits_for_release_or_interruption() {
        let brake = Arc::new(Brake::default());
        // No thread registered: engaging kicks nobody.
        brake.engage(0);
        assert!(brake.is_engaged());
        brake.engage(0);
        assert_eq!(brake.engagements(), 1, "engaging twice counts once");
        let (tx, rx) = std::sync::mpsc::channel();
        let b = brake.clone();
        let t = std::thread::spawn(move || {
            b.hold(&|| false);
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(50)).is_err(),
            "a held thread ran on while engaged"
        );
        brake.release();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("release did not let the thread go");
        t.join().unwrap();

        brake.engage(0);
        let flag = Arc::new(AtomicBool::new(false));
        let (b, f) = (brake.clone(), flag.clone());
        let t = std::thread::spawn(move || b.hold(&|| f.load(Ordering::SeqCst)));
        flag.store(true, Ordering::SeqCst);
        brake.poke();
        t.join().unwrap();
        assert!(brake.is_engaged(), "an interruption does not release");
    }

    /// A registration ends with its guard: the list is empty again.
    #[test]
    fn registration_ends_with_its_guard() {
        let brake = Brake::default();
        {
            let _r = brake.register();
            assert_eq!(brake.lock().len(), 1);
        }
        assert!(brake.lock().is_empty());
    }
}
