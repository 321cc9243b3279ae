//! Epoch policy and per-epoch metrics for `--persist epoch`.
//!
//! An epoch ends (and is checkpointed) when output is held and at least
//! `min` has passed since the last epoch began (group commit: every reply
//! waiting for durability shares one commit), or at `max` in any case. The
//! dirty budget bounds the pages one epoch may log (and so the time from a
//! power-fail warning to a durable commit: budget ÷ persist bandwidth).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::nvram::CommitTimes;

/// Default hot-page budget. Measured with `redis-benchmark -t set -r 100000`
/// on ext4 (two interleaved runs of each): 50 clients × 16 pipelined gave
/// 169–175k SET/s with 2 048, 220–262k with 4 096 to 32 768 (8 192: 232–262k);
/// 16 clients, 16 × 16 and 1 client the same within noise; 256 to 1 024 much
/// worse (16 × 16: 54–88k against 105–119k), the working set then faulting
/// back in every epoch. It bounds the compares of one pause: at ~0.25–0.5 µs
/// a page, 2–4 ms with every hot page held, and 32 MiB of shadow copies.
pub const DEFAULT_HOT_PAGES: usize = 8192;

/// When epochs end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochPolicy {
    /// Shortest epoch when output is waiting (group commit window).
    pub min: Duration,
    /// Longest epoch.
    pub max: Duration,
    /// Most dirty pages one epoch may carry.
    pub dirty_budget: usize,
    /// Most pages left writable between epochs (copied and compared every
    /// epoch instead of paying a ~20 µs write fault each time).
    pub hot_pages: usize,
    /// How long after a page was written to the image nvhv's private copy
    /// of it may be given back if the guest has not written it since
    /// (`vstate::reclaim`); `None`: never.
    pub give_back_after: Option<Duration>,
}

/// [`EpochPolicy::give_back_after`] by default.
pub const DEFAULT_GIVE_BACK_AFTER: Duration = Duration::from_secs(10);

impl Default for EpochPolicy {
    fn default() -> Self {
        EpochPolicy {
            min: Duration::from_micros(100),
            max: Duration::from_millis(10),
            dirty_budget: 16384,
            hot_pages: DEFAULT_HOT_PAGES,
            give_back_after: Some(DEFAULT_GIVE_BACK_AFTER),
        }
    }
}

/// Why an epoch ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochEnd {
    /// Its time is up (`max`, or `min` with output waiting).
    Due,
    /// The guest's dirty pages reached the budget.
    Budget,
}

/// How often the dirty count is checked against the budget between epochs.
pub const BUDGET_CHECK: Duration = Duration::from_millis(2);

/// An epoch policy that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The group-commit window is longer than the longest epoch.
    #[error("--epoch-min ({min:?}) is longer than --epoch-max ({max:?})")]
    MinAboveMax {
        /// `--epoch-min`.
        min: Duration,
        /// `--epoch-max`.
        max: Duration,
    },
    /// A budget of no pages: every epoch would be over it.
    #[error("--dirty-budget must be at least 1 page")]
    ZeroBudget,
    /// A redo-log half too small for any budget.
    #[error("--log-size is too small: a redo-log half holds {capacity} pages (at least 4 are needed; 128M, the default for guests of 128 MiB or more, holds 32 655)")]
    LogTooSmall {
        /// Pages one record holds, each logged whole.
        capacity: usize,
    },
    /// One epoch within the budget could overflow a redo-log half.
    #[error(
        "--dirty-budget {budget} does not fit the redo log: a half holds {capacity} pages, and the budget may use at most {limit} of them (the rest is room for what the guest writes between a budget check and the capture); use a larger --log-size or --dirty-budget {limit} or less"
    )]
    BudgetAboveLog {
        /// `--dirty-budget`.
        budget: usize,
        /// Pages one record holds, each logged whole.
        capacity: usize,
        /// The largest budget allowed.
        limit: usize,
    },
}

/// The largest dirty budget a log half of `capacity` pages allows for a
/// guest of `ram_pages` pages of RAM. A half that holds every page of RAM
/// logged whole can hold any epoch (a record carries each page at most once),
/// so then any budget fits. Otherwise three quarters of the half: the budget
/// is checked every [`BUDGET_CHECK`] while the guest runs on, and the pages
/// written in between (and while an epoch commits) land in the same record; a
/// record that does not fit stops the VM (`VmmError::DirtyOverflow`).
pub fn budget_limit(capacity: usize, ram_pages: usize) -> usize {
    if capacity >= ram_pages {
        usize::MAX
    } else {
        capacity / 4 * 3
    }
}

impl EpochPolicy {
    /// Checks the policy against itself and against a redo-log half of
    /// `capacity` pages, for a guest of `ram_pages` pages of RAM.
    pub fn check(&self, capacity: usize, ram_pages: usize) -> Result<(), PolicyError> {
        if self.min > self.max {
            return Err(PolicyError::MinAboveMax {
                min: self.min,
                max: self.max,
            });
        }
        if self.dirty_budget == 0 {
            return Err(PolicyError::ZeroBudget);
        }
        let limit = budget_limit(capacity, ram_pages);
        if limit == 0 {
            return Err(PolicyError::LogTooSmall { capacity });
        }
        if self.dirty_budget > limit {
            return Err(PolicyError::BudgetAboveLog {
                budget: self.dirty_budget,
                capacity,
                limit,
            });
        }
        Ok(())
    }

    /// When the current epoch (begun at `start`) should end, given since
    /// when output has been waiting (`pending`) and whether the guest is idle
    /// (every vCPU parked at the wait port, its state already saved).
    ///
    /// With output waiting, the epoch lasts at least `min`; after that it
    /// ends as soon as the guest is idle (it will produce nothing more for
    /// this group commit, and pausing it costs nothing), and at the latest
    /// `min` after the output began to wait (then the guest is kicked out of
    /// `KVM_RUN`).
    pub fn due(&self, start: Instant, pending: Option<Instant>, idle: bool) -> Instant {
        match pending {
            None => start + self.max,
            Some(_) if idle => start + self.min,
            Some(p) => (start + self.min).max(p + self.min).min(start + self.max),
        }
    }

    /// When to wake next: the epoch's due time, or earlier to check the
    /// dirty budget, `BUDGET_CHECK` after it was last checked (`checked`,
    /// or the epoch's start) — unless every vCPU is parked (`parked`, with
    /// the VMM told when one leaves its park): parked vCPUs dirty nothing,
    /// so an idle VM wakes the VMM once per `max`, not every check.
    ///
    /// Counted from the last check, not from now: the VMM wakes for events
    /// too (a vCPU parking, output) and computes this again each time, and
    /// a guest that parks every few hundred µs (waiting for the rest of a
    /// large request) would otherwise push the check off for good. It did:
    /// one epoch carried 2 000–4 500 pages under a budget of 64.
    pub fn next_wake(
        &self,
        start: Instant,
        pending: Option<Instant>,
        idle: bool,
        parked: bool,
        checked: Instant,
    ) -> Instant {
        let due = self.due(start, pending, idle);
        if parked && pending.is_none() {
            due
        } else {
            due.min(checked + BUDGET_CHECK)
        }
    }
}

/// Per-epoch measurements, summarised when the VM stops.
pub struct EpochStats {
    /// Epochs committed.
    pub epochs: u64,
    /// Guest pause per epoch (µs).
    pub pause_us: Histogram<u64>,
    /// Pause start → commit durable (µs): what held output waits at most.
    pub commit_us: Histogram<u64>,
    /// Persist alone (µs).
    pub persist_us: Histogram<u64>,
    /// Dirty pages per epoch.
    pub pages: Histogram<u64>,
    /// Bytes of changes logged in total (redo-log payloads).
    pub bytes_logged: u64,
    /// Output bytes released after commits.
    pub output_released: u64,
    /// Output bytes sent without waiting for a commit (they depended on
    /// nothing uncommitted: `devices::virtio::vsock::deps`).
    pub output_unheld: u64,
    /// Epochs that ended with every vCPU still parked since the last
    /// capture: nothing was captured.
    pub idle_skips: u64,
    /// Epochs ended early because the guest's dirty pages reached the budget.
    pub budget_ends: u64,
    /// Commits during which the guest reached the budget and was held back
    /// until the next epoch (`vstate::throttle`).
    pub brakes: u64,
    /// Pages written to the RAM image by the applies (format 3 writes a page
    /// once for many epochs that changed it).
    pub pages_applied: u64,
    /// Pages whose private copy was given back (`vstate::reclaim`).
    pub pages_given_back: u64,
}

impl Default for EpochStats {
    fn default() -> Self {
        let h = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
        EpochStats {
            epochs: 0,
            pause_us: h(),
            commit_us: h(),
            persist_us: h(),
            pages: h(),
            bytes_logged: 0,
            output_released: 0,
            output_unheld: 0,
            idle_skips: 0,
            budget_ends: 0,
            brakes: 0,
            pages_applied: 0,
            pages_given_back: 0,
        }
    }
}

impl EpochStats {
    /// Record one epoch.
    pub fn record(
        &mut self,
        pause: Duration,
        pages: usize,
        times: &CommitTimes,
        commit: Duration,
        released: u64,
    ) {
        self.epochs += 1;
        let us = |d: Duration| (d.as_micros() as u64).max(1);
        let _ = self.pause_us.record(us(pause));
        let _ = self.commit_us.record(us(commit));
        let _ = self
            .persist_us
            .record(us(times.state_persist + times.meta_persist));
        let _ = self.pages.record(pages as u64 + 1);
        self.bytes_logged += times.log_bytes;
        self.output_released += released;
    }

    /// One line: counts and p50/p99 of each measure.
    pub fn summary(&self) -> String {
        let q = |h: &Histogram<u64>| {
            format!(
                "p50 {} p99 {} max {}",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.max()
            )
        };
        format!(
            "{} epochs; pause µs {}; commit µs {}; persist µs {}; dirty pages+1 {}; {:.1} MiB logged; {} bytes of output released after commits, {} sent at once (depending on nothing uncommitted); {} idle epochs without a capture; {} epochs ended by the dirty budget ({} with the guest held back while the last epoch committed); {} pages written to the RAM image; {} pages' private copies given back",
            self.epochs,
            q(&self.pause_us),
            q(&self.commit_us),
            q(&self.persist_us),
            q(&self.pages),
            self.bytes_logged as f64 / (1 << 20) as f64,
            self.output_released,
            self.output_unheld,
            self.idle_skips,
            self.budget_ends,
            self.brakes,
            self.pages_applied,
            self.pages_given_back
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_is_checked_against_itself_and_the_log() {
        let p = EpochPolicy::default();
        // A 128 MiB half (the default --log-size from 128 MiB of RAM) holds
        // 32 655 whole pages; a 1 GiB guest has 262 144.
        let default_log = crate::nvram::redo::capacity_pages(128 << 20).unwrap() as usize;
        let ram = 262_144;
        assert_eq!(default_log, 32_655);
        assert_eq!(p.check(default_log, ram), Ok(()));
        assert_eq!(budget_limit(default_log, ram), 24_489);
        assert_eq!(
            p.check(16_000, ram),
            Err(PolicyError::BudgetAboveLog {
                budget: p.dirty_budget,
                capacity: 16_000,
                limit: 12_000
            })
        );
        // The same half for a guest it holds whole: any budget fits.
        assert_eq!(budget_limit(16_000, 16_000), usize::MAX);
        assert_eq!(p.check(16_000, 16_000), Ok(()));
        assert_eq!(
            p.check(15_999, 16_000),
            Err(PolicyError::BudgetAboveLog {
                budget: p.dirty_budget,
                capacity: 15_999,
                limit: 11_997
            }),
            "one page short of the whole RAM"
        );
        let exact = EpochPolicy {
            dirty_budget: 12_000,
            ..p
        };
        assert_eq!(exact.check(16_000, ram), Ok(()));
        assert_eq!(
            exact.check(3, ram),
            Err(PolicyError::LogTooSmall { capacity: 3 }),
            "a log too small for any budget"
        );
        let zero = EpochPolicy {
            dirty_budget: 0,
            ..p
        };
        assert_eq!(zero.check(default_log, ram), Err(PolicyError::ZeroBudget));
        let inverted = EpochPolicy {
            min: Duration::from_millis(20),
            max: Duration::from_millis(10),
            ..p
        };
        assert!(matches!(
            inverted.check(default_log, ram),
            Err(PolicyError::MinAboveMax { .. })
        ));
        let equal = EpochPolicy { min: p.max, ..p };
        assert_eq!(
            equal.check(default_log, ram),
            Ok(()),
            "min = max is a fixed interval"
        );
    }

    #[test]
    fn output_shortens_the_epoch_to_min() {
        let p = EpochPolicy::default();
        let t = Instant::now();
        assert_eq!(p.due(t, None, false) - t, p.max);
        assert_eq!(p.due(t, None, true) - t, p.max, "idle without output");
        assert_eq!(p.due(t, Some(t), false) - t, p.min);
        assert_eq!(p.due(t, Some(t), true) - t, p.min);
    }

    #[test]
    fn a_busy_guest_gets_min_after_its_output_to_go_idle() {
        let p = EpochPolicy::default();
        let t = Instant::now();
        let late = t + 5 * p.min;
        assert_eq!(p.due(t, Some(late), false), late + p.min);
        assert_eq!(p.due(t, Some(late), true), t + p.min, "idle: at once");
        let very_late = t + p.max;
        assert_eq!(
            p.due(t, Some(very_late), false),
            t + p.max,
            "never past max"
        );
    }

    #[test]
    fn budget_checks_wake_before_a_long_epoch_ends() {
        let p = EpochPolicy::default();
        let t = Instant::now();
        assert_eq!(
            p.next_wake(t, None, false, false, t),
            t + BUDGET_CHECK.min(p.max)
        );
        assert_eq!(
            p.next_wake(t, Some(t), false, false, t),
            t + p.min.min(BUDGET_CHECK)
        );
        // Every vCPU parked: no budget checks, just the epoch's end.
        assert_eq!(p.next_wake(t, None, false, true, t), t + p.max);
        assert_eq!(
            p.next_wake(t, Some(t), true, true, t),
            t + p.min.min(BUDGET_CHECK),
            "output waiting: as before"
        );
        // Waking for an event later in the epoch does not move the check.
        let checked = t;
        let later = t + BUDGET_CHECK / 2;
        assert_eq!(
            p.next_wake(later, None, false, false, checked),
            t + BUDGET_CHECK
        );
    }

    #[test]
    fn stats_summarise_what_was_recorded() {
        let mut s = EpochStats::default();
        let times = CommitTimes {
            epoch: 1,
            log_bytes: 7 * 4096,
            state_bytes: 10,
            state_write: Duration::ZERO,
            state_persist: Duration::from_micros(100),
            meta_write: Duration::ZERO,
            meta_persist: Duration::ZERO,
            total: Duration::from_micros(120),
        };
        s.record(
            Duration::from_micros(300),
            7,
            &times,
            Duration::from_micros(900),
            55,
        );
        assert_eq!(s.epochs, 1);
        assert_eq!(s.bytes_logged, 7 * 4096);
        assert_eq!(s.output_released, 55);
        let line = s.summary();
        assert!(line.starts_with("1 epochs"), "{line}");
        assert!(line.contains("pause µs p50 300"), "{line}");
        s.idle_skips = 4;
        s.budget_ends = 2;
        s.brakes = 1;
        s.pages_given_back = 3;
        assert!(
            s.summary()
                .ends_with("; 4 idle epochs without a capture; 2 epochs ended by the dirty budget (1 with the guest held back while the last epoch committed); 0 pages written to the RAM image; 3 pages' private copies given back"),
            "{line}"
        );
    }
}
