//! The vCPU thread: its run loop (exits dispatched to an [`ExitHandler`]),
//! parking at the wait port (with the state saved on the way, so that an
//! epoch can pause a parked vCPU without waking it), the pause and stop
//! commands ([`VcpuHandle`]), and the kick signal that takes a thread out
//! of `KVM_RUN` (`immediate_exit`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuExit;

use super::{leaves_sync_fields, Vcpu, VcpuError, VcpuState};
use crate::vstate::throttle::Brake;
use crate::vstate::wait::{GuestWake, Waiter, Wake};

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by the
        // vCPU thread before it first enters KVM_RUN and valid until the thread
        // exits (the VcpuFd outlives the loop). Writing one byte is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
    }
}

/// Signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Install the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(VcpuError::Signal)
}

/// What the run loop asks the rest of the VMM to do with a port or MMIO access.
pub trait ExitHandler: Send + Sync {
    /// Port read.
    fn pio_in(&self, port: u16, data: &mut [u8]);
    /// Port write; may ask the vCPU to park or the VM to stop.
    fn pio_out(&self, port: u16, data: &[u8]) -> ExitAction;
    /// MMIO read.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// MMIO write.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// What to do after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// Park until a device has work or the timeout passes (the wait port).
    Wait(Option<Duration>),
    /// Park until the VM stops; device work does not wake it (the wait port
    /// with [`nvhv_abi::WAIT_FOREVER`]). Pauses are served as for `Wait`.
    Halt,
    /// The guest asked to stop (exit port) or reported a panic.
    Stop(StopReason),
}

/// Why a VM stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote the exit port.
    GuestExit(u32),
    /// The guest reported a panic on the panic port.
    GuestPanic(u32),
    /// Triple fault (a guest exception with no IDT): the guest crashed.
    TripleFault {
        /// rip at the time.
        rip: u64,
        /// rsp at the time.
        rsp: u64,
    },
    /// KVM could not run or emulate the guest.
    Internal(String),
    /// `KVM_RUN` failed with this errno. `EFAULT` means KVM could not get
    /// a host page behind guest RAM: with RAM mapped from a sparse image,
    /// usually a full file system.
    RunFailed(i32),
}

/// Commands from the VMM to a vCPU thread.
#[derive(Debug)]
pub enum VcpuCmd {
    /// Save the state (after completing pending I/O) and report it, then wait.
    Pause,
    /// Leave the paused state and run again.
    Resume,
    /// Exit the thread.
    Stop,
}

/// Events from a vCPU thread to the VMM.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Paused at a safe point; the state is attached (or the error saving it).
    Paused(u32, Box<Result<VcpuState, VcpuError>>),
    /// Parked at the wait port with its state saved (with `presave`): the
    /// VMM can pause it now without waking it.
    Parked(u32),
    /// Left a park while the VMM was watching for it (see [`spawn`]).
    Unparked(u32),
    /// The guest stopped on its own.
    Stopped(u32, StopReason),
}

/// The VMM's handle to a running vCPU thread.
pub struct VcpuHandle {
    thread: std::thread::JoinHandle<()>,
    cmd: Sender<VcpuCmd>,
    pause: Arc<AtomicBool>,
    /// The thread is parked at the wait port (not in KVM_RUN).
    parked: Arc<AtomicBool>,
    park: Arc<ParkSlot>,
    brake: Arc<Brake>,
}

/// Where a vCPU that parks at the wait port leaves the state it saved on
/// the way (with `presave`), so that an epoch can pause it by taking that
/// state — no signal, no wake-up, no thread hand-off (each costs tens of µs
/// on our hosts; together they were most of an epoch's pause).
#[derive(Default)]
struct ParkSlot {
    inner: Mutex<ParkInner>,
    cv: Condvar,
}

#[derive(Default)]
struct ParkInner {
    /// The state saved at the park: Some only while the thread is parked
    /// and has not run since.
    state: Option<VcpuState>,
    /// The VMM took `state` and holds the vCPU until [`VcpuHandle::resume`].
    held: bool,
    /// Counts the parks that saved a state: unchanged means the guest has
    /// not run since.
    generation: u64,
}

impl ParkSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, ParkInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl VcpuHandle {
    /// Ask the thread to pause: it reports [`VcpuEvent::Paused`] when it has.
    ///
    /// ORDER: the flag is set before the kick, so a thread between its flag
    /// check and KVM_RUN still sees `immediate_exit` and returns at once.
    ///
    /// A vCPU parked at the wait port is not in KVM_RUN: it gets no signal
    /// (a kick costs ~46 µs here) and no wake-up, only a poke; it saves its
    /// state (or reuses the last one if it has not run since) and parks again.
    ///
    /// Returns the state at once, and sends no event, when the vCPU is parked
    /// with a state saved at its park (`presave`); it then stays parked until
    /// [`resume`](Self::resume), even if a device wakes it meanwhile.
    pub fn pause(&self, wake: &GuestWake) -> Option<VcpuState> {
        {
            let mut slot = self.park.lock();
            let st = slot.state.clone();
            if st.is_some() {
                slot.held = true;
                return st;
            }
        }
        self.pause.store(true, Ordering::SeqCst);
        let _ = self.cmd.send(VcpuCmd::Pause);
        // ORDER: after `pause` is set, so a thread held by the brake sees it.
        self.brake.poke();
        // ORDER: `pause` is stored before `parked` is read; the thread clears
        // `parked` before it checks `pause`, so one of the two sees the other.
        if self.parked.load(Ordering::SeqCst) {
            wake.poke();
        } else {
            use vmm_sys_util::signal::Killable;
            let _ = self.thread.kill(kick_signal());
            wake.poke();
        }
        None
    }

    /// While parked with its state saved (a pause then costs nothing): a
    /// number that changes whenever the guest has run and parked again. None
    /// while it runs.
    pub fn park_generation(&self) -> Option<u64> {
        let slot = self.park.lock();
        slot.state.as_ref().map(|_| slot.generation)
    }

    /// Run again after a pause.
    pub fn resume(&self) {
        {
            let mut slot = self.park.lock();
            if slot.held {
                slot.held = false;
                self.park.cv.notify_all();
                return;
            }
        }
        self.pause.store(false, Ordering::SeqCst);
        let _ = self.cmd.send(VcpuCmd::Resume);
    }

    /// Stop the thread, running or paused, and join it.
    ///
    /// ORDER: the Stop command is queued before the kick, so a running thread
    /// that the kick sends into its pause handling finds it there.
    pub fn stop(self, wake: &GuestWake) {
        self.pause.store(true, Ordering::SeqCst);
        let _ = self.cmd.send(VcpuCmd::Stop);
        self.brake.poke();
        self.park.lock().held = false;
        self.park.cv.notify_all();
        use vmm_sys_util::signal::Killable;
        let _ = self.thread.kill(kick_signal());
        // ORDER: after `pause` is set. A parked or halted thread then leaves
        //        its wait (a wake-up would not reach a halted one) and finds
        //        the Stop command.
        wake.poke();
        let _ = self.thread.join();
    }
}

/// Start `vcpu` on its own thread. Events go to `events`. With `presave`
/// (epoch mode), the thread saves the vCPU state whenever the guest parks at
/// the wait port, so that an epoch finds it ready (see [`VcpuHandle::pause`]).
/// A vCPU leaving a park while `unpark_watch` is set clears it and sends
/// [`VcpuEvent::Unparked`] (the VMM sleeps long while every vCPU is parked).
/// While `brake` is engaged the thread stays out of KVM_RUN (see
/// [`Brake`]); pauses and stops are still served.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    mut vcpu: Vcpu,
    handler: Arc<dyn ExitHandler>,
    wake: Arc<GuestWake>,
    presave: bool,
    unpark_watch: Arc<AtomicBool>,
    brake: Arc<Brake>,
    events: Box<dyn Fn(VcpuEvent) + Send>,
) -> Result<VcpuHandle, VcpuError> {
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
    let pause = Arc::new(AtomicBool::new(false));
    let pause2 = pause.clone();
    let parked = Arc::new(AtomicBool::new(false));
    let parked2 = parked.clone();
    let park = Arc::new(ParkSlot::default());
    let park2 = park.clone();
    let brake2 = brake.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{}", vcpu.index))
        .spawn(move || {
            let run: *mut kvm_run = vcpu.fd.get_kvm_run();
            KVM_RUN_PTR.with(|c| c.set(run));
            // ORDER: after the kick handler can find this thread's kvm_run.
            let _registered = brake2.register();
            let ctl = LoopControl {
                wake: &wake,
                pause: &pause2,
                parked: &parked2,
                park: presave.then_some(&*park2),
                unpark_watch: &unpark_watch,
                brake: &brake2,
                cmds: &cmd_rx,
                events: &*events,
            };
            run_loop(&mut vcpu, &*handler, &ctl);
            KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
        })
        .map_err(VcpuError::Spawn)?;
    Ok(VcpuHandle {
        thread,
        cmd: cmd_tx,
        pause,
        parked,
        park,
        brake,
    })
}

/// What the run loop shares with its [`VcpuHandle`].
struct LoopControl<'a> {
    wake: &'a GuestWake,
    pause: &'a AtomicBool,
    parked: &'a AtomicBool,
    /// With `presave`: where the state saved at a park is left.
    park: Option<&'a ParkSlot>,
    unpark_watch: &'a AtomicBool,
    brake: &'a Brake,
    cmds: &'a Receiver<VcpuCmd>,
    events: &'a dyn Fn(VcpuEvent),
}

/// Handle pause commands until told to resume (true) or stop (false).
/// `last` is the state saved at the previous pause, reused when the vCPU
/// has not entered KVM_RUN since (parked at the wait port all along).
fn paused(vcpu: &mut Vcpu, ctl: &LoopControl, last: &mut Option<VcpuState>) -> bool {
    loop {
        match ctl.cmds.recv() {
            Ok(VcpuCmd::Pause) => {
                let st = save_or_reuse(vcpu, last, false);
                (ctl.events)(VcpuEvent::Paused(vcpu.index, Box::new(st)));
            }
            Ok(VcpuCmd::Resume) => return true,
            Ok(VcpuCmd::Stop) | Err(_) => return false,
        }
    }
}

/// The vCPU's state: the last save again if the guest has not run since,
/// else a new save, remembered in `last` (a failed one forgets it).
///
/// `at_wait`: the vCPU just exited on its `out` to the wait port, which is
/// left pending (the next KVM_RUN completes it when the vCPU leaves its
/// park). Completing it now (a KVM_RUN with `immediate_exit`, ~7 µs of a
/// ~26 µs park save here) would change nothing but RIP, and not even that on
/// this host: `kvm_pvm` has RIP past the `out` at the exit already, so a VM
/// restored from the state goes on as if the wait had returned. Where KVM
/// leaves RIP at the `out` (upstream KVM), a restored VM executes it again
/// and waits once more (woken by its devices, which a restore kicks, or by
/// the guest's timeout): a longer wait, which the wait's contract allows.
pub(super) fn save_or_reuse(
    vcpu: &mut Vcpu,
    last: &mut Option<VcpuState>,
    at_wait: bool,
) -> Result<VcpuState, VcpuError> {
    if let (false, Some(s)) = (vcpu.ran_since_save, last.as_ref()) {
        return Ok(s.clone());
    }
    if !at_wait {
        // ORDER: finish a pending exit (a kick's, an MMIO or port access)
        // before reading any register, or its data is lost.
        vcpu.complete_pending_io();
    }
    let st = vcpu.save();
    vcpu.ran_since_save = false;
    *last = st.as_ref().ok().cloned();
    st
}

/// Parking with `presave`: save the state now (unless unchanged since the
/// last save) and leave it in the slot for the VMM.
fn presave(vcpu: &mut Vcpu, park: &ParkSlot, ctl: &LoopControl, last: &mut Option<VcpuState>) {
    if let Ok(st) = save_or_reuse(vcpu, last, true) {
        let mut slot = park.lock();
        slot.state = Some(st);
        slot.generation += 1;
        drop(slot);
        (ctl.events)(VcpuEvent::Parked(vcpu.index));
    }
}

fn run_loop(vcpu: &mut Vcpu, handler: &dyn ExitHandler, ctl: &LoopControl) {
    let mut waiter = Waiter::default();
    let mut last: Option<VcpuState> = None;
    loop {
        if ctl.pause.load(Ordering::SeqCst) {
            if !paused(vcpu, ctl, &mut last) {
                return;
            }
            continue;
        }
        if ctl.brake.is_engaged() {
            // Held back until the next epoch has taken the guest's pages;
            // a pause (that epoch's capture) or a stop still gets through.
            ctl.brake.hold(&|| ctl.pause.load(Ordering::SeqCst));
            continue;
        }
        vcpu.ran_since_save = true;
        let result = vcpu.fd.run();
        vcpu.synced.set(vcpu.sync && leaves_sync_fields(&result));
        vcpu.io_pending = matches!(
            result,
            Ok(VcpuExit::IoOut(..))
                | Ok(VcpuExit::IoIn(..))
                | Ok(VcpuExit::MmioRead(..))
                | Ok(VcpuExit::MmioWrite(..))
        );
        let action = match result {
            Ok(VcpuExit::IoOut(port, data)) => handler.pio_out(port, data),
            Ok(VcpuExit::IoIn(port, data)) => {
                handler.pio_in(port, data);
                ExitAction::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                handler.mmio_read(addr, data);
                ExitAction::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                handler.mmio_write(addr, data);
                ExitAction::Continue
            }
            Ok(VcpuExit::Shutdown) => {
                let (rip, rsp) = vcpu.regs().map(|r| (r.rip, r.rsp)).unwrap_or((0, 0));
                ExitAction::Stop(StopReason::TripleFault { rip, rsp })
            }
            Ok(VcpuExit::Hlt) => ExitAction::Stop(StopReason::Internal(
                "guest executed hlt with no interrupt source".into(),
            )),
            Ok(VcpuExit::InternalError) => ExitAction::Stop(StopReason::Internal(format!(
                "KVM internal error (emulation failure) at rip {:#x}",
                vcpu.regs().map(|r| r.rip).unwrap_or(0)
            ))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => ExitAction::Stop(StopReason::Internal(
                format!("KVM entry failure {reason:#x} on cpu {cpu}"),
            )),
            Ok(other) => ExitAction::Stop(StopReason::Internal(format!(
                "unexpected vCPU exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the flag the signal handler set and look at `pause`.
                vcpu.fd.set_kvm_immediate_exit(0);
                ExitAction::Continue
            }
            Err(e) => ExitAction::Stop(StopReason::RunFailed(e.errno())),
        };
        match action {
            ExitAction::Continue => {}
            ExitAction::Wait(_) | ExitAction::Halt => {
                // Parked: pauses are served from here without leaving the
                // wait; only a wake-up or the timeout resumes the guest (a
                // halted guest: nothing but the VM's stop).
                let (halt, deadline) = match action {
                    ExitAction::Wait(t) => (false, t.map(|t| std::time::Instant::now() + t)),
                    _ => (true, None),
                };
                if let Some(park) = ctl.park {
                    presave(vcpu, park, ctl, &mut last);
                }
                ctl.parked.store(true, Ordering::SeqCst);
                loop {
                    let interrupted = || ctl.pause.load(Ordering::SeqCst);
                    let r = if halt {
                        ctl.wake.halt(&interrupted)
                    } else {
                        ctl.wake.wait_until(&mut waiter, deadline, &interrupted)
                    };
                    if r != Wake::Interrupted {
                        break;
                    }
                    if !paused(vcpu, ctl, &mut last) {
                        ctl.parked.store(false, Ordering::SeqCst);
                        return;
                    }
                }
                if let Some(park) = ctl.park {
                    // ORDER: the slot is emptied before KVM_RUN, and not while
                    // the VMM holds the state it took (its epoch is still
                    // being captured).
                    let mut slot = park.lock();
                    while slot.held {
                        slot = park.cv.wait(slot).unwrap_or_else(|e| e.into_inner());
                    }
                    slot.state = None;
                }
                // ORDER: after the slot is emptied (the VMM arms the watch,
                //        then looks at the slots: one of the two sees the other).
                if ctl.unpark_watch.swap(false, Ordering::SeqCst) {
                    (ctl.events)(VcpuEvent::Unparked(vcpu.index));
                }
                // ORDER: clear `parked` before the pause check at the loop top.
                ctl.parked.store(false, Ordering::SeqCst);
            }
            ExitAction::Stop(reason) => {
                (ctl.events)(VcpuEvent::Stopped(vcpu.index, reason));
                // Stay available for a final pause/save or stop.
                if !paused(vcpu, ctl, &mut last) {
                    return;
                }
            }
        }
    }
}
