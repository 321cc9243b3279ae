//! A built machine and its life: the main thread's event loop (signals,
//! control requests, vCPU stops, output waiting for a commit), the epochs
//! of epoch mode (pause, capture, commit, release held output, apply), and
//! the suspend commit. `build_new` and `resume` make a [`Machine`]; its
//! `run` owns it until the VM stops.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::devices::serial::SerialState;
use crate::devices::virtio::vsock::{OutputCommit, OutputCut, OutputGate, Vsock};
use crate::devices::GuestMemory;
use crate::nvram::redo::Changes;
use crate::nvram::{notice, Bytes, Image, ImageError, Status};
use crate::persist::{DeviceStates, MachineState, Persist};
use crate::vstate::dirty::DirtyTracker;
use crate::vstate::memory::AdviceWord;
use crate::vstate::reclaim::Reclaim;
use crate::vstate::throttle::{Brake, Throttle};
use crate::vstate::vcpu::{self, ExitHandler, StopReason, Vcpu, VcpuEvent, VcpuHandle};
use crate::vstate::vm::Vm;
use crate::vstate::wait::GuestWake;

use super::bus::Bus;
use super::epoch::{self, EpochEnd, EpochPolicy, EpochStats};
use super::{control, listeners, ram_pages, RunOutcome, StopCause, VmmError};

/// Pages [`Machine::give_back`] looks at in one pause at most: each costs a
/// read of the image's page and a compare (~1–2 µs here), so the pause
/// grows by a fraction of a millisecond at most.
const RECLAIM_PER_PAUSE: usize = 128;

/// [`RECLAIM_PER_PAUSE`] when every vCPU was parked at the capture and no
/// reply waits for the epoch (an idle VM): the pause may then take a
/// millisecond or two.
const RECLAIM_PER_IDLE_PAUSE: usize = 1024;

/// Events the main thread waits for.
pub(super) enum Event {
    Vcpu(VcpuEvent),
    /// The vsock device holds output waiting for a commit (group commit).
    OutputPending,
    Signal(i32, Instant),
    Suspend(Instant, Sender<String>),
}

/// Why the VM stops, when the request came, and whom to tell the outcome
/// (a `nvhv suspend` waiting for its reply).
type Stop = (StopCause, Instant, Option<Sender<String>>);

/// Closes the signal thread's iterator.
type SignalsHandle = signal_hook::iterator::Handle;

/// What a machine is built from, new ([`super::run`]) or resumed
/// ([`super::resume()`]).
pub(super) struct Parts {
    pub(super) vm: Vm,
    pub(super) mem: GuestMemory,
    pub(super) vcpus: Vec<Vcpu>,
    pub(super) bus: Arc<Bus>,
    pub(super) wake: Arc<GuestWake>,
    pub(super) image: Image,
    pub(super) vsock: Option<Vsock>,
    /// Epoch mode's policy; None in suspend-only mode.
    pub(super) policy: Option<EpochPolicy>,
    /// Epoch mode's dirty-page tracker.
    pub(super) dirty: Option<DirtyTracker>,
}

/// A built machine, ready to run.
pub(super) struct Machine {
    // ORDER (drop): vCPU handles are stopped explicitly before the VM and memory go.
    vm: Vm,
    mem: GuestMemory,
    vcpus: Vec<Vcpu>,
    bus: Arc<Bus>,
    wake: Arc<GuestWake>,
    image: Image,
    vsock: Option<Vsock>,
    /// Epoch mode's policy; None in suspend-only mode.
    policy: Option<EpochPolicy>,
    /// Epoch mode's dirty-page tracker.
    dirty: Option<DirtyTracker>,
    /// Epoch mode: `Hints::output_held`, advice to the guest.
    output_hint: Option<AdviceWord>,
    /// The last captured machine state, clock zeroed (to skip empty epochs).
    last_state: Option<MachineState>,
    /// Every vCPU's park generation at the last capture, if all were parked:
    /// while they still are, nothing ran, and an idle epoch is skipped.
    parked_at_capture: Option<Vec<u64>>,
    /// Epoch mode: holds the vCPUs back when the guest reaches the dirty
    /// budget while an epoch commits (engaged by `throttle`, released as the
    /// next epoch resumes the vCPUs).
    brake: Arc<Brake>,
    /// Epoch mode: the thread that watches the budget during commits (with
    /// its own duplicate of the VM fd).
    throttle: Option<Throttle>,
    /// Epoch mode: the pages written to the image whose private copies may
    /// be given back once cold.
    reclaim: Option<Reclaim>,
}

/// The guest's `Hints::output_held` word.
fn output_hint(mem: &GuestMemory) -> Option<AdviceWord> {
    let at = nvhv_abi::HINTS_ADDR + std::mem::offset_of!(nvhv_abi::Hints, output_held) as u64;
    AdviceWord::new(mem, at)
}

/// Named instants since process start (or since a standby's image was
/// freed), for the resume and suspend breakdowns (printed at
/// `NVHV_LOG=info`).
pub struct Timeline {
    t0: Instant,
    /// What happened at `t0`, in words.
    origin: &'static str,
    marks: Vec<(&'static str, Duration)>,
    /// The committed epoch the resume continues from, once known.
    from_epoch: Option<u64>,
}

impl Timeline {
    /// Start at `t0`, when `origin` happened.
    pub fn new(t0: Instant, origin: &'static str) -> Self {
        Timeline {
            t0,
            origin,
            marks: Vec::new(),
            from_epoch: None,
        }
    }
    /// The resume continues from committed epoch `epoch`.
    pub fn from_epoch(&mut self, epoch: u64) {
        self.from_epoch = Some(epoch);
    }
    /// Record `what` happened now.
    pub fn mark(&mut self, what: &'static str) {
        self.marks.push((what, self.t0.elapsed()));
    }
    /// Time since `t0`.
    pub fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }
    /// Log every mark at info level.
    pub fn log(&self, title: &str) {
        let parts: Vec<String> = self
            .marks
            .iter()
            .map(|(w, d)| format!("{w} {:.3} ms", d.as_secs_f64() * 1e3))
            .collect();
        tracing::info!("{title}: {}", parts.join(", "));
    }
}

impl Machine {
    /// The machine of `p`, nothing captured yet.
    pub(super) fn new(mut p: Parts) -> Machine {
        let reclaim = p.policy.and_then(|pol| pol.give_back_after).map(|age| {
            p.image.keep_written(true);
            Reclaim::new(ram_pages(p.image.header().ram_bytes()), age, Instant::now())
        });
        Machine {
            reclaim,
            output_hint: p.policy.and_then(|_| output_hint(&p.mem)),
            vm: p.vm,
            mem: p.mem,
            vcpus: p.vcpus,
            bus: p.bus,
            wake: p.wake,
            image: p.image,
            vsock: p.vsock,
            policy: p.policy,
            dirty: p.dirty,
            last_state: None,
            parked_at_capture: None,
            brake: Arc::default(),
            throttle: None,
        }
    }

    /// [`describe`], and for a `KVM_RUN` that could not get guest RAM, why:
    /// a sparse image whose file system is full.
    fn diagnose(&self, r: &StopReason) -> String {
        let d = describe(r);
        if *r != StopReason::RunFailed(libc::EFAULT) {
            return d;
        }
        match self.image.space() {
            Ok(s) if s.free < (1 << 20) && s.unallocated > 0 => format!(
                "{d}: guest RAM could not be backed by the image, whose file system is full ({} free, the image sparse by {})",
                Bytes(s.free),
                Bytes(s.unallocated)
            ),
            _ => d,
        }
    }

    pub(super) fn run(self) -> Result<RunOutcome, VmmError> {
        self.run_timed(None)
    }

    pub(super) fn run_timed(
        mut self,
        mut timeline: Option<Timeline>,
    ) -> Result<RunOutcome, VmmError> {
        let (tx, rx) = std::sync::mpsc::channel::<Event>();
        let (sig_handle, ctl, notice) = self.start_event_sources(&tx)?;
        if notice.is_some() {
            // The notice's rule, checked at every write: only this thread
            // writes the image from now on.
            self.image.pin_writer();
        }
        if let Some(t) = timeline.as_mut() {
            t.mark("signals and control socket up");
        }

        // 6. Mark the image Running: from now on guest RAM in the image moves
        //    ahead of the saved state.
        // ORDER: durable before the first KVM_RUN, so a crash from here on
        //        can never resume stale state over newer RAM.
        self.image.mark_running()?;
        if let Some(t) = timeline.as_mut() {
            t.mark("image marked running");
        }

        // 7. Start the vCPUs (and, in epoch mode, the throttle that brakes
        //    them when they outrun a commit).
        // Armed while the main thread sleeps with every vCPU parked: the
        // first vCPU to leave its park says so (Unparked), and the dirty
        // budget is watched again.
        let unpark_watch = Arc::new(AtomicBool::new(false));
        let handles = self.start_vcpus(&tx, &unpark_watch)?;
        if let Some(t) = timeline.as_mut() {
            t.mark("vCPU threads started");
            t.log("resume");
            say!(
                "nvhv: resumed{}, guest running {:.3} ms after {}{}",
                t.from_epoch
                    .map(|e| format!(" from epoch {e}"))
                    .unwrap_or_default(),
                t.elapsed().as_secs_f64() * 1e3,
                t.origin,
                self.clients_at()
            );
            // Off the recovery's path, on a thread of its own (a removal
            // may free gigabytes): what a `run --force` killed as it put
            // an image here left beside it. Rare, and nobody else would
            // ever remove it.
            let path = self.image_path().to_owned();
            let _ = std::thread::Builder::new()
                .name("leftovers".into())
                .spawn(move || super::remove_leftovers(&path));
        } else {
            say!(
                "nvhv: running (image {}){}",
                self.image_path().display(),
                self.clients_at()
            );
        }

        // 8. Wait for a reason to stop; in epoch mode, checkpoint meanwhile.
        let mut deferred: VecDeque<Event> = VecDeque::new();
        let mut stats = EpochStats::default();
        let (cause, t0, reply) =
            match self.wait_for_stop(&handles, &rx, &unpark_watch, &mut deferred, &mut stats) {
                Ok(stop) => stop,
                Err(e) => {
                    // Nothing after the last durable epoch was released:
                    // stopping here loses no acknowledged output.
                    for h in handles {
                        h.stop(&self.wake);
                    }
                    self.print_summary(&mut stats);
                    return Err(e);
                }
            };

        if matches!(cause, StopCause::Guest(_)) {
            // The guest is gone for good: its unfinished console line too.
            self.bus
                .console
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .finish();
        }
        // 9. Final commit: pause every vCPU at a safe point, save, persist, commit.
        let result = if self.policy.is_some() {
            // The final epoch is durable when epoch() returns; the Suspended
            // record after it only saves the next open a log scan.
            self.epoch(&handles, &rx, &mut deferred, &mut stats, true)
                .map(|state| (t0.elapsed(), state))
                .and_then(|(l, state)| {
                    self.image.commit(Status::Suspended, &state)?;
                    Ok(l)
                })
        } else {
            self.suspend(&handles, &rx, &mut deferred, t0)
        };
        sig_handle.close();
        for h in handles {
            h.stop(&self.wake);
        }
        if stats.epochs > 0 {
            self.print_summary(&mut stats);
        }
        let latency = match result {
            Ok(l) => {
                let msg = format!(
                    "suspended: state durable {:.3} ms after the {}",
                    l.as_secs_f64() * 1e3,
                    match &cause {
                        StopCause::Signal(s) => super::signals::name(*s),
                        StopCause::Request => "suspend request",
                        StopCause::Guest(_) => "guest stop",
                    }
                );
                say!("nvhv: {msg}");
                if let Some(r) = reply {
                    let _ = r.send(msg);
                }
                Some(l)
            }
            Err(e) => {
                if let Some(r) = reply {
                    let _ = r.send(format!("error: suspend failed: {e}"));
                }
                return Err(e);
            }
        };
        drop(ctl);
        // ORDER: after the image's last write (the final commit above): a
        // standby waiting on the notice may take the image from here on.
        drop(notice);
        Ok(RunOutcome {
            reason: cause,
            commit_latency: latency,
        })
    }

    /// The main thread's event sources besides the vCPUs: the signals
    /// (SIGTERM/SIGINT, an orderly stop; SIGPWR, the power-fail warning),
    /// the control socket (`nvhv suspend`, a standby's request for the
    /// listening sockets), and in epoch mode the output gate.
    /// In epoch mode this thread takes the death notice here (the thread
    /// that writes the image, see `notice`), before the control socket can
    /// hand it to a standby.
    fn start_event_sources(
        &self,
        tx: &Sender<Event>,
    ) -> Result<(SignalsHandle, Option<control::Server>, Option<notice::Held>), VmmError> {
        // Caught since `run` or `resume` started, and blocked in every
        // thread: those that came while the VM was made or restored are
        // delivered to the signals thread as it starts, and stop the VM as
        // soon as it runs.
        let mut taken = super::signals::take()?;
        for &s in &taken.early {
            say!(
                "nvhv: {} arrived before the guest ran; it is suspended as soon as it runs",
                super::signals::name(s)
            );
        }
        let sig_handle = taken.signals.handle();
        {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    // The one thread that receives the stop signals.
                    taken.receive_here();
                    for s in taken.signals.forever() {
                        if tx.send(Event::Signal(s, Instant::now())).is_err() {
                            break;
                        }
                    }
                })
                .map_err(VmmError::Signals)?;
        }
        let (tcp, unix) = self
            .vsock
            .as_ref()
            .map_or((None, None), Vsock::listening_sockets);
        let listening = listeners::Listeners { tcp, unix };
        // Only an epoch-mode image can be taken over by a standby. Without
        // a notice a standby waits for the image lock instead.
        let notice = match self.policy {
            Some(_) => notice::Held::hold()
                .inspect_err(|e| tracing::warn!("{e}: a standby would wait for the image lock"))
                .ok(),
            None => None,
        };
        let shared = notice.as_ref().and_then(|n| n.share().ok());
        let ctl = control::Server::start(
            &self.image_path(),
            {
                let tx = tx.clone();
                move |reply| {
                    let _ = tx.send(Event::Suspend(Instant::now(), reply));
                }
            },
            listening,
            shared,
        );
        let ctl = ctl
            .inspect_err(|e| {
                tracing::warn!("control socket unavailable (nvhv suspend will not work): {e}");
            })
            .ok();
        if let (Some(_), Some(v)) = (&self.policy, &self.vsock) {
            // Output commit: guest output is held until its epoch is durable;
            // the first held byte of an epoch asks for a group commit.
            // The gate also tells the guest (advice, nvhv_abi::Hints) that
            // its output waits for a commit, so an idle guest parks at once.
            let tx = tx.clone();
            let hint = self.output_hint.clone();
            v.set_output_gate(Some(OutputGate::new(move || {
                if let Some(h) = &hint {
                    h.store(1);
                }
                let _ = tx.send(Event::OutputPending);
                std::thread::yield_now();
            })));
        }
        Ok((sig_handle, ctl, notice))
    }

    /// Starts a thread per vCPU (and, in epoch mode, the throttle that
    /// brakes them when they outrun a commit); their events go to `tx`.
    fn start_vcpus(
        &mut self,
        tx: &Sender<Event>,
        unpark_watch: &Arc<AtomicBool>,
    ) -> Result<Vec<VcpuHandle>, VmmError> {
        vcpu::install_kick_handler()?;
        if let Some(p) = &self.policy {
            let npages = crate::vstate::dirty::slot_pages(&self.mem)?;
            self.throttle = Some(Throttle::start(
                &self.vm.fd,
                npages,
                p.dirty_budget,
                self.brake.clone(),
                vcpu::kick_signal(),
            )?);
        }
        let mut handles: Vec<VcpuHandle> = Vec::new();
        for v in self.vcpus.drain(..) {
            let tx = tx.clone();
            let h = vcpu::spawn(
                v,
                self.bus.clone() as Arc<dyn ExitHandler>,
                self.wake.clone(),
                self.policy.is_some(),
                unpark_watch.clone(),
                self.brake.clone(),
                Box::new(move |e| {
                    let _ = tx.send(Event::Vcpu(e));
                }),
            )?;
            handles.push(h);
        }
        Ok(handles)
    }

    /// Step 8: waits for a reason to stop (a signal, a suspend request, the
    /// guest stopping) and, in epoch mode, ends epochs meanwhile (see
    /// [`EpochPolicy`]). Returns the cause, when it came, and whom to tell.
    fn wait_for_stop(
        &mut self,
        handles: &[VcpuHandle],
        rx: &Receiver<Event>,
        unpark_watch: &AtomicBool,
        deferred: &mut VecDeque<Event>,
        stats: &mut EpochStats,
    ) -> Result<Stop, VmmError> {
        let mut epoch_start = Instant::now();
        let mut output_pending: Option<Instant> = None;
        // When the dirty budget was last checked (or the epoch began): the
        // next check is due BUDGET_CHECK after it, however often events
        // wake the loop meanwhile.
        let mut checked = Instant::now();
        // A vCPU left its park since that check: the guest may have written
        // pages and be parked again already (a guest waiting for the rest of
        // a large request parks and unparks all the time), so the VMM does
        // not sleep past the next check.
        let mut unparked = false;
        let idle = |hs: &[VcpuHandle]| hs.iter().all(|h| h.park_generation().is_some());
        Ok(loop {
            let ev = match deferred.pop_front() {
                Some(e) => Ok(e),
                None => match &self.policy {
                    None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    Some(_) if self.brake.is_engaged() => {
                        // The guest reached the budget while the last epoch
                        // committed and is held: the next epoch begins now.
                        rx.recv_timeout(Duration::ZERO)
                    }
                    Some(p) => {
                        let now = Instant::now();
                        // Only once the epoch has been quiet for a budget
                        // check (under load the guest parks between most
                        // requests, and a wake-up per request costs ~5% at
                        // one client on tmpfs).
                        let quiet = now >= epoch_start + epoch::BUDGET_CHECK;
                        let parked =
                            !unparked && output_pending.is_none() && quiet && idle(handles) && {
                                // ORDER: arm the watch, then look again: a vCPU
                                //        leaving its park after this look sees it.
                                unpark_watch.store(true, std::sync::atomic::Ordering::SeqCst);
                                idle(handles)
                            };
                        let idle = output_pending.is_some() && idle(handles);
                        let wake = p.next_wake(epoch_start, output_pending, idle, parked, checked);
                        rx.recv_timeout(wake.saturating_duration_since(now))
                    }
                },
            };
            match ev {
                Ok(Event::Signal(s, t)) => break (StopCause::Signal(s), t, None),
                Ok(Event::Suspend(t, r)) => break (StopCause::Request, t, Some(r)),
                Ok(Event::Vcpu(VcpuEvent::Stopped(i, r))) => {
                    say!("nvhv: guest stopped on vCPU {i}: {}", self.diagnose(&r));
                    break (StopCause::Guest(r), Instant::now(), None);
                }
                // A park re-evaluates the due time at the loop top.
                Ok(Event::Vcpu(VcpuEvent::Paused(..) | VcpuEvent::Parked(_))) => {}
                Ok(Event::Vcpu(VcpuEvent::Unparked(_))) => unparked = true,
                Ok(Event::OutputPending) => {
                    output_pending.get_or_insert_with(Instant::now);
                }
                Err(RecvTimeoutError::Timeout) => {
                    // The budget is checked now (unless the epoch ends anyway).
                    unparked = false;
                    checked = Instant::now();
                    let idle = output_pending.is_some() && idle(handles);
                    let nothing_ran = self.nothing_ran(handles);
                    let Some(end) =
                        self.epoch_end(epoch_start, output_pending, idle, nothing_ran)?
                    else {
                        continue;
                    };
                    // ORDER: not before a record says the replay of the
                    // last recovery is applied (else every later recovery
                    // replays it again).
                    if output_pending.is_none()
                        && nothing_ran
                        && !self.image.replay_unacknowledged()
                        && !self.reclaim_due()
                    {
                        // Every vCPU stayed parked since the last capture (so
                        // no page changed through them and no output exists):
                        // an idle VM costs no capture at all.
                        stats.idle_skips += 1;
                        epoch_start = Instant::now();
                        // Braked (by hot pages alone, which the budget
                        // counts) while the guest did not run: nothing to
                        // capture, nothing to hold back. ORDER: released
                        // here or by the next epoch's unpause, so the loop
                        // never waits with the brake engaged.
                        self.brake.release();
                        continue;
                    }
                    if end == EpochEnd::Budget {
                        stats.budget_ends += 1;
                    }
                    epoch_start = Instant::now();
                    output_pending = None;
                    self.epoch(handles, rx, deferred, stats, false)?;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    unreachable!("the main thread holds a sender")
                }
            }
        })
    }

    /// Completes `stats` with the counts kept elsewhere (the vsock device's
    /// unheld output, the throttle's brakes) and prints the summary line.
    fn print_summary(&self, stats: &mut EpochStats) {
        stats.output_unheld = self.vsock.as_ref().map_or(0, Vsock::unheld_output);
        stats.brakes = self.brake.engagements();
        say!("nvhv: {}", stats.summary());
    }

    fn image_path(&self) -> PathBuf {
        self.image.path().to_path_buf()
    }

    /// `; clients connect to ADDR` for the running/resumed line, when the
    /// VM has a vsock device (a `--listen HOST:0` port is the bound one).
    fn clients_at(&self) -> String {
        self.vsock
            .as_ref()
            .map(|v| format!("; clients connect to {}", v.addresses()))
            .unwrap_or_default()
    }

    /// Pause every vCPU and device at a safe point and capture the machine
    /// state; with `dirty`, also the guest pages written since the last
    /// capture (copied out of guest memory). Events that arrive meanwhile are
    /// kept in `deferred`. Leaves everything paused.
    fn capture(
        &mut self,
        handles: &[VcpuHandle],
        rx: &Receiver<Event>,
        deferred: &mut VecDeque<Event>,
        dirty: bool,
    ) -> Result<Capture, VmmError> {
        let t0 = Instant::now();
        // ORDER: generations read before the pause, so a park in between
        //        can only make the next idle check fail (never pass wrongly).
        self.parked_at_capture = handles.iter().map(VcpuHandle::park_generation).collect();
        // A vCPU parked with its state saved hands it over at once.
        let mut states: Vec<Option<vcpu::VcpuState>> =
            handles.iter().map(|h| h.pause(&self.wake)).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while states.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Event::Vcpu(VcpuEvent::Paused(i, st))) => {
                    states[i as usize] = Some((*st)?);
                }
                Ok(other) => deferred.push_back(other),
                Err(_) => {
                    let i = states.iter().position(Option::is_none).unwrap_or(0);
                    return Err(VmmError::PauseTimeout(i as u32));
                }
            }
        }
        let t_vcpus = t0.elapsed();
        if let (true, Some(t)) = (dirty, self.dirty.as_ref()) {
            // The compare helper's wake-up (tens of µs) overlaps the device
            // pause and the state reads. Not before the vCPUs are paused: a
            // vCPU thread leaving KVM_RUN may need the core it would spin on.
            t.prepare();
        }
        // ORDER: devices after the vCPUs, so no guest notification arrives
        //        after the device state is taken; the output cut at the same
        //        point, so exactly the output produced before it is released
        //        with this epoch.
        let (vsock, cut) = match self.vsock.as_ref() {
            Some(v) => {
                v.pause();
                (Some(v.save()), dirty.then(|| v.output_cut()))
            }
            None => (None, None),
        };
        let t_dev = t0.elapsed();
        let vcpus = states.into_iter().map(|s| s.expect("all paused")).collect();
        let state = self.machine_state(vcpus, vsock)?;
        let t_vm = t0.elapsed();
        let mut changes = Changes::default();
        if let (true, Some(t)) = (dirty, self.dirty.as_mut()) {
            // ORDER: harvest with vCPUs and devices paused (nothing writes
            //        guest memory), copy before anything resumes.
            t.capture(&self.vm.fd, &self.mem, &mut changes)?;
        }
        let t_pages = t0.elapsed();
        // The machine state without the clock: equal to the last epoch's
        // when the guest has not run since (kvmclock alone always moves).
        let unchanged = {
            let mut key = state.clone();
            key.vm.clock = Default::default();
            let same = self.last_state.as_ref() == Some(&key);
            if !same {
                self.last_state = Some(key);
            }
            same
        };
        let state = state.encode()?;
        tracing::trace!(
            vcpus_us = t_vcpus.as_micros() as u64,
            devices_us = t_dev.as_micros() as u64,
            vm_us = t_vm.as_micros() as u64,
            pages_us = t_pages.as_micros() as u64,
            encoded_us = t0.elapsed().as_micros() as u64,
            "capture"
        );
        Ok(Capture {
            state,
            changes,
            cut,
            unchanged,
        })
    }

    /// The machine state from saved vCPU and vsock states, adding the
    /// console (flushed) and the VM-wide state. Everything must be paused.
    fn machine_state(
        &self,
        vcpus: Vec<vcpu::VcpuState>,
        vsock: Option<crate::devices::virtio::vsock::VsockState>,
    ) -> Result<MachineState, VmmError> {
        let serial: SerialState = {
            let mut c = self.bus.console.lock().unwrap_or_else(|e| e.into_inner());
            c.flush();
            c.save()
        };
        Ok(MachineState {
            vm: self.vm.save()?,
            vcpus,
            devices: DeviceStates { serial, vsock },
        })
    }

    /// Epoch mode, new VM: commit the loaded guest (vCPU entry state and
    /// every page the loader wrote) as the first epoch, before any guest code runs.
    pub(super) fn initial_epoch(&mut self) -> Result<(), VmmError> {
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            vcpus.push(v.save()?);
        }
        let vsock = self.vsock.as_ref().map(|v| v.save());
        let state = self.machine_state(vcpus, vsock)?.encode()?;
        let mut cap = Changes::default();
        if let Some(t) = self.dirty.as_mut() {
            t.capture(&self.vm.fd, &self.mem, &mut cap)?;
        }
        self.image.commit_epoch(&cap, &state)?;
        self.image.apply_committed(&cap)?;
        Ok(())
    }

    /// Epoch mode: whether the current epoch should end now, and why — its
    /// time is up, or the guest has written as many pages as the dirty
    /// budget allows.
    fn epoch_end(
        &mut self,
        start: Instant,
        output_pending: Option<Instant>,
        idle: bool,
        nothing_ran: bool,
    ) -> Result<Option<EpochEnd>, VmmError> {
        let (Some(p), Some(d)) = (&self.policy, self.dirty.as_mut()) else {
            return Ok(None);
        };
        if Instant::now() >= p.due(start, output_pending, idle) {
            return Ok(Some(EpochEnd::Due));
        }
        // Braked: the throttle saw the budget reached during the last commit
        // (the count falls only at a capture). Parked vCPUs dirty nothing: no
        // need to ask KVM.
        let over = self.brake.is_engaged()
            || (!nothing_ran && d.peek_count(&self.vm.fd, &self.mem)? >= p.dirty_budget);
        Ok(over.then_some(EpochEnd::Budget))
    }

    /// Whether every vCPU has stayed parked since the last capture.
    fn nothing_ran(&self, handles: &[VcpuHandle]) -> bool {
        let now: Option<Vec<u64>> = handles.iter().map(VcpuHandle::park_generation).collect();
        now.is_some() && now == self.parked_at_capture
    }

    /// Let vCPUs and devices run again after [`capture`](Self::capture).
    fn unpause(&self, handles: &[VcpuHandle]) {
        if let Some(v) = &self.vsock {
            v.resume();
        }
        // ORDER: with every vCPU paused (its pages just taken), before they
        //        resume.
        self.brake.release();
        for h in handles {
            h.resume();
        }
    }

    /// One epoch: capture, resume the guest, commit the redo record (one
    /// persist), release the output held for it, apply it to the RAM image.
    /// Returns the committed machine state.
    fn epoch(
        &mut self,
        handles: &[VcpuHandle],
        rx: &Receiver<Event>,
        deferred: &mut VecDeque<Event>,
        stats: &mut EpochStats,
        final_epoch: bool,
    ) -> Result<Vec<u8>, VmmError> {
        let t0 = Instant::now();
        let cap = self.capture(handles, rx, deferred, true)?;
        // ORDER: with the guest and devices still paused, right after the
        //        capture (see `vstate::reclaim`). Not in the last epoch:
        //        the VM is about to go.
        if !final_epoch {
            stats.pages_given_back += self.give_back(&cap.changes);
        }
        self.unpause(handles);
        let paused = t0.elapsed();
        // The guest runs while this epoch commits: the throttle watches it.
        if let Some(t) = self.throttle.as_mut() {
            t.arm()?;
        }
        let r = self.commit_captured(cap, t0, paused, stats, final_epoch);
        let d = self.throttle.as_mut().map_or(Ok(()), Throttle::disarm);
        let state = r?;
        d?;
        Ok(state)
    }

    /// Epoch mode: gives back the private copies of up to
    /// [`RECLAIM_PER_PAUSE`] pages ([`RECLAIM_PER_IDLE_PAUSE`] in an idle
    /// VM) that were written to the image long
    /// enough ago and still hold its bytes, keeping those in `changes` (just
    /// captured), the hot ones and those the image lacks the newest bytes
    /// of. Call only right after a capture, everything still paused.
    /// Returns the pages given back. A failure (reading the image, or the
    /// `madvise`) turns the give-back off with a warning: it costs memory,
    /// never the guest.
    fn give_back(&mut self, changes: &Changes) -> u64 {
        let Some(r) = self.reclaim.as_mut() else {
            return 0;
        };
        let now = Instant::now();
        if !r.due(now) {
            return 0;
        }
        // Idle: every vCPU parked and no reply waiting for this epoch.
        let idle = self.parked_at_capture.is_some()
            && self.vsock.as_ref().is_none_or(|v| v.held_output() == 0);
        let max = if idle {
            RECLAIM_PER_IDLE_PAUSE
        } else {
            RECLAIM_PER_PAUSE
        };
        let pfns = changes.pfns();
        let (dirty, image) = (self.dirty.as_ref(), &self.image);
        let keep = |pfn: u64| {
            pfns.binary_search(&pfn).is_ok()
                || dirty.is_some_and(|d| d.is_hot(pfn))
                || image.is_pending(pfn)
        };
        let file = image.file();
        match r.run(&self.mem, file, image.ram_offset(), max, keep, now) {
            Ok(n) => n as u64,
            Err(e) => {
                say!(
                    "nvhv: warning: giving back private copies of cold pages stopped: {}",
                    crate::error_chain(&e)
                );
                self.reclaim = None;
                self.image.keep_written(false);
                0
            }
        }
    }

    /// Whether pages written to the image are old enough to be looked at
    /// for giving back (an idle VM then still captures, to do that).
    fn reclaim_due(&mut self) -> bool {
        self.reclaim.as_mut().is_some_and(|r| r.due(Instant::now()))
    }

    /// The rest of [`epoch`](Self::epoch) after the capture: commit, release
    /// the output, apply. Returns the captured machine state.
    fn commit_captured(
        &mut self,
        cap: Capture,
        t0: Instant,
        paused: Duration,
        stats: &mut EpochStats,
        final_epoch: bool,
    ) -> Result<Vec<u8>, VmmError> {
        let changes = &cap.changes;
        let pfns = changes.pfns();
        let no_output = self.vsock.as_ref().is_none_or(|v| v.held_output() == 0);
        if pfns.is_empty()
            && cap.unchanged
            && no_output
            && !final_epoch
            && !self.image.replay_unacknowledged()
        {
            // Nothing happened since the last epoch (the guest stayed parked,
            // no page changed, no output waits): nothing to commit. An idle
            // VM costs a capture per epoch, no write.
            return Ok(cap.state);
        }
        // A record too large is refused before anything is written.
        let times = self
            .image
            .commit_epoch(changes, &cap.state)
            .map_err(|e| match e {
                ImageError::LogFull { pages, bytes, room } => {
                    VmmError::DirtyOverflow { pages, bytes, room }
                }
                e => e.into(),
            })?;
        let durable = t0.elapsed();
        // ORDER: output of this epoch goes out only after its commit is durable.
        let held = match (&self.vsock, cap.cut) {
            (Some(v), Some(cut)) => v.release_output(cut),
            _ => 0,
        };
        let released = t0.elapsed();
        if let (Some(h), Some(v)) = (&self.output_hint, &self.vsock) {
            // The guest's output stays held (the hint set) from its gate to
            // its release, so the guest parks rather than polls meanwhile.
            // ORDER: clear, then look: output held since (whose gate sets
            //        the word after holding it) keeps the word set.
            h.store(0);
            if v.held_output() > 0 {
                h.store(1);
            }
        }
        // ORDER: apply after the commit; the next commit's persist makes it durable.
        self.image.apply_committed(changes)?;
        if let Some(r) = self.reclaim.as_mut() {
            self.image.drain_written(|w| r.written(w));
        }
        stats.record(paused, pfns.len(), &times, t0.elapsed(), held);
        stats.pages_applied = self.image.pages_applied();
        tracing::debug!(
            epoch = times.epoch,
            pages = pfns.len(),
            bytes = times.log_bytes,
            hot = self.dirty.as_ref().map_or(0, |d| d.hot_pages()),
            faulted = self.dirty.as_ref().map_or(0, |d| d.faulted()),
            helped = self.dirty.as_ref().map_or(0, |d| d.helped()),
            pause_us = paused.as_micros() as u64,
            write_us = times.state_write.as_micros() as u64,
            persist_us = times.state_persist.as_micros() as u64,
            durable_us = durable.as_micros() as u64,
            release_us = (released - durable).as_micros() as u64,
            commit_us = t0.elapsed().as_micros() as u64,
            held,
            "epoch committed"
        );
        if let Some(t) = self.dirty.as_mut() {
            t.recycle(cap.changes);
        }
        Ok(cap.state)
    }

    /// Suspend-only mode: pause, save, persist, commit. Returns the time from
    /// `t0` to the durable commit.
    fn suspend(
        &mut self,
        handles: &[VcpuHandle],
        rx: &Receiver<Event>,
        deferred: &mut VecDeque<Event>,
        t0: Instant,
    ) -> Result<Duration, VmmError> {
        let cap = self.capture(handles, rx, deferred, false)?;
        if self.image.backing() == crate::nvram::BackingKind::Dax {
            // Guest RAM is a plain shared mapping of the DAX file (no MAP_SYNC),
            // and its blocks may be unallocated: fdatasync makes the kernel write
            // back the dirty cache lines and the block metadata. O(dirty RAM).
            // ORDER: before the commit that makes this RAM current.
            self.image.file().sync_data().map_err(VmmError::RamSync)?;
        }
        // ORDER: commit() persists guest RAM and the state slot before it
        //        writes the meta record that makes them current.
        self.image.commit(Status::Suspended, &cap.state)?;
        Ok(t0.elapsed())
    }
}

/// What [`Machine::capture`] took while the guest was paused.
pub(super) struct Capture {
    /// Encoded [`MachineState`].
    state: Vec<u8>,
    /// What changed in guest RAM since the last capture (epoch mode): the
    /// redo-log payload and the whole pages.
    changes: Changes,
    /// The vsock output produced up to the pause (epoch mode).
    cut: Option<OutputCut>,
    /// vCPU and device state equal the previous capture's (clock aside).
    unchanged: bool,
}

/// A one-line description of a guest stop.
pub fn describe(r: &StopReason) -> String {
    match r {
        StopReason::GuestExit(c) => format!("guest exited with status {c}"),
        StopReason::GuestPanic(c) => format!("guest panicked (code {c}); see the console"),
        StopReason::TripleFault { rip, rsp } => {
            format!("guest crashed (triple fault) at rip {rip:#x}, rsp {rsp:#x}")
        }
        StopReason::Internal(s) => s.clone(),
        StopReason::RunFailed(errno) => {
            format!(
                "KVM_RUN failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            )
        }
    }
}
