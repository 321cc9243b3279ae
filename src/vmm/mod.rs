//! The VMM: builds a machine from a [`RunConfig`] (new image) or from an
//! image's committed state ([`ResumeConfig`]), runs it, and commits its state
//! to the image when told to stop (SIGTERM, SIGPWR, SIGINT, `nvhv suspend`)
//! or when the guest stops on its own.
//!
//! One thread per vCPU runs the guest; the main thread waits for events
//! (signals, control requests, vCPU stops) and performs the suspend commit.
//! `ARCHITECTURE.md` narrates the steps; the numbered comments below match it.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvhv_abi::BootInfo;

use crate::boot::elf;
use crate::boot::guest_abi::{self, Layout};
use crate::devices::serial::{Console, SerialState};
use crate::devices::virtio::vsock::{
    DepsPort, OutputCommit, OutputCut, OutputGate, Vsock, VsockArgs, VsockConfig,
};
use crate::devices::{GuestMemory, MmioDevice};
use crate::nvram::redo::Changes;
use crate::nvram::{Bytes, CreateOptions, Image, ImageConfig, ImageError, PersistMode, Status};
use crate::persist::{DeviceStates, MachineState, Persist};
use crate::vstate::dirty::DirtyTracker;
use crate::vstate::memory;
use crate::vstate::memory::AdviceWord;
use crate::vstate::throttle::{Brake, Throttle, ThrottleError};
use crate::vstate::vcpu::{
    self, EntryPoint, ExitAction, ExitHandler, StopReason, Vcpu, VcpuArgs, VcpuEvent, VcpuHandle,
};
use crate::vstate::vm::Vm;
use crate::vstate::wait::{GuestWake, PARK_SPIN};

pub mod control;
mod epoch;
pub mod listeners;
mod standby;

pub use epoch::{EpochEnd, EpochPolicy, EpochStats, DEFAULT_HOT_PAGES};
pub use standby::{standby, StandbyEnd};

/// Everything that can go wrong building, running or stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Image problem (open, validation, commit).
    #[error(transparent)]
    Image(#[from] crate::nvram::ImageError),
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

/// An MMIO device shared between the bus (vCPU threads) and its owner.
type SharedMmio = Arc<Mutex<dyn MmioDevice>>;

/// Port and MMIO dispatch for the built-in ABI's devices.
struct Bus {
    console: Mutex<Console>,
    /// MMIO devices: (base, size, device).
    mmio: Vec<(u64, u64, SharedMmio)>,
    /// Where [`nvhv_abi::OUTPUT_DEPS_PORT`] writes go (the vsock device).
    deps: Option<DepsPort>,
}

impl Bus {
    fn new(console: Console, layout: &Layout, vsock: Option<&Vsock>) -> Arc<Bus> {
        let mut mmio: Vec<(u64, u64, SharedMmio)> = Vec::new();
        if let Some(v) = vsock {
            let w = layout.mmio_window(0);
            mmio.push((w.base, w.size, v.transport()));
        }
        Arc::new(Bus {
            console: Mutex::new(console),
            mmio,
            deps: vsock.map(Vsock::deps_port),
        })
    }

    fn mmio_device(&self, addr: u64) -> Option<(u64, &SharedMmio)> {
        self.mmio
            .iter()
            .find(|(base, size, _)| addr >= *base && addr - base < *size)
            .map(|(base, _, d)| (addr - base, d))
    }
}

impl ExitHandler for Bus {
    fn pio_in(&self, port: u16, data: &mut [u8]) {
        let base = nvhv_abi::SERIAL_PORT;
        if (base..base + 8).contains(&port) && !data.is_empty() {
            data[0] = self
                .console
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read((port - base) as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn pio_out(&self, port: u16, data: &[u8]) -> ExitAction {
        let base = nvhv_abi::SERIAL_PORT;
        let word = || {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(b)
        };
        match port {
            p if (base..base + 8).contains(&p) => {
                if let Some(&v) = data.first() {
                    self.console
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .write((p - base) as u8, v);
                }
                ExitAction::Continue
            }
            nvhv_abi::WAIT_PORT => match word() {
                0 => ExitAction::Wait(None),
                nvhv_abi::WAIT_FOREVER => ExitAction::Halt,
                us => ExitAction::Wait(Some(Duration::from_micros(us as u64))),
            },
            nvhv_abi::EXIT_PORT => ExitAction::Stop(StopReason::GuestExit(word())),
            nvhv_abi::PANIC_PORT => ExitAction::Stop(StopReason::GuestPanic(word())),
            nvhv_abi::OUTPUT_DEPS_PORT => {
                let addr = word() as u64;
                match &self.deps {
                    Some(d) if d.register(addr) => {
                        tracing::debug!("guest output-dependency area registered at {addr:#x}");
                    }
                    Some(_) => tracing::warn!(
                        "guest output-dependency area at {addr:#x} refused (misaligned or not in RAM): all output is held"
                    ),
                    None => {}
                }
                ExitAction::Continue
            }
            _ => ExitAction::Continue,
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.mmio_device(addr) {
            Some((off, d)) => d
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .mmio_read(off, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((off, d)) = self.mmio_device(addr) {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .mmio_write(off, data);
        }
    }
}

/// Events the main thread waits for.
enum Event {
    Vcpu(VcpuEvent),
    /// The vsock device holds output waiting for a commit (group commit).
    OutputPending,
    Signal(i32, Instant),
    Suspend(Instant, Sender<String>),
}

/// A built machine, ready to run.
struct Machine {
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
    // 2. Create the image (refuses an existing file unless --force).
    let image = Image::create_with(
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
        },
    )?;
    warn_if_short(&image);
    let built = build_new(cfg, &layout, &guest, image, listeners, console).and_then(|mut m| {
        if m.policy.is_some() {
            // The first epoch holds the loaded guest, so the image is
            // resumable before the guest runs a single instruction.
            m.initial_epoch()?;
        }
        Ok(m)
    });
    let machine = match built {
        Ok(m) => m,
        Err(e) => {
            // The guest never ran and the image holds no VM: the file
            // (created or overwritten above) is of no use, so it goes.
            if std::fs::remove_file(&cfg.image).is_ok() {
                eprintln!(
                    "nvhv: removed {}: the VM was never started, so it held nothing",
                    cfg.image.display()
                );
            }
            return Err(e);
        }
    };
    let result = machine.run();
    if let Err(e) = &result {
        report_image(&cfg.image, e);
    }
    result
}

/// After a failed run or resume: what the image holds now, in one line
/// (whether it can be resumed, and from which epoch), so that the user
/// knows what the failure cost, and a full file system named as the cause.
fn report_image(path: &Path, e: &VmmError) {
    if crate::is_out_of_space(e) {
        eprintln!(
            "nvhv: the file system holding {} is full; make room (or move the image to a larger one) and resume it",
            path.display()
        );
    }
    match crate::nvram::inspect(path) {
        Ok(r) if r.resumable => eprintln!(
            "nvhv: the image at {} is resumable from epoch {} (`nvhv resume --image {}` once the problem is fixed)",
            path.display(),
            r.epoch,
            path.display()
        ),
        Ok(r) => eprintln!(
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
fn warn_if_short(image: &Image) {
    match image.space() {
        Ok(s) if s.short() => eprintln!(
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
    Ok(Machine {
        output_hint: epochs.then(|| output_hint(&mem)).flatten(),
        vm,
        mem,
        vcpus,
        bus,
        wake,
        image,
        vsock,
        policy: epochs.then_some(cfg.runtime.epochs),
        dirty,
        last_state: None,
        parked_at_capture: None,
        brake: Arc::default(),
        throttle: None,
    })
}

/// The guest's `Hints::output_held` word.
fn output_hint(mem: &GuestMemory) -> Option<AdviceWord> {
    let at = nvhv_abi::HINTS_ADDR + std::mem::offset_of!(nvhv_abi::Hints, output_held) as u64;
    AdviceWord::new(mem, at)
}

/// `nvhv resume`: validate the image, restore the machine, run until stopped.
///
/// Guest RAM is mapped, never read or copied: the cost does not depend on RAM size.
pub fn resume(cfg: &ResumeConfig, started: Instant) -> Result<RunOutcome, VmmError> {
    reported(cfg, resume_image(cfg, started, None))
}

/// `result` of a resume of `cfg.image`, after saying what is kept and what
/// is needed if a replay or commit found no room; an image error names the
/// image.
fn reported(
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
fn resume_image(
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
enum VmSource {
    /// `KVM_CREATE_VM` on a thread of its own since the resume started.
    Creating(std::thread::JoinHandle<Result<Vm, crate::vstate::vm::VmError>>),
    /// Built by a standby before the image was free: the VM, guest RAM
    /// mapped from the image and registered with KVM, the dirty tracker.
    Ready(Box<standby::Prebuilt>),
}

/// The rest of a resume, from an image opened and locked: validate, recover,
/// restore the machine, run it. `from` starts the resume's timeline.
fn resume_opened(
    cfg: &ResumeConfig,
    from: Timeline,
    mut image: Image,
    listeners: Result<VsockConfig, VmmError>,
    source: VmSource,
) -> Result<RunOutcome, VmmError> {
    warn_if_short(&image);
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
            eprintln!(
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
    let m = Machine {
        output_hint: epochs.then(|| output_hint(&mem)).flatten(),
        vm,
        mem,
        vcpus,
        bus,
        wake,
        image,
        vsock,
        policy: epochs.then_some(policy),
        dirty,
        last_state: None,
        parked_at_capture: None,
        brake: Arc::default(),
        throttle: None,
    };
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
struct Restored<R> {
    /// Recovery's report (epoch mode).
    report: Option<R>,
    vm: Vm,
    dirty: Option<DirtyTracker>,
    vcpus: Vec<Vcpu>,
}

/// The vCPUs of `vm`, restored from `state`.
fn restore_vcpus(vm: &Vm, state: &MachineState) -> Result<Vec<Vcpu>, VmmError> {
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

/// Named instants since process start (or since a standby's image was
/// freed), for the resume and suspend breakdowns (printed at
/// `NVHV_LOG=info`).
pub struct Timeline {
    t0: Instant,
    /// What happened at `t0`, in words.
    origin: &'static str,
    marks: Vec<(&'static str, Duration)>,
}

impl Timeline {
    /// Start at `t0`, when `origin` happened.
    pub fn new(t0: Instant, origin: &'static str) -> Self {
        Timeline {
            t0,
            origin,
            marks: Vec::new(),
        }
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

    fn run(self) -> Result<RunOutcome, VmmError> {
        self.run_timed(None)
    }

    fn run_timed(mut self, mut timeline: Option<Timeline>) -> Result<RunOutcome, VmmError> {
        let (tx, rx) = std::sync::mpsc::channel::<Event>();
        // Signals: SIGTERM/SIGINT = orderly stop; SIGPWR = power-fail warning.
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            libc::SIGPWR,
        ])
        .map_err(VmmError::Signals)?;
        let sig_handle = signals.handle();
        {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    for s in signals.forever() {
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
        let ctl = control::Server::start(
            &self.image_path(),
            {
                let tx = tx.clone();
                move |reply| {
                    let _ = tx.send(Event::Suspend(Instant::now(), reply));
                }
            },
            listening,
        );
        if let Err(e) = &ctl {
            tracing::warn!("control socket unavailable (nvhv suspend will not work): {e}");
        }
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
        // Armed while the main thread sleeps with every vCPU parked: the
        // first vCPU to leave its park says so (Unparked), and the dirty
        // budget is watched again.
        let unpark_watch = Arc::new(std::sync::atomic::AtomicBool::new(false));
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
        if let Some(t) = timeline.as_mut() {
            t.mark("vCPU threads started");
            t.log("resume");
            eprintln!(
                "nvhv: resumed, guest running {:.3} ms after {}",
                t.elapsed().as_secs_f64() * 1e3,
                t.origin
            );
        } else {
            eprintln!("nvhv: running (image {})", self.image_path().display());
        }

        // 8. Wait for a reason to stop; in epoch mode, checkpoint meanwhile.
        let mut deferred: VecDeque<Event> = VecDeque::new();
        let mut stats = EpochStats::default();
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
        let (cause, t0, reply) = loop {
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
                            !unparked && output_pending.is_none() && quiet && idle(&handles) && {
                                // ORDER: arm the watch, then look again: a vCPU
                                //        leaving its park after this look sees it.
                                unpark_watch.store(true, std::sync::atomic::Ordering::SeqCst);
                                idle(&handles)
                            };
                        let idle = output_pending.is_some() && idle(&handles);
                        let wake = p.next_wake(epoch_start, output_pending, idle, parked, checked);
                        rx.recv_timeout(wake.saturating_duration_since(now))
                    }
                },
            };
            match ev {
                Ok(Event::Signal(s, t)) => break (StopCause::Signal(s), t, None),
                Ok(Event::Suspend(t, r)) => break (StopCause::Request, t, Some(r)),
                Ok(Event::Vcpu(VcpuEvent::Stopped(i, r))) => {
                    eprintln!("nvhv: guest stopped on vCPU {i}: {}", self.diagnose(&r));
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
                    let idle = output_pending.is_some() && idle(&handles);
                    let nothing_ran = self.nothing_ran(&handles);
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
                    if let Err(e) = self.epoch(&handles, &rx, &mut deferred, &mut stats, false) {
                        // Nothing after the last durable epoch was released:
                        // stopping here loses no acknowledged output.
                        for h in handles {
                            h.stop(&self.wake);
                        }
                        self.print_summary(&mut stats);
                        return Err(e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    unreachable!("the main thread holds a sender")
                }
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
                        StopCause::Signal(s) => signal_name(*s),
                        StopCause::Request => "suspend request",
                        StopCause::Guest(_) => "guest stop",
                    }
                );
                eprintln!("nvhv: {msg}");
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
        Ok(RunOutcome {
            reason: cause,
            commit_latency: latency,
        })
    }

    /// Completes `stats` with the counts kept elsewhere (the vsock device's
    /// unheld output, the throttle's brakes) and prints the summary line.
    fn print_summary(&self, stats: &mut EpochStats) {
        stats.output_unheld = self.vsock.as_ref().map_or(0, Vsock::unheld_output);
        stats.brakes = self.brake.engagements();
        eprintln!("nvhv: {}", stats.summary());
    }

    fn image_path(&self) -> PathBuf {
        self.image.path().to_path_buf()
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
    fn initial_epoch(&mut self) -> Result<(), VmmError> {
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
struct Capture {
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

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGPWR => "SIGPWR",
        _ => "signal",
    }
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
