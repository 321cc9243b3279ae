//! Making a new image, which appears at its path only once it is complete.
//!
//! [`Image::prepare`] makes the image as an unnamed file (`O_TMPFILE`) in
//! the directory of its path: sized, its metadata regions allocated, its
//! RAM region reserved if asked, formatted (a `Created` meta record, then
//! the header, each persisted). The caller may commit more before it calls
//! [`NewImage::publish`], which links the file at the path (in epoch mode
//! `nvhv run` commits the VM's first epoch first, so what appears at the
//! path is resumable). A `run` killed or failing at any point before that leaves
//! the path as it was: nothing, or, under `--force`, the file it was to
//! replace, which stays locked meanwhile so that nobody resumes it. The
//! unnamed file and its room go with the process (after a power cut, with
//! the file system's orphan cleanup).
//!
//! A file system without `O_TMPFILE` gets the image made at the path
//! itself, as before: removed again on a failure, and what a kill leaves
//! has an all-zero header, which `inspect` names as a creation that never
//! finished.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::backing::{Backing, BackingKind};
use super::image::{free_bytes, open_rw, space_of, ImageError, Space};
use super::layout::{Header, ImageConfig, Uuid, MAGIC};
use super::lock::lock;
use super::storage::FileStorage;
use super::Image;

/// How [`Image::prepare`] makes a new image.
#[derive(Clone, Copy, Default)]
pub struct CreateOptions<'a> {
    /// Replace a file already at the path (never one another process holds).
    pub overwrite: bool,
    /// Allocate the whole RAM region now (`posix_fallocate`), so that the
    /// file system can never fill under the running VM. Without it the RAM
    /// region is sparse and takes room as the guest first touches its pages.
    pub reserve_ram: bool,
    /// Told (bytes reserved, bytes to reserve) after each `RESERVE_CHUNK`
    /// (256 MiB) of a `reserve_ram`, for progress shown to the user (tmpfs
    /// takes about a third of a second a GiB here).
    pub on_reserve: Option<&'a dyn Fn(u64, u64)>,
    /// Asked between the pieces of a `reserve_ram`: `true` stops it with
    /// [`ImageError::Cancelled`] (a stop signal while a large region is
    /// reserved).
    pub cancelled: Option<&'a dyn Fn() -> bool>,
}

impl std::fmt::Debug for CreateOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateOptions")
            .field("overwrite", &self.overwrite)
            .field("reserve_ram", &self.reserve_ram)
            .field("on_reserve", &self.on_reserve.is_some())
            .field("cancelled", &self.cancelled.is_some())
            .finish()
    }
}

/// The RAM region is reserved in pieces of this size, each reported to
/// [`CreateOptions::on_reserve`].
pub const RESERVE_CHUNK: u64 = 256 << 20;

/// The permissions of a new image (less the umask): it holds the guest's
/// whole memory, so only its owner may read it. An image that replaces a
/// file takes that file's permissions and owner instead.
pub const IMAGE_MODE: u32 = 0o600;

/// Where a new image is being made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    /// An unnamed file in the path's directory, linked at the path when
    /// published.
    Unnamed,
    /// At the path itself (no `O_TMPFILE` on its file system).
    InPlace,
}

/// A new image that is not yet at its path (see [`Image::prepare`]).
/// Dropped unpublished, it leaves the path as it was before (made in
/// place, the half-made file is removed).
#[derive(Debug)]
pub struct NewImage {
    path: PathBuf,
    made: Made,
    /// A second descriptor of the new image, to link it and to read its
    /// room.
    file: File,
    /// The file at the path that the image replaces, locked until the new
    /// image takes its place.
    replaced: Option<File>,
    kind: BackingKind,
    published: bool,
}

/// What dropping an unpublished [`NewImage`] did to its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discarded {
    /// Nothing was at the path, and nothing is.
    Nothing,
    /// The file that was to be replaced is still there, unchanged.
    OldKept,
    /// The half-made image at the path was removed.
    Removed,
}

impl Image<FileStorage> {
    /// [`Image::create_with`] without reserving the RAM region.
    pub fn create(path: &Path, cfg: &ImageConfig, overwrite: bool) -> Result<Image, ImageError> {
        let opts = CreateOptions {
            overwrite,
            ..Default::default()
        };
        Image::create_with(path, cfg, opts)
    }

    /// [`Image::prepare`] and [`NewImage::publish`] at once: a new image
    /// at `path`, open and locked.
    pub fn create_with(
        path: &Path,
        cfg: &ImageConfig,
        how: CreateOptions,
    ) -> Result<Image, ImageError> {
        let (image, mut new) = Image::prepare(path, cfg, how)?;
        new.publish()?;
        Ok(image)
    }

    /// Makes a new image for `cfg`, open and locked, that is not yet at
    /// `path`: [`NewImage::publish`] puts it there (see the module header).
    ///
    /// Refuses an existing file unless `how.overwrite`, and never replaces
    /// an image another process holds. Every region before guest RAM is
    /// allocated; the RAM region is sparse and reads as zeros, unless
    /// `how.reserve_ram` allocates it too (refused up front if the file
    /// system lacks the room).
    pub fn prepare(
        path: &Path,
        cfg: &ImageConfig,
        how: CreateOptions,
    ) -> Result<(Image, NewImage), ImageError> {
        Image::prepare_as(path, cfg, how, Made::Unnamed)
    }

    fn prepare_as(
        path: &Path,
        cfg: &ImageConfig,
        how: CreateOptions,
        want: Made,
    ) -> Result<(Image, NewImage), ImageError> {
        let (secs, nanos) = now();
        let header = Header::new(cfg, random_uuid()?, secs, nanos)?;
        let mut replaced = existing(path, how.overwrite)?;
        let unnamed = match want {
            Made::Unnamed => open_unnamed(path)?,
            Made::InPlace => None,
        };
        let (file, made) = match unnamed {
            Some(f) => (f, Made::Unnamed),
            None => match replaced.take() {
                Some(old) => (old, Made::InPlace),
                None => (create_new(path)?, Made::InPlace),
            },
        };
        // From here on, a failure drops `new`, which undoes what was done.
        let mut new = NewImage {
            path: path.to_owned(),
            made,
            file: file.try_clone().map_err(|e| create_error(path, e))?,
            replaced,
            kind: BackingKind::File,
            published: false,
        };
        lock(&file, path, libc::LOCK_EX)?;
        if let Some(old) = &new.replaced {
            keep_owner_and_mode(old, &file);
        }
        let g = header.geometry;
        if made == Made::InPlace {
            file.set_len(0).map_err(|e| ImageError::Resize(0, e))?;
        }
        file.set_len(g.image_len())
            .map_err(|e| ImageError::Resize(g.image_len(), e))?;
        let free = free_bytes(&file).map_err(ImageError::Space)?;
        if g.ram.offset > free {
            // Refused by name rather than as fallocate's bare ENOSPC.
            return Err(ImageError::NoRoomForMetadata {
                bytes: g.ram.offset,
                free,
            });
        }
        fallocate(&file, 0, g.ram.offset)?;
        if how.reserve_ram {
            let free = free_bytes(&file).map_err(ImageError::Space)?;
            let old = new.replaced.as_ref().map_or(0, allocated);
            // `free` is what unprivileged users may take: a root nvhv is
            // not let into ext4's reserved blocks either.
            room_for(g.ram.size, free, old, path)?;
            let region = (g.ram.offset, g.ram.size);
            reserve(&file, region, RESERVE_CHUNK, &how).map_err(|e| match e {
                ImageError::Allocate(source) => ImageError::Reserve {
                    bytes: g.ram.size,
                    free,
                    source,
                },
                e => e,
            })?;
        }
        let backing = Backing::detect(&file, g.ram.offset, true)?;
        new.kind = backing.kind();
        let image = Image::format(FileStorage::new(path, file, backing), header)?;
        Ok((image, new))
    }
}

impl NewImage {
    /// Puts the image at its path, replacing the file there under
    /// `overwrite`, and makes that durable (the directory is synced, except
    /// on tmpfs). [`ImageError::Exists`] if, without `overwrite`, a file
    /// appeared at the path meanwhile (it is left alone).
    pub fn publish(&mut self) -> Result<(), ImageError> {
        if self.published {
            return Ok(());
        }
        // ORDER: everything the image holds was persisted by its writes
        // before this link: after a power cut the path holds the old file
        // (or nothing) or the whole new image, never a part of it.
        if self.made == Made::Unnamed {
            if self.replaced.is_some() {
                self.link_replacing()?;
            } else {
                link(&self.file, &self.path).map_err(|e| match e.raw_os_error() {
                    Some(libc::EEXIST) => ImageError::Exists(self.path.clone()),
                    _ => self.publish_error(e),
                })?;
            }
        }
        self.published = true;
        // The old file, if any, is gone from the path: its lock can go.
        self.replaced = None;
        if self.kind != BackingKind::Tmpfs {
            sync_parent_dir(&self.path)?;
        }
        Ok(())
    }

    /// Links the image under a name of its own next to the path, then
    /// renames it over the path (one atomic step for anyone opening it).
    fn link_replacing(&self) -> Result<(), ImageError> {
        let mut temp_name = temp_prefix(&self.path);
        temp_name.push(std::process::id().to_string());
        let temp = self.path.with_file_name(temp_name);
        let mut linked = link(&self.file, &temp);
        if linked
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::EEXIST))
        {
            // Left by an earlier process with this pid that was killed here.
            let _ = std::fs::remove_file(&temp);
            linked = link(&self.file, &temp);
        }
        linked.map_err(|e| self.publish_error(e))?;
        std::fs::rename(&temp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            self.publish_error(e)
        })
    }

    fn publish_error(&self, source: io::Error) -> ImageError {
        ImageError::Publish {
            path: self.path.clone(),
            source,
        }
    }

    /// The room the new image may still take, and its file system's.
    pub fn space(&self) -> Result<Space, ImageError> {
        space_of(&self.file)
    }

    /// Gives the image up unpublished (as dropping it does) and says what
    /// that left at the path.
    pub fn discard(self) -> Discarded {
        match (self.made, self.replaced.is_some()) {
            _ if self.published => Discarded::Nothing,
            (Made::InPlace, _) => Discarded::Removed,
            (Made::Unnamed, true) => Discarded::OldKept,
            (Made::Unnamed, false) => Discarded::Nothing,
        }
    }
}

impl Drop for NewImage {
    fn drop(&mut self) {
        if !self.published && self.made == Made::InPlace {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The start of the name under which a replacing image is linked beside
/// `path` before its rename: `.NAME.nvhv-new-`, then the pid. NAME is cut
/// so that the whole stays within NAME_MAX (255 bytes).
fn temp_prefix(path: &Path) -> std::ffi::OsString {
    let name = path.file_name().unwrap_or_default().as_bytes();
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(std::ffi::OsStr::from_bytes(&name[..name.len().min(200)]));
    prefix.push(".nvhv-new-");
    prefix
}

/// A whole image that a `run --force` killed between [`NewImage::publish`]'s
/// link and its rename left beside the path, under its hidden name
/// (`.NAME.nvhv-new-PID`). It holds the first epoch of a VM that never ran
/// and that nobody was told of, so nothing is lost by removing it; left
/// alone, it would hold its room (all of the VM's RAM under `--reserve`)
/// for good.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Leftover {
    /// Where it was.
    pub path: PathBuf,
    /// The room it held.
    pub bytes: u64,
}

/// The [`Leftover`]s beside `path`, left where they are (`inspect`). A
/// file is one only if its name is a hidden name `path` would be published
/// under, with a pid, it is a regular file starting with an image header,
/// and no process holds its lock: the `run` publishing it holds the lock
/// from before the link to the end of the VM, so a file whose lock is free
/// has no process left to rename it. What cannot be read or locked is not
/// one.
pub fn leftovers(path: &Path) -> Vec<Leftover> {
    scan_leftovers(path, false)
}

/// Removes the [`Leftover`]s beside `path` (see [`leftovers`]) and returns
/// them. Best effort: what cannot be removed is left as it is.
pub fn remove_leftovers(path: &Path) -> Vec<Leftover> {
    scan_leftovers(path, true)
}

fn scan_leftovers(path: &Path, remove: bool) -> Vec<Leftover> {
    let prefix = temp_prefix(path);
    let prefix = prefix.as_bytes();
    let Ok(entries) = std::fs::read_dir(parent_dir(path)) else {
        return Vec::new();
    };
    let mut found: Vec<Leftover> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let pid = name.as_bytes().strip_prefix(prefix)?;
            if pid.is_empty() || !pid.iter().all(u8::is_ascii_digit) {
                return None;
            }
            leftover(&path.with_file_name(name), remove)
        })
        .collect();
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// `path` as a [`Leftover`] if it is one, removed if `remove`.
fn leftover(path: &Path, remove: bool) -> Option<Leftover> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    let mut magic = [0u8; 8];
    if !meta.is_file() || file.read_exact_at(&mut magic, 0).is_err() || magic != MAGIC {
        return None;
    }
    // Held: a live `run` is between its link and its rename.
    lock(&file, path, libc::LOCK_EX).ok()?;
    if remove {
        // Only the file that was checked and locked: a name taken over
        // since (a new process with the same pid) is not ours to remove.
        let now = std::fs::symlink_metadata(path).ok()?;
        if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) {
            return None;
        }
        std::fs::remove_file(path).ok()?;
    }
    Some(Leftover {
        path: path.to_owned(),
        bytes: allocated(&file),
    })
}

/// The file at `path` that a new image is to replace, locked; refused
/// unless `overwrite`.
fn existing(path: &Path, overwrite: bool) -> Result<Option<File>, ImageError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(None);
    }
    if !overwrite {
        return Err(ImageError::Exists(path.to_owned()));
    }
    let file = open_rw(path)?;
    lock(&file, path, libc::LOCK_EX)?;
    Ok(Some(file))
}

/// An unnamed file in the directory of `path`; `None` if its file system
/// cannot make one.
fn open_unnamed(path: &Path) -> Result<Option<File>, ImageError> {
    let dir = parent_dir(path);
    match OpenOptions::new()
        .read(true)
        .write(true)
        .mode(IMAGE_MODE)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    {
        Ok(f) => Ok(Some(f)),
        // What open(2) returns where the kernel or the file system lacks it.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => Ok(None),
        Err(e) => Err(create_error(path, e)),
    }
}

fn create_new(path: &Path) -> Result<File, ImageError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(IMAGE_MODE)
        .create_new(true)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ImageError::Exists(path.to_owned()),
            _ => create_error(path, e),
        })
}

/// An error making the file of a new image at `path`. Not `image.rs`'s
/// `open_error`, which reads a missing file as "no image at PATH": here
/// it means the directory is missing, so the error names the directory.
fn create_error(path: &Path, source: io::Error) -> ImageError {
    ImageError::Create {
        path: path.to_owned(),
        dir: parent_dir(path).to_owned(),
        source,
    }
}

/// Gives `new` the permissions and owner of `old`, the file it replaces, as
/// far as this process may: only root gives a file away, and elsewhere the
/// new image keeps nvhv's owner.
fn keep_owner_and_mode(old: &File, new: &File) {
    let Ok(m) = old.metadata() else {
        return;
    };
    // ORDER: owner before mode: a chown may clear set-id bits. A chown that
    // is not allowed (not root, another owner) leaves nvhv's owner.
    let _ = std::os::unix::fs::fchown(new, Some(m.uid()), Some(m.gid()));
    if let Err(e) = new.set_permissions(m.permissions()) {
        tracing::warn!("cannot give the new image the old one's permissions: {e}");
    }
}

/// Links the open (unnamed) `file` at `to`; `EEXIST` if something is there.
fn link(file: &File, to: &Path) -> io::Result<()> {
    let invalid = |_| io::Error::from_raw_os_error(libc::EINVAL);
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(invalid)?;
    let to = CString::new(to.as_os_str().as_bytes()).map_err(invalid)?;
    // SAFETY: both paths are NUL-terminated strings that outlive the call;
    // linkat reads them and touches no other memory. Through /proc with
    // AT_SYMLINK_FOLLOW is how open(2) documents linking an O_TMPFILE file.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes `file` has allocated.
fn allocated(file: &File) -> u64 {
    file.metadata()
        .map_or(0, |m| m.blocks().saturating_mul(512))
}

/// Whether a RAM region of `need` bytes can be reserved with `free` bytes
/// free, the file it replaces holding `old` more until then. A region the
/// file system cannot hold is refused before any of it is taken
/// (reserving piece by piece would first fill it).
fn room_for(need: u64, free: u64, old: u64, path: &Path) -> Result<(), ImageError> {
    if need <= free {
        Ok(())
    } else if need <= free.saturating_add(old) {
        Err(ImageError::NoRoomBeside {
            path: path.to_owned(),
            bytes: need,
            free,
        })
    } else {
        Err(ImageError::Reserve {
            bytes: need,
            free,
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        })
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn fallocate(file: &File, offset: u64, len: u64) -> Result<(), ImageError> {
    let bad = || ImageError::Allocate(io::Error::from_raw_os_error(libc::EFBIG));
    let off = libc::off_t::try_from(offset).map_err(|_| bad())?;
    let len = libc::off_t::try_from(len).map_err(|_| bad())?;
    // SAFETY: posix_fallocate on an fd we own, within offsets checked above;
    // it returns an error number instead of setting errno.
    let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), off, len) };
    if r != 0 {
        return Err(ImageError::Allocate(io::Error::from_raw_os_error(r)));
    }
    Ok(())
}

/// Allocates the `(offset, len)` region of `file` in pieces of `chunk`
/// bytes, telling `how.on_reserve` (bytes done, `len`) after each, and
/// stopping with [`ImageError::Cancelled`] if `how.cancelled` says so
/// before one.
fn reserve(
    file: &File,
    (offset, len): (u64, u64),
    chunk: u64,
    how: &CreateOptions,
) -> Result<(), ImageError> {
    let mut done = 0;
    while done < len {
        if how.cancelled.is_some_and(|c| c()) {
            return Err(ImageError::Cancelled);
        }
        let piece = chunk.min(len - done);
        fallocate(file, offset + done, piece)?;
        done += piece;
        if let Some(report) = how.on_reserve {
            report(done, len);
        }
    }
    Ok(())
}

fn sync_parent_dir(path: &Path) -> Result<(), ImageError> {
    File::open(parent_dir(path))
        .and_then(|d| d.sync_all())
        .map_err(|source| ImageError::SyncDir {
            path: path.to_owned(),
            source,
        })
}

fn random_uuid() -> Result<Uuid, ImageError> {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        let rest = &mut b[filled..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(ImageError::Random(e));
        }
        filled += r as usize;
    }
    Ok(Uuid::from_random(b))
}

fn now() -> (u64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

#[cfg(test)]
mod tests;
