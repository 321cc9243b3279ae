//! Progress shown while a long step runs before the guest does (today: a
//! `run --reserve` of a large RAM region, about a third of a second a GiB
//! on tmpfs). Nothing
//! is shown for a step that ends within [`QUIET`]; after that, a bar on a
//! terminal, or one line when stderr is not one (a log), and a line with
//! the time taken when it ends.

use std::cell::OnceCell;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::nvram::Bytes;

/// How long a step runs before its progress is shown.
pub const QUIET: Duration = Duration::from_millis(300);

/// The progress of reserving guest RAM in a new image: call
/// [`Reserving::update`] with (bytes done, bytes in all).
pub struct Reserving {
    started: Instant,
    /// Set once the step has run for [`QUIET`]: the bar (hidden when stderr
    /// is not a terminal).
    shown: OnceCell<ProgressBar>,
}

impl Reserving {
    /// A step that starts now.
    pub fn start() -> Reserving {
        Reserving {
            started: Instant::now(),
            shown: OnceCell::new(),
        }
    }

    /// `done` of `total` bytes are reserved.
    pub fn update(&self, done: u64, total: u64) {
        if self.shown.get().is_none() && self.started.elapsed() < QUIET {
            return;
        }
        let bar = self.shown.get_or_init(|| {
            if !std::io::stderr().is_terminal() {
                say!("nvhv: reserving {} for guest RAM in the image", Bytes(total));
            }
            ProgressBar::new(total).with_style(
                ProgressStyle::with_template(
                    "nvhv: reserving guest RAM {bar:30} {binary_bytes}/{binary_total_bytes}, {eta} left",
                )
                .expect("the template is valid"),
            )
        });
        bar.set_position(done);
        if done >= total {
            bar.finish_and_clear();
            say!(
                "nvhv: reserved {} for guest RAM in {:.1} s",
                Bytes(total),
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// Takes the bar off the terminal if the step stopped before its end
    /// (cancelled, failed), so that the lines printed next stand alone.
    pub fn clear(&self) {
        if let Some(bar) = self.shown.get() {
            if !bar.is_finished() {
                bar.finish_and_clear();
            }
        }
    }
}

impl Drop for Reserving {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_shows_its_progress_only_once_it_has_run_for_quiet() {
        let quick = Reserving::start();
        quick.update(1, 2);
        assert!(quick.shown.get().is_none());
        let slow = Reserving {
            started: Instant::now() - QUIET,
            shown: OnceCell::new(),
        };
        slow.update(1, 2);
        let bar = slow.shown.get().expect("shown after QUIET");
        assert_eq!((bar.position(), bar.length()), (1, Some(2)));
        slow.update(2, 2);
        assert!(bar.is_finished());
    }

    #[test]
    fn a_step_stopped_before_its_end_takes_its_bar_away() {
        let slow = Reserving {
            started: Instant::now() - QUIET,
            shown: OnceCell::new(),
        };
        slow.update(1, 4);
        slow.clear();
        assert!(slow.shown.get().expect("shown").is_finished());
    }
}
