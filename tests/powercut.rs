//! Power cuts below the file system. nvhv runs the kv guest with its image
//! on an ext4 whose block device records every write and every flush that
//! reaches it; the test then builds the disks a power cut could have left
//! at many points of that run, mounts each (ext4 replays its journal),
//! resumes the image on it, and checks what the clients were told.
//!
//! The block device: a loop device over the one file of a FUSE file system
//! served by this test (`Recorder`). The loop driver turns a flush (and a
//! FUA write: it has a write cache and no FUA) into `fsync` of that file,
//! and its writes reach the FUSE server one by one (direct I/O), so the
//! server sees the device's writes and flushes in an order the kernel
//! allowed. The disk a power cut could leave at flush `f`: every write the
//! server completed before `f`, and of the writes after it and before the
//! next flush any subset, each possibly cut at 4 KiB boundaries (this is
//! the dm-log-writes model, built in user space because this machine has no
//! device-mapper). Each cut point gives the disk without those writes and
//! disks with random parts of them.
//!
//! The runs and what must hold at `f`:
//! - epoch mode, `run` under SETs from 4 clients, SIGKILLed: each SET whose
//!   reply reached its client while no more than `f` operations had reached
//!   the device (its commit's flush then came before `f`) is present with
//!   its value; no key holds a value never written; an image present at the
//!   path resumes (a `run` cut while making it leaves the path empty);
//! - the disk that run left, resumed (recovery writes) and loaded again,
//!   SIGKILLed: every SET acknowledged in the first run at every point, and
//!   the new ones as above;
//! - suspend-only mode, three sessions each ended by SIGTERM, the third
//!   recorded: before its commit the image may be refused as not
//!   resumable, but an image that resumes holds every acknowledged SET;
//! - `run --force` over a suspended image, under SETs, SIGKILLed: the path
//!   holds the old image with all it acknowledged, or the new one as above,
//!   never nothing;
//! - epoch mode on a `run --reserve` image (its RAM region unwritten
//!   extents, converted by the first write of each block), SIGKILLed: as
//!   the first run.
//!
//! CI: 1.5 s of load, about 38 cut points in the first run. Longer:
//! `NVHV_POWERCUT_SECONDS=10 NVHV_POWERCUT_POINTS=500 cargo test --release
//! --test powercut -- --nocapture`; `NVHV_POWERCUT_ARGS="--give-back-after
//! 0"` adds options to the epoch run's `nvhv run`. Needs root (FUSE, loop devices, a
//! private mount namespace) and KVM: skipped without them unless
//! `NVHV_REQUIRE_ROOT=1` / `NVHV_REQUIRE_KVM=1`.

mod common;
mod harness;

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::{private_mount_namespace, run_ok as run, Scratch, Vmm};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    WriteFlags,
};
use harness::{Client, Reply, Rng};

/// The recorded disk's size.
const DISK: u64 = 160 << 20;
/// The pieces a torn write is kept or lost in, from the write's start (4
/// of ext4's 1 KiB blocks on a disk this small; never a part of a sector).
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
    /// Writes the device is to fail.
    fail: Arc<Mutex<Failure>>,
}

/// A failing stretch of the device: the next `left` writes that touch any
/// of `ranges` (byte ranges of the device) fail with EIO and change
/// nothing; then it works again. Flushes never fail.
#[derive(Default)]
struct Failure {
    ranges: Vec<std::ops::Range<u64>>,
    left: usize,
    /// Writes failed so far.
    failed: usize,
}

impl Failure {
    /// Whether the write of `len` bytes at `off` fails (and counts it).
    fn fails(&mut self, off: u64, len: usize) -> bool {
        let hit = self.left > 0
            && self
                .ranges
                .iter()
                .any(|r| off < r.end && r.start < off + len as u64);
        if hit {
            self.left -= 1;
            self.failed += 1;
        }
        hit
    }
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
        if self.fail.lock().unwrap().fails(offset, data.len()) {
            reply.error(Errno::EIO);
            return;
        }
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

/// Unique SETs (keys `TAG:CLIENT:N`) from `clients` connections until
/// `stop`; every acknowledged one is stamped with the device operations
/// seen when its reply arrived.
fn load(
    port: u16,
    tag: &str,
    clients: usize,
    stop: &AtomicBool,
    seen: &AtomicUsize,
) -> (Vec<Ack>, u64) {
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
                        let key = format!("{tag}:{c}:{n}");
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
    /// `resume` refused the image as not resumable (allowed where the
    /// scenario says so).
    Refused,
    /// Resumed; this many acknowledged keys checked, and whether the image
    /// was the older one ([`Expect::or_older`]).
    Checked(usize, bool),
}

/// What a crash disk must show.
struct Expect<'a> {
    /// Keys whose SET was acknowledged before the cut.
    required: Vec<&'a str>,
    /// An older image that may still be at the path instead (a `run
    /// --force` cut before it replaced it): when its first key is there,
    /// these keys must be, not `required`; and there is always an image.
    or_older: Option<&'a [&'a str]>,
    /// SETs sent in all, a bound on the keys there may be.
    sent: u64,
    /// Whether the image may be missing or refused as not resumable (the
    /// acknowledged writes need then not be anywhere).
    may_refuse: bool,
}

/// Mounts the crash disk `disk` on `mnt`, resumes the image there and checks
/// it against `expect`; the VM is killed and the disk unmounted after.
fn check_disk(disk: &Path, mnt: &Path, work: &Scratch, expect: &Expect, what: &str) -> Outcome {
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(disk)
        .arg(mnt));
    let unmount = Unmount(mnt.to_owned());
    let img = mnt.join("kv.img");
    if !img.exists() {
        assert!(
            expect.or_older.is_none() && (expect.required.is_empty() || expect.may_refuse),
            "{what}: no image at the path, but {} writes were acknowledged",
            expect.required.len()
        );
        return Outcome::NoImage;
    }
    // Port 0: the kernel picks a free port as nvhv binds it, and nvhv's
    // resumed line says which.
    let mut vm = Vmm::start(
        &[
            "resume",
            "--image",
            img.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        work.path("resume.console"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.child.try_wait().is_ok_and(|s| s.is_none())
        && !vm.stderr_text().contains("resumed")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !vm.stderr_text().contains("resumed") {
        let Ok(Some(status)) = vm.child.try_wait() else {
            panic!("{what}: no resume in 30 s:\n{}", vm.stderr_text());
        };
        let err = vm.stderr_text();
        assert!(
            expect.may_refuse && !status.success() && err.contains("not resumable"),
            "{what}: resume failed ({status}):\n{err}"
        );
        return Outcome::Refused;
    }
    let port = vm.bound_port(Duration::from_secs(1));
    let mut cl = Client::connect(port).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    let older = expect.or_older.filter(|older| {
        matches!(
            cl.cmd(&[b"GET", older[0].as_bytes()]),
            Ok(Reply::Bulk(Some(_)))
        )
    });
    let required = older.unwrap_or(&expect.required);
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
        n as u64 >= required.len() as u64 && n as u64 <= expect.sent,
        "{what}: {n} keys after the power cut, {} acknowledged, {} sent",
        required.len(),
        expect.sent
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
    Outcome::Checked(required.len(), older.is_some())
}

/// One recorded run: the disk as the recording began, and every operation
/// that reached it after.
struct Recording {
    initial: Vec<u8>,
    ops: Vec<Op>,
}

impl Recording {
    /// The indices of the flushes.
    fn flushes(&self) -> Vec<usize> {
        self.ops
            .iter()
            .enumerate()
            .filter_map(|(i, o)| matches!(o, Op::Flush).then_some(i))
            .collect()
    }

    /// The disk with every recorded write applied (a cut just after the
    /// last).
    fn end(&self) -> Vec<u8> {
        let mut d = self.initial.clone();
        apply(&mut d, &self.ops);
        d
    }
}

fn apply(disk: &mut [u8], ops: &[Op]) {
    for op in ops {
        if let Op::Write { off, data } = op {
            disk[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
    }
}

/// Serves `bytes` as a block device (a loop device over the recorder's
/// FUSE file), mounts its ext4, and runs `body` on the mounted directory
/// while every write and flush reaching the device is recorded; `body` gets
/// the count of operations seen so far, to stamp acknowledgements with.
fn record<T>(
    work: &Scratch,
    tag: &str,
    bytes: Vec<u8>,
    body: impl FnOnce(&Path, &AtomicUsize) -> T,
) -> (Recording, T) {
    record_failing(work, tag, bytes, Arc::default(), body)
}

/// [`record`], the device failing the writes `fail` says.
fn record_failing<T>(
    work: &Scratch,
    tag: &str,
    bytes: Vec<u8>,
    fail: Arc<Mutex<Failure>>,
    body: impl FnOnce(&Path, &AtomicUsize) -> T,
) -> (Recording, T) {
    let fuse_dir = work.path(&format!("{tag}.fuse"));
    let ext4_dir = work.path(&format!("{tag}.ext4"));
    for d in [&fuse_dir, &ext4_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
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
            fail,
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
    // Recorded from the disk as the mount left it (after ext4 replayed its
    // journal, if it had to).
    let initial = {
        let mut d = disk.lock().unwrap();
        d.recording = true;
        d.bytes.clone()
    };
    let out = body(&ext4_dir, &seen);
    let ops = {
        let mut d = disk.lock().unwrap();
        d.recording = false;
        std::mem::take(&mut d.ops)
    };
    drop(ext4);
    drop(session);
    (Recording { initial, ops }, out)
}

/// A fresh ext4 of [`DISK`] bytes.
fn fresh_ext4(work: &Scratch) -> Vec<u8> {
    let made = work.path("made.ext4");
    std::fs::File::create(&made).unwrap().set_len(DISK).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&made));
    let mut bytes = std::fs::read(&made).unwrap();
    std::fs::remove_file(&made).unwrap();
    bytes.resize(DISK as usize, 0);
    bytes
}

/// Starts nvhv with `args` (the image is `DIR/kv.img`, served on a port the
/// kernel picks as nvhv binds it) and waits until it listens; returns it
/// and the port.
fn serve(work: &Scratch, dir: &Path, args: &[&str]) -> (Vmm, u16) {
    serve_under(work, dir, &[], args)
}

/// [`serve`], nvhv run by `wrapper` (`common::nvhv_under`).
fn serve_under(work: &Scratch, dir: &Path, wrapper: &[&str], args: &[&str]) -> (Vmm, u16) {
    let img = dir.join("kv.img");
    let mut all = vec![args[0], "--image", img.to_str().unwrap()];
    all.extend(&args[1..]);
    all.extend(["--listen", "127.0.0.1:0"]);
    let mut vm = Vmm::start_under(wrapper, &all, work.path(&format!("{}.console", args[0])));
    // nvhv binds before it says where clients connect.
    let port = vm.bound_port(Duration::from_secs(30));
    (vm, port)
}

/// [`serve`], then SETs from 4 clients for `secs` (keys `TAG:…`), then
/// `signal`; waits for nvhv to exit.
fn serve_and_stop(
    work: &Scratch,
    dir: &Path,
    args: &[&str],
    tag: &str,
    secs: f64,
    signal: i32,
    seen: &AtomicUsize,
) -> (Vec<Ack>, u64) {
    let (mut vm, port) = serve(work, dir, args);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let l = s.spawn(|| load(port, tag, 4, &stop, seen));
        std::thread::sleep(Duration::from_secs_f64(secs));
        let status = vm.signal_and_wait(signal);
        if signal != libc::SIGKILL {
            assert!(
                status.success(),
                "nvhv stopped with {status}:\n{}",
                vm.stderr_text()
            );
        }
        stop.store(true, Ordering::Relaxed);
        l.join().unwrap()
    })
}

/// Cuts `rec` at its first and last `edge` flushes, at `spread` + 1 flushes
/// spread over it, and at its end. Each point gives 1 + `subsets` crash
/// disks: every write before it, and that with random parts of the writes
/// then in flight (up to the next flush), each cut at [`TEAR`] blocks. Each crash disk is checked against `expect(f)`, `f` being the
/// operations before the cut. Prints and returns what the disks showed:
/// (no image, refused, resumed, acknowledged SETs checked, resumed the
/// older image).
fn cut_and_check<'a>(
    work: &Scratch,
    rec: &Recording,
    edge: usize,
    spread: usize,
    subsets: usize,
    expect: impl Fn(usize) -> Expect<'a>,
) -> [usize; 5] {
    cut_and_check_after(work, rec, edge, spread, subsets, (&[], 0), expect)
}

/// [`cut_and_check`], cut also at the last flush before each operation
/// index in `after` and the `dense` - 1 after it.
fn cut_and_check_after<'a>(
    work: &Scratch,
    rec: &Recording,
    edge: usize,
    spread: usize,
    subsets: usize,
    (after, dense): (&[usize], usize),
    expect: impl Fn(usize) -> Expect<'a>,
) -> [usize; 5] {
    let ops = &rec.ops;
    let flushes = rec.flushes();
    let mut points: Vec<usize> = flushes.iter().copied().take(edge).collect();
    points.extend(flushes.iter().rev().copied().take(edge));
    for &a in after {
        // From the last flush before `a`: its cut has in flight what was
        // written after it, up to the first flush after `a`.
        let from = flushes.partition_point(|&f| f < a).saturating_sub(1);
        points.extend(flushes[from..].iter().copied().take(dense));
    }
    for k in 0..=spread {
        if let Some(&f) = flushes.get(flushes.len().saturating_sub(1) * k / spread.max(1)) {
            points.push(f);
        }
    }
    points.push(ops.len());
    points.sort_unstable();
    points.dedup();

    let seed = 0x5eed_0c07 ^ std::process::id() as u64 ^ ops.len() as u64;
    let mut rng = Rng::new(seed);
    let mut state = rec.initial.clone();
    let mut applied = 0;
    let crash_dir = work.path("crash");
    std::fs::create_dir_all(&crash_dir).unwrap();
    let crash_disk = work.path("crash.ext4");
    let mut found = [0; 5];
    let (mut disks, mut torn) = (0, 0);
    for (n, &f) in points.iter().enumerate() {
        // Every write before flush f (or the end) reached the disk.
        apply(&mut state, &ops[applied..f]);
        applied = f;
        // The writes then in flight: those before the next flush.
        let next = flushes
            .iter()
            .copied()
            .find(|&g| g > f)
            .unwrap_or(ops.len());
        let in_flight = ops.get(f + 1..next).unwrap_or_default();
        // The cut with none of them, then `subsets` with a random part of
        // them, each write cut at block boundaries, a block kept with a
        // probability of 7/8, 1/2 or 1/8 in turn (so that both "nearly all
        // but one" and "nearly none but one" come up).
        for tear in 0..=subsets {
            let mut cut = std::borrow::Cow::Borrowed(&state);
            if tear > 0 {
                if !in_flight.iter().any(|op| matches!(op, Op::Write { .. })) {
                    break;
                }
                let keep = [7, 4, 1][(n + tear) % 3];
                let s = cut.to_mut();
                for op in in_flight {
                    if let Op::Write { off, data } = op {
                        for (i, block) in data.chunks(TEAR).enumerate() {
                            if rng.below(8) < keep {
                                let at = *off as usize + i * TEAR;
                                s[at..at + block.len()].copy_from_slice(block);
                            }
                        }
                    }
                }
                torn += 1;
            }
            disks += 1;
            write_sparse(&crash_disk, &cut);
            let what = format!(
                "power cut at operation {f} of {} (point {n}{}, seed {seed})",
                ops.len(),
                if tear > 0 {
                    ", writes in flight torn"
                } else {
                    ""
                }
            );
            match check_disk(&crash_disk, &crash_dir, work, &expect(f), &what) {
                Outcome::NoImage => found[0] += 1,
                Outcome::Refused => found[1] += 1,
                Outcome::Checked(k, older) => {
                    found[2] += 1;
                    found[3] += k;
                    found[4] += usize::from(older);
                }
            }
        }
    }
    eprintln!(
        "{} writes and {} flushes recorded; {} cut points, {disks} crash disks ({torn} with \
         torn in-flight writes): {} without an image, {} refused as not resumable, {} \
         resumed ({} of them the older image) with {} acknowledged SETs checked",
        ops.len() - flushes.len(),
        flushes.len(),
        points.len(),
        found[0],
        found[1],
        found[2],
        found[4],
        found[3]
    );
    found
}

/// Whether this process can run the test (root, FUSE, mkfs.ext4, a private
/// mount namespace for this thread); prints why not, or fails under
/// `NVHV_REQUIRE_ROOT=1`.
fn can_run() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    need("root", !root).is_some()
        && need("/dev/fuse", !Path::new("/dev/fuse").exists()).is_some()
        && need(
            "mkfs.ext4",
            Command::new("mkfs.ext4").arg("-V").output().is_err(),
        )
        .is_some()
        && need(
            "a private mount namespace",
            private_mount_namespace().is_err(),
        )
        .is_some()
}

/// The acknowledged keys stamped with at most `f` operations.
fn acked_by(acks: &[Ack], f: usize) -> impl Iterator<Item = &str> {
    acks.iter()
        .filter(move |a| a.seen <= f)
        .map(|a| a.key.as_str())
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

/// `nvhv run` of the epoch-mode runs: a small VM whose log halves fill and
/// are reused within the run.
const EPOCH_RUN: [&str; 7] = [
    "run",
    "--mem",
    "64M",
    "--log-size",
    "8M",
    "--dirty-budget",
    "1024",
];

/// Epoch mode, killed under load (the power cut), then the resume of the
/// disk that left, itself cut while it recovers and serves more SETs.
#[test]
fn acknowledged_writes_survive_power_cuts_below_ext4() {
    require_kvm!();
    if !can_run() {
        return;
    }
    let work = Scratch::new("powercut");
    let secs = env_or("NVHV_POWERCUT_SECONDS", 1.5);
    let spread = env_or("NVHV_POWERCUT_POINTS", 24.0) as usize;
    let extra = std::env::var("NVHV_POWERCUT_ARGS").unwrap_or_default();
    let mut epoch = EPOCH_RUN.to_vec();
    epoch.extend(extra.split_whitespace());
    let (rec, (acks, sent)) = record(&work, "run", fresh_ext4(&work), |dir, seen| {
        serve_and_stop(&work, dir, &epoch, "run", secs, libc::SIGKILL, seen)
    });
    assert!(
        acks.len() > 100,
        "too little load: {} SETs acknowledged",
        acks.len()
    );
    eprintln!("run: {} SETs acknowledged of {sent}", acks.len());
    // The image being made and published, then the run.
    cut_and_check_run(&work, &rec, (12, spread), &acks, sent);

    // The disk the run left, resumed: its recovery's own writes are cut too,
    // and every write acknowledged before must hold at every point.
    let (rec2, (acks2, sent2)) = record(&work, "resume", rec.end(), |dir, seen| {
        serve_and_stop(
            &work,
            dir,
            &["resume"],
            "resume",
            secs / 3.0,
            libc::SIGKILL,
            seen,
        )
    });
    assert!(!acks2.is_empty(), "no SET acknowledged after the resume");
    eprintln!("resume: {} SETs acknowledged of {sent2}", acks2.len());
    let found = cut_and_check(&work, &rec2, 12, spread / 2, 1, |f| Expect {
        required: acked_by(&acks, usize::MAX)
            .chain(acked_by(&acks2, f))
            .collect(),
        or_older: None,
        sent: sent + sent2,
        may_refuse: false,
    });
    assert_eq!(
        found[0] + found[1],
        0,
        "the resumed image went missing: {found:?}"
    );
}

/// Suspend-only mode: a VM made, loaded and suspended (SIGTERM), then
/// twice resumed, loaded and suspended again, the last session recorded: by
/// then both state slots and the RAM blocks are allocated, and its suspend
/// overwrites them in place. A power cut before that suspend's commit
/// leaves an image `resume` refuses as not resumable, never one that
/// resumes without an acknowledged write.
#[test]
fn a_suspend_only_image_cut_before_its_commit_is_refused_never_wrong() {
    require_kvm!();
    if !can_run() {
        return;
    }
    let work = Scratch::new("powercut-so");
    let mut disk = fresh_ext4(&work);
    let (mut earlier, mut sent) = (Vec::new(), 0);
    let mut last = None;
    for (session, args) in [
        &["run", "--mem", "64M", "--persist", "suspend-only"][..],
        &["resume"],
        &["resume"],
    ]
    .into_iter()
    .enumerate()
    {
        let (rec, (a, n)) = record(&work, args[0], disk, |dir, seen| {
            serve_and_stop(
                &work,
                dir,
                args,
                &format!("s{session}"),
                0.5,
                libc::SIGTERM,
                seen,
            )
        });
        assert!(!a.is_empty(), "no SET acknowledged in session {session}");
        sent += n;
        disk = rec.end();
        if let Some((_, before)) = last.replace((rec, a)) {
            earlier.extend(before);
        }
    }
    let (rec, acks) = last.unwrap();
    let end = rec.ops.len();
    // Before the end, the acknowledged SETs may be missing only because the
    // image is refused: a resumable image holds them all (the last
    // session's from the first it acknowledged: before that the path may
    // hold the image as the session before left it).
    let found = cut_and_check(&work, &rec, 12, 12, 6, |f| Expect {
        required: acked_by(&earlier, usize::MAX)
            .chain(acked_by(&acks, f))
            .collect(),
        or_older: None,
        sent,
        may_refuse: f < end,
    });
    assert!(found[1] > 0, "no crash disk was refused: {found:?}");
    assert_eq!(found[0], 0, "the image went missing: {found:?}");
}

/// `run --force` over an image in use for a while (suspended), cut
/// anywhere: the path holds the old image, resumable with everything it
/// acknowledged, or the new one with what the new VM acknowledged before the
/// cut; never nothing, never a mix.
#[test]
fn run_force_cut_anywhere_leaves_the_old_image_or_the_new_one() {
    require_kvm!();
    if !can_run() {
        return;
    }
    let work = Scratch::new("powercut-force");
    let args = EPOCH_RUN;
    let (rec, (old, sent_old)) = record(&work, "old", fresh_ext4(&work), |dir, seen| {
        serve_and_stop(&work, dir, &args, "old", 0.5, libc::SIGTERM, seen)
    });
    let force: Vec<&str> = args.iter().copied().chain(["--force"]).collect();
    let (rec, (new, sent_new)) = record(&work, "new", rec.end(), |dir, seen| {
        serve_and_stop(&work, dir, &force, "new", 0.5, libc::SIGKILL, seen)
    });
    assert!(!old.is_empty() && !new.is_empty(), "no SET acknowledged");
    let older: Vec<&str> = acked_by(&old, usize::MAX).collect();
    let found = cut_and_check(&work, &rec, 12, 12, 1, |f| Expect {
        required: acked_by(&new, f).collect(),
        or_older: Some(&older),
        sent: sent_old + sent_new,
        may_refuse: false,
    });
    assert_eq!(
        found[0] + found[1],
        0,
        "the path held no resumable image: {found:?}"
    );
    assert!(
        found[4] > 0 && found[4] < found[2],
        "the cuts missed the replacement (old image on {} disks of {}): {found:?}",
        found[4],
        found[2]
    );
}

/// Epoch mode on an image made with `--reserve`: its RAM region is
/// allocated up front as unwritten extents, so the first write of each
/// block converts an extent (a metadata change the journal carries) instead
/// of allocating one. Killed under load; every cut holds what was
/// acknowledged before it.
#[test]
fn a_reserved_image_keeps_acknowledged_writes_through_power_cuts() {
    require_kvm!();
    if !can_run() {
        return;
    }
    let work = Scratch::new("powercut-reserve");
    let args: Vec<&str> = EPOCH_RUN.iter().copied().chain(["--reserve"]).collect();
    let (rec, ((acks, sent), allocated)) =
        record(&work, "reserve", fresh_ext4(&work), |dir, seen| {
            let out = serve_and_stop(&work, dir, &args, "rsv", 1.0, libc::SIGKILL, seen);
            let meta = std::fs::metadata(dir.join("kv.img")).unwrap();
            (out, std::os::unix::fs::MetadataExt::blocks(&meta) * 512)
        });
    // The kv guest touches only part of its 64 MiB in a second: an image
    // holding all of it was reserved, not written.
    assert!(
        allocated >= 64 << 20,
        "the image has {allocated} bytes allocated: not reserved"
    );
    assert!(!acks.is_empty(), "no SET acknowledged");
    eprintln!("reserve: {} SETs acknowledged of {sent}", acks.len());
    cut_and_check_run(&work, &rec, (8, 12), &acks, sent);
}

/// [`cut_and_check`] (one torn variant a point) of a recorded `run` from a
/// fresh file system: every SET in `acks` acknowledged before a cut must
/// be there, and more of the crash disks must hold an image than not.
fn cut_and_check_run(
    work: &Scratch,
    rec: &Recording,
    (edge, spread): (usize, usize),
    acks: &[Ack],
    sent: u64,
) {
    let found = cut_and_check(work, rec, edge, spread, 1, |f| Expect {
        required: acked_by(acks, f).collect(),
        or_older: None,
        sent,
        may_refuse: false,
    });
    assert!(
        found[2] > found[0],
        "too few crash disks held an image: {found:?}"
    );
}

/// The device byte ranges under the bytes `within` of `file` that have a
/// place on the disk (`filefrag -v`; blocks still delayed in the page cache
/// have none yet).
fn extents(file: &Path, within: std::ops::Range<u64>) -> Vec<std::ops::Range<u64>> {
    let out = Command::new("filefrag")
        .arg("-v")
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "filefrag: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let block: u64 = text
        .split_once("blocks of ")
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("no block size in filefrag's output:\n{text}"));
    let num = |s: &str| s.trim().parse::<u64>().ok();
    text.lines()
        .filter(|l| !l.contains("unknown_loc"))
        .filter_map(|l| {
            // "  0:   0..  299:   9217..  9516:   300: ..." (blocks)
            let f: Vec<&str> = l.split(':').collect();
            let (lstart, lend) = f.get(1)?.split_once("..")?;
            let (pstart, _) = f.get(2)?.split_once("..")?;
            let (lstart, lend, pstart) = (
                num(lstart)? * block,
                (num(lend)? + 1) * block,
                num(pstart)? * block,
            );
            let (from, to) = (lstart.max(within.start), lend.min(within.end));
            (from < to).then(|| pstart + (from - lstart)..pstart + (to - lstart))
        })
        .collect()
}

/// How the first process of [`resumed_on_the_same_mount`] ends.
#[derive(Clone, Copy, PartialEq)]
enum FirstEnd {
    /// SIGKILL under load: what it wrote but never persisted is still in
    /// the page cache when the resume reads the image.
    Killed,
    /// SIGKILL as it enters an `fdatasync` (strace holds the call back):
    /// the epoch it wrote is in the page cache, never persisted.
    KilledBeforePersist,
    /// SIGKILL while the record the image would resume from is in the page
    /// cache and not on the device (strace holds nvhv's persists at their
    /// entry, until at one of them `inspect` and the device say so), and the
    /// device fails the first write of that record's header: its
    /// write-back, by the kernel's flusher or by the resume's settle. No
    /// process was told of that failure before, so the settle is: it drops
    /// the cache and the image is read from the disk (rule 2 of "What the
    /// page cache holds is not what the disk holds"), and rule 3 finds
    /// nothing left to differ.
    KilledThenWriteBackFails,
    /// As `KilledThenWriteBackFails`, with the log's pages mapped by
    /// another process (this test) through the first resume: no drop can
    /// evict them, so that resume must refuse the image rather than build
    /// on them; once they are unmapped the next resume finds the
    /// difference (rule 3) and reads the disk.
    KilledThenWriteBackFailsPinned,
    /// A few of the redo log's writes fail on the device (EIO); nvhv stops
    /// with the error. Linux reports such a failure to one `fdatasync` and
    /// keeps the pages in its cache, clean, with bytes the disk never got.
    WritesFail,
    /// A few of the redo log's writes fail on the device, and nvhv is
    /// SIGKILLed in the `fdatasync` that reports it (strace holds the call
    /// at its exit): that call was told of the failure, so no later
    /// `fdatasync` of the file reports it, and the pages the disk lacks are
    /// still in the cache, clean.
    KilledAsWritesFail,
}

/// strace, tracing the `fdatasync` calls of nvhv and its threads into
/// `out` and changing them as `inject` says, as a wrapper for nvhv.
fn strace<'a>(out: &'a str, inject: &'a str) -> Vec<&'a str> {
    vec![
        "strace",
        "-f",
        "-qq",
        "--seccomp-bpf",
        "-o",
        out,
        "-e",
        "signal=none",
        "-e",
        "trace=fdatasync",
        "-e",
        inject,
    ]
}

/// The pid of the nvhv that strace (`tracer`) started.
fn traced_nvhv(tracer: u32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let children = format!("/proc/{tracer}/task/{tracer}/children");
    loop {
        let text = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = text.split_whitespace().next() {
            return pid.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "strace started no nvhv");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until a thread of `nvhv` (run by strace) has been stopped at a
/// syscall for 20 ms: an `fdatasync` strace holds (the others stop for
/// microseconds). Panics after 30 s, with `vm`'s stderr.
fn wait_for_stalled_fdatasync(nvhv: i32, vm: &Vmm) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stopped = || -> Vec<String> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{nvhv}/task")) else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
                    st.rsplit_once(") ")
                        .is_some_and(|(_, r)| r.starts_with('t'))
                })
            })
            .map(|t| t.file_name().to_string_lossy().into_owned())
            .collect()
    };
    loop {
        assert!(
            Instant::now() < deadline,
            "no fdatasync of nvhv stalled in 30 s:\n{}",
            vm.stderr_text()
        );
        let before = stopped();
        if !before.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
            if stopped().iter().any(|t| before.contains(t)) {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sigkill(pid: i32) {
    // SAFETY: kill(2) of a process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// The header (its 128 bytes) of the record the image at `path` (`file`)
/// resumes from, as the page cache holds it, if its page is dirty
/// (written, maybe not yet on the disk: a dirty folio of several pages
/// counts all of them). Read with `inspect` of the image in use, which
/// reads the cache only.
fn newest_header_unwritten(path: &Path, file: &std::fs::File) -> Option<std::ops::Range<u64>> {
    let j = common::inspect_json(path.to_str().unwrap());
    let epoch = j["epoch"].as_u64();
    let half_bytes = j["log_bytes"].as_u64().unwrap() / 2;
    let log = j["log_offset"].as_u64().unwrap();
    j["log_records"].as_array().unwrap().iter().find_map(|r| {
        if r["state"] != "valid" || r["epoch"].as_u64() != epoch {
            return None;
        }
        let at = log + r["half"].as_u64().unwrap() * half_bytes + r["offset"].as_u64().unwrap();
        (unpersisted_pages(file, &(at..at + 4096)) > 0).then_some(at..at + 128)
    })
}

/// The bytes of `ranges` of the device file `device`, one after another.
fn device_bytes(device: &std::fs::File, ranges: &[std::ops::Range<u64>]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in ranges {
        let mut b = vec![0u8; (r.end - r.start) as usize];
        device.read_exact_at(&mut b, r.start).unwrap();
        out.extend(b);
    }
    out
}

/// The pages of `range` of `file` the page cache holds dirty
/// (`cachestat(2)`, Linux 6.5): written, and not yet sent to the disk.
/// (Not those under write-back: their write may have reached the device
/// already.)
fn unpersisted_pages(file: &std::fs::File, range: &std::ops::Range<u64>) -> u64 {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let r = Range {
        off: range.start,
        len: range.end - range.start,
    };
    let mut cs = Cachestat::default();
    // SAFETY: cachestat reads `r` and writes `cs`, both live and of the
    // kernel's layout, and reads the integer fd of an open file.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &r as *const Range,
            &mut cs as *mut Cachestat,
            0u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "cachestat: {} (it needs Linux 6.5)",
        std::io::Error::last_os_error()
    );
    cs.nr_dirty
}

/// `run` under SETs ended by `end`, then `resume` on the same mount (its
/// page cache as the first process left it), under SETs, SIGKILLed; the
/// disks a power cut could leave are checked, densely where the resume
/// begins: until its first checkpoint the log it continues is all that
/// holds what it acknowledges. Every SET either process acknowledged must
/// survive every cut. With `inspect_first`, `nvhv inspect` of the image
/// between the two must name the epoch the resume continues from.
fn resumed_on_the_same_mount(end: FirstEnd, inspect_first: bool) {
    require_kvm!();
    let strace_missing = || Command::new("strace").arg("-V").output().is_err();
    let write_back_fails = matches!(
        end,
        FirstEnd::KilledThenWriteBackFails | FirstEnd::KilledThenWriteBackFailsPinned
    );
    let traced = write_back_fails
        || matches!(
            end,
            FirstEnd::KilledBeforePersist | FirstEnd::KilledAsWritesFail
        );
    if !can_run() || (traced && need("strace", strace_missing()).is_none()) {
        return;
    }
    let work = Scratch::new("powercut-same");
    let fail: Arc<Mutex<Failure>> = Arc::default();
    let (rec, (acks, sent, acks2, sent2, resumed_at)) = record_failing(
        &work,
        "same",
        fresh_ext4(&work),
        fail.clone(),
        |dir, seen| {
            // KilledBeforePersist: the 300th fdatasync (past the image's
            // creation, some 0.3 s into the load) waits 30 s before it
            // starts, and nvhv is killed there. KilledAsWritesFail: each
            // waits 0.2 s before it returns, its result already written to
            // `traced` by strace.
            let traced = work.path("strace.out");
            let wrapper: Vec<&str> = match end {
                FirstEnd::KilledBeforePersist => strace(
                    "/dev/null",
                    "inject=fdatasync:delay_enter=30000000:when=300",
                ),
                FirstEnd::KilledAsWritesFail => strace(
                    traced.to_str().unwrap(),
                    "inject=fdatasync:delay_exit=200000",
                ),
                _ if write_back_fails => strace(
                    traced.to_str().unwrap(),
                    "inject=fdatasync:delay_enter=5000000:when=300+",
                ),
                _ => Vec::new(),
            };
            let (mut vm, port) = serve_under(&work, dir, &wrapper, &EPOCH_RUN);
            // The log's blocks on the device (it is preallocated, so all
            // have a place), found before the load: `inspect` drops pages
            // from the page cache, which writes those still dirty.
            let log_range = {
                let j = common::inspect_json(dir.join("kv.img").to_str().unwrap());
                let log = j["log_offset"].as_u64().unwrap();
                log..log + j["log_bytes"].as_u64().unwrap()
            };
            let log_ranges = extents(&dir.join("kv.img"), log_range.clone());
            // The device fails the next `n` writes to the log's blocks.
            // ORDER: the extents before the lock: finding them reads the
            // image, and the device serves reads under that lock.
            let fail_log_writes = |n| {
                let mut f = fail.lock().unwrap();
                f.ranges = log_ranges.clone();
                f.left = n;
            };
            let stop = AtomicBool::new(false);
            let (acks, sent, status) = std::thread::scope(|s| {
                let l = s.spawn(|| load(port, "one", 4, &stop, seen));
                std::thread::sleep(Duration::from_millis(500));
                let status = match end {
                    FirstEnd::Killed => Some(vm.signal_and_wait(libc::SIGKILL)),
                    FirstEnd::KilledBeforePersist => {
                        let nvhv = traced_nvhv(vm.child.id());
                        wait_for_stalled_fdatasync(nvhv, &vm);
                        sigkill(nvhv);
                        common::wait_or_kill(&mut vm.child, Duration::from_secs(30))
                    }
                    FirstEnd::KilledThenWriteBackFails
                    | FirstEnd::KilledThenWriteBackFailsPinned => {
                        // From the 300th on, strace holds every fdatasync at
                        // its entry for 5 s: its record is written and not
                        // yet persisted. At each such stall the test looks
                        // whether the device lacks that record's header (the
                        // kernel's flusher may have written it already).
                        let nvhv = traced_nvhv(vm.child.id());
                        let img = std::fs::File::open(dir.join("kv.img")).unwrap();
                        // The device as the FUSE server holds it (read
                        // through the FUSE file, which has no page cache).
                        let device =
                            std::fs::File::open(work.path("same.fuse").join("disk")).unwrap();
                        let completed = || {
                            std::fs::read_to_string(&traced)
                                .unwrap_or_default()
                                .lines()
                                .filter(|l| l.contains(" = "))
                                .count()
                        };
                        let deadline = Instant::now() + Duration::from_secs(120);
                        let mut looked_after = None;
                        let mut stalls = 0;
                        loop {
                            assert!(
                                Instant::now() < deadline,
                                "in {stalls} stalled persists, the record nvhv would resume \
                                 from was always on the device:\n{}",
                                vm.stderr_text()
                            );
                            wait_for_stalled_fdatasync(nvhv, &vm);
                            // The same stall as last time: wait for the next.
                            let done = completed();
                            if looked_after == Some(done) {
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                            looked_after = Some(done);
                            stalls += 1;
                            if let Some(header) = newest_header_unwritten(&dir.join("kv.img"), &img)
                            {
                                // The device fails the first write to that
                                // header's bytes (not merely its block: a
                                // write of bytes the disk holds already
                                // loses nothing). ORDER: armed before the
                                // look at the device: a write reaching it
                                // after the look fails there.
                                let on_device = extents(&dir.join("kv.img"), header.clone());
                                {
                                    let mut f = fail.lock().unwrap();
                                    f.ranges = on_device.clone();
                                    f.left = 1;
                                }
                                let mut cached = vec![0u8; (header.end - header.start) as usize];
                                img.read_exact_at(&mut cached, header.start).unwrap();
                                if device_bytes(&device, &on_device) != cached {
                                    break;
                                }
                            }
                            let mut f = fail.lock().unwrap();
                            f.left = 0;
                            if f.failed > 0 {
                                break; // the flusher's write-back failed: as good
                            }
                        }
                        eprintln!(
                            "the newest record's header was not on the device at stall {stalls}"
                        );
                        sigkill(nvhv);
                        common::wait_or_kill(&mut vm.child, Duration::from_secs(30))
                    }
                    FirstEnd::WritesFail => {
                        fail_log_writes(4);
                        common::wait_or_kill(&mut vm.child, Duration::from_secs(30))
                    }
                    FirstEnd::KilledAsWritesFail => {
                        let nvhv = traced_nvhv(vm.child.id());
                        fail_log_writes(4);
                        // The first fdatasync to end after the failure is
                        // told of it: strace has written its result and
                        // holds it at its exit for 0.2 s. Killed there, nvhv
                        // never learns of it.
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while !std::fs::read_to_string(&traced)
                            .unwrap_or_default()
                            .contains("= -1 EIO")
                        {
                            assert!(
                                Instant::now() < deadline,
                                "no fdatasync failed in 30 s:\n{}",
                                vm.stderr_text()
                            );
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        sigkill(nvhv);
                        common::wait_or_kill(&mut vm.child, Duration::from_secs(30))
                    }
                };
                stop.store(true, Ordering::Relaxed);
                let (a, n) = l.join().unwrap();
                (a, n, status)
            });
            if end == FirstEnd::WritesFail {
                let err = vm.stderr_text();
                let status = status
                    .unwrap_or_else(|| panic!("nvhv went on 30 s after its writes failed:\n{err}"));
                assert!(
                    !status.success() && err.contains("Input/output error"),
                    "nvhv did not stop with the I/O error ({status}):\n{err}"
                );
            }
            if end == FirstEnd::KilledAsWritesFail {
                let err = vm.stderr_text();
                assert!(
                    !err.contains("Input/output error"),
                    "nvhv saw the failed write before it was killed:\n{err}"
                );
            }
            // The device works again from here (but for the write-back the
            // resume starts, when that is to fail).
            if !write_back_fails {
                fail.lock().unwrap().left = 0;
            }
            if end == FirstEnd::KilledThenWriteBackFailsPinned {
                let img = dir.join("kv.img");
                let pin = Pinned::map(&img, log_range.clone());
                let mut refused = Vmm::start(
                    &[
                        "resume",
                        "--image",
                        img.to_str().unwrap(),
                        "--listen",
                        "127.0.0.1:0",
                    ],
                    work.path("refused.console"),
                );
                let status = common::wait_or_kill(&mut refused.child, Duration::from_secs(30));
                let err = refused.stderr_text();
                assert!(
                    status.is_some_and(|s| !s.success())
                        && err.contains("an earlier write of this image failed on its disk")
                        && err.contains("they could not be dropped from it"),
                    "a resume with the log's pages pinned in the page cache did not refuse \
                     ({status:?}):\n{err}"
                );
                drop(pin);
            }
            // What `inspect` says the image resumes from, before the resume.
            // (It reads what the killed process may have left unpersisted
            // from the disk, and so leaves the page cache as the disk is:
            // without it, the resume finds that out itself.)
            let inspected = inspect_first.then(|| {
                common::inspect_json(dir.join("kv.img").to_str().unwrap())["epoch"]
                    .as_u64()
                    .unwrap()
            });
            let resumed_at = seen.load(Ordering::SeqCst);
            let (acks2, sent2) =
                serve_and_stop(&work, dir, &["resume"], "two", 0.5, libc::SIGKILL, seen);
            let err = std::fs::read_to_string(work.path("resume.stderr")).unwrap();
            if let Some(inspected) = inspected {
                assert!(
                    err.contains(&format!("nvhv: resumed from epoch {inspected},")),
                    "inspect said epoch {inspected}:\n{err}"
                );
            } else if end == FirstEnd::KilledAsWritesFail {
                assert!(
                    err.contains("the page cache held what the disk lacks of this image"),
                    "the resume did not find that the cache held what the disk lacks:\n{err}"
                );
            }
            if end == FirstEnd::KilledThenWriteBackFailsPinned {
                // The refused resume's settle was told of the failure:
                // this one finds the difference itself.
                assert!(
                    !err.contains("an earlier write of this image failed")
                        && err.contains("the page cache held what the disk lacks"),
                    "the resume after the pages were unpinned did not find the difference:\n{err}"
                );
            }
            if end == FirstEnd::KilledThenWriteBackFails {
                // The settle was told of the failure and dropped the
                // cache: nothing the disk lacks was left for rule 3.
                assert!(
                    fail.lock().unwrap().left == 0,
                    "the resume wrote nothing of the log the killed process left unpersisted"
                );
                assert!(
                    err.contains("an earlier write of this image failed on its disk")
                        && !err.contains("the page cache held what the disk lacks"),
                    "the resume's settle did not leave the page cache as the disk is:\n{err}"
                );
            }
            if end == FirstEnd::KilledAsWritesFail {
                // The failure was spent on the killed call: the resume's
                // settle is told of nothing.
                assert!(
                    !err.contains("an earlier write of this image failed"),
                    "the resume was told of the failed write, so the kill did not land in \
                     the fdatasync that reported it:\n{err}"
                );
            }
            (acks, sent, acks2, sent2, resumed_at)
        },
    );
    let failed = fail.lock().unwrap().failed;
    assert_eq!(
        failed > 0,
        write_back_fails || matches!(end, FirstEnd::WritesFail | FirstEnd::KilledAsWritesFail),
        "{failed} writes failed"
    );
    assert!(
        !acks.is_empty() && !acks2.is_empty(),
        "no SET acknowledged: {} before, {} after the resume",
        acks.len(),
        acks2.len()
    );
    eprintln!(
        "{failed} writes failed; {} SETs acknowledged of {sent} before, {} of {sent2} after the \
         resume",
        acks.len(),
        acks2.len()
    );
    let found = cut_and_check_after(&work, &rec, 4, 6, 1, (&[resumed_at], 24), |f| Expect {
        required: acked_by(&acks, f).chain(acked_by(&acks2, f)).collect(),
        or_older: None,
        sent: sent + sent2,
        may_refuse: false,
    });
    assert!(found[2] > 0, "no crash disk held an image: {found:?}");
}

/// A few of the image's writes fail on the device, then it works again;
/// the resume on the same mount must not build on what the page cache
/// holds and the disk does not.
#[test]
fn a_failed_image_write_loses_nothing_acknowledged_through_the_resume() {
    resumed_on_the_same_mount(FirstEnd::WritesFail, true);
}

/// A write of the log fails on the device, and nvhv is SIGKILLed in the
/// `fdatasync` that reports it, before it can act: the error is spent, so
/// the resume on the same mount must not trust what the cache holds of the
/// image's records (the disk lacks that epoch's record).
#[test]
fn a_kill_in_the_fdatasync_that_reports_a_failed_write_loses_nothing_acknowledged() {
    resumed_on_the_same_mount(FirstEnd::KilledAsWritesFail, false);
}

/// The same, with `nvhv inspect` before the resume: it must name the epoch
/// on the disk, the one the resume continues from, not the one the page
/// cache holds.
#[test]
fn inspect_after_a_kill_in_a_failing_fdatasync_names_the_epoch_resume_continues() {
    resumed_on_the_same_mount(FirstEnd::KilledAsWritesFail, true);
}

/// SIGKILL, then a resume at once on the same mount: what the killed
/// process wrote and never persisted must be durable before the resume
/// builds on it.
#[test]
fn a_resume_on_the_same_mount_after_sigkill_loses_nothing_acknowledged() {
    resumed_on_the_same_mount(FirstEnd::Killed, true);
}

/// SIGKILL between an epoch's writes and its `fdatasync`, then a resume at
/// once on the same mount: that epoch's record is in the page cache only,
/// and must be durable before the resume builds on it (`settle`).
#[test]
fn a_resume_after_a_kill_before_the_persist_loses_nothing_acknowledged() {
    resumed_on_the_same_mount(FirstEnd::KilledBeforePersist, true);
}

/// The record a SIGKILLed nvhv left unpersisted fails on the device when
/// it is written back: the resume's settle is told, and the resume builds
/// on what the disk holds, not on the page cache.
#[test]
fn a_write_back_that_fails_at_the_resume_loses_nothing_acknowledged() {
    resumed_on_the_same_mount(FirstEnd::KilledThenWriteBackFails, false);
}

/// As above, with another process mapping the image's log through the
/// first resume, so that the page cache cannot be made what the disk holds:
/// that resume refuses the image; the next one, unpinned, resumes it from
/// the disk.
#[test]
fn a_resume_refuses_pages_the_disk_lacks_that_it_cannot_drop() {
    resumed_on_the_same_mount(FirstEnd::KilledThenWriteBackFailsPinned, false);
}

/// `range` of a file mapped shared, read-only, and every page of it read:
/// while it lives, no `POSIX_FADV_DONTNEED` evicts those pages.
struct Pinned {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Pinned {
    fn map(path: &Path, range: std::ops::Range<u64>) -> Pinned {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path).unwrap();
        let len = (range.end - range.start) as usize;
        // SAFETY: a new read-only shared mapping of `len` bytes of an open
        // file at a page-aligned offset (the log's); the kernel picks the
        // address (checked below). MAP_POPULATE reads every page in.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                range.start as libc::off_t,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Pinned { ptr, len }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` made.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}
