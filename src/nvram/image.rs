//! An open, validated, exclusively locked nvhv image: opening and
//! validating one (`create.rs` makes new ones), the crash-atomic commit protocol (state slot, then meta
//! record, each persisted in that order), reading the committed state back,
//! and the verdict on whether the VM in it can be resumed.
//!
//! Epoch mode adds the redo log (`epoch.rs`: `commit_epoch`,
//! `apply_committed`; `recovery.rs`: `recover`). The commit protocols and
//! the recovery rule are written out in `docs/nvram-format.md` ("Commit
//! protocol", "Epoch commit protocol", "Recovery").
//!
//! Every byte goes through a [`Storage`]: the image file with its backing
//! ([`FileStorage`], the default), or any other implementation (the tests
//! record every write and persist to enumerate crash points).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::backing::{Backing, BackingError, BackingKind};
use super::epoch::{LogWriter, Unapplied};
use super::inspect::Bytes;
use super::layout::{
    check_file_len, select_meta, FormatError, Header, Meta, MetaSelection, PersistMode, Status,
    HEADER_BLOCK, HEADER_LEN, META_LEN,
};
use super::lock::{lock, wait_lock, Successor};
use super::recovery::{plan_recovery_keeping, RecoveryPlan};
use super::redo::half_region;
use super::storage::{FileStorage, Storage};

/// A failure to create, open, read, commit or recover an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Nothing exists at the path.
    #[error("no image at {0}")]
    NotFound(PathBuf),
    /// A new image without `overwrite` found a file at the path.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// The path is a directory, device or other non-regular file.
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    /// Opening or creating the file failed.
    #[error("cannot open {path}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Making the file of a new image failed (its directory missing or not
    /// writable, its file system full or read-only).
    #[error("cannot create an image at {path} (in directory {dir})")]
    Create {
        /// The image path.
        path: PathBuf,
        /// The directory the file is made in.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the image's lock.
    #[error("image {0} is in use by another process")]
    InUse(PathBuf),
    /// `flock` failed for a reason other than contention.
    #[error("cannot lock {path}")]
    Lock {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading part of the image failed.
    #[error("cannot read the {what}")]
    Read {
        /// What was being read.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Sizing the new image (`ftruncate`) failed.
    #[error("cannot size the image to {0} bytes")]
    Resize(u64, #[source] io::Error),
    /// `run --force --reserve`: the RAM region fits only in the room the
    /// image being replaced still holds.
    #[error(
        "cannot reserve {} for guest RAM beside the image it replaces at {} ({} free): \
         the old image keeps its room until the new one is complete; remove it first",
        Bytes(*.bytes), .path.display(), Bytes(*.free)
    )]
    NoRoomBeside {
        /// The image path.
        path: PathBuf,
        /// Bytes of the RAM region.
        bytes: u64,
        /// Bytes free on the file system.
        free: u64,
    },
    /// Making a new image was cancelled ([`super::CreateOptions::cancelled`]).
    #[error("the new image was cancelled")]
    Cancelled,
    /// Putting a new image at its path (`linkat`, `rename`) failed.
    #[error("cannot put the new image at {path}")]
    Publish {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file system has less room than the regions before guest RAM.
    #[error(
        "the image's metadata regions need {} (the redo log, --log-size, is most of it) and its file system has {} free",
        Bytes(*.bytes), Bytes(*.free)
    )]
    NoRoomForMetadata {
        /// Bytes before the RAM region.
        bytes: u64,
        /// Bytes free on the file system.
        free: u64,
    },
    /// Preallocating the metadata regions (`posix_fallocate`) failed.
    #[error("cannot preallocate the image's metadata regions")]
    Allocate(#[source] io::Error),
    /// Reserving the RAM region (`create` with `reserve_ram`) failed.
    #[error("cannot reserve {} for guest RAM in the image ({} free on its file system)", Bytes(*.bytes), Bytes(*.free))]
    Reserve {
        /// Bytes of the RAM region.
        bytes: u64,
        /// Bytes free on the file system before the attempt.
        free: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `fstat` or `fstatvfs` of the image file failed.
    #[error("cannot read how much room the image and its file system have")]
    Space(#[source] io::Error),
    /// Reading random bytes for the image's UUID failed.
    #[error("cannot generate the image UUID")]
    Random(#[source] io::Error),
    /// Persisting the directory entry of a new image failed.
    #[error("cannot persist the directory entry of {path}")]
    SyncDir {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image's bytes are not a valid image (see [`FormatError`]).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Writing or persisting through the backing failed.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The bytes in a state slot do not match the CRC in the meta record naming them.
    #[error("state slot {slot} CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    StateCrc {
        /// Slot index.
        slot: usize,
        /// CRC in the meta record.
        stored: u32,
        /// CRC of the slot's bytes.
        computed: u32,
    },
    /// A commit's state does not fit a state slot.
    #[error("state of {len} bytes does not fit the {slot_bytes}-byte state slot")]
    StateTooLarge {
        /// State bytes offered.
        len: u64,
        /// Slot capacity.
        slot_bytes: u64,
    },
    /// `commit` was asked to record a status only `create` records.
    #[error("a commit cannot record status {0}")]
    CommitStatus(Status),
    /// The epoch counter would overflow.
    #[error("the epoch counter is exhausted")]
    EpochExhausted,
    /// An earlier write or persist failed mid-commit; what is durable is unknown until a reopen.
    #[error("an earlier persist of this image failed; reopen it before committing again")]
    Poisoned,
    /// The page cache holds what the disk lacks of the image, and dropping
    /// it did not help (rule 3 of the format spec's "What the page cache
    /// holds is not what the disk holds").
    #[error(
        "the page cache holds parts of this image that its disk lacks (a write the disk \
         failed), and they could not be dropped from it; unmount and mount its file system \
         again (or reboot), then resume"
    )]
    CacheUnlikeDisk,
    /// `commit_epoch` on an image made for suspend-only persistence.
    #[error("the image was made for suspend-only persistence: it has no redo log for epochs")]
    NotEpochMode,
    /// An epoch's changes do not fit one half of the redo log.
    #[error("{pages} dirty pages ({bytes} bytes of changes) do not fit a redo-log record of at most {room} bytes")]
    LogFull {
        /// Pages offered.
        pages: usize,
        /// Bytes of payload offered.
        bytes: usize,
        /// Most payload bytes one record holds in this image.
        room: usize,
    },
    /// The whole pages of an epoch's changes are not 4096 bytes per page.
    #[error("{bytes} bytes of page data for {pfns} page numbers (4096 bytes each)")]
    PageBuffer {
        /// Page numbers offered.
        pfns: usize,
        /// Bytes of page data offered.
        bytes: usize,
    },
    /// A page number outside guest RAM.
    #[error("page {pfn} is outside guest RAM ({ram_pages} pages)")]
    PfnOutOfRange {
        /// The page number.
        pfn: u64,
        /// Pages of guest RAM.
        ram_pages: u64,
    },
    /// A commit was attempted before the previous epoch's pages were applied.
    #[error("epoch {0} is committed but its pages are not applied yet (apply_committed)")]
    ApplyPending(u64),
    /// `apply_committed` without a committed, unapplied epoch.
    #[error("no committed epoch is waiting to be applied")]
    NothingToApply,
    /// `apply_committed` was given other pages than the epoch committed.
    #[error("the pages to apply are not the ones epoch {0} committed")]
    ApplyMismatch(u64),
    /// The image must be recovered (redo log replayed) before this operation.
    #[error("the image needs recovery (redo-log replay) first")]
    RecoveryPending,
    /// Both log halves hold a valid record of the same epoch: the image contradicts itself.
    #[error("both redo-log halves hold a valid record for epoch {0}")]
    LogConflict(u64),
    /// Format 3: the redo log lacks what restoring the newest committed
    /// epoch needs (only media damage or a foreign write can do that).
    #[error("the redo log cannot restore epoch {epoch}: {why}")]
    LogBroken {
        /// The epoch that would be restored.
        epoch: u64,
        /// What is missing.
        why: String,
    },
    /// A log record no longer matched its CRC while it was replayed.
    #[error("the redo-log record of epoch {0} changed while it was replayed")]
    LogChanged(u64),
    /// An error about the contents of the image at `path` (the source says
    /// what), for a message that names the file: see [`ImageError::in_image`].
    #[error("{}", path.display())]
    In {
        /// The image path.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<ImageError>,
    },
}

impl ImageError {
    /// This error as one about the image at `path`: the variants whose
    /// message does not name the file already (a bad header, a CRC
    /// mismatch, a failed read, …) are wrapped in [`ImageError::In`], so the
    /// user reads `/var/lib/vm.img: not an nvhv image`, not just the latter.
    pub fn in_image(self, path: &Path) -> ImageError {
        match self {
            ImageError::NotFound(_)
            | ImageError::Exists(_)
            | ImageError::NotRegular(_)
            | ImageError::Open { .. }
            | ImageError::Create { .. }
            | ImageError::InUse(_)
            | ImageError::Lock { .. }
            | ImageError::SyncDir { .. }
            | ImageError::NoRoomBeside { .. }
            | ImageError::Publish { .. }
            | ImageError::In { .. } => self,
            e => ImageError::In {
                path: path.to_owned(),
                source: Box::new(e),
            },
        }
    }
}

/// Why the VM in an image cannot be resumed, in words for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct NotResumable {
    /// One sentence naming the problem.
    pub reason: String,
}

impl NotResumable {
    fn new(reason: impl Into<String>) -> Self {
        NotResumable {
            reason: reason.into(),
        }
    }
}

/// How long each step of a commit took.
///
/// For [`Image::commit`]: state write, its persist, meta write, its persist.
/// For [`Image::commit_epoch`], which persists once: `state_write` is the
/// time to issue every write (log record and state), `state_persist` the one
/// persist (the commit point), and the meta fields are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitTimes {
    /// The epoch just committed.
    pub epoch: u64,
    /// Bytes of redo-log payload written (0 for a meta-record commit).
    pub log_bytes: u64,
    /// Bytes of state written.
    pub state_bytes: u64,
    /// Writing the state slot (and, for an epoch, the log record).
    pub state_write: Duration,
    /// Persisting it (with dirty RAM pages, on File backing).
    pub state_persist: Duration,
    /// Writing the meta record.
    pub meta_write: Duration,
    /// Persisting the meta record: after this the commit is durable.
    pub meta_persist: Duration,
    /// The whole commit.
    pub total: Duration,
}

/// An open, validated image. Opened from a path ([`Image::open`],
/// [`Image::create`]) it is a [`FileStorage`], exclusively locked (`flock`)
/// for as long as it lives.
#[derive(Debug)]
pub struct Image<S: Storage = FileStorage> {
    pub(super) storage: S,
    pub(super) header: Header,
    /// The meta blocks as last read or written.
    pub(super) meta: MetaSelection,
    /// The committed point the VM continues from: the current meta record,
    /// or (epoch mode) the meta record recovery will write / the last epoch
    /// committed through the redo log.
    pub(super) current: Meta,
    /// What recovery found (or would do) when the image was opened.
    pub(super) plan: RecoveryPlan,
    /// `plan` still has writes to do (`recover` not called yet).
    pub(super) recovery_pending: bool,
    /// The payloads of the records `plan` replays, read when it was made.
    pub(super) replay_payloads: super::recovery::Payloads,
    /// The epoch committed by `commit_epoch` whose pages are not applied yet.
    pub(super) unapplied: Option<Unapplied>,
    /// Writes were issued (log apply, replay) that no persist covers yet.
    pub(super) unpersisted: bool,
    pub(super) poisoned: bool,
    /// Epoch mode, format 3: where the next log record goes and the
    /// committed pages not yet written to the RAM image.
    pub(super) log: LogWriter,
    /// Pages written to the RAM image by applies since the image was opened.
    pub(super) pages_applied: u64,
    /// The pages applies wrote to the RAM image since the last
    /// [`Image::drain_written`], when asked to keep them
    /// ([`Image::keep_written`]).
    pub(super) written: Option<Vec<u64>>,
    /// Format 3: recovery continued the log instead of sealing it, so the
    /// next `mark_running` writes no meta record (see there).
    pub(super) log_continued: bool,
}

/// What [`read_validated`] proved about an image.
pub(super) struct Validated {
    pub(super) header: Header,
    pub(super) meta: MetaSelection,
    pub(super) file_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes of the image file not yet allocated (holes in a sparse RAM
    /// region), which the VM may still need.
    pub unallocated: u64,
    /// Bytes free on the file system for an unprivileged writer.
    pub free: u64,
}

impl Space {
    /// Whether the file system could fill before the image is whole.
    pub fn short(&self) -> bool {
        self.unallocated > self.free
    }
}

/// Room left on the file system holding `file`.
pub(super) fn free_bytes(file: &File) -> io::Result<u64> {
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs on an fd we own, writing only into `st`, which lives
    // across the call.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// [`Space`] of `file`: its length less what it has allocated, and the
/// file system's free bytes.
pub(super) fn space_of(file: &File) -> Result<Space, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let md = file.metadata().map_err(ImageError::Space)?;
    let allocated = md.blocks().saturating_mul(512);
    Ok(Space {
        unallocated: md.len().saturating_sub(allocated),
        free: free_bytes(file).map_err(ImageError::Space)?,
    })
}

impl Image<FileStorage> {
    /// Opens an existing image read-write, takes its exclusive lock
    /// ([`ImageError::InUse`] if another process has it), and validates the
    /// header, the file length, the meta records and (epoch mode) the redo
    /// log. Never writes: if the log must be replayed, [`Image::recover`]
    /// does it.
    pub fn open(path: &Path) -> Result<Image, ImageError> {
        let file = open_rw(path)?;
        lock(&file, path, libc::LOCK_EX)?;
        Image::open_locked(path, file)
    }

    /// For a standby holding the image's [`Successor`] lock: like
    /// [`Image::open`], but waits for the process holding the image's lock
    /// (if any) to release it, by stopping or dying, instead of failing with
    /// [`ImageError::InUse`]; the successor lock is let go once the image
    /// lock is held. The image it returns is the one at `path` once the
    /// lock is taken: if the file was replaced at the path meanwhile, the
    /// claim and the wait start again on the new one. Also returns when
    /// the lock was taken.
    pub fn open_when_free(
        path: &Path,
        mut successor: Successor,
    ) -> Result<(Image, Instant), ImageError> {
        loop {
            let file = open_rw(path)?;
            wait_lock(&file, path)?;
            let locked = Instant::now();
            // ORDER: compare after the lock is taken: a file that was still
            // at the path then is the one every later opener locks too.
            if at_path_and_claimed(path, &file, &successor)? {
                let image = Image::open_locked(path, file)?;
                drop(successor);
                return Ok((image, locked));
            }
            drop(file);
            successor = Successor::wait(path)?;
        }
    }

    /// For a standby holding the image's [`Successor`] lock, once the thread
    /// that wrote the image in the process it replaces is gone (its death
    /// notice ended) but that process may still hold the image lock while
    /// the kernel tears it down: opens the image at once, as
    /// [`Image::open`] would, and takes the image lock on a thread of its
    /// own when the kernel frees it, the successor lock keeping every other
    /// opener out until then. Falls back to [`Image::open_when_free`] if
    /// the file at `path` is no longer the one claimed.
    pub fn open_taken_over(
        path: &Path,
        successor: Successor,
    ) -> Result<(Image, Instant), ImageError> {
        let file = open_rw(path)?;
        if !at_path_and_claimed(path, &file, &successor)? {
            return Image::open_when_free(path, successor);
        }
        let taken = Instant::now();
        let ours = file.try_clone().map_err(read_err("image descriptor"))?;
        let image = Image::open_locked(path, file)?;
        let p = path.to_owned();
        let waiter = std::thread::Builder::new()
            .name("nvhv-lock".into())
            .spawn(move || match wait_lock(&ours, &p) {
                // ORDER: the claim goes only once the image lock is ours.
                Ok(()) => drop(successor),
                Err(e) => {
                    tracing::warn!("{e}: the image stays claimed until this process ends");
                    std::mem::forget(successor);
                }
            });
        if let Err(e) = waiter {
            return Err(read_err("a thread to take the image lock")(e));
        }
        Ok((image, taken))
    }

    /// The header of the image at `path`, read without its lock (the image
    /// may be in use): what the VM of a resume will need, to set it up
    /// before the image is free. Checked like [`Image::open`] checks it.
    pub fn peek_header(path: &Path) -> Result<(File, Header), ImageError> {
        let file = File::open(path).map_err(|e| open_error(path, e))?;
        check_regular(&file, path)?;
        let header = read_validated(&file).map_err(|e| e.in_image(path))?.header;
        Ok((file, header))
    }

    /// The validation of [`Image::open`], on `file` whose lock is held (or,
    /// [`Image::open_taken_over`], claimed).
    fn open_locked(path: &Path, file: File) -> Result<Image, ImageError> {
        let open = || {
            // ORDER: before anything is read: what the image holds is what
            // its disk holds from here on (see `settle`), but for what a
            // writer killed in a failing persist left in the page cache,
            // which `checked_against_disk` finds.
            if super::backing::settle(&file)? {
                tracing::warn!(
                    "an earlier write of this image failed on its disk; the image is read \
                     from the disk, not from the page cache"
                );
            }
            let v = read_validated(&file)?;
            let backing = Backing::detect(&file, v.header.geometry.ram.offset, true)?;
            let storage = FileStorage::new(path, file, backing);
            match storage.kind() {
                BackingKind::File => Image::open_validated(storage, v)?.checked_against_disk(),
                // No page cache of their own: what is read is what is kept.
                BackingKind::Tmpfs | BackingKind::Dax => Image::open_validated(storage, v),
            }
        };
        open().map_err(|e| e.in_image(path))
    }

    /// The image file (for mapping the RAM region).
    pub fn file(&self) -> &File {
        self.storage.file()
    }

    /// The path the image was opened at.
    pub fn path(&self) -> &Path {
        self.storage.path()
    }

    /// From now on only the calling thread may write the image: writes and
    /// persists from any other fail (`BackingError::WrongThread`). Taken by
    /// the thread that holds the death notice a standby waits on, so that
    /// the notice's rule is checked, not only written down.
    pub fn pin_writer(&mut self) {
        self.storage.pin_writer();
    }

    /// What the image lives on.
    pub fn backing(&self) -> BackingKind {
        self.storage.kind()
    }

    /// How much the image may still grow and how much room its file system
    /// has (a sparse RAM region takes room as the guest touches its pages).
    pub fn space(&self) -> Result<Space, ImageError> {
        space_of(self.file())
    }

    /// This image, opened over the page cache, as its disk holds it: if a
    /// place the last writer may have left unpersisted ([`unpersisted_places`])
    /// reads otherwise from the disk ([`compare_with_disk`]), it is opened
    /// again with the page cache of its metadata dropped, and checked again.
    fn checked_against_disk(self) -> Result<Image, ImageError> {
        let places = unpersisted_places(&self.header, &self.plan, &self.current);
        match compare_with_disk(&self.storage, self.storage.file(), &places) {
            OnDisk::Same => return Ok(self),
            OnDisk::Differs => tracing::warn!(
                "the page cache held what the disk lacks of this image (a write that failed \
                 on the disk); the image is read from the disk"
            ),
            OnDisk::Unknown => tracing::debug!(
                "no direct I/O on this file system: the image's metadata is read from the disk"
            ),
        }
        let meta_end = self.header.geometry.ram.offset;
        // ORDER: the image (its views of the log) is dropped before the
        // cache: no mapped page is ever evicted.
        let storage = self.into_storage();
        super::backing::read_from_disk(storage.file(), 0, meta_end);
        let v = read_validated(&storage)?;
        let image = Image::open_validated(storage, v)?;
        let places = unpersisted_places(&image.header, &image.plan, &image.current);
        match compare_with_disk(&image.storage, image.storage.file(), &places) {
            OnDisk::Differs => Err(ImageError::CacheUnlikeDisk),
            OnDisk::Same | OnDisk::Unknown => Ok(image),
        }
    }
}

impl<S: Storage> Image<S> {
    /// Formats `storage` (already at least `header.geometry.image_len()`
    /// bytes, zero before the RAM region) as a new image: meta block 0 gets a
    /// `Created` record (epoch 0), persisted before the header.
    pub fn format(mut storage: S, header: Header) -> Result<Image<S>, ImageError> {
        let g = header.geometry;
        let meta = Meta {
            epoch: 0,
            status: Status::Created,
            state_slot: 0,
            state_len: 0,
            state_crc: crc32c::crc32c(&[]),
            log_head: 0,
            log_tail: 0,
            image_uuid: header.uuid,
            time_unix_ns: now_ns(),
        };
        storage.write_at(g.meta[0].offset, &meta.encode())?;
        // ORDER: the Created meta record (and the file size) must be durable
        // before the header that makes the file an image.
        storage.persist(0, g.ram.offset)?;
        storage.write_at(0, &header.encode())?;
        storage.persist(0, HEADER_LEN as u64)?;
        let selection = MetaSelection {
            current_block: 0,
            current: meta.clone(),
            blocks: [Ok(meta.clone()), Err(FormatError::MetaBlank)],
        };
        Ok(Image {
            storage,
            plan: RecoveryPlan::nothing(&header, &meta),
            meta: selection,
            recovery_pending: false,
            replay_payloads: Default::default(),
            unapplied: None,
            unpersisted: false,
            poisoned: false,
            log: LogWriter::new(meta.epoch, half_region(header.geometry.log, 0).size),
            pages_applied: 0,
            written: None,
            log_continued: false,
            current: meta,
            header,
        })
    }

    /// Validates the image held by `storage` (header, length, meta records,
    /// redo log) and works out what recovery must do. Never writes.
    pub fn open_storage(storage: S) -> Result<Image<S>, ImageError> {
        let v = read_validated(&storage)?;
        Image::open_validated(storage, v)
    }

    /// [`Image::open_storage`] of `storage` whose header and meta records
    /// `v` were read and checked.
    fn open_validated(storage: S, v: Validated) -> Result<Image<S>, ImageError> {
        let t = std::time::Instant::now();
        let (plan, replay_payloads) = plan_recovery_keeping(&storage, &v.header, &v.meta.current)?;
        tracing::debug!(
            plan_us = t.elapsed().as_micros() as u64,
            replay = plan.replay.len(),
            "recovery planned"
        );
        let current = plan.current(&v.header, &v.meta.current);
        Ok(Image {
            log: LogWriter::new(current.epoch, half_region(v.header.geometry.log, 0).size),
            pages_applied: 0,
            written: None,
            log_continued: false,
            recovery_pending: plan.needs_writes(),
            replay_payloads,
            storage,
            header: v.header,
            meta: v.meta,
            current,
            plan,
            unapplied: None,
            unpersisted: false,
            poisoned: false,
        })
    }

    /// The storage the image lives in.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The storage, consuming the image (and, for a file, its lock).
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// The validated header: config, UUID, geometry.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// File offset of the guest RAM region (2 MiB aligned).
    pub fn ram_offset(&self) -> u64 {
        self.header.geometry.ram.offset
    }

    /// The committed point the VM continues from. Normally the current meta
    /// record; in epoch mode, after `commit_epoch`, the epoch committed
    /// through the redo log (no meta record is written per epoch), and after
    /// `open`, the record `recover` makes current.
    pub fn current(&self) -> &Meta {
        &self.current
    }

    /// Both meta blocks as last read or written: each record, or why it is invalid.
    pub fn meta_blocks(&self) -> &MetaSelection {
        &self.meta
    }

    /// What recovery found in the redo log when the image was opened, and
    /// what it does (or did) about it.
    pub fn recovery_plan(&self) -> &RecoveryPlan {
        &self.plan
    }

    /// Whether the VM can be resumed from [`Image::current`]: its status
    /// fits the persist mode, it names a state, and the state matches its CRC.
    pub fn resumable(&self) -> Result<(), NotResumable> {
        resumability(&self.storage, &self.header, &self.current)
    }

    /// The machine state of [`Image::current`], checked against its CRC.
    /// In epoch mode, refused until [`Image::recover`] has replayed the log
    /// (the state would not match the RAM image yet).
    pub fn read_state(&self) -> Result<Vec<u8>, ImageError> {
        if self.recovery_pending && !self.plan.replay.is_empty() {
            return Err(ImageError::RecoveryPending);
        }
        self.restored_state()
    }

    /// The machine state of [`Image::current`] (checked against its CRC)
    /// even before [`Image::recover`] has run: what recovery restores, so
    /// that a resume can decode it and set up the VM while recovery replays
    /// the log. Guest RAM matches it only once `recover` has returned.
    /// Recovery writes no state slot, so the bytes stay valid.
    pub fn restored_state(&self) -> Result<Vec<u8>, ImageError> {
        read_state(&self.storage, &self.header, &self.current)
    }

    /// Commits a `Running` record (epoch + 1, same state slot) and persists
    /// it. Call before guest code runs on a shared mapping of the RAM image:
    /// from then on, a crash leaves RAM newer than the saved state, and the
    /// image says so. In epoch mode (private RAM mapping) the record keeps
    /// the image resumable.
    pub fn mark_running(&mut self) -> Result<(), ImageError> {
        self.ready_to_commit()?;
        if std::mem::take(&mut self.log_continued) {
            // Recovery continued the log (epoch mode, private RAM mapping):
            // the current meta record stays, the log's records say what the
            // VM continues from, and a meta record now would first have to
            // persist the replayed pages, the wait continuing saves.
            return Ok(());
        }
        let meta = Meta {
            epoch: self.next_epoch()?,
            status: Status::Running,
            time_unix_ns: now_ns(),
            ..self.current.clone()
        };
        self.write_meta(meta).map(drop)
    }

    /// Commits `state` as epoch + 1 with `status`.
    ///
    /// Writes the state into the slot the current record does not name,
    /// persists it (on File backing that one `fdatasync` also covers guest RAM
    /// pages dirtied through a shared mapping of this file, and in epoch mode
    /// the pages `apply_committed` wrote; on DAX the caller must have written
    /// back RAM pages dirtied through a mapping with
    /// [`super::backing::write_back`]), then writes the meta record into the
    /// block not holding the current record and persists that. The commit is
    /// durable when this returns.
    pub fn commit(&mut self, status: Status, state: &[u8]) -> Result<CommitTimes, ImageError> {
        let start = Instant::now();
        if status == Status::Created {
            return Err(ImageError::CommitStatus(status));
        }
        self.ready_to_commit()?;
        let epoch = self.next_epoch()?;
        let slot = 1 - self.current.state_slot.min(1);
        let region = self.header.geometry.state[slot];
        let len = state.len() as u64;
        if len > region.size {
            return Err(ImageError::StateTooLarge {
                len,
                slot_bytes: region.size,
            });
        }
        // The slot is not named by the current record, so a crash from here
        // on leaves the current commit intact.
        self.poisoned = true;
        let t = Instant::now();
        // Epoch mode, format 3: the meta record says every epoch is applied.
        self.write_pending(usize::MAX, u64::MAX)?;
        self.storage.write_at(region.offset, state)?;
        let state_write = t.elapsed();
        let t = Instant::now();
        // ORDER: the state slot (and the guest RAM pages it goes with: pages
        // dirtied through a shared mapping, or applied from the redo log) must
        // be durable before the meta record that names it.
        if self.unpersisted {
            self.persist_all()?;
        } else {
            self.storage.persist(region.offset, len)?;
        }
        let state_persist = t.elapsed();
        self.poisoned = false;
        let meta = Meta {
            epoch,
            status,
            state_slot: slot,
            state_len: len,
            state_crc: crc32c::crc32c(state),
            time_unix_ns: now_ns(),
            ..self.current.clone()
        };
        let (meta_write, meta_persist) = self.write_meta(meta)?;
        Ok(CommitTimes {
            epoch,
            log_bytes: 0,
            state_bytes: len,
            state_write,
            state_persist,
            meta_write,
            meta_persist,
            total: start.elapsed(),
        })
    }

    /// Refuses a commit on a poisoned image, before recovery, or while a
    /// committed epoch waits to be applied.
    pub(super) fn ready_to_commit(&self) -> Result<(), ImageError> {
        if self.poisoned {
            return Err(ImageError::Poisoned);
        }
        if self.recovery_pending {
            return Err(ImageError::RecoveryPending);
        }
        if let Some(u) = &self.unapplied {
            return Err(ImageError::ApplyPending(u.epoch));
        }
        Ok(())
    }

    pub(super) fn next_epoch(&self) -> Result<u64, ImageError> {
        self.current
            .epoch
            .checked_add(1)
            .ok_or(ImageError::EpochExhausted)
    }

    /// Persists every write issued so far, wherever it is (log, state, RAM).
    pub(super) fn persist_all(&mut self) -> Result<(), BackingError> {
        self.storage.persist(0, self.header.geometry.image_len())?;
        self.unpersisted = false;
        self.log.persisted();
        Ok(())
    }

    /// Writes `meta` into the block not holding the current record, persists
    /// it, and makes it current. In epoch mode, first persists any writes no
    /// persist covers yet (applied or replayed pages), and marks the record's
    /// log span as live (see docs/nvram-format.md, "Meta records in epoch mode").
    pub(super) fn write_meta(
        &mut self,
        mut meta: Meta,
    ) -> Result<(Duration, Duration), ImageError> {
        if self.poisoned {
            return Err(ImageError::Poisoned);
        }
        if self.header.config.persist == PersistMode::Epoch {
            (meta.log_head, meta.log_tail) = (0, self.header.log_bytes());
        }
        let block = 1 - self.meta.current_block.min(1);
        let region = self.header.geometry.meta[block];
        self.poisoned = true;
        // Format 3: pages still pending are written first (covered below).
        self.write_pending(usize::MAX, u64::MAX)?;
        if self.unpersisted {
            // ORDER: a meta record in epoch mode says that every log record up
            // to its epoch is applied to the RAM image: those writes must be
            // durable before it.
            self.persist_all()?;
        }
        let t = Instant::now();
        // A torn write of this block leaves the current record in the other
        // block, which recovery then picks (its CRC fails on this one).
        self.storage.write_at(region.offset, &meta.encode())?;
        let meta_write = t.elapsed();
        let t = Instant::now();
        // ORDER: the commit is durable only after this persist; nothing that
        // depends on it (released output, log apply) may happen before.
        self.storage.persist(region.offset, META_LEN as u64)?;
        let meta_persist = t.elapsed();
        self.poisoned = false;
        self.meta.blocks[block] = Ok(meta.clone());
        self.meta.current = meta.clone();
        self.meta.current_block = block;
        if self.header.config.persist == PersistMode::Epoch {
            // Every record is at or below this meta record now: applied.
            self.log.reset(meta.epoch);
        }
        self.current = meta;
        Ok((meta_write, meta_persist))
    }
}

pub(super) fn read_err(what: &'static str) -> impl FnOnce(io::Error) -> ImageError {
    move |source| ImageError::Read { what, source }
}

/// The places (file offset, length) of what a plan over the page cache
/// relied on that the last writer may have left unpersisted.
///
/// A writer told of a failed write-back (its `fdatasync` returned EIO)
/// that died before it could act on it (a SIGKILL while it waited in that
/// call) leaves clean pages the disk lacks, and no error for anyone else
/// to see: the settle's `fdatasync` succeeds. What such a writer can have
/// written since its last completed persist is narrow: the meta records,
/// the state slots, and the newest records of the log (a record is written
/// only after the one before it committed, W1 in the format spec), which
/// are the ones the plan restores or finds above that. So the places are
/// both meta records, those records (`RecoveryPlan::maybe_unpersisted`)
/// and the state the plan restores (`current`). Everything else the plan
/// read is older than the writer's last completed persist, and the same
/// in the cache as on the disk. (The RAM region is trusted only as far as
/// a record says it was durably applied, which is said only after a
/// persist of it completed.)
pub(super) fn unpersisted_places(
    header: &Header,
    plan: &RecoveryPlan,
    current: &Meta,
) -> Vec<(u64, u64)> {
    let mut places: Vec<(u64, u64)> = header
        .geometry
        .meta
        .iter()
        .map(|r| (r.offset, META_LEN as u64))
        .collect();
    places.extend(plan.maybe_unpersisted(header));
    let slot = header.geometry.state[current.state_slot.min(1)];
    places.push((slot.offset, current.state_len.min(slot.size)));
    places
}

/// How [`compare_with_disk`] found the places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnDisk {
    /// The page cache holds what the disk holds there.
    Same,
    /// It does not (or a read failed).
    Differs,
    /// The file system does no direct I/O: the disk cannot be read past
    /// the page cache.
    Unknown,
}

/// Whether `places` (from [`unpersisted_places`]) read the same from the
/// page cache (`storage`) as from the disk, read past the cache
/// (`O_DIRECT` on `file`). Costs a few reads from the disk.
///
/// Not by dropping the places from the cache and reading them again: the
/// kernel caches a file in folios of up to 2 MiB (ext4 here), and a drop
/// leaves every folio the range does not cover whole. A record's pages
/// written into a larger folio stayed cached, and the check compared the
/// cache with itself. Dropping everything before the RAM region instead
/// cost 5–9 ms a resume on ext4 here (recovery then read ~150 record
/// headers one disk read each); it is kept for when the places differ.
pub(super) fn compare_with_disk<S: Storage + ?Sized>(
    storage: &S,
    file: &File,
    places: &[(u64, u64)],
) -> OnDisk {
    let t = Instant::now();
    let Ok(direct) = super::backing::open_direct(file) else {
        return OnDisk::Unknown;
    };
    let same = places.iter().all(|&(offset, len)| {
        let Ok(n) = usize::try_from(len) else {
            return false;
        };
        let mut cached = vec![0u8; n];
        storage.read_at(offset, &mut cached).is_ok()
            && super::backing::read_direct(&direct, offset, len).is_ok_and(|d| d == cached)
    });
    tracing::debug!(
        us = t.elapsed().as_micros() as u64,
        places = places.len(),
        same,
        "what the last writer may have left unpersisted, compared with the disk"
    );
    if same {
        OnDisk::Same
    } else {
        OnDisk::Differs
    }
}

/// Reads and validates the header, the file length and both meta records.
/// Every read is bounded by a constant (a header block, two meta records).
pub(super) fn read_validated<S: Storage + ?Sized>(s: &S) -> Result<Validated, ImageError> {
    let file_len = s.size().map_err(read_err("image metadata"))?;
    let mut head = vec![0u8; file_len.min(HEADER_BLOCK) as usize];
    s.read_at(0, &mut head).map_err(read_err("header"))?;
    let header = Header::parse(&head)?;
    check_file_len(&header, file_len)?;
    let mut blocks = [[0u8; META_LEN]; 2];
    for (block, region) in blocks.iter_mut().zip(header.geometry.meta) {
        s.read_at(region.offset, block)
            .map_err(read_err("meta records"))?;
    }
    let meta = select_meta(&header, &blocks[0], &blocks[1])?;
    Ok(Validated {
        header,
        meta,
        file_len,
    })
}

/// The state `meta` names, checked against its CRC. Allocates at most one
/// state slot (bounded by the validated geometry).
pub(super) fn read_state<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    meta: &Meta,
) -> Result<Vec<u8>, ImageError> {
    let slot = meta.state_slot.min(1);
    let region = header.geometry.state[slot];
    if meta.state_len > region.size {
        return Err(FormatError::BadMeta(format!(
            "state length {} exceeds its {}-byte slot",
            meta.state_len, region.size
        ))
        .into());
    }
    let len = usize::try_from(meta.state_len)
        .map_err(|_| FormatError::BadMeta("state length does not fit in memory".into()))?;
    let mut buf = vec![0u8; len];
    s.read_at(region.offset, &mut buf)
        .map_err(read_err("state slot"))?;
    let computed = crc32c::crc32c(&buf);
    if computed != meta.state_crc {
        return Err(ImageError::StateCrc {
            slot,
            stored: meta.state_crc,
            computed,
        });
    }
    Ok(buf)
}

/// Whether the VM can resume from `meta` (the committed point: a meta record,
/// or in epoch mode the record recovery makes current). See
/// docs/nvram-format.md ("Status").
pub(super) fn resumability<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    meta: &Meta,
) -> Result<(), NotResumable> {
    let mode = header.config.persist;
    match (meta.status, mode) {
        (Status::Created, PersistMode::SuspendOnly) => {
            return Err(NotResumable::new(
                "the image was created but never suspended: it holds no VM state",
            ))
        }
        (Status::Created, PersistMode::Epoch) => {
            return Err(NotResumable::new(
                "the image was created but no epoch was ever committed: it holds no VM state",
            ))
        }
        (Status::Running, PersistMode::SuspendOnly) => {
            return Err(NotResumable::new(
                "the VM was running in suspend-only mode and stopped without suspending (crash or kill): \
                 guest RAM is newer than the saved state",
            ))
        }
        (Status::Committed, PersistMode::SuspendOnly) => {
            return Err(NotResumable::new(
                "the last commit was taken while the VM kept running in suspend-only mode: \
                 guest RAM is newer than the saved state",
            ))
        }
        _ => {}
    }
    if meta.state_len == 0 {
        let why = match mode {
            PersistMode::Epoch => ": no epoch was ever committed",
            PersistMode::SuspendOnly => "",
        };
        return Err(NotResumable::new(format!(
            "the current meta record (epoch {}, {}) names no saved state{why}",
            meta.epoch, meta.status
        )));
    }
    // Suspend-only images never use the redo log (v1); in epoch mode the
    // log span is always live and recovery replays what the log holds.
    if mode == PersistMode::SuspendOnly && meta.log_tail != meta.log_head {
        return Err(NotResumable::new(format!(
            "the redo log holds {} committed bytes, which suspend-only mode never writes",
            meta.log_tail - meta.log_head
        )));
    }
    read_state(s, header, meta)
        .map(drop)
        .map_err(|e| NotResumable::new(e.to_string()))
}

pub(super) fn open_error(path: &Path, e: io::Error) -> ImageError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ImageError::NotFound(path.to_owned()),
        Some(libc::EISDIR) => ImageError::NotRegular(path.to_owned()),
        _ => ImageError::Open {
            path: path.to_owned(),
            source: e,
        },
    }
}

/// `path` opened read-write, a regular file.
pub(super) fn open_rw(path: &Path) -> Result<File, ImageError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| open_error(path, e))?;
    check_regular(&file, path)?;
    Ok(file)
}

/// Whether `file` is the file at `path` now, and the one `successor`
/// claimed.
fn at_path_and_claimed(
    path: &Path,
    file: &File,
    successor: &Successor,
) -> Result<bool, ImageError> {
    let now = std::fs::metadata(path).map_err(|e| open_error(path, e))?;
    let id = |f: &File| {
        f.metadata()
            .map(|m| (m.dev(), m.ino()))
            .map_err(read_err("image metadata"))
    };
    let at_path = (now.dev(), now.ino());
    Ok(id(file)? == at_path && id(successor.file())? == at_path)
}

pub(super) fn check_regular(file: &File, path: &Path) -> Result<(), ImageError> {
    let ft = file
        .metadata()
        .map_err(read_err("image metadata"))?
        .file_type();
    if !ft.is_file() {
        return Err(ImageError::NotRegular(path.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Pins the clock in records and meta records, so that tests counting
    /// distinct images get the same count on every run.
    pub(super) static FIXED_NOW_NS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

pub(super) fn now_ns() -> u64 {
    #[cfg(test)]
    if let Some(t) = FIXED_NOW_NS.with(std::cell::Cell::get) {
        return t;
    }
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
pub(super) mod tests;
