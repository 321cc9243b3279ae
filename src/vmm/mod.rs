//! The VMM: builds a machine from a [`RunConfig`] (new image) or from an
//! image's committed state ([`ResumeConfig`]), runs it, and commits its state
//! to the image when told to stop (SIGTERM, SIGPWR, SIGINT, `nvhv suspend`)
//! or when the guest stops on its own.
//!
//! One thread per vCPU runs the guest; the main thread waits for events
//! (signals, control requests, vCPU stops) and performs the suspend commit.
//! This file holds the configs, the errors and the building of a new
//! machine (`run`); `resume` rebuilds one from an image, `machine` runs
//! it (event loop, epochs, suspend), `bus` dispatches its port and MMIO
//! exits. `ARCHITECTURE.md` narrates the steps; the numbered comments match it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nvhv_abi::BootInfo;

use crate::boot::elf;
use crate::boot::guest_abi::{self, Layout};
use crate::devices::serial::Console;
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::GuestMemory;
use crate::nvram::{
    Bytes, CreateOptions, Discarded, Image, ImageConfig, ImageError, PersistMode, Space,
};
use crate::vstate::dirty::DirtyTracker;
use crate::vstate::memory;
use crate::vstate::throttle::ThrottleError;
use crate::vstate::vcpu::{self, EntryPoint, StopReason, Vcpu};
use crate::vstate::vm::Vm;
use crate::vstate::wait::{GuestWake, PARK_SPIN};

/// `eprintln!` that never panics. After a hangup (SIGHUP, a stop signal)
/// stderr may be a terminal that is gone, where a write fails with EIO and
/// `eprintln!` would panic in the middle of a suspend; nothing nvhv says
/// is worth that.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod bus;
pub mod control;
mod epoch;
pub mod listeners;
mod machine;
mod progress;
mod resume;
pub mod signals;
mod standby;

use bus::Bus;
pub use epoch::{EpochEnd, EpochPolicy, EpochStats, DEFAULT_HOT_PAGES};
pub use machine::{describe, Timeline};
use machine::{Machine, Parts};
pub use resume::resume;
pub use standby::{standby, StandbyEnd};

/// Everything that can go wrong building, running or stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Image problem (open, validation, commit).
    #[error(transparent)]
    Image(#[from] crate::nvram::ImageError),
    /// The death notice a standby waits on.
    #[error(transparent)]
    Notice(#[from] crate::nvram::notice::NoticeError),
    /// `nvhv resume --standby` cannot stand by for this image.
    #[error("--standby: {0}")]
    Standby(String),
    /// The image cannot be resumed.
    #[error("image {} is not resumable: {reason}", path.display())]
    NotResumable {
        /// The image.
        path: PathBuf,
        /// Why, in words for the user.
        reason: String,
    },
    /// Machine state problem.
    #[error(transparent)]
    State(#[from] crate::persist::StateError),
    /// KVM VM problem.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// vCPU problem.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// Guest memory problem.
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::MemoryError),
    /// Dirty tracking problem.
    #[error(transparent)]
    Dirty(#[from] crate::vstate::dirty::DirtyError),
    /// The throttle thread could not be started.
    #[error(transparent)]
    Throttle(#[from] ThrottleError),
    /// Boot structures problem.
    #[error(transparent)]
    GuestAbi(#[from] crate::boot::guest_abi::GuestAbiError),
    /// ELF problem.
    #[error(transparent)]
    Elf(#[from] crate::boot::elf::ElfError),
    /// Serial state problem.
    #[error(transparent)]
    Serial(#[from] crate::devices::serial::SerialError),
    /// The guest does not fit.
    #[error("guest image ends at {end:#x}, above the vCPU stacks at {stacks:#x}: give the VM more --mem")]
    GuestTooBig {
        /// End of the guest image.
        end: u64,
        /// Stack area base.
        stacks: u64,
    },
    /// Reading a guest ELF file failed.
    #[error("cannot read guest ELF {path}")]
    ReadGuest {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Unknown built-in guest name.
    #[error("no built-in guest named '{0}' (see `nvhv run --help`)")]
    UnknownGuest(String),
    /// Console file.
    #[error("cannot open console file {path}")]
    Console {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The vsock device's listeners could not be had.
    #[error(transparent)]
    Listen(#[from] listeners::ListenError),
    /// vsock device problem.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// Signal setup.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// A stop signal arrived while `run` was making its image: it stopped
    /// there (and said what it left at the path).
    #[error("interrupted by {} before the guest ran", signals::name(*.0))]
    Interrupted(i32),
    /// A vCPU did not pause in time.
    #[error("vCPU {0} did not pause within 10 s")]
    PauseTimeout(u32),
    /// A thread of the VMM could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    /// Writing back guest RAM on a DAX image failed.
    #[error("cannot write back guest RAM to the image")]
    RamSync(#[source] std::io::Error),
    /// The epoch options cannot work (with this redo log).
    #[error(transparent)]
    Policy(#[from] epoch::PolicyError),
    /// An epoch changed more than a redo-log record holds.
    #[error("an epoch changed {bytes} bytes in {pages} pages, more than a redo-log record holds ({room} bytes); use a larger --log-size or a smaller --dirty-budget")]
    DirtyOverflow {
        /// Dirty pages.
        pages: usize,
        /// Bytes of changes.
        bytes: usize,
        /// What a record holds.
        room: usize,
    },
}

/// Which guest to run in a new VM.
#[derive(Clone, Debug)]
pub enum GuestChoice {
    /// A built-in guest by name.
    Builtin(String),
    /// An ELF file following the built-in guest ABI.
    File(PathBuf),
}

impl GuestChoice {
    fn name(&self) -> String {
        match self {
            GuestChoice::Builtin(n) => n.clone(),
            GuestChoice::File(p) => p
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "guest.elf".into()),
        }
    }

    fn bytes(&self) -> Result<std::borrow::Cow<'static, [u8]>, VmmError> {
        match self {
            GuestChoice::Builtin(n) => crate::guests::builtin(n)
                .map(std::borrow::Cow::Borrowed)
                .ok_or_else(|| VmmError::UnknownGuest(n.clone())),
            GuestChoice::File(p) => {
                std::fs::read(p)
                    .map(std::borrow::Cow::Owned)
                    .map_err(|source| VmmError::ReadGuest {
                        path: p.clone(),
                        source,
                    })
            }
        }
    }
}

/// Options shared by `run` and `resume`.
#[derive(Clone, Debug, Default)]
pub struct RuntimeOptions {
    /// Console output file (stdout when None).
    pub console: Option<PathBuf>,
    /// TCP address the vsock device listens on (None: [`DEFAULT_LISTEN`]).
    pub listen: Option<String>,
    /// Optional Unix socket path the vsock device also listens on.
    pub unix: Option<PathBuf>,
    /// Epoch policy (used in epoch mode).
    pub epochs: EpochPolicy,
    /// Epoch mode: hold every reply until its own epoch commits, also
    /// those the guest says depend only on committed state.
    pub hold_all_output: bool,
    /// Listening sockets a service manager passed (socket activation),
    /// used instead of `listen` and `unix`.
    pub inherited: listeners::Inherited,
    /// How long an idle vCPU thread (parked at the wait port) and the vsock
    /// device thread poll for work before they sleep; None: their defaults,
    /// [`PARK_SPIN`] and [`IDLE_SPIN`](crate::devices::virtio::vsock::backend::IDLE_SPIN).
    pub idle_poll: Option<Duration>,
}

/// Where the vsock device listens unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6380";

impl RuntimeOptions {
    /// The vsock device's configuration with its listeners: inherited from
    /// a service manager, or bound from `listen` and `unix`.
    fn vsock_config(&self) -> Result<VsockConfig, VmmError> {
        let l = listeners::listeners(
            &self.inherited,
            self.listen.as_deref(),
            self.unix.as_deref(),
            DEFAULT_LISTEN,
        )?;
        Ok(self.vsock_config_with(l))
    }

    /// The vsock device's configuration with the listeners `l`.
    fn vsock_config_with(&self, l: listeners::Listeners) -> VsockConfig {
        let mut cfg = VsockConfig::new(l.tcp, l.unix);
        cfg.release_settled = !self.hold_all_output;
        if let Some(p) = self.idle_poll {
            cfg.idle_spin = p;
        }
        cfg
    }

    /// Where idle vCPUs park, polling `idle_poll` (or [`PARK_SPIN`]) first.
    fn guest_wake(&self) -> Arc<GuestWake> {
        Arc::new(GuestWake::with_spin(self.idle_poll.unwrap_or(PARK_SPIN)))
    }

    /// Whether the guest gets a vsock device although it is not the kv
    /// guest: an address to serve was given or passed in.
    fn serves_clients(&self) -> bool {
        self.listen.is_some() || self.inherited.is_some()
    }
}

/// `nvhv run`: a new VM in a new image.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Image path.
    pub image: PathBuf,
    /// Replace an existing file.
    pub overwrite: bool,
    /// Guest RAM bytes.
    pub mem: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// The guest.
    pub guest: GuestChoice,
    /// Persistence mode.
    pub persist: PersistMode,
    /// Bytes of each of the two redo-log halves (epoch mode); `None` for
    /// the default ([`default_log_half`]).
    pub log_half_bytes: Option<u64>,
    /// Allocate the image's RAM region up front (`run --reserve`) instead
    /// of leaving it sparse.
    pub reserve_ram: bool,
    /// Runtime options.
    pub runtime: RuntimeOptions,
}

/// `nvhv resume`: continue the VM held by an image.
#[derive(Clone, Debug)]
pub struct ResumeConfig {
    /// Image path.
    pub image: PathBuf,
    /// Runtime options.
    pub runtime: RuntimeOptions,
}

/// How a VM run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why it stopped.
    pub reason: StopCause,
    /// Signal/request → durable commit, if a commit happened.
    pub commit_latency: Option<Duration>,
}

/// What ended the run.
#[derive(Debug, Clone)]
pub enum StopCause {
    /// A signal (number).
    Signal(i32),
    /// `nvhv suspend`.
    Request,
    /// The guest stopped on its own.
    Guest(StopReason),
}

/// The largest default redo-log half: 32 655 pages logged whole, room for
/// the default dirty budget (16 384) and what the guest writes past it
/// before the capture.
pub const DEFAULT_LOG_HALF: u64 = 128 << 20;

/// The default size of each redo-log half for a guest of `mem` bytes of RAM:
/// [`DEFAULT_LOG_HALF`], or less when a smaller half holds every page of RAM
/// logged whole (then no epoch can overflow it, whatever the dirty budget).
pub fn default_log_half(mem: u64) -> u64 {
    crate::nvram::redo::half_bytes_for(ram_pages(mem) as u64).min(DEFAULT_LOG_HALF)
}

fn ram_pages(mem: u64) -> usize {
    usize::try_from(mem.div_ceil(crate::nvram::redo::PAGE)).unwrap_or(usize::MAX)
}

fn console_out(opts: &RuntimeOptions) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match &opts.console {
        None => Box::new(std::io::LineWriter::new(std::io::stdout())),
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmmError::Console {
                    path: p.clone(),
                    source,
                })?;
            Box::new(std::io::LineWriter::new(f))
        }
    })
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u64::from_le_bytes(b)
}

/// `nvhv run`: create the image, load the guest, run until stopped.
pub fn run(cfg: &RunConfig) -> Result<RunOutcome, VmmError> {
    // From here on a stop signal cancels the run until its image is in
    // place, and suspends the VM after (see `signals`).
    signals::catch()?;
    // 1. Check the geometry and the epoch options before touching the file
    //    system.
    let layout = Layout::new(cfg.mem, cfg.vcpus)?;
    let log_half_bytes = cfg
        .log_half_bytes
        .unwrap_or_else(|| default_log_half(cfg.mem));
    if cfg.persist == PersistMode::Epoch {
        // The log half the image will get.
        let log = crate::nvram::layout::Region {
            offset: 0,
            size: 2 * log_half_bytes,
        };
        let half = crate::nvram::redo::half_region(log, 0).size;
        let capacity = crate::nvram::redo::capacity_pages(half).unwrap_or(0);
        cfg.runtime.epochs.check(
            usize::try_from(capacity).unwrap_or(usize::MAX),
            ram_pages(cfg.mem),
        )?;
    }
    let guest = cfg.guest.bytes()?;
    elf::entry_cpl(&guest)?;
    // The listeners and the console file before the image: an address in
    // use or a bad console path then fails the run without leaving an
    // image behind.
    let with_vsock = cfg.guest.name() == "kv" || cfg.runtime.serves_clients();
    let listeners = with_vsock.then(|| cfg.runtime.vsock_config()).transpose()?;
    let console = console_out(&cfg.runtime)?;
    // 2. Make the image (refuses an existing file unless --force). It is
    //    not at its path yet: a run that fails or is killed before step 3
    //    leaves the path as it was (nothing, or the file --force replaces).
    //    First what an earlier `run --force`, killed as it put its image
    //    in place, left beside the path: it may hold the room a
    //    `--reserve` now needs.
    remove_leftovers(&cfg.image);
    let reserving = progress::Reserving::start();
    let (image, mut fresh) = Image::prepare(
        &cfg.image,
        &ImageConfig {
            ram_bytes: cfg.mem,
            vcpus: cfg.vcpus,
            guest: cfg.guest.name(),
            persist: cfg.persist,
            log_bytes: match cfg.persist {
                PersistMode::Epoch => 2 * log_half_bytes,
                PersistMode::SuspendOnly => 0,
            },
        },
        CreateOptions {
            overwrite: cfg.overwrite,
            reserve_ram: cfg.reserve_ram,
            on_reserve: Some(&|done, total| reserving.update(done, total)),
            cancelled: Some(&|| signals::arrived().is_some()),
        },
    )
    .map_err(|e| match (e, signals::arrived()) {
        (ImageError::Cancelled, Some(signal)) => {
            // Unmade (the unnamed file went with it): say what is there.
            reserving.clear();
            let left = if cfg.image.exists() {
                Discarded::OldKept
            } else {
                Discarded::Nothing
            };
            say_left(&cfg.image, left);
            VmmError::Interrupted(signal)
        }
        (e, _) => e.into(),
    })?;
    let built = build_new(cfg, &layout, &guest, image, listeners, console).and_then(|mut m| {
        if cfg.persist == PersistMode::Epoch {
            // The first epoch holds the loaded guest, so the image is
            // resumable before the guest runs a single instruction.
            m.initial_epoch()?;
        }
        // 3. Put the image at its path, whole (and, in epoch mode,
        //    resumable), unless a stop signal came first: no guest ran, so
        //    stopping here loses nothing. One that comes after this check
        //    suspends the VM as soon as it runs.
        if let Some(signal) = signals::arrived() {
            return Err(VmmError::Interrupted(signal));
        }
        fresh.publish()?;
        Ok(m)
    });
    let machine = match built {
        Ok(m) => m,
        Err(e) => {
            // The guest never ran: the new image held no VM.
            say_left(&cfg.image, fresh.discard());
            return Err(e);
        }
    };
    warn_if_short(fresh.space());
    let result = machine.run();
    if let Err(e) = &result {
        report_image(&cfg.image, e);
    }
    result
}

/// Removes the whole images that a `run --force` killed between its link
/// and its rename left beside `path` under a hidden name (see
/// [`crate::nvram::Leftover`]), saying so: nobody else knows they exist.
pub(super) fn remove_leftovers(path: &Path) {
    for left in crate::nvram::remove_leftovers(path) {
        say!(
            "nvhv: removed {} ({}): an image that a `nvhv run --force` killed before putting it at {} left behind; its VM never ran",
            left.path.display(),
            Bytes(left.bytes),
            path.display()
        );
    }
}

/// After a `run` stopped before its guest ran: what is at `path` now.
fn say_left(path: &Path, left: Discarded) {
    let path = path.display();
    match left {
        Discarded::Nothing => say!("nvhv: no image is at {path}"),
        Discarded::OldKept => say!("nvhv: {path} is left as it was: the VM was never started"),
        Discarded::Removed => {
            say!("nvhv: removed {path}: the VM was never started, so it held nothing")
        }
    }
}

/// After a failed run or resume: what the image holds now, in one line
/// (whether it can be resumed, and from which epoch), so that the user
/// knows what the failure cost, and a full file system named as the cause.
fn report_image(path: &Path, e: &VmmError) {
    if crate::is_out_of_space(e) {
        say!(
            "nvhv: the file system holding {} is full; make room (or move the image to a larger one) and resume it",
            path.display()
        );
    }
    match crate::nvram::inspect(path) {
        Ok(r) if r.resumable => say!(
            "nvhv: the image at {} is resumable from epoch {} (`nvhv resume --image {}` once the problem is fixed)",
            path.display(),
            r.epoch,
            path.display()
        ),
        Ok(r) => say!(
            "nvhv: the image at {} is not resumable: {}",
            path.display(),
            r.reason.unwrap_or_default()
        ),
        // Never created, or removed again (a failed `run`).
        Err(_) => {}
    }
}

/// Warns when the image's file system has less room than the image may
/// still take (a sparse RAM region fills as the guest touches its pages):
/// if it fills, the guest stops.
fn warn_if_short(space: Result<Space, ImageError>) {
    match space {
        Ok(s) if s.short() => say!(
            "nvhv: warning: the image may still need {} (its RAM region is sparse) but its file system has {} free; \
             if it fills, the guest is stopped with its last committed state kept, and `nvhv resume` continues it once there is room \
             (`nvhv run --reserve` allocates the whole image up front)",
            Bytes(s.unallocated),
            Bytes(s.free)
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("{}", crate::error_chain(&e)),
    }
}

/// A KVM VM with `ram` bytes of guest RAM mapped from `file` at `offset`
/// and registered with KVM: shared in suspend-only mode, private and
/// dirty-logged (with the tracker, `hot_pages` its hot budget) in epoch
/// mode. Reads no page of guest RAM.
fn vm_with_ram(
    (file, offset, ram): (&std::fs::File, u64, u64),
    epochs: bool,
    hot_pages: usize,
) -> Result<(Vm, Option<DirtyTracker>, GuestMemory), VmmError> {
    let vm = Vm::new()?;
    // ORDER: manual dirty-log protection before the dirty-logged slot exists.
    let dirty = epochs
        .then(|| DirtyTracker::enable(&vm.fd, hot_pages, ram))
        .transpose()?;
    let mem = memory::map_ram(file, offset, ram, !epochs)?;
    memory::register(&vm.fd, &mem, epochs)?;
    Ok((vm, dirty, mem))
}

fn build_new(
    cfg: &RunConfig,
    layout: &Layout,
    guest: &[u8],
    image: Image,
    listeners: Option<VsockConfig>,
    console: Box<dyn Write + Send>,
) -> Result<Machine, VmmError> {
    // 3. KVM VM with the split irqchip; guest RAM mapped from the image:
    //    shared in suspend-only mode (writes land in the image), private
    //    (copy-on-write, dirty-logged) in epoch mode.
    let epochs = cfg.persist == PersistMode::Epoch;
    let (vm, dirty, mem) = vm_with_ram(
        (image.file(), image.ram_offset(), cfg.mem),
        epochs,
        cfg.runtime.epochs.hot_pages,
    )?;
    // 4. The guest ELF and the ABI's structures.
    let loaded = elf::load(&mem, guest)?;
    if loaded.end > layout.stacks_base() {
        return Err(VmmError::GuestTooBig {
            end: loaded.end,
            stacks: layout.stacks_base(),
        });
    }
    guest_abi::write_system_tables(&mem, layout, loaded.cpl == vcpu::EntryCpl::Cpl3)?;
    // 5. vCPUs in the ABI's entry state.
    let mut vcpus = Vec::new();
    let confined = guest_abi::is_confining(&mem);
    for i in 0..cfg.vcpus {
        let mut v = Vcpu::new(&vm, i)?;
        v.set_confinable(confined);
        v.configure_entry(&EntryPoint {
            rip: loaded.entry,
            cpl: loaded.cpl,
            boot_info: nvhv_abi::BOOT_INFO_ADDR,
            ram_bytes: cfg.mem,
        })?;
        vcpus.push(v);
    }
    // 6. Devices: the vsock device for guests that serve clients (kv, or --listen).
    let wake = cfg.runtime.guest_wake();
    let vsock = listeners
        .map(|l| Vsock::new(mem.clone(), wake.clone(), l))
        .transpose()?;
    let mut mmio = [Default::default(); nvhv_abi::MAX_MMIO];
    if vsock.is_some() {
        mmio[0] = layout.mmio_window(0);
    }
    let info = BootInfo {
        magic: nvhv_abi::BOOT_INFO_MAGIC,
        version: nvhv_abi::BOOT_INFO_VERSION,
        vcpus: cfg.vcpus,
        ram_bytes: cfg.mem,
        map_end: layout.map_end,
        image_end: loaded.end,
        stacks_base: layout.stacks_base(),
        tsc_khz: vcpus[0].tsc_khz() as u64,
        kvmclock_addr: nvhv_abi::KVMCLOCK_ADDR,
        seed: random_seed(),
        mmio_count: u32::from(vsock.is_some()),
        _pad: 0,
        mmio,
    };
    guest_abi::write_boot_info(&mem, &info)?;
    guest_abi::write_wall_clock(&mem, vm.unix_minus_kvmclock_ns()?)?;
    let console = Console::new(console);
    let bus = Bus::new(console, layout, vsock.as_ref());
    Ok(Machine::new(Parts {
        vm,
        mem,
        vcpus,
        bus,
        wake,
        image,
        vsock,
        policy: epochs.then_some(cfg.runtime.epochs),
        dirty,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::redo::capacity_pages;

    #[test]
    fn the_default_log_half_holds_a_small_guest_whole_and_stops_at_128_mib() {
        for mem in [16u64 << 20, 64 << 20, (127 << 20) + 4096] {
            let half = default_log_half(mem);
            assert!(half < DEFAULT_LOG_HALF, "{mem}");
            assert!(capacity_pages(half).unwrap() >= mem / 4096, "{mem}");
            // Then any budget fits: the default one, even for 16 MiB.
            let pages = ram_pages(mem);
            let capacity = capacity_pages(half).unwrap() as usize;
            assert_eq!(EpochPolicy::default().check(capacity, pages), Ok(()));
        }
        for mem in [128u64 << 20, 4 << 30] {
            assert_eq!(default_log_half(mem), DEFAULT_LOG_HALF, "{mem}");
        }
    }

    #[test]
    fn idle_poll_reaches_the_vcpus_and_the_vsock_thread() {
        let mut opts = RuntimeOptions {
            listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        assert_eq!(opts.guest_wake().spin(), PARK_SPIN);
        assert_eq!(
            opts.vsock_config().unwrap().idle_spin,
            crate::devices::virtio::vsock::backend::IDLE_SPIN
        );
        for poll in [Duration::ZERO, Duration::from_micros(30)] {
            opts.idle_poll = Some(poll);
            assert_eq!(opts.guest_wake().spin(), poll);
            assert_eq!(opts.vsock_config().unwrap().idle_spin, poll);
        }
    }
}
