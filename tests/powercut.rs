//! Power cuts below the file system. nvhv runs the kv guest in epoch mode
//! with its image on an ext4 whose block device records every write and
//! every flush that reaches it; the test then builds the disks a power cut
//! could have left at many points of that run, mounts each (ext4 replays
//! its journal), resumes the image on it, and checks that every write the
//! guest acknowledged before that point is there with its value.
//!
//! The block device: a loop device over the one file of a FUSE file system
//! served by this test (`Recorder`). The loop driver turns a flush (and a
//! FUA write: it has a write cache and no FUA) into `fsync` of that file,
//! and its writes reach the FUSE server one by one (write-through, direct
//! I/O), so the server sees the device's writes and flushes in an order the
//! kernel allowed. The disk a power cut could leave at flush `f`: every
//! write the server completed before `f`, and of the writes after it and
//! before the next flush any subset, each possibly cut at a 4 KiB boundary
//! (the file system's block; this is the dm-log-writes model, built in
//! user space because this machine has no device-mapper).
//!
//! What must hold at `f`: each acknowledged SET whose reply reached its
//! client while no more than `f` operations had reached the device (its
//! commit's flush then came before `f`) is present with its value; no key
//! has a value that was never written; and an image present at the path is
//! resumable (a `run` killed while making it leaves the path empty).
//!
//! CI cuts at about 38 points of 1.5 s of load; a longer run:
//! `NVHV_POWERCUT_SECONDS=10 NVHV_POWERCUT_POINTS=500 cargo test --release
//! --test powercut -- --nocapture`. Needs
//! root (FUSE, loop devices, a private mount namespace) and KVM: skipped
//! without them unless `NVHV_REQUIRE_ROOT=1` / `NVHV_REQUIRE_KVM=1`.

mod common;
mod harness;

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::{Scratch, Vmm};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    WriteFlags,
};
use harness::{Client, Reply, Rng};

/// The recorded disk's size.
const DISK: u64 = 160 << 20;
/// The unit a torn write keeps or loses (ext4's block).
const TEAR: usize = 4096;
const DISK_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(3600);

/// One operation that reached the block device.
enum Op {
    Write { off: u64, data: Vec<u8> },
    Flush,
}

/// The disk's bytes and, while recording, every operation on them.
struct Disk {
    bytes: Vec<u8>,
    ops: Vec<Op>,
    recording: bool,
}

/// The FUSE file system of one file, `disk`, backed by [`Disk`].
struct Recorder {
    disk: Arc<Mutex<Disk>>,
    /// `ops.len()`, readable without the lock: the clients stamp each
    /// acknowledgement with it.
    seen: Arc<AtomicUsize>,
}

fn attr(ino: INodeNo, kind: FileType, size: u64) -> FileAttr {
    FileAttr {
        ino,
        size,
        blocks: size / 512,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: if kind == FileType::Directory {
            0o755
        } else {
            0o600
        },
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

impl Filesystem for Recorder {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == "disk" {
            reply.entry(
                &TTL,
                &attr(DISK_INO, FileType::RegularFile, DISK),
                fuser::Generation(0),
            );
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INodeNo::ROOT => reply.attr(&TTL, &attr(ino, FileType::Directory, 0)),
            DISK_INO => reply.attr(&TTL, &attr(ino, FileType::RegularFile, DISK)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Direct I/O: every write reaches this server, none waits in a cache.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let d = self.disk.lock().unwrap();
        let start = (offset as usize).min(d.bytes.len());
        let end = (start + size as usize).min(d.bytes.len());
        reply.data(&d.bytes[start..end]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut d = self.disk.lock().unwrap();
        let start = offset as usize;
        if start + data.len() > d.bytes.len() {
            reply.error(Errno::ENOSPC);
            return;
        }
        d.bytes[start..start + data.len()].copy_from_slice(data);
        if d.recording {
            d.ops.push(Op::Write {
                off: offset,
                data: data.to_vec(),
            });
            self.seen.store(d.ops.len(), Ordering::SeqCst);
        }
        reply.written(data.len() as u32);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut d = self.disk.lock().unwrap();
        if d.recording {
            d.ops.push(Op::Flush);
            self.seen.store(d.ops.len(), Ordering::SeqCst);
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2)'s flush, not the device's: nothing to record.
        reply.ok();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// This thread's own mount namespace (mounts made here vanish with the
/// test), or None when this process may not make one (not root).
fn private_mounts() -> Option<()> {
    // SAFETY: unshare(2) and mount(2) with valid NUL-terminated strings;
    // they change only this thread's (and its children's) mount table.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    ok.then_some(())
}

/// Skips (None) or, under `NVHV_REQUIRE_ROOT=1`, fails when `missing`.
fn need(what: &str, missing: bool) -> Option<()> {
    if !missing {
        return Some(());
    }
    if std::env::var("NVHV_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!("NVHV_REQUIRE_ROOT=1 but {what} is not available");
    }
    eprintln!("SKIPPED: the power-cut test needs {what}");
    None
}

/// The value every SET of `key` writes (so any value found can be checked).
fn value_of(key: &str) -> String {
    format!("{key}:{}", "v".repeat(40))
}

/// One acknowledged SET: its key, and the device operations seen by then.
struct Ack {
    key: String,
    seen: usize,
}

/// Unique SETs from `clients` connections until `stop`; every acknowledged
/// one is stamped with the device operations seen when its reply arrived.
fn load(port: u16, clients: usize, stop: &AtomicBool, seen: &AtomicUsize) -> (Vec<Ack>, u64) {
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    let mut acks = Vec::new();
                    let mut sent = 0u64;
                    let Ok(mut cl) = Client::connect(port) else {
                        return (acks, sent);
                    };
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("pc:{c}:{n}");
                        n += 1;
                        sent += 1;
                        match cl.cmd(&[b"SET", key.as_bytes(), value_of(&key).as_bytes()]) {
                            Ok(Reply::Status(s)) if s == "OK" => acks.push(Ack {
                                key,
                                seen: seen.load(Ordering::SeqCst),
                            }),
                            Ok(r) => panic!("SET {key}: {r:?}"),
                            Err(_) => break,
                        }
                    }
                    (acks, sent)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut sent = 0;
        for w in workers {
            let (a, s) = w.join().unwrap();
            all.extend(a);
            sent += s;
        }
        (all, sent)
    })
}

/// Writes `bytes` to `path` leaving all-zero 64 KiB chunks as holes.
fn write_sparse(path: &Path, bytes: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for (i, chunk) in bytes.chunks(64 << 10).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            f.write_all_at(chunk, (i * (64 << 10)) as u64).unwrap();
        }
    }
}

/// What checking one crash disk found.
enum Outcome {
    /// No image at the path (allowed only before any acknowledgement).
    NoImage,
    /// Resumed; this many acknowledged keys checked.
    Checked(usize),
}

/// Mounts the crash disk `disk` on `mnt`, resumes the image there and checks
/// the keys in `required`; the VM is killed and the disk unmounted after.
fn check_disk(
    disk: &Path,
    mnt: &Path,
    work: &Scratch,
    required: &[&str],
    sent: u64,
    what: &str,
) -> Outcome {
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(disk)
        .arg(mnt));
    let unmount = Unmount(mnt.to_owned());
    let img = mnt.join("kv.img");
    if !img.exists() {
        assert!(
            required.is_empty(),
            "{what}: no image at the path, but {} writes were acknowledged",
            required.len()
        );
        return Outcome::NoImage;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut vm = Vmm::start(
        &[
            "resume",
            "--image",
            img.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        work.path("resume.console"),
    );
    vm.wait_stderr(what, Duration::from_secs(30), |e| e.contains("resumed"));
    let mut cl = Client::connect(port).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    for batch in required.chunks(200) {
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(batch.iter().map(|k| k.as_bytes()));
        let Ok(Reply::Array(vals)) = cl.cmd(&args) else {
            panic!("{what}: MGET failed");
        };
        for (k, v) in batch.iter().zip(vals) {
            match v {
                Reply::Bulk(Some(b)) if b == value_of(k).as_bytes() => {}
                other => panic!(
                    "{what}: acknowledged SET {k} lost or changed after the power cut: {other:?}"
                ),
            }
        }
    }
    // Nothing that was never written: every key present holds its value,
    // and there are no more keys than SETs sent.
    let Ok(Reply::Int(n)) = cl.cmd(&[b"DBSIZE"]) else {
        panic!("{what}: DBSIZE failed");
    };
    assert!(
        n as u64 >= required.len() as u64 && n as u64 <= sent,
        "{what}: {n} keys after the power cut, {} acknowledged, {sent} sent",
        required.len()
    );
    let Ok(Reply::Array(keys)) = cl.cmd(&[b"KEYS", b"*"]) else {
        panic!("{what}: KEYS failed");
    };
    let mut get: Vec<Vec<u8>> = vec![b"MGET".to_vec()];
    for k in keys.iter().take(500) {
        if let Reply::Bulk(Some(k)) = k {
            get.push(k.clone());
        }
    }
    let args: Vec<&[u8]> = get.iter().map(|a| a.as_slice()).collect();
    if let Ok(Reply::Array(vals)) = cl.cmd(&args) {
        for (k, v) in get[1..].iter().zip(vals) {
            let k = String::from_utf8_lossy(k);
            assert!(
                matches!(&v, Reply::Bulk(Some(b)) if b == value_of(&k).as_bytes()),
                "{what}: {k} holds a value never written: {v:?}"
            );
        }
    }
    drop(cl);
    vm.signal_and_wait(libc::SIGKILL);
    drop(unmount);
    Outcome::Checked(required.len())
}

/// A number from the environment variable `name`, or `default`.
fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// `umount` on drop.
struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn acknowledged_writes_survive_power_cuts_below_ext4() {
    require_kvm!();
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if need("root", !root).is_none()
        || need("/dev/fuse", !Path::new("/dev/fuse").exists()).is_none()
        || need(
            "mkfs.ext4",
            Command::new("mkfs.ext4").arg("-V").output().is_err(),
        )
        .is_none()
        || need("a private mount namespace", private_mounts().is_none()).is_none()
    {
        return;
    }
    let work = Scratch::new("powercut");
    let fuse_dir = work.path("fuse");
    let ext4_dir = work.path("ext4");
    let crash_dir = work.path("crash");
    for d in [&fuse_dir, &ext4_dir, &crash_dir] {
        std::fs::create_dir_all(d).unwrap();
    }

    // The disk: an ext4 made on a plain file, then served by the recorder.
    let made = work.path("made.ext4");
    std::fs::File::create(&made).unwrap().set_len(DISK).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&made));
    let mut bytes = std::fs::read(&made).unwrap();
    std::fs::remove_file(&made).unwrap();
    bytes.resize(DISK as usize, 0);
    let disk = Arc::new(Mutex::new(Disk {
        bytes,
        ops: Vec::new(),
        recording: false,
    }));
    let seen = Arc::new(AtomicUsize::new(0));
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![MountOption::FSName("nvhv-powercut".into())];
    let session = fuser::spawn_mount(
        Recorder {
            disk: disk.clone(),
            seen: seen.clone(),
        },
        &fuse_dir,
        &cfg,
    )
    .unwrap_or_else(|e| panic!("mounting the recording file system: {e}"));
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(fuse_dir.join("disk"))
        .arg(&ext4_dir));
    let ext4 = Unmount(ext4_dir.clone());

    // The run: recorded from before `nvhv run` makes the image, starting
    // from the disk as the mount left it.
    let initial = {
        let mut d = disk.lock().unwrap();
        d.recording = true;
        d.bytes.clone()
    };
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let img = ext4_dir.join("kv.img");
    let mut vm = Vmm::start(
        &[
            "run",
            "--image",
            img.to_str().unwrap(),
            "--mem",
            "64M",
            "--log-size",
            "8M",
            "--dirty-budget",
            "1024",
            "--listen",
            &listen,
        ],
        work.path("run.console"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while Client::connect(port).is_err() {
        assert!(
            Instant::now() < deadline,
            "nvhv never listened:\n{}",
            vm.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let stop = AtomicBool::new(false);
    let (acks, sent) = std::thread::scope(|s| {
        let l = s.spawn(|| load(port, 4, &stop, &seen));
        std::thread::sleep(Duration::from_secs_f64(env_or(
            "NVHV_POWERCUT_SECONDS",
            1.5,
        )));
        // The power cut: the VM dies with its writes where they are.
        vm.signal_and_wait(libc::SIGKILL);
        stop.store(true, Ordering::Relaxed);
        l.join().unwrap()
    });
    let ops = {
        let mut d = disk.lock().unwrap();
        d.recording = false;
        std::mem::take(&mut d.ops)
    };
    drop(ext4);
    drop(session);

    let flushes: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter_map(|(i, o)| matches!(o, Op::Flush).then_some(i))
        .collect();
    let writes = ops.len() - flushes.len();
    assert!(
        acks.len() > 100,
        "too little load to test: {} acknowledged SETs",
        acks.len()
    );
    eprintln!(
        "recorded {} writes and {} flushes; {} SETs acknowledged of {sent}",
        writes,
        flushes.len(),
        acks.len()
    );

    // Crash points: the first flushes (the image being made and published),
    // then flushes spread over the run, and the end: every recorded write
    // on the disk (a cut just after the last), where every acknowledged
    // write must be present.
    let mut points: Vec<usize> = flushes.iter().copied().take(12).collect();
    let spread = env_or("NVHV_POWERCUT_POINTS", 24.0) as usize;
    for k in 0..=spread {
        if let Some(&f) = flushes.get(flushes.len().saturating_sub(1) * k / spread) {
            points.push(f);
        }
    }
    points.push(ops.len());
    points.sort_unstable();
    points.dedup();

    let seed = 0x5eed_0c07 ^ std::process::id() as u64;
    eprintln!("torn writes drawn with seed {seed}");
    let mut rng = Rng::new(seed);
    let mut state = initial;
    let mut applied = 0;
    let crash_disk = work.path("crash.ext4");
    let (mut images, mut empty, mut torn, mut keys) = (0, 0, 0, 0);
    for (n, &f) in points.iter().enumerate() {
        // Every write before flush f (or the end) reached the disk.
        for op in &ops[applied..f] {
            if let Op::Write { off, data } = op {
                state[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
        }
        applied = f;
        let required: Vec<&str> = acks
            .iter()
            .filter(|a| a.seen <= f)
            .map(|a| a.key.as_str())
            .collect();
        // Every other point also keeps a random part of the writes in
        // flight before the next flush, cut at block boundaries.
        let mut cut = std::borrow::Cow::Borrowed(&state);
        if n % 2 == 1 && f < ops.len() {
            let next = flushes
                .iter()
                .copied()
                .find(|&g| g > f)
                .unwrap_or(ops.len());
            let s = cut.to_mut();
            for op in &ops[f + 1..next] {
                if let Op::Write { off, data } = op {
                    for (i, block) in data.chunks(TEAR).enumerate() {
                        if rng.below(2) == 0 {
                            let at = *off as usize + i * TEAR;
                            s[at..at + block.len()].copy_from_slice(block);
                        }
                    }
                }
            }
            torn += 1;
        }
        write_sparse(&crash_disk, &cut);
        let what = format!("power cut at operation {f} of {} (point {n})", ops.len());
        match check_disk(&crash_disk, &crash_dir, &work, &required, sent, &what) {
            Outcome::NoImage => empty += 1,
            Outcome::Checked(k) => {
                images += 1;
                keys += k;
            }
        }
    }
    eprintln!(
        "{} crash disks ({torn} with torn in-flight writes): {images} resumed, {keys} \
         acknowledged SETs checked; {empty} before the image was published",
        points.len()
    );
    assert!(
        images >= points.len() / 2,
        "too few crash disks held an image"
    );
    let _ = std::io::stderr().flush();
}
