//! What the image file lives on, and the persist primitive for each kind:
//! `fdatasync` on an ordinary file, a fence on tmpfs (nothing survives a power
//! loss there anyway), cache-line write-back + `sfence` on a DAX file mapped
//! with `MAP_SYNC`. Owns the mappings of the image that `nvram` makes (the
//! DAX mapping of the metadata regions, and read-only views of the redo log
//! for recovery) and the cache-flush instructions.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::OnceLock;

use serde::Serialize;

/// x86 cache-line size.
const LINE: usize = 64;

/// The kernel's page size: the unit of the page cache and of direct I/O
/// here.
const PAGE: u64 = 4096;

/// What the image file lives on. Decides the persist primitive and what a
/// commit survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackingKind {
    /// tmpfs (`/dev/shm`): RAM. Survives a crash of the VMM process only.
    Tmpfs,
    /// An ordinary file on a disk file system: persisted with `fdatasync`.
    File,
    /// A DAX file mapped with `MAP_SYNC` (pmem): persisted with cache-line write-back.
    Dax,
}

impl BackingKind {
    /// What a durable commit on this backing survives, in one sentence.
    pub fn guarantee(self) -> &'static str {
        match self {
            BackingKind::Tmpfs => {
                "tmpfs: a commit survives a crash or kill of the VMM process, NOT a host power loss or reboot"
            }
            BackingKind::File => {
                "file: a commit survives a power loss once its fdatasync returns"
            }
            BackingKind::Dax => {
                "DAX: a commit survives a power loss once its cache lines are written back and fenced"
            }
        }
    }
}

impl std::fmt::Display for BackingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackingKind::Tmpfs => "tmpfs",
            BackingKind::File => "file",
            BackingKind::Dax => "dax",
        })
    }
}

/// A failure to detect, write or persist the backing.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// `fstatfs` on the image failed.
    #[error("cannot stat the image's file system")]
    Statfs(#[source] io::Error),
    /// A write of image metadata failed.
    #[error("cannot write {len} bytes at offset {offset:#x}")]
    Write {
        /// File offset.
        offset: u64,
        /// Bytes to write.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `fdatasync` failed: what was written since the last persist may be lost.
    #[error("fdatasync failed")]
    Sync(#[source] io::Error),
    /// A thread other than the one the image's writes were pinned to
    /// (`Image::pin_writer`) tried to write or persist it: refused, since a
    /// standby takes the image over once that one thread is gone.
    #[error(
        "the image is written only by the thread that holds its death notice; another thread tried"
    )]
    WrongThread,
}

/// The image's backing: its kind and, on DAX, the `MAP_SYNC` mapping of the
/// metadata regions (everything before the RAM region).
#[derive(Debug)]
pub(crate) struct Backing {
    kind: BackingKind,
    dax: Option<DaxMap>,
}

impl Backing {
    /// Detects the backing of `file`, whose first `meta_len` bytes hold the
    /// header, meta blocks, state slots and log. tmpfs is recognised by its
    /// `statfs` magic; DAX by a successful `MAP_SHARED_VALIDATE | MAP_SYNC`
    /// mapping (kept, writable if `writable`); anything else is a `File`.
    pub(crate) fn detect(
        file: &File,
        meta_len: u64,
        writable: bool,
    ) -> Result<Backing, BackingError> {
        // SAFETY: an all-zero statfs is a valid value of this plain C struct.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is open for the duration of the call and `st` is a valid out-pointer.
        let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
        if r != 0 {
            return Err(BackingError::Statfs(io::Error::last_os_error()));
        }
        if st.f_type == libc::TMPFS_MAGIC {
            return Ok(Backing {
                kind: BackingKind::Tmpfs,
                dax: None,
            });
        }
        match DaxMap::new(file, meta_len, writable, true) {
            Ok(map) => Ok(Backing {
                kind: BackingKind::Dax,
                dax: Some(map),
            }),
            Err(e) => {
                if statx_says_dax(file) {
                    tracing::warn!(
                        error = %e,
                        "the image is a DAX file but MAP_SYNC was refused; persisting with fdatasync instead"
                    );
                } else if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    tracing::warn!(error = %e, "MAP_SYNC probe failed; persisting with fdatasync");
                } else {
                    tracing::debug!("image is not on DAX; persisting with fdatasync");
                }
                Ok(Backing {
                    kind: BackingKind::File,
                    dax: None,
                })
            }
        }
    }

    /// The detected kind.
    pub(crate) fn kind(&self) -> BackingKind {
        self.kind
    }

    /// Writes `data` at `offset` of the image (metadata regions only). Not
    /// durable until [`Backing::persist`] covers it.
    pub(crate) fn write_at(
        &mut self,
        file: &File,
        offset: u64,
        data: &[u8],
    ) -> Result<(), BackingError> {
        if let Some(map) = self.dax.as_mut() {
            if map.write(offset, data) {
                return Ok(());
            }
        }
        file.write_all_at(data, offset)
            .map_err(|source| BackingError::Write {
                offset,
                len: data.len(),
                source,
            })
    }

    /// Makes every earlier write to `[offset, offset + len)` durable, and
    /// orders it before any later write. On `File` this is an `fdatasync` of
    /// the whole file, which also covers guest RAM pages dirtied through a
    /// shared mapping of the file.
    pub(crate) fn persist(&self, file: &File, offset: u64, len: u64) -> Result<(), BackingError> {
        match self.kind {
            BackingKind::Tmpfs => {
                fence(Ordering::SeqCst);
                Ok(())
            }
            BackingKind::Dax => {
                if let Some(map) = &self.dax {
                    if map.write_back(offset, len) {
                        store_fence();
                        return Ok(());
                    }
                }
                // Outside the mapping: fdatasync also writes back DAX cache lines.
                fdatasync(file)
            }
            BackingKind::File => fdatasync(file),
        }
    }

    /// On an ordinary file: start the write-back of `[offset, offset + len)`
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for
    /// it), so that the next `fdatasync` finds those pages written. Scattered
    /// pages are what makes an `fdatasync` slow on our disks (64 contiguous
    /// dirty pages: ~150 µs; 50 more scattered ones: ~790 µs). Nothing on
    /// tmpfs and DAX (their persist does not wait for a disk).
    pub(crate) fn start_writeback(&self, file: &File, offset: u64, len: u64) {
        if self.kind == BackingKind::File {
            start_writeback(file, offset, len);
        }
    }

    /// [`Backing::start_writeback`] on a thread of its own at the lowest
    /// priority (nice 19), for writes nothing waits on yet. After a
    /// recovery that continued the log, the replayed pages (~2 300
    /// scattered ones after a SIGKILL under pipelined SETs) are made durable
    /// by the first epoch's `fdatasync`, and writing them back there held
    /// the first write after the resume on this ext4. Five fresh kills each,
    /// alternately: the first SET's reply 6.0–8.0 ms after the first GET's
    /// without this, 2.8–4.2 ms with it (nice 19), the GET itself 9.4–12.1
    /// against 9.2–11.7 ms after the spawn; with `SCHED_IDLE`
    /// 1.4–6.2 ms but 13–14 ms in 3 of 13 runs (the `fdatasync` waiting,
    /// it seems, on write-back the idle thread had begun and could not
    /// finish); with normal priority it delayed the first GET by 2–6 ms,
    /// done inline by 1.5–7 ms.
    ///
    /// The image is opened again by `path` rather than the descriptor
    /// duplicated: a duplicate would share the open file that holds the
    /// image's lock, and keep it locked after the image is closed for as
    /// long as the thread waits for a core. It is opened here, before the
    /// thread starts: at nice 19 the thread must take no lock the VM needs.
    /// Its first allocation would map a malloc arena, holding the process's
    /// `mmap_lock` for writing, and a vCPU's page fault waits for that lock:
    /// one resume (`perf` of `sched_switch` with call chains) had its vCPU
    /// blocked in `get_user_pages_unlocked` → `down_read_killable` for 4.4
    /// ms before its first reply.
    pub(crate) fn start_writeback_idle(&self, path: &Path, offset: u64, len: u64) {
        if self.kind != BackingKind::File {
            return;
        }
        let Ok(file) = File::open(path) else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("nvhv-writeback".into())
            .spawn(move || {
                // SAFETY: gettid and setpriority only take integers; on
                // Linux a thread id names just this thread. A failure leaves
                // the normal priority: this is a hint.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
                start_writeback(&file, offset, len);
            });
        // Without a thread the write-back waits for the next persist.
        drop(spawned);
    }

    /// A backing that writes through an ordinary shared mapping and flushes
    /// cache lines as on DAX: lets the tests run the DAX code path on tmpfs.
    #[cfg(test)]
    pub(crate) fn fake_dax(file: &File, meta_len: u64) -> io::Result<Backing> {
        Ok(Backing {
            kind: BackingKind::Dax,
            dax: Some(DaxMap::new(file, meta_len, true, false)?),
        })
    }
}

/// `fdatasync` of `file`. When it fails, Linux has given up on some of the
/// file's writes but keeps their pages in its cache, marked clean, holding
/// bytes the disk never got: a later open would read them as if they were
/// durable (recovery would replay a record the disk lacks and continue the
/// log after it, and a power cut then leaves the records after a hole).
/// So the cache's clean pages of the file are dropped at once, and every
/// later read comes from the disk.
fn fdatasync(file: &File) -> Result<(), BackingError> {
    file.sync_data().map_err(|e| {
        drop_cached(file);
        BackingError::Sync(e)
    })
}

/// Makes what the page cache holds of `file` what its disk holds, before
/// an opener reads the image to build on it. A process killed after a
/// write and before its persist leaves that write in the cache, not yet
/// on the disk; an earlier failed write-back nobody has been told of yet
/// left clean pages the disk lacks. An `fdatasync` writes the first and
/// reports the second (to the first file opened since that failure that
/// asks); then the cache's clean pages are dropped and the file read from
/// the disk. Returns whether that happened. Costs a disk flush when the
/// cache holds nothing unwritten; nothing on tmpfs.
pub(crate) fn settle(file: &File) -> Result<bool, BackingError> {
    match fdatasync(file) {
        Ok(()) => Ok(false),
        // fdatasync dropped the cache; what is left dirty is written now.
        Err(_) => fdatasync(file).map(|()| true),
    }
}

/// A second open file description of `file` that reads past the page cache
/// (`O_DIRECT`), for [`read_direct`]. Fails where the file system does not
/// do direct I/O.
pub(crate) fn open_direct(file: &File) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// What the disk holds of `[offset, offset + len)` of the file `direct`
/// ([`open_direct`]) reads: the page cache is not consulted, whatever it
/// holds (the kernel first writes out pages of the range still dirty).
/// Reads whole pages into a page-aligned buffer, as direct I/O needs.
pub(crate) fn read_direct(direct: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let start = offset / PAGE * PAGE;
    let end = offset
        .checked_add(len)
        .map(|e| e.div_ceil(PAGE) * PAGE)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let span =
        usize::try_from(end - start).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let page = PAGE as usize;
    let mut room = vec![0u8; span + page];
    let skip = room.as_ptr().align_offset(page);
    let buf = &mut room[skip..skip + span];
    direct.read_exact_at(buf, start)?;
    let from = (offset - start) as usize;
    Ok(buf[from..from + len as usize].to_vec())
}

/// Drops the page cache's clean pages of `file` that hold any of
/// `[offset, offset + len)`, so that what is read there next comes from the
/// disk. Only a folio that lies wholly inside the range goes (and none that
/// is mapped): the kernel caches a file in folios of up to 2 MiB, so a
/// range that ends inside one leaves it (see `image::compare_with_disk`).
/// Nothing on tmpfs or DAX (no page cache of their own).
pub(crate) fn read_from_disk(file: &File, offset: u64, len: u64) {
    if len == 0 {
        return; // to the kernel, a length of 0 means "to the end of the file"
    }
    // The kernel keeps a page the range covers only in part: widen it to
    // whole pages.
    let start = offset / PAGE * PAGE;
    let end = offset
        .saturating_add(len)
        .div_ceil(PAGE)
        .saturating_mul(PAGE);
    drop_cached_range(file, start, end - start);
}

/// Drops the clean pages of `file` from the page cache
/// (`POSIX_FADV_DONTNEED`); pages still dirty, under write-back or mapped
/// stay. An error is ignored: nothing more can be done about the cache.
fn drop_cached(file: &File) {
    drop_cached_range(file, 0, 0);
}

/// [`drop_cached`] of `[offset, offset + len)` (`len` 0: to the end).
fn drop_cached_range(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is open
    // for the duration of the call (borrowed `file`).
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED);
    }
}

fn statx_says_dax(file: &File) -> bool {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open, the path is a valid empty C string used with
    // AT_EMPTY_PATH, and `stx` is a valid out-pointer.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BASIC_STATS,
            &mut stx,
        )
    };
    r == 0
        && stx.stx_attributes_mask & libc::STATX_ATTR_DAX as u64 != 0
        && stx.stx_attributes & libc::STATX_ATTR_DAX as u64 != 0
}

/// A shared mapping of the first `len` bytes of the image.
#[derive(Debug)]
struct DaxMap {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is owned by this value alone (never aliased by another
// Rust object); moving it to another thread moves that ownership.
unsafe impl Send for DaxMap {}
// SAFETY: `&self` methods only read the mapping's address range or flush cache
// lines; every write goes through `&mut self`.
unsafe impl Sync for DaxMap {}

impl DaxMap {
    fn new(file: &File, len: u64, writable: bool, sync: bool) -> io::Result<DaxMap> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let flags = if sync {
            libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC
        } else {
            libc::MAP_SHARED
        };
        // SAFETY: a new mapping at an address the kernel picks; no existing
        // memory is touched. The result is checked before use.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(DaxMap { ptr, len, writable })
    }

    /// `[offset, offset + len)` as a range of the mapping, if it lies inside.
    fn range(&self, offset: u64, len: u64) -> Option<(usize, usize)> {
        let start = usize::try_from(offset).ok()?;
        let len = usize::try_from(len).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.len).then_some((start, len))
    }

    /// Copies `data` into the mapping at `offset`; false if it does not fit.
    fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        let Some((start, len)) = self.range(offset, data.len() as u64) else {
            return false;
        };
        if !self.writable {
            return false;
        }
        // SAFETY: `start + len <= self.len`, so the destination lies inside our
        // writable mapping; `data` is a separate Rust slice, so they cannot
        // overlap. The lock on the image keeps other nvhv processes out; a file
        // truncated behind our back would raise SIGBUS, as for any mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(start), len) };
        true
    }

    /// Writes back the cache lines of `[offset, offset + len)`; false if the
    /// range is not inside the mapping. No fence: see [`store_fence`].
    fn write_back(&self, offset: u64, len: u64) -> bool {
        let Some((start, len)) = self.range(offset, len) else {
            return false;
        };
        // SAFETY: the range lies inside our live mapping.
        unsafe { write_back(self.ptr.as_ptr().add(start), len) };
        true
    }
}

impl Drop for DaxMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created and owns.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A read-only view of `len` bytes of a file from `offset`, mapped shared
/// and populated: reading it reads the page cache (or the DAX medium) in
/// place, with no copy into fresh memory. For recovery's reads of the redo
/// log, where copying into new pages (each first touch a fault on our
/// hosts) cost more than checking the bytes.
///
/// ORDER: nothing may write the viewed range while a view lives (a `&[u8]`
/// from [`ReadMap::bytes`] would change under its reader). The image lock
/// keeps other processes out; recovery drops its views of the log before it
/// returns, and the log is written only after that.
pub struct ReadMap {
    ptr: NonNull<u8>,
    /// Length of the mapping (from the page boundary below `offset`).
    map_len: usize,
    /// Where the view starts in the mapping.
    skip: usize,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone and only ever read.
unsafe impl Send for ReadMap {}
// SAFETY: every method only reads the mapping.
unsafe impl Sync for ReadMap {}

impl ReadMap {
    /// Maps `[offset, offset + len)` of `file` (`len` > 0) read-only.
    pub(crate) fn new(file: &File, offset: u64, len: usize) -> io::Result<ReadMap> {
        let start = offset & !(PAGE - 1);
        let skip = (offset - start) as usize;
        let map_len = skip
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let at =
            libc::off_t::try_from(start).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new read-only mapping at an address the kernel picks; no
        // existing memory is touched. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                at,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(ReadMap {
            ptr,
            map_len,
            skip,
            len,
        })
    }

    /// The viewed bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `[skip, skip + len)` lies inside our live read-only
        // mapping (`map_len = skip + len`); by the ORDER rule above nothing
        // writes it while this borrow lives. A file truncated behind our back
        // would raise SIGBUS, as for any mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(self.skip), self.len) }
    }
}

impl Drop for ReadMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created and owns.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

impl std::fmt::Debug for ReadMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadMap({} bytes)", self.len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlushInsn {
    Clwb,
    Clflushopt,
    Clflush,
}

fn flush_insn() -> FlushInsn {
    static INSN: OnceLock<FlushInsn> = OnceLock::new();
    *INSN.get_or_init(|| {
        // CPUID leaf 7 exists on every x86-64 CPU that has CLWB or CLFLUSHOPT;
        // on older ones it reads as zeros, which selects CLFLUSH.
        let ebx = std::arch::x86_64::__cpuid_count(7, 0).ebx;
        if ebx & (1 << 24) != 0 {
            FlushInsn::Clwb
        } else if ebx & (1 << 23) != 0 {
            FlushInsn::Clflushopt
        } else {
            FlushInsn::Clflush
        }
    })
}

/// Writes back to memory every cache line of `[addr, addr + len)` with the
/// best instruction the CPU has (CLWB, else CLFLUSHOPT, else CLFLUSH). Not
/// ordered with later stores until a [`store_fence`]. For guest RAM mapped
/// with `MAP_SYNC` on DAX: call this on every dirty page before a commit.
///
/// # Safety
///
/// The whole range must be mapped in this process for the duration of the
/// call (a flush of an unmapped address faults).
pub unsafe fn write_back(addr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let insn = flush_insn();
    let first = addr as usize & !(LINE - 1);
    let end = (addr as usize).saturating_add(len);
    let mut line = first;
    while line < end {
        let p = line as *const u8;
        match insn {
            // SAFETY: `p` lies in the caller's mapped range (rounded down to
            // its cache line, which is in the same page); CLWB only writes the
            // line back and changes no memory.
            FlushInsn::Clwb => unsafe {
                std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags))
            },
            // SAFETY: as above; CLFLUSHOPT writes back and evicts the line.
            FlushInsn::Clflushopt => unsafe {
                std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
            },
            // SAFETY: as above; CLFLUSH is in SSE2, part of every x86-64 CPU.
            FlushInsn::Clflush => unsafe { std::arch::x86_64::_mm_clflush(p) },
        }
        line += LINE;
    }
}

/// Orders every earlier store and cache-line write-back before any later store
/// (`sfence`). After it, lines written back with [`write_back`] are durable on
/// a platform with ADR (every pmem platform).
pub fn store_fence() {
    // SAFETY: SFENCE has no operands and only orders stores (SSE, baseline x86-64).
    unsafe { std::arch::x86_64::_mm_sfence() };
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)` of `[offset, offset + len)`:
/// starts the write-back, does not wait for it.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range only reads its integer arguments; the fd is
    // open for the duration of the call (borrowed `file`). An error (e.g.
    // EINVAL on a file system without it) is ignored: this is a hint.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Turns the kernel's readahead for `file` on (the default) or off
/// (`posix_fadvise` `POSIX_FADV_NORMAL` / `POSIX_FADV_RANDOM`, which apply to
/// the whole open file). Off while recovery reads the RAM image's replayed
/// pages: ascending reads of scattered spans looked sequential to the
/// kernel, which read ahead far past them, filling the page cache with the
/// sparse RAM region's holes (ext4 zero-fills each). Replay of 2 303 pages
/// after a SIGKILL under pipelined SETs, ext4: its write-out 3.1–4.0 ms
/// against 7.3–8.3 ms with readahead (`nvram::replay`). An error is
/// ignored: this is a hint.
pub(crate) fn advise_readahead(file: &File, on: bool) {
    let advice = if on {
        libc::POSIX_FADV_NORMAL
    } else {
        libc::POSIX_FADV_RANDOM
    };
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is open
    // for the duration of the call (borrowed `file`).
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, advice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp_file(dir: &str, name: &str, len: u64) -> Option<(PathBuf, File)> {
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            return None;
        }
        let path = dir.join(format!("nvhv-backing-{}-{name}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .ok()?;
        f.set_len(len).ok()?;
        Some((path, f))
    }

    #[test]
    fn test_detect_tmpfs_on_dev_shm() {
        let Some((path, f)) = temp_file("/dev/shm", "detect", 8192) else {
            eprintln!("SKIPPED: no /dev/shm");
            return;
        };
        let b = Backing::detect(&f, 8192, true).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(b.kind(), BackingKind::Tmpfs);
        assert!(b.dax.is_none());
    }

    #[test]
    fn test_detect_falls_back_to_file_off_dax() {
        let dir = std::env::temp_dir();
        let (path, f) = temp_file(dir.to_str().unwrap(), "file", 8192).unwrap();
        let b = Backing::detect(&f, 8192, true).unwrap();
        std::fs::remove_file(&path).unwrap();
        // No pmem here: either tmpfs or an ordinary file, never DAX.
        assert_ne!(b.kind(), BackingKind::Dax);
        b.persist(&f, 0, 8192).unwrap();
    }

    #[test]
    fn test_fake_dax_write_and_persist() {
        let Some((path, f)) = temp_file("/dev/shm", "fakedax", 16384) else {
            eprintln!("SKIPPED: no /dev/shm");
            return;
        };
        let mut b = Backing::fake_dax(&f, 8192).unwrap();
        b.write_at(&f, 100, b"through the mapping").unwrap();
        b.persist(&f, 100, 19).unwrap();
        // Beyond the mapping: falls back to pwrite and fdatasync.
        b.write_at(&f, 12000, b"through the fd").unwrap();
        b.persist(&f, 12000, 14).unwrap();
        let mut got = [0u8; 19];
        f.read_exact_at(&mut got, 100).unwrap();
        assert_eq!(&got, b"through the mapping");
        let mut got = [0u8; 14];
        f.read_exact_at(&mut got, 12000).unwrap();
        assert_eq!(&got, b"through the fd");
        drop(b);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn test_write_back_any_alignment() {
        let buf = vec![1u8; 1000];
        for (off, len) in [(0, 0), (0, 1), (3, 64), (63, 2), (1, 999)] {
            // SAFETY: the range is inside `buf`.
            unsafe { write_back(buf.as_ptr().add(off), len) };
        }
        store_fence();
        assert!(buf.iter().all(|&b| b == 1));
    }

    #[test]
    fn test_guarantee_names_the_limits() {
        assert!(BackingKind::Tmpfs
            .guarantee()
            .contains("NOT a host power loss"));
        assert!(BackingKind::File.guarantee().contains("fdatasync"));
        assert!(BackingKind::Dax.guarantee().contains("written back"));
    }
}
