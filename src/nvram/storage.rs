//! Where an image's bytes live, as the commit and recovery code sees them: a
//! small positional interface ([`Storage`]: size, read, write, persist) with
//! the real implementation over the image file and its backing
//! ([`FileStorage`]), a plain one over a bare `File` (validation before the
//! backing is known, and `inspect`, which only reads), and an in-memory one
//! ([`MemStorage`]) for tests and tools.
//!
//! Every write of `Image` goes through [`Storage::write_at`] and every ordering
//! point through [`Storage::persist`], so a test implementation that records
//! them sees the whole write/persist order of the protocol (the crash-point
//! enumeration in `crash_tests.rs` does exactly that). The one exception is
//! recovery's write-out, which also writes through [`Storage::second_handle`]
//! where a storage offers one (files do; the recording test storages do not,
//! so they still see every write).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::backing::{Backing, BackingError, BackingKind, ReadMap};

/// Positional access to an image's bytes, with a persist primitive.
///
/// A write is not durable until a later [`Storage::persist`] whose range
/// covers it has returned; until then a power cut may leave any part of it
/// (and of any other write issued since the last completed persist) on the
/// medium, in any combination. That is the whole contract the commit protocol
/// relies on (`docs/nvram-format.md`, "Persist model").
pub trait Storage {
    /// Length of the image in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Fills `buf` from `offset`; a read past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes `data` at `offset`. Not durable until a persist covers it.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BackingError>;

    /// Makes every earlier write to `[offset, offset + len)` durable and
    /// orders it before every later write. Implementations may persist more
    /// than the range (`fdatasync` persists the whole file).
    fn persist(&mut self, offset: u64, len: u64) -> Result<(), BackingError>;

    /// A hint, no guarantee: start writing `[offset, offset + len)` to the
    /// medium now, so that a later persist has less left to wait for. Only a
    /// persist makes anything durable.
    fn start_writeback(&mut self, _offset: u64, _len: u64) {}

    /// [`Storage::start_writeback`] in the background, at the lowest
    /// priority: for writes no persist waits on yet.
    fn start_writeback_idle(&mut self, offset: u64, len: u64) {
        self.start_writeback(offset, len);
    }

    /// A hint, no guarantee: the reads that follow, until the next call
    /// with `false`, are scattered; read no more than each asks for.
    fn scattered_reads(&self, _on: bool) {}

    /// `len` bytes from `offset`, to be read only: by default copied out
    /// ([`Storage::read_at`]); a file may hand out a view of them in place.
    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<ReadBytes> {
        copied(self, offset, len)
    }

    /// A second handle of the same file (a duplicated descriptor), through
    /// which another thread may read and write the RAM region while this
    /// storage is borrowed, for disjoint ranges; its writes are like this
    /// storage's own and the next persist covers them. Drop it before the
    /// image closes. `None` where there is no file (or the descriptor
    /// cannot be duplicated): then one thread does it all.
    fn second_handle(&self) -> Option<File> {
        None
    }
}

/// A bare file: reads and `pwrite`s, persisted with `fdatasync`. Used to
/// validate an image before its backing is known and by `inspect` (which
/// opens the file read-only and never writes).
impl Storage for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        self.write_all_at(data, offset)
            .map_err(|source| BackingError::Write {
                offset,
                len: data.len(),
                source,
            })
    }

    fn persist(&mut self, _offset: u64, _len: u64) -> Result<(), BackingError> {
        self.sync_data().map_err(BackingError::Sync)
    }

    fn second_handle(&self) -> Option<File> {
        self.try_clone().ok()
    }
}

/// Bytes read from a storage ([`Storage::read_bytes`]).
#[derive(Debug)]
pub enum ReadBytes {
    /// Copied out into memory of their own.
    Copied(Vec<u8>),
    /// A read-only view of the file's pages (see [`ReadMap`] for the rule
    /// that no one writes them meanwhile).
    Mapped(ReadMap),
}

impl std::ops::Deref for ReadBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ReadBytes::Copied(v) => v,
            ReadBytes::Mapped(m) => m.bytes(),
        }
    }
}

/// `len` bytes from `offset` of `s`, copied out ([`Storage::read_at`]).
fn copied<S: Storage + ?Sized>(s: &S, offset: u64, len: usize) -> io::Result<ReadBytes> {
    let mut v = vec![0u8; len];
    s.read_at(offset, &mut v)?;
    Ok(ReadBytes::Copied(v))
}

/// Reads of at least this many bytes from an image file are mapped, not
/// copied (below it a copy costs less than a mapping).
const MAP_READS_FROM: usize = 64 << 10;

/// The image file with its detected backing: writes go through the DAX
/// mapping where there is one, persists use the backing's primitive
/// (`fdatasync`, a fence on tmpfs, cache-line write-back on DAX).
#[derive(Debug)]
pub struct FileStorage {
    path: PathBuf,
    file: File,
    pub(super) backing: Backing,
    /// Once set ([`FileStorage::pin_writer`]), the only thread whose writes
    /// and persists are carried out.
    writer: Option<std::thread::ThreadId>,
}

impl FileStorage {
    pub(super) fn new(path: &Path, file: File, backing: Backing) -> FileStorage {
        FileStorage {
            path: path.to_owned(),
            file,
            backing,
            writer: None,
        }
    }

    /// From now on only the calling thread may write or persist the image
    /// (others get [`BackingError::WrongThread`]), and no second handle for
    /// a helper thread is given out. The rule a standby's early takeover
    /// rests on (`nvram::notice`), checked where every write goes through.
    pub(super) fn pin_writer(&mut self) {
        self.writer = Some(std::thread::current().id());
    }

    fn may_write(&self) -> Result<(), BackingError> {
        match self.writer {
            Some(w) if w != std::thread::current().id() => Err(BackingError::WrongThread),
            _ => Ok(()),
        }
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path the image was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the file lives on.
    pub fn kind(&self) -> BackingKind {
        self.backing.kind()
    }
}

impl Storage for FileStorage {
    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        self.may_write()?;
        self.backing.write_at(&self.file, offset, data)
    }

    fn persist(&mut self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.may_write()?;
        self.backing.persist(&self.file, offset, len)
    }

    fn start_writeback(&mut self, offset: u64, len: u64) {
        self.backing.start_writeback(&self.file, offset, len);
    }

    fn start_writeback_idle(&mut self, offset: u64, len: u64) {
        self.backing.start_writeback_idle(&self.path, offset, len);
    }

    fn scattered_reads(&self, on: bool) {
        super::backing::advise_readahead(&self.file, !on);
    }

    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<ReadBytes> {
        if len >= MAP_READS_FROM {
            // A view must lie inside the file (a page past its end would
            // raise SIGBUS when read): the caller's bounds come from a
            // validated geometry, and the length was checked at open.
            let inside = offset
                .checked_add(len as u64)
                .is_some_and(|end| self.file.size().is_ok_and(|size| end <= size));
            if inside {
                if let Ok(m) = ReadMap::new(&self.file, offset, len) {
                    return Ok(ReadBytes::Mapped(m));
                }
            }
        }
        copied(self, offset, len)
    }

    fn second_handle(&self) -> Option<File> {
        if self.writer.is_some() {
            return None;
        }
        // RAM-region bytes are written with pwrite on every backing (the DAX
        // mapping covers the metadata only), so a plain file handle writes
        // them as this storage would.
        self.file.try_clone().ok()
    }
}

/// An image held in memory: every write is immediately "durable" and persist
/// does nothing. For tests and tools that want an [`super::Image`] without a
/// file (`Image::format` / `Image::open_storage`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemStorage {
    bytes: Vec<u8>,
}

impl MemStorage {
    /// `len` zero bytes.
    pub fn new(len: usize) -> MemStorage {
        MemStorage {
            bytes: vec![0; len],
        }
    }

    /// Wraps existing image bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        MemStorage { bytes }
    }

    /// The bytes as they are now.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The bytes, consuming the storage.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

fn range(offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    Some(start..start.checked_add(len)?)
}

impl Storage for MemStorage {
    fn size(&self) -> io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let src = range(offset, buf.len())
            .and_then(|r| self.bytes.get(r))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        let r = range(offset, data.len()).ok_or_else(|| BackingError::Write {
            offset,
            len: data.len(),
            source: io::Error::from_raw_os_error(libc::EFBIG),
        })?;
        if self.bytes.len() < r.end {
            self.bytes.resize(r.end, 0);
        }
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }

    fn persist(&mut self, _offset: u64, _len: u64) -> Result<(), BackingError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mem_storage_reads_writes_and_grows() {
        let mut s = MemStorage::new(16);
        s.write_at(4, b"abcd").unwrap();
        let mut b = [0u8; 6];
        s.read_at(3, &mut b).unwrap();
        assert_eq!(&b, b"\0abcd\0");
        assert!(s.read_at(12, &mut b).is_err());
        s.write_at(20, b"z").unwrap();
        assert_eq!(s.size().unwrap(), 21);
        s.persist(0, 21).unwrap();
        assert_eq!(s.bytes()[20], b'z');
    }

    #[test]
    fn test_file_reads_of_large_ranges_are_views_of_the_same_bytes() {
        let p = super::super::image::tests::TempPath::new("readbytes");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p.0)
            .unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        file.write_all_at(&data, 0).unwrap();
        let backing = Backing::detect(&file, 0, true).unwrap();
        let s = FileStorage::new(&p.0, file, backing);
        // Large, unaligned: a view; small: a copy; both the file's bytes.
        let big = s.read_bytes(1234, 200_000).unwrap();
        assert!(matches!(big, ReadBytes::Mapped(_)));
        assert_eq!(&big[..], &data[1234..201_234]);
        let small = s.read_bytes(5000, 100).unwrap();
        assert!(matches!(small, ReadBytes::Copied(_)));
        assert_eq!(&small[..], &data[5000..5100]);
        // Past the end: an error, never a view (reading one would SIGBUS).
        assert!(s.read_bytes(200_000, 200_000).is_err());
        // The default (MemStorage) copies.
        let m = MemStorage::from_bytes(data.clone());
        let c = m.read_bytes(1234, 200_000).unwrap();
        assert!(matches!(c, ReadBytes::Copied(_)));
        assert_eq!(&c[..], &data[1234..201_234]);
    }
}
