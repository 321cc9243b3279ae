//! A helper thread that takes part of work cut into chunks: the page
//! compares of an epoch's pause.
//!
//! While an epoch is captured every vCPU and device is paused, and the
//! clients wait for replies held until the commit: the host's other core is
//! idle, and the compares of the hot pages (~0.8 µs a page with cold caches
//! here, hundreds of pages an epoch) are most of the pause. [`Splitter::run`]
//! hands out chunks `0..n` from both ends: the calling thread takes them
//! from the front, the helper from the back, so the helper's chunks are
//! always above the caller's and results can be joined in chunk order. The
//! helper sleeps between rounds; [`Splitter::wake`] starts it ahead of a
//! round (a wake-up costs tens of µs here), and when it comes late, or not
//! at all, the caller simply takes every chunk itself.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Who runs a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The thread that called [`Splitter::run`] (chunks from the front).
    Caller,
    /// The helper thread (chunks from the back).
    Helper,
}

/// The most chunks one round may have (`front` and `back` are 16 bits).
pub const MAX_CHUNKS: usize = u16::MAX as usize;

/// How long a woken helper waits for its round before sleeping again (the
/// round usually opens ~25 µs after the wake).
const SPIN: Duration = Duration::from_micros(100);

/// How long the caller spins for the helper's last chunks before it yields.
const YIELD_AFTER: Duration = Duration::from_micros(50);

/// Whether this process may run on more than one CPU. Without a second one
/// a helper could only run on the caller's core, so there is none.
pub fn second_core() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
}

/// Errors of the splitter.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// The helper thread could not be started.
    #[error("starting the page-compare helper thread failed")]
    Spawn(#[source] std::io::Error),
}

/// The work of one round, as the helper sees it.
type Work = dyn Fn(usize, Side) + Sync;

/// A round's work, lifetime erased (see [`Splitter::run`]).
#[derive(Clone, Copy)]
struct Task {
    gen: u32,
    work: *const Work,
}

// SAFETY: `work` points to a `Sync` closure; the helper calls it only while
// the round that published it is running (see `Splitter::run`).
unsafe impl Send for Task {}

/// What the caller and the helper share.
struct Shared {
    /// `gen` (bits 32..64) | `front` (16..32) | `back` (0..16): chunks
    /// `front..back` of round `gen` are not claimed yet.
    state: AtomicU64,
    /// Chunks of the current round the helper finished.
    helper_done: AtomicU32,
    /// The current round's work (None between rounds).
    task: Mutex<Option<Task>>,
    /// The round announced by `wake` (taken by the helper when it wakes).
    woken: Mutex<Option<u32>>,
    bell: Condvar,
    stop: AtomicBool,
}

fn pack(gen: u32, front: usize, back: usize) -> u64 {
    (u64::from(gen) << 32) | ((front as u64) << 16) | back as u64
}

fn unpack(s: u64) -> (u32, usize, usize) {
    (
        (s >> 32) as u32,
        (s >> 16) as usize & 0xffff,
        s as usize & 0xffff,
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The caller's side of the helper thread; stops it when dropped.
pub struct Splitter {
    shared: Arc<Shared>,
    gen: u32,
    thread: Option<JoinHandle<()>>,
}

impl Splitter {
    /// Start the helper thread (asleep until [`wake`](Self::wake)).
    pub fn spawn() -> Result<Self, SplitError> {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            helper_done: AtomicU32::new(0),
            task: Mutex::new(None),
            woken: Mutex::new(None),
            bell: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("nvhv-compare".into())
            .spawn(move || helper(&s))
            .map_err(SplitError::Spawn)?;
        Ok(Splitter {
            shared,
            gen: 0,
            thread: Some(thread),
        })
    }

    /// Get the helper going: a round follows soon. (A wake with no round
    /// after it costs the helper one short spin.)
    pub fn wake(&self) {
        *lock(&self.shared.woken) = Some(self.gen.wrapping_add(1));
        self.shared.bell.notify_one();
    }

    /// Run `work(chunk, side)` once for every chunk in `0..n` (at most
    /// [`MAX_CHUNKS`]), the calling thread taking chunks from the front and
    /// the helper, if it is there, from the back: every chunk the helper
    /// runs is above every chunk the caller runs. Returns when all are done;
    /// what the helper wrote is then visible to the caller.
    pub fn run(&mut self, n: usize, work: &(dyn Fn(usize, Side) + Sync)) {
        assert!(n <= MAX_CHUNKS, "{n} chunks");
        if n == 0 {
            return;
        }
        self.gen = self.gen.wrapping_add(1);
        let gen = self.gen;
        let sh = &*self.shared;
        // SAFETY: only the lifetime is erased. The helper dereferences `work` only
        // after claiming a chunk of round `gen`, and this function does not
        // return before every chunk of the round is done (the wait below),
        // so `work` outlives every use. A helper late for the round fails
        // its claim (the round is over, or the generation moved on).
        let erased: *const Work = unsafe {
            std::mem::transmute::<*const (dyn Fn(usize, Side) + Sync + '_), *const Work>(work)
        };
        *lock(&sh.task) = Some(Task { gen, work: erased });
        sh.helper_done.store(0, Ordering::Relaxed);
        // ORDER: task and counter set before the round is opened (Release).
        sh.state.store(pack(gen, 0, n), Ordering::Release);
        let mut mine = 0;
        loop {
            let s = sh.state.load(Ordering::Acquire);
            let (g, front, back) = unpack(s);
            debug_assert_eq!(g, gen);
            if front >= back {
                break;
            }
            if sh
                .state
                .compare_exchange_weak(
                    s,
                    pack(g, front + 1, back),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                work(front, Side::Caller);
                mine += 1;
            }
        }
        // ORDER: Acquire pairs with the helper's Release after each chunk:
        // its writes are visible once its count is in.
        // A chunk is a few µs of work, so the wait is short, unless the
        // helper lost its core mid-chunk (a loaded host): then yield, in case
        // it waits for this one.
        let since = Instant::now();
        while mine + sh.helper_done.load(Ordering::Acquire) as usize != n {
            if since.elapsed() < YIELD_AFTER {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *lock(&sh.task) = None;
    }
}

impl Drop for Splitter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // ORDER: under the lock the helper checks `stop` with, so it cannot
        //        miss the notification.
        drop(lock(&self.shared.woken));
        self.shared.bell.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The helper thread: sleep until woken, wait (briefly) for the round the
/// wake announced, take its chunks from the back, sleep again.
fn helper(sh: &Shared) {
    loop {
        let announced = {
            let mut w = lock(&sh.woken);
            loop {
                if sh.stop.load(Ordering::Acquire) {
                    return;
                }
                if let Some(g) = w.take() {
                    break g;
                }
                w = sh.bell.wait(w).unwrap_or_else(|e| e.into_inner());
            }
        };
        let until = Instant::now() + SPIN;
        loop {
            let (g, _, _) = unpack(sh.state.load(Ordering::Acquire));
            // A later round than announced: this one is over (missed).
            if g.wrapping_sub(announced) as i32 >= 0 {
                if g == announced {
                    take_from_back(sh, g);
                }
                break;
            }
            if Instant::now() >= until {
                break;
            }
            // Yield, not spin: should this thread share a core with the
            // caller, the caller must run to open the round.
            std::thread::yield_now();
        }
    }
}

/// The helper's part of round `gen`: claim chunks from the back until none
/// is left.
fn take_from_back(sh: &Shared, gen: u32) {
    let Some(task) = *lock(&sh.task) else {
        return;
    };
    if task.gen != gen {
        return;
    }
    loop {
        let s = sh.state.load(Ordering::Acquire);
        let (g, front, back) = unpack(s);
        if g != gen || front >= back {
            return;
        }
        if sh
            .state
            .compare_exchange_weak(
                s,
                pack(g, front, back - 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            // SAFETY: a chunk of round `gen` is claimed, so the round is
            // running and `run` is waiting for this chunk: the closure is
            // alive (see `Splitter::run`).
            let work = unsafe { &*task.work };
            work(back - 1, Side::Helper);
            // ORDER: Release, after the chunk's writes (see `run`).
            sh.helper_done.fetch_add(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU8;

    #[test]
    fn every_chunk_runs_once_and_the_helpers_are_above_the_callers() {
        let mut s = Splitter::spawn().unwrap();
        let mut helped = 0;
        for round in 0..2000usize {
            let n = 1 + round % 300;
            let runs: Vec<AtomicU8> = (0..n).map(|_| AtomicU8::new(0)).collect();
            let by_helper: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
            if round % 3 != 0 {
                s.wake();
            }
            s.run(n, &|c, side| {
                runs[c].fetch_add(1, Ordering::Relaxed);
                by_helper[c].store(side == Side::Helper, Ordering::Relaxed);
                // Some work, so that the helper gets a share.
                for _ in 0..200 {
                    std::hint::spin_loop();
                }
            });
            assert!(
                runs.iter().all(|r| r.load(Ordering::Relaxed) == 1),
                "round {round}"
            );
            let first_helped = by_helper.iter().position(|b| b.load(Ordering::Relaxed));
            if let Some(f) = first_helped {
                helped += 1;
                assert!(
                    by_helper[f..].iter().all(|b| b.load(Ordering::Relaxed)),
                    "round {round}: the helper's chunks are the last ones"
                );
            }
        }
        // Whether the helper gets there in time depends on the scheduler;
        // on any machine with two cores it does in some of 2 000 rounds.
        if second_core() {
            assert!(helped > 0, "the helper never took a chunk");
        }
    }

    #[test]
    fn the_caller_does_everything_when_the_helper_is_not_woken() {
        let mut s = Splitter::spawn().unwrap();
        for n in [1usize, 2, 100] {
            let by_helper = AtomicU32::new(0);
            s.run(n, &|_, side| {
                if side == Side::Helper {
                    by_helper.fetch_add(1, Ordering::Relaxed);
                }
            });
            assert_eq!(by_helper.load(Ordering::Relaxed), 0);
        }
    }
}
