//! `nvhv resume`: open and check the image, replay its redo log beside the
//! VM's creation and slot setup, restore the vCPUs, devices and clocks from
//! the committed machine state, and hand the machine to its event loop.
//! The standby (`standby`) runs the same path with a VM it built before
//! the image was free.

use std::time::Instant;

use crate::boot::guest_abi::{self, Layout};
use crate::devices::serial::Console;
use crate::devices::virtio::vsock::{Vsock, VsockArgs, VsockConfig};
use crate::devices::GuestMemory;
use crate::nvram::{Image, ImageError, PersistMode};
use crate::persist::{MachineState, Persist};
use crate::vstate::dirty::DirtyTracker;
use crate::vstate::memory;
use crate::vstate::vcpu::{Vcpu, VcpuArgs};
use crate::vstate::vm::Vm;

use super::bus::Bus;
use super::machine::{Machine, Parts, Timeline};
use super::{
    console_out, epoch, ram_pages, report_image, standby, warn_if_short, ResumeConfig, RunOutcome,
    VmmError,
};

/// `nvhv resume`: validate the image, restore the machine, run until stopped.
///
/// Guest RAM is mapped, never read or copied: the cost does not depend on RAM size.
pub fn resume(cfg: &ResumeConfig, started: Instant) -> Result<RunOutcome, VmmError> {
    // A stop signal from here on suspends the VM as soon as it runs.
    super::signals::catch()?;
    reported(cfg, resume_image(cfg, started, None))
}

/// `result` of a resume of `cfg.image`, after saying what is kept and what
/// is needed if a replay or commit found no room; an image error names the
/// image.
pub(super) fn reported(
    cfg: &ResumeConfig,
    result: Result<RunOutcome, VmmError>,
) -> Result<RunOutcome, VmmError> {
    if let Err(e) = &result {
        if crate::is_out_of_space(e) {
            report_image(&cfg.image, e);
        }
    }
    result.map_err(|e| match e {
        VmmError::Image(e) => VmmError::Image(e.in_image(&cfg.image)),
        e => e,
    })
}

/// A resume from process start (`started`), of `opened` if the caller has
/// already opened (and locked) the image.
pub(super) fn resume_image(
    cfg: &ResumeConfig,
    started: Instant,
    opened: Option<Image>,
) -> Result<RunOutcome, VmmError> {
    // 1. Open (lock + validate header and meta records); never writes.
    // KVM_CREATE_VM (~0.6 ms here) on another thread while the image is
    // opened and checked; its result is looked at only once the image is
    // known good, so image errors come first.
    let new_vm = std::thread::spawn(Vm::new);
    // The listeners first: a client connecting while the VM resumes waits
    // in the accept queue and is served as soon as the guest runs, instead
    // of being refused (and backing off). Errors are reported after the
    // image's, where the device is restored.
    let listeners = cfg.runtime.vsock_config();
    let image = match opened {
        Some(image) => image,
        None => Image::open(&cfg.image)?,
    };
    let from = Timeline::new(started, "process start");
    resume_opened(cfg, from, image, listeners, VmSource::Creating(new_vm))
}

/// Where the KVM VM of a resume comes from.
pub(super) enum VmSource {
    /// `KVM_CREATE_VM` on a thread of its own since the resume started.
    Creating(std::thread::JoinHandle<Result<Vm, crate::vstate::vm::VmError>>),
    /// Built by a standby before the image was free: the VM, guest RAM
    /// mapped from the image and registered with KVM, the dirty tracker.
    Ready(Box<standby::Prebuilt>),
}

/// The rest of a resume, from an image opened and locked: validate, recover,
/// restore the machine, run it. `from` starts the resume's timeline.
pub(super) fn resume_opened(
    cfg: &ResumeConfig,
    from: Timeline,
    mut image: Image,
    listeners: Result<VsockConfig, VmmError>,
    source: VmSource,
) -> Result<RunOutcome, VmmError> {
    warn_if_short(image.space());
    let epochs = image.header().config.persist == PersistMode::Epoch;
    let mut policy = cfg.runtime.epochs;
    if epochs {
        // The image's log was sized when it was made: a budget it cannot
        // hold (the default one, say, with a small --log-size) is lowered
        // to what it can, not refused.
        let capacity = image.log_capacity_pages();
        let ram_pages = ram_pages(image.header().ram_bytes());
        let limit = epoch::budget_limit(capacity, ram_pages);
        if policy.dirty_budget > limit && limit > 0 {
            say!(
                "nvhv: --dirty-budget {} does not fit this image's redo log (a half holds {capacity} pages); using {limit}",
                policy.dirty_budget
            );
            policy.dirty_budget = limit;
        }
        policy.check(capacity, ram_pages)?;
    }
    image.resumable().map_err(|r| VmmError::NotResumable {
        path: image.path().to_owned(),
        reason: r.to_string(),
    })?;
    let hdr = image.header().clone();
    let vcpus_n = hdr.config.vcpus;
    let ram = hdr.config.ram_bytes;
    // 2. The machine state recovery restores (CRC-checked against its
    //    record), and guest RAM mapped (nothing is read through the mapping
    //    yet: each page reads the RAM image at its first access).
    let bytes = image.restored_state()?;
    let state = MachineState::decode(&bytes, vcpus_n)?;
    let mem = match &source {
        VmSource::Creating(_) => memory::map_ram(image.file(), image.ram_offset(), ram, !epochs)?,
        VmSource::Ready(pre) => pre.mem.clone(),
    };
    let mut tl = from;
    tl.mark("image opened, state read, RAM mapped");
    // After the open, the committed point recovery restores.
    tl.from_epoch(image.current().epoch);
    // 3. Recovery, the VM, the vCPUs (see `restore_vm`).
    let recover = epochs.then_some(|| image.recover());
    let Restored {
        report,
        vm,
        dirty,
        mut vcpus,
    } = match source {
        VmSource::Creating(new_vm) => restore_vm(
            recover,
            new_vm,
            (&mem, ram),
            &state,
            cfg.runtime.epochs.hot_pages,
            epochs,
        )?,
        VmSource::Ready(pre) => pre.restore(recover, &state)?,
    };
    if let Some(r) = report {
        tracing::info!("recovery: {r:?}");
    }
    tl.mark("recovered, VM set up, vCPUs restored");
    let confined = guest_abi::is_confining(&mem);
    for v in &mut vcpus {
        v.set_confinable(confined);
    }
    vm.restore(&state.vm)?;
    // kvmclock continues from its saved value; Unix time moved on.
    guest_abi::write_wall_clock(&mem, vm.unix_minus_kvmclock_ns()?)?;
    tl.mark("clocks restored");
    let console = Console::restore(console_out(&cfg.runtime)?, &state.devices.serial)?;
    // 5. Devices. Host connections do not survive a VMM restart: the restored
    //    vsock device tells the guest (TRANSPORT_RESET) and re-polls its queues.
    let wake = cfg.runtime.guest_wake();
    let vsock = match (&state.devices.vsock, listeners) {
        (Some(vs), listeners) => Some(Vsock::restore(
            VsockArgs {
                mem: mem.clone(),
                wake: wake.clone(),
                cfg: listeners?,
            },
            vs,
        )?),
        // No vsock device: the listeners close here.
        (None, _) => None,
    };
    tl.mark("devices restored");
    let layout = Layout::new(ram, vcpus_n)?;
    let bus = Bus::new(console, &layout, vsock.as_ref());
    let m = Machine::new(Parts {
        vm,
        mem,
        vcpus,
        bus,
        wake,
        image,
        vsock,
        policy: epochs.then_some(policy),
        dirty,
    });
    m.run_timed(Some(tl))
}

/// The middle of a resume: recovery (`recover`, epoch mode: the replay of
/// the committed redo records the RAM image may lack, work proportional to
/// the un-applied log, never to RAM size) on a thread of its own, while this
/// one joins the KVM VM (`new_vm`, created since the start) and enables the
/// dirty tracker, and a third registers the memory slot: with shadow paging
/// KVM allocates per-page metadata for the slot (~0.7 ms per GiB here, with
/// or without dirty logging), the one cost of resume that grows with RAM
/// size. Then the vCPUs are restored from `state`, the slot registration
/// still going on. Returns recovery's report, the VM, the tracker and the
/// vCPUs; errors of the image (recovery's) before those of the VM.
///
/// ORDER: nothing reads or writes guest memory until recovery has
/// returned: each page of the private mapping reads the RAM image at its
/// first access. The vCPU restore is the first access (KVM maps the
/// kvmclock page when its MSR is restored).
fn restore_vm<R: Send>(
    recover: Option<impl FnOnce() -> Result<R, ImageError> + Send>,
    new_vm: std::thread::JoinHandle<Result<Vm, crate::vstate::vm::VmError>>,
    (mem, ram): (&GuestMemory, u64),
    state: &MachineState,
    hot_pages: usize,
    epochs: bool,
) -> Result<Restored<R>, VmmError> {
    std::thread::scope(|s| {
        let recovery = recover.map(|f| {
            std::thread::Builder::new()
                .name("nvhv-recover".into())
                .spawn_scoped(s, f)
        });
        let recovered = || match recovery {
            None => Ok(None),
            Some(Ok(h)) => h
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
                .map(Some)
                .map_err(VmmError::from),
            Some(Err(e)) => Err(VmmError::Thread(e)),
        };
        let t = Instant::now();
        let vm_side = new_vm
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
            .map_err(VmmError::from)
            .and_then(|vm| {
                let dirty = epochs
                    .then(|| DirtyTracker::enable(&vm.fd, hot_pages, ram))
                    .transpose()?;
                Ok((vm, dirty))
            });
        let (vm, mut dirty) = match vm_side {
            Ok(v) => v,
            Err(e) => {
                // The image's errors first.
                recovered()?;
                return Err(e);
            }
        };
        let vm_us = t.elapsed().as_micros() as u64;
        let (report, vcpus) = std::thread::scope(|inner| {
            let slot = inner.spawn(|| {
                let t = Instant::now();
                let r = memory::register(&vm.fd, mem, epochs);
                (r, t.elapsed().as_micros() as u64)
            });
            if let Some(d) = dirty.as_mut() {
                // Off the path of the first reply after this resume.
                d.warm();
            }
            let waited = Instant::now();
            let report = recovered();
            let recovery_wait_us = waited.elapsed().as_micros() as u64;
            // ORDER: the vCPUs only once recovery has returned.
            let vcpus = report.is_ok().then(|| restore_vcpus(&vm, state));
            let waited = Instant::now();
            let (slot, slot_us) = slot.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            // Where the resume waited: for the VM's creation and the dirty
            // tracker, for recovery, for the slot after the vCPUs. At 6.4 GB
            // of RAM (image on tmpfs): VM 0.2-1.4 ms, slot 1.8-2.7.
            tracing::debug!(
                vm_us,
                recovery_wait_us,
                slot_us,
                slot_wait_us = waited.elapsed().as_micros() as u64,
                "VM set up beside recovery"
            );
            let report = report?;
            let vcpus = vcpus.unwrap_or_else(|| Ok(Vec::new()))?;
            slot?;
            Ok::<_, VmmError>((report, vcpus))
        })?;
        Ok(Restored {
            report,
            vm,
            dirty,
            vcpus,
        })
    })
}

/// What [`restore_vm`] returns.
pub(super) struct Restored<R> {
    /// Recovery's report (epoch mode).
    pub(super) report: Option<R>,
    pub(super) vm: Vm,
    pub(super) dirty: Option<DirtyTracker>,
    pub(super) vcpus: Vec<Vcpu>,
}

/// The vCPUs of `vm`, restored from `state`.
pub(super) fn restore_vcpus(vm: &Vm, state: &MachineState) -> Result<Vec<Vcpu>, VmmError> {
    let mut vcpus = Vec::new();
    for (i, st) in state.vcpus.iter().enumerate() {
        let args = VcpuArgs {
            vm,
            index: i as u32,
        };
        vcpus.push(<Vcpu as Persist>::restore(args, st)?);
    }
    Ok(vcpus)
}
