//! `nvhv resume --standby`: a resume prepared before its image is free.
//!
//! A standby runs beside the nvhv that runs an epoch-mode image. It claims
//! the image (`nvram::Successor`: no other process can open it while the
//! claim is held; a second standby waits for the claim), reads the image's
//! header without taking its lock and builds what a resume needs that does
//! not depend on the image's contents: the KVM VM, guest RAM mapped
//! privately from the image and registered with KVM (the one step of a
//! resume whose cost grows with RAM size, ~0.3 ms per GiB here), and the
//! dirty tracker. Then it waits, using no CPU, on the running nvhv's death
//! notice (`super::notice`, handed over the control socket), or, without
//! one, on the image's lock. When the running nvhv dies, the notice ends
//! as its epoch thread starts to exit (the lock would be freed only after
//! the kernel has torn the process down, milliseconds later), and the
//! standby resumes at once: open and validate the image, replay the log,
//! restore the vCPUs and devices, run, taking the image lock when the
//! kernel frees it. Process start and the slot are then behind it. The
//! listening sockets are the running nvhv's, taken over its control socket
//! beforehand when they are the addresses the standby would serve (so they
//! stay open across the death), else bound at the takeover.
//!
//! It takes over only an image left by a crash (its current record says
//! `Running` or `Committed`). An image stopped in order (`Suspended`) or
//! never run stays as it is, and the standby exits: stopping the VM on
//! purpose must not start it again. A standby that finds nobody holding
//! the image resumes it at once, as `nvhv resume` does: so two standbys of
//! one image make a pair (the first resumes, the second waits; the first,
//! restarted after its crash, waits in turn).
//!
//! Why building early is safe: a page of a private mapping reads the file
//! when it is first touched, and nothing touches guest RAM until recovery
//! has returned (the ORDER rule of every resume), so what the running nvhv
//! and recovery write to the RAM image before then is what the guest sees.
//! If the file at the path is not the one the VM was built for (replaced,
//! or re-created with another header), the prebuilt VM is dropped and the
//! resume builds its own.

use std::fs::File;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::control;
use super::listeners::{ListenError, Listeners};
use super::machine::Timeline;
use super::resume::{resume_opened, Restored, VmSource};
use super::{ResumeConfig, RunOutcome, VmmError};
use crate::devices::virtio::vsock::VsockConfig;
use crate::devices::GuestMemory;
use crate::nvram::{Bytes, Header, Image, ImageError, PersistMode, Status, Successor};
use crate::persist::MachineState;
use crate::vstate::dirty::DirtyTracker;
use crate::vstate::vm::Vm;

/// How a standby ended, when it did not fail.
#[derive(Debug)]
pub enum StandbyEnd {
    /// It took the image over; how that VM's run ended.
    Resumed(RunOutcome),
    /// The image was freed in order (or never ran): its status, left as is.
    NotCrashed(Status),
}

/// `nvhv resume --standby`: if no process holds the image, resume it now
/// (as `nvhv resume` does); otherwise build the VM, wait for the image to
/// be free, and resume it if a crash left it. `started`: process start.
pub fn standby(cfg: &ResumeConfig, started: Instant) -> Result<StandbyEnd, VmmError> {
    match Image::open(&cfg.image) {
        Ok(image) => {
            // Nobody runs it: resume it, whatever stopped it. So two
            // standbys of one image make a pair: the first resumes, the
            // second waits, and a standby restarted after a crash waits.
            super::signals::catch()?;
            let result = super::resume::resume_image(cfg, started, Some(image));
            return super::resume::reported(cfg, result).map(StandbyEnd::Resumed);
        }
        Err(ImageError::InUse(_)) => {}
        Err(e) => return Err(e.into()),
    }
    // One standby at a time: a second one waits here until the first owns
    // the image (or gives up on it), then stands by for that one.
    let successor = match Successor::claim(&cfg.image)? {
        Some(s) => s,
        None => {
            say!(
                "nvhv: another standby is first in line for {}; waiting for it to take the image over",
                cfg.image.display()
            );
            Successor::wait(&cfg.image)?
        }
    };
    let t = Instant::now();
    let pre = Prebuilt::build(&cfg.image, cfg.runtime.epochs.hot_pages)?;
    let shared = shared_listeners(cfg);
    let notice = match control::request_notice(&cfg.image, Duration::from_secs(2)) {
        Ok(n) => n,
        Err(e) => {
            tracing::info!("no death notice ({e}): waiting for the image lock instead");
            None
        }
    };
    say!(
        "nvhv: standing by for {} ({} of guest RAM set up in {:.1} ms{}); it resumes the VM when the nvhv running it dies",
        cfg.image.display(),
        Bytes(pre.header.config.ram_bytes),
        t.elapsed().as_secs_f64() * 1e3,
        if shared.is_some() {
            ", sharing the running nvhv's listening sockets"
        } else {
            ""
        }
    );
    let ((image, freed), origin) = match notice {
        Some(fd) => {
            let ended = crate::nvram::notice::wait(fd)?;
            tracing::info!("the death notice ended: {ended:?}");
            (
                Image::open_taken_over(&cfg.image, successor)?,
                "the nvhv running it died",
            )
        }
        None => (
            Image::open_when_free(&cfg.image, successor)?,
            "the image was freed",
        ),
    };
    // Not before: a standby waiting for the image stops on a stop signal
    // as any process does (the wait would not see it).
    super::signals::catch()?;
    let status = image.current().status;
    if !matches!(status, Status::Running | Status::Committed) {
        return Ok(StandbyEnd::NotCrashed(status));
    }
    // Shared with the nvhv that ran the image (clients that connected since
    // its death wait in their queue), or bound only now: it held them.
    let listeners = match shared {
        Some(l) => Ok(cfg.runtime.vsock_config_with(l)),
        None => listen_after_takeover(cfg),
    };
    let source = if pre.fits(&image) {
        VmSource::Ready(Box::new(pre))
    } else {
        tracing::info!("the image at the path is not the one the standby built for; building anew");
        drop(pre);
        VmSource::Creating(std::thread::spawn(Vm::new))
    };
    let from = Timeline::new(freed, origin);
    let result = resume_opened(cfg, from, image, listeners, source);
    super::resume::reported(cfg, result).map(StandbyEnd::Resumed)
}

/// How long a standby retries a listen address still in use after the
/// takeover: a process killed with SIGKILL closes its descriptors one by
/// one as it exits, its image lock not necessarily last (the crash harness
/// saw the bind right after a takeover fail with EADDRINUSE).
const LISTEN_RETRY: Duration = Duration::from_secs(2);

/// The vsock listeners of `cfg`, bound once the nvhv that held them has
/// closed them: an address still in use is tried again every 200 µs (there
/// is no event for a port being freed) for up to [`LISTEN_RETRY`].
fn listen_after_takeover(cfg: &ResumeConfig) -> Result<VsockConfig, VmmError> {
    let t = Instant::now();
    loop {
        match cfg.runtime.vsock_config() {
            Err(VmmError::Listen(ListenError::Bind { source, .. }))
                if source.kind() == std::io::ErrorKind::AddrInUse && t.elapsed() < LISTEN_RETRY =>
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            r => return r,
        }
    }
}

/// The listening sockets of the nvhv running the image (asked for over its
/// control socket), if they are the ones this standby would serve: the
/// same TCP address (`--listen`, or the default) and the same `--unix`
/// path. Holding them, the standby keeps them open when that nvhv dies, so
/// a client connecting then waits in their queue instead of being refused.
/// `None` (bind at the takeover) under socket activation, where the
/// sockets are shared already, and whenever they cannot be had or differ.
fn shared_listeners(cfg: &ResumeConfig) -> Option<Listeners> {
    let rt = &cfg.runtime;
    if rt.inherited.is_some() {
        return None;
    }
    let got = match control::request_listeners(&cfg.image, Duration::from_secs(2)) {
        Ok(l) => l,
        Err(e) => {
            tracing::info!("listening sockets not shared: {e}");
            return None;
        }
    };
    let want: Vec<SocketAddr> = rt
        .listen
        .as_deref()
        .unwrap_or(super::DEFAULT_LISTEN)
        .to_socket_addrs()
        .map(Iterator::collect)
        .unwrap_or_default();
    let tcp_fits = got
        .tcp
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .is_some_and(|a| want.contains(&a));
    let unix_fits = match (&got.unix, &rt.unix) {
        (None, None) => true,
        (Some(l), Some(p)) => l
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|q| q == p.as_path()))
            .unwrap_or(false),
        _ => false,
    };
    if !(tcp_fits && unix_fits) {
        tracing::info!("the running nvhv listens elsewhere: listening sockets not shared");
        return None;
    }
    Some(got)
}

/// What a resume needs that a standby builds before the image is free.
pub(super) struct Prebuilt {
    /// The image file it was built for, opened read-only without its lock:
    /// the mapping's source, and the identity [`Prebuilt::fits`] checks.
    file: File,
    header: Header,
    // ORDER: `vm` before `mem` (fields drop in order): the VM's slot points
    // into the mapping.
    vm: Vm,
    /// Guest RAM, mapped privately and registered with KVM (dirty-logged).
    pub(super) mem: GuestMemory,
    /// The dirty tracker (epoch mode, so always there).
    dirty: Option<DirtyTracker>,
}

impl Prebuilt {
    /// The VM, guest RAM and dirty tracker for the image at `path`, read
    /// without its lock. Touches no page of guest RAM.
    fn build(path: &Path, hot_pages: usize) -> Result<Self, VmmError> {
        let (file, header) = Image::peek_header(path)?;
        if header.config.persist != PersistMode::Epoch {
            return Err(VmmError::Standby(format!(
                "{} is a suspend-only image, which a crash leaves not resumable; a standby needs --persist epoch",
                path.display()
            )));
        }
        let ram = (&file, header.geometry.ram.offset, header.config.ram_bytes);
        let (vm, mut dirty, mem) = super::vm_with_ram(ram, true, hot_pages)?;
        if let Some(d) = dirty.as_mut() {
            d.warm();
        }
        Ok(Prebuilt {
            file,
            header,
            vm,
            mem,
            dirty,
        })
    }

    /// Whether this was built for what `image` holds: the same file, with
    /// the same header.
    fn fits(&self, image: &Image) -> bool {
        let same_file = match (self.file.metadata(), image.file().metadata()) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        };
        same_file && &self.header == image.header()
    }

    /// Recovery (`recover`, on this thread: nothing is left to build beside
    /// it), then the vCPUs restored from `state`.
    pub(super) fn restore<R>(
        self,
        recover: Option<impl FnOnce() -> Result<R, ImageError>>,
        state: &MachineState,
    ) -> Result<Restored<R>, VmmError> {
        let report = recover.map(|f| f()).transpose()?;
        // ORDER: the vCPUs only once recovery has returned (restoring them
        // is the first access to guest RAM).
        let vcpus = super::resume::restore_vcpus(&self.vm, state)?;
        Ok(Restored {
            report,
            vm: self.vm,
            dirty: self.dirty,
            vcpus,
        })
    }
}
