//! The `nvhv` command line: parses arguments into the library's configs and
//! runs them. All the work is in the `nvhv` library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use nvhv::error_chain;
use nvhv::nvram::PersistMode;
use nvhv::vmm::{self, GuestChoice, ResumeConfig, RunConfig, RuntimeOptions};
use nvhv::vstate::vcpu::StopReason;

/// nvhv: a KVM hypervisor whose virtual machines survive power outages.
///
/// A VM's whole state lives in an image file on NVRAM (or a file emulating it:
/// tmpfs, ext4, a DAX device). `run` creates one, `suspend` (or SIGTERM/SIGPWR)
/// commits it, `resume` continues it where it stopped, `inspect` shows it.
#[derive(Parser)]
#[command(name = "nvhv", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a persistent VM in a new image and run it.
    ///
    /// Stops (committing its state to the image) on SIGTERM, SIGINT, SIGPWR,
    /// SIGHUP (its terminal went away; ignored under nohup) or
    /// `nvhv suspend --image PATH`, printing the time from the request to the
    /// durable commit. The new image appears at its path only once it is
    /// whole: a stop signal before that (Ctrl-C during a long --reserve,
    /// say) cancels the run and leaves the path as it was.
    Run(RunArgs),
    /// Continue the VM held by an image, where it stopped.
    ///
    /// Maps guest RAM from the image without reading it, replays what the
    /// redo log holds that the RAM image lacks, restores vCPU and device
    /// state, and runs: nvhv's own work does not grow with RAM size (KVM's
    /// memory-slot setup does, ~0.4 ms a GiB on our hosts). A stop signal
    /// that arrives meanwhile suspends the VM as soon as it runs.
    Resume(ResumeArgs),
    /// Ask the nvhv process running an image to suspend it (orderly commit and stop).
    ///
    /// Prints the time from the request to the durable commit. When no nvhv
    /// answers on IMAGE.ctl it fails (status 1) and says what the image
    /// holds: already suspended, left by a crash (`nvhv resume` continues
    /// it), not resumable, or missing.
    Suspend {
        /// The image the running VM uses.
        #[arg(long)]
        image: PathBuf,
    },
    /// Show what an image holds and whether it can be resumed. Never changes it.
    Inspect {
        /// The image (also accepted as `--image PATH`, as the other commands take it).
        #[arg(value_name = "PATH", required_unless_present = "image")]
        path: Option<PathBuf>,
        /// The image, like the positional PATH.
        #[arg(long, value_name = "PATH", conflicts_with = "path")]
        image: Option<PathBuf>,
        /// Print JSON (keys: format_version, ram_bytes, vcpus, epoch, resumable, reason, …).
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Path of the new image (on tmpfs, an ordinary file system, or DAX).
    #[arg(long)]
    image: PathBuf,
    /// Replace the file at the path if there is one (its contents are lost).
    /// It is kept, locked, until the new image is complete and replaces it
    /// in one step, so a run that fails or is killed first leaves it as it
    /// was.
    #[arg(long)]
    force: bool,
    /// Allocate the image's whole RAM region now, so that its file system
    /// can never fill under the running VM (a file system too small fails
    /// here). Without it the RAM region is sparse and takes room as the
    /// guest first touches its pages; if the file system fills, the guest
    /// is stopped with its last committed state kept. On tmpfs this takes
    /// the memory now (about a third of a second per GiB, progress shown);
    /// on ext4 it is quick, but the first write of each reserved block
    /// costs the file system a little more.
    #[arg(long)]
    reserve: bool,
    /// Guest RAM, e.g. 64M, 1G (suffixes K, M, G; binary units).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest to run: a built-in guest (kv: a Redis-compatible key-value
    /// store served on --listen; counter: per-vCPU counters printed on the
    /// console; ticker: LAPIC-timer ticks counted at CPL0) or the path of an
    /// ELF file following the built-in guest ABI.
    #[arg(long, default_value = "kv")]
    guest: String,
    /// Persistence mode. epoch (the default): continuous checkpoints (an
    /// epoch ends when a reply waits and --epoch-min has passed, at the dirty
    /// budget, or at --epoch-max); client output is held until the epoch
    /// that produced it is durable (except replies a guest marks as
    /// depending only on committed state, like the kv guest's reads of
    /// committed data), so a crash without warning (kill -9, power loss)
    /// loses no acknowledged write. suspend-only: guest RAM lives
    /// in the image in place, no runtime cost; state is durable only after
    /// an orderly or warned stop (SIGTERM, SIGPWR, SIGHUP, `nvhv suspend`); after a
    /// crash the image is refused.
    #[arg(long, value_enum, default_value_t = Mode::Epoch)]
    persist: Mode,
    /// Epoch mode: size of each of the two redo-log halves (one epoch's dirty
    /// pages must fit in one half). Default 128M, or less for a guest whose
    /// whole RAM, every page logged whole, fits in less (about 1.004 × --mem:
    /// then any --dirty-budget fits).
    #[arg(long, value_parser = parse_size)]
    log_size: Option<u64>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(clap::Args)]
struct ResumeArgs {
    /// The image to continue.
    #[arg(long)]
    image: PathBuf,
    /// Stand by beside the nvhv running an epoch-mode image, and take over
    /// when it crashes: set up the KVM VM and its guest RAM now (the part of
    /// a resume that grows with RAM size), wait for the image's lock without
    /// using CPU, and resume as soon as the kernel frees the lock. Only an
    /// image left by a crash is taken over: if the VM was suspended in order
    /// (nvhv suspend, SIGTERM), the standby leaves it and exits 0. If no
    /// nvhv runs the image, it is resumed at once, as without --standby (so
    /// two standbys of one image make a pair). It shares the running nvhv's
    /// listening sockets (over IMAGE.ctl) when they are the --listen/--unix
    /// addresses it would serve, so clients that connect during the takeover
    /// wait in the queue; otherwise it binds its own at the takeover. Under
    /// socket activation both processes get the same sockets anyway.
    #[arg(long)]
    standby: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(clap::Args)]
struct RuntimeArgs {
    /// Write the guest's serial console to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// TCP address where clients reach the guest's service (each connection
    /// becomes a virtio-vsock connection to the guest). Default
    /// 127.0.0.1:6380 for the kv guest; loopback only unless you say otherwise.
    /// Port 0 lets the kernel pick a free port; nvhv's "running" (or
    /// "resumed") line on stderr names the address bound. Giving it attaches
    /// the vsock device to any guest. Under socket
    /// activation (a service manager passing listening sockets with
    /// LISTEN_FDS, e.g. a systemd .socket unit) nvhv serves those instead,
    /// and --listen and --unix must not be given: such a socket outlives
    /// nvhv, so clients connecting between a crash and the resume wait in
    /// its queue instead of being refused.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// Also accept client connections on this Unix socket.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Epoch mode: shortest epoch while replies wait for durability (group
    /// commit window), e.g. 500us, 1ms.
    #[arg(long, default_value = "100us", value_parser = parse_duration)]
    epoch_min: Duration,
    /// Epoch mode: longest epoch (checkpoint interval when no output waits).
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    epoch_max: Duration,
    /// Epoch mode: most dirty pages (4 KiB) one epoch may log: at least 1,
    /// and, unless a redo-log half holds all of guest RAM, at most three
    /// quarters of what a half holds (24 489 with a 128M --log-size; the rest
    /// is room for what the guest writes between a budget check and the
    /// capture). `resume` lowers a budget the image's log cannot hold to that
    /// limit, and says so. Checked every 2 ms between epochs and every 1 ms
    /// while an epoch commits; a guest that reaches it during a commit is
    /// held back until the next epoch. Hot pages count toward it.
    #[arg(long, default_value_t = 16384)]
    dirty_budget: usize,
    /// Epoch mode: most pages left writable between epochs. A re-protected
    /// page costs ~20 µs on its next write here; a hot page costs a ~0.25 µs
    /// compare per epoch. A page stays hot for 2 unchanged epochs the first
    /// time, then 32, or 64 if it keeps coming back; beyond this budget the longest
    /// unchanged go first. The budget bounds the compares of one pause
    /// (~2–4 ms with 8 192 pages all hot) and the shadow copies (4 KiB a
    /// page). 0 re-protects everything every epoch.
    #[arg(long, default_value_t = nvhv::vmm::DEFAULT_HOT_PAGES)]
    hot_pages: usize,
    /// Epoch mode: hold every reply until the epoch that produced it
    /// commits. By default a reply the guest marks as depending only on
    /// committed state (the kv guest: a reply on a connection whose
    /// replies so far read or wrote only committed keys) goes out at once;
    /// either way no client sees anything a crash can take back.
    #[arg(long)]
    hold_all_output: bool,
    /// How long an idle vCPU (its guest parked, waiting for a request) and
    /// the vsock device thread keep polling for new work before they sleep,
    /// e.g. 50us; 0 sleeps at once. Default: 200us for a vCPU, 100us for the
    /// device. Waking a sleeping thread costs ~30–50 µs on a nested host:
    /// one client's SETs in epoch mode ran 1.4–1.7× as fast with the defaults
    /// as with 0 (tmpfs and ext4). Polling costs CPU while requests come, not
    /// while the VM is idle. Use 0 on hosts where cores are scarce.
    #[arg(long, value_name = "DURATION", value_parser = parse_poll)]
    idle_poll: Option<Duration>,
    /// Epoch mode: give back nvhv's private copy of a guest page once its
    /// committed bytes have been in the image this long and the guest has
    /// not written it since, e.g. 500ms, 10s; 0 as soon as possible; off:
    /// never. Guest RAM is a copy-on-write mapping of the image, so every
    /// page the guest writes is otherwise held twice (on tmpfs, twice in
    /// memory). A given-back page reads the image again; the next write to
    /// it copies it again. A page is given back between one and two of
    /// these after its last write to the image. Under uniformly random SETs
    /// over a million keys, 10s and 2s kept 29% and 17% of the anonymous
    /// memory that off did, at the same throughput within this machine's
    /// noise.
    #[arg(long, value_name = "DURATION|off", default_value = "10s", value_parser = parse_give_back)]
    give_back_after: GiveBack,
}

/// `--give-back-after`: a duration, 0, or off.
#[derive(Clone, Copy, Debug)]
struct GiveBack(Option<Duration>);

fn parse_give_back(s: &str) -> Result<GiveBack, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(GiveBack(None));
    }
    parse_duration_or_zero(s).map(|d| GiveBack(Some(d)))
}

/// `--idle-poll`: 0 (with a unit or without), or a duration up to 1 s.
fn parse_poll(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d > Duration::from_secs(1) {
        return Err(format!("'{s}' is longer than 1s"));
    }
    Ok(d)
}

/// [`parse_duration`], or zero (`0`, with or without a unit).
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let number = s.trim().trim_end_matches(|c: char| c.is_alphabetic());
    if number.parse::<f64>() == Ok(0.0) {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("'{s}' needs a unit: us, ms or s"))?;
    let v: f64 = s[..split]
        .parse()
        .map_err(|_| format!("'{s}' is not a duration"))?;
    let mult = match &s[split..] {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        u => return Err(format!("unknown duration unit '{u}' (use us, ms, s)")),
    };
    let d = Duration::from_secs_f64(v * mult);
    if d.is_zero() || d > Duration::from_secs(60) {
        return Err(format!("'{s}' must be between 1us and 60s"));
    }
    Ok(d)
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Flush-on-fail: durable on orderly or warned stops only.
    SuspendOnly,
    /// Continuous epochs with output commit: survives crashes without warning.
    Epoch,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let m = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit '{}' (use K, M, G)", &s[i..])),
            };
            (&s[..i], m)
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 64M, 1G)"))?;
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("size '{s}' is zero or too large"))
}

fn runtime(a: RuntimeArgs, inherited: vmm::listeners::Inherited) -> RuntimeOptions {
    RuntimeOptions {
        console: a.console,
        listen: a.listen,
        unix: a.unix,
        epochs: nvhv::vmm::EpochPolicy {
            min: a.epoch_min,
            max: a.epoch_max,
            dirty_budget: a.dirty_budget,
            hot_pages: a.hot_pages,
            give_back_after: a.give_back_after.0,
        },
        hold_all_output: a.hold_all_output,
        inherited,
        idle_poll: a.idle_poll,
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    // Listening sockets a service manager passed (socket activation), taken
    // before any thread starts: taking them changes the environment.
    let inherited = vmm::listeners::Inherited::from_env().map_err(|e| error_chain(&e));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NVHV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result: Result<(), String> = match cli.cmd {
        Cmd::Run(a) => inherited.and_then(|inherited| {
            let guest = if nvhv::guests::builtin(&a.guest).is_some() {
                GuestChoice::Builtin(a.guest)
            } else if std::path::Path::new(&a.guest).exists() {
                GuestChoice::File(a.guest.into())
            } else {
                GuestChoice::Builtin(a.guest)
            };
            let cfg = RunConfig {
                image: a.image,
                overwrite: a.force,
                mem: a.mem,
                vcpus: a.vcpus,
                guest,
                persist: match a.persist {
                    Mode::SuspendOnly => PersistMode::SuspendOnly,
                    Mode::Epoch => PersistMode::Epoch,
                },
                log_half_bytes: a.log_size,
                reserve_ram: a.reserve,
                runtime: runtime(a.runtime, inherited),
            };
            stop_status(vmm::run(&cfg))
        }),
        Cmd::Resume(a) => inherited.and_then(|inherited| {
            let cfg = ResumeConfig {
                image: a.image,
                runtime: runtime(a.runtime, inherited),
            };
            if !a.standby {
                return stop_status(vmm::resume(&cfg, started));
            }
            match vmm::standby(&cfg, started) {
                Ok(vmm::StandbyEnd::Resumed(outcome)) => stop_status(Ok(outcome)),
                Ok(vmm::StandbyEnd::NotCrashed(status)) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "nvhv: standby: {} was freed with status {status}, not left by a crash; not resuming it",
                        cfg.image.display()
                    );
                    Ok(())
                }
                Err(e) => stop_status(Err(e)),
            }
        }),
        Cmd::Suspend { image } => vmm::control::request_suspend(&image, Duration::from_secs(30))
            .map(|reply| println!("{reply}"))
            .map_err(|e| match e {
                vmm::control::ControlError::NotRunning(_) => nothing_to_suspend(&image, &e),
                _ => error_chain(&e),
            }),
        Cmd::Inspect { path, image, json } => {
            inspect(&path.or(image).expect("clap requires PATH or --image"), json)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            // Not eprintln!, which panics when stderr is a terminal that
            // went away (after a SIGHUP): the exit status must stay 1.
            let _ = writeln!(std::io::stderr(), "nvhv: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `nvhv inspect`: the report on the image at `path`, as text or JSON.
fn inspect(path: &std::path::Path, json: bool) -> Result<(), String> {
    let r = nvhv::nvram::inspect(path).map_err(|e| error_chain(&e))?;
    let text = if json {
        serde_json::to_string_pretty(&r).expect("report serializes")
    } else {
        r.to_string()
    };
    // A reader that stops early (`| head`) is not an error.
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("writing the report: {e}"))
        }
        _ => Ok(()),
    }
}

/// Why `nvhv suspend` found no nvhv to ask, from what the image at `image`
/// says: missing, held by a process that does not answer, already
/// suspended, or left by a crash (then `resume` continues it).
fn nothing_to_suspend(image: &std::path::Path, e: &vmm::control::ControlError) -> String {
    let said = error_chain(e);
    let r = match nvhv::nvram::inspect(image) {
        Ok(r) => r,
        Err(ie) => return format!("{said}: {}", error_chain(&ie)),
    };
    if r.in_use {
        return format!(
            "{said}, yet the image is in use: a standby waiting on it, or an nvhv that is \
             starting or stopping"
        );
    }
    match (r.status, r.resumable) {
        (nvhv::nvram::Status::Suspended, _) => {
            format!("{said}: the image is already suspended (epoch {})", r.epoch)
        }
        (_, true) => format!(
            "{said}: its last nvhv stopped without a suspend (a crash or a kill); `nvhv \
             resume --image {}` continues it from epoch {}",
            image.display(),
            r.epoch
        ),
        (_, false) => format!(
            "{said}: the image is not resumable ({})",
            r.reason.as_deref().unwrap_or("no reason given")
        ),
    }
}

/// The exit status of a run or resume: a guest that could not be run any
/// more (`KVM_RUN` failed, say for a full file system) is a failure even
/// though its state was committed; an orderly stop or the guest's own exit
/// is not.
fn stop_status(r: Result<vmm::RunOutcome, vmm::VmmError>) -> Result<(), String> {
    match r {
        Ok(vmm::RunOutcome {
            reason: vmm::StopCause::Guest(r @ StopReason::RunFailed(_)),
            ..
        }) => Err(format!(
            "the VM could not go on ({}); its state is committed",
            vmm::describe(&r)
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(error_chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_give_back, parse_poll, parse_size};
    use std::time::Duration;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn idle_poll_takes_zero_or_up_to_a_second() {
        assert_eq!(parse_poll("0"), Ok(Duration::ZERO));
        assert_eq!(parse_poll("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_poll("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_poll("2s").is_err());
        assert_eq!(parse_poll("0us"), Ok(Duration::ZERO));
        assert!(parse_poll("50").is_err(), "a unit is needed");
        assert!(parse_poll("-1ms").is_err());
    }

    #[test]
    fn give_back_after_takes_a_duration_zero_or_off() {
        let p = |s| parse_give_back(s).map(|g| g.0);
        assert_eq!(p("2s"), Ok(Some(Duration::from_secs(2))));
        assert_eq!(p("500ms"), Ok(Some(Duration::from_millis(500))));
        assert_eq!(p("0"), Ok(Some(Duration::ZERO)));
        assert_eq!(p("off"), Ok(None));
        assert_eq!(p("OFF"), Ok(None));
        assert!(p("2").is_err(), "a unit is needed");
        assert!(p("never").is_err());
        assert!(p("61s").is_err());
    }
}
