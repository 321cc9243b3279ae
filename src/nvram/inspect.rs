//! `nvhv inspect`: what an image holds and whether its VM can be resumed,
//! read without changing the file (read-only open, no lock kept), as a
//! serializable report with a human-readable `Display`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::Serialize;

use super::backing::{Backing, BackingKind};
use super::image::{
    check_regular, lock, open_error, read_validated, resumability, unlock, ImageError,
};
use super::layout::{PersistMode, Status, Uuid};

/// What `inspect` found. The JSON keys `format_version`, `ram_bytes`, `vcpus`,
/// `epoch`, `resumable` and `reason` are a stable interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InspectReport {
    /// The path inspected, as given.
    pub path: String,
    /// Format version of the image.
    pub format_version: u32,
    /// The image's identity.
    pub uuid: Uuid,
    /// The guest's name.
    pub guest: String,
    /// Guest RAM bytes.
    pub ram_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// How the VM is made durable.
    pub persist_mode: PersistMode,
    /// What the image lives on.
    pub backing: BackingKind,
    /// What a commit on this backing survives.
    pub guarantee: &'static str,
    /// Epoch of the current meta record.
    pub epoch: u64,
    /// Status in the current meta record.
    pub status: Status,
    /// Whether `nvhv resume` can continue the VM (ignoring `in_use`).
    pub resumable: bool,
    /// Why not, when `resumable` is false.
    pub reason: Option<String>,
    /// Whether another process holds the image's lock right now.
    pub in_use: bool,
    /// State slot named by the current record.
    pub state_slot: usize,
    /// Bytes of saved machine state.
    pub state_bytes: u64,
    /// Capacity of one state slot.
    pub state_slot_bytes: u64,
    /// Bytes reserved for the redo log.
    pub log_bytes: u64,
    /// Committed redo-log bytes not yet applied to the RAM image.
    pub log_pending_bytes: u64,
    /// Length of the image file.
    pub image_bytes: u64,
    /// File offset of the guest RAM region.
    pub ram_offset: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Time of the current commit, nanoseconds since the Unix epoch.
    pub committed_unix_ns: u64,
    /// Both meta blocks.
    pub meta_blocks: Vec<MetaBlockReport>,
}

/// One meta block as `inspect` read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetaBlockReport {
    /// Block index (0 or 1).
    pub block: usize,
    /// Whether this block holds the current record.
    pub current: bool,
    /// The record's epoch, if valid.
    pub epoch: Option<u64>,
    /// The record's status, if valid.
    pub status: Option<Status>,
    /// Why the record is invalid, if it is.
    pub problem: Option<String>,
}

/// Reports what the image at `path` holds, without changing it: the file is
/// opened read-only (without updating its access time where permitted), and
/// whether another process holds the image is probed with a non-blocking
/// shared `flock` that is released at once. Fails with the same errors as
/// [`super::Image::open`] on an image that does not validate.
pub fn inspect(path: &Path) -> Result<InspectReport, ImageError> {
    let file = open_read_only(path)?;
    check_regular(&file, path)?;
    let in_use = match lock(&file, path, libc::LOCK_SH) {
        Ok(()) => {
            unlock(&file);
            false
        }
        Err(ImageError::InUse(_)) => true,
        Err(e) => return Err(e),
    };
    let v = read_validated(&file)?;
    let (h, cur) = (&v.header, &v.meta.current);
    let backing = Backing::detect(&file, h.geometry.ram.offset, false)?.kind();
    let verdict = resumability(&file, h, cur);
    let meta_blocks = v
        .meta
        .blocks
        .iter()
        .enumerate()
        .map(|(block, r)| MetaBlockReport {
            block,
            current: block == v.meta.current_block,
            epoch: r.as_ref().ok().map(|m| m.epoch),
            status: r.as_ref().ok().map(|m| m.status),
            problem: r.as_ref().err().map(ToString::to_string),
        })
        .collect();
    Ok(InspectReport {
        path: path.display().to_string(),
        format_version: h.format_version,
        uuid: h.uuid,
        guest: h.config.guest.clone(),
        ram_bytes: h.ram_bytes(),
        vcpus: h.config.vcpus,
        persist_mode: h.config.persist,
        backing,
        guarantee: backing.guarantee(),
        epoch: cur.epoch,
        status: cur.status,
        resumable: verdict.is_ok(),
        reason: verdict.err().map(|e| e.reason),
        in_use,
        state_slot: cur.state_slot,
        state_bytes: cur.state_len,
        state_slot_bytes: h.geometry.state[0].size,
        log_bytes: h.log_bytes(),
        log_pending_bytes: cur.log_tail - cur.log_head,
        image_bytes: v.file_len,
        ram_offset: h.geometry.ram.offset,
        created_unix: h.created_secs,
        committed_unix_ns: cur.time_unix_ns,
        meta_blocks,
    })
}

fn open_read_only(path: &Path) -> Result<File, ImageError> {
    // O_NONBLOCK: a FIFO at the path must not hang us (it is then refused as
    // not a regular file); it changes nothing for regular files.
    let try_open = |flags| {
        OpenOptions::new()
            .read(true)
            .custom_flags(flags | libc::O_NONBLOCK)
            .open(path)
    };
    // O_NOATIME is refused (EPERM) on files we do not own: then read with atime updates.
    match try_open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => try_open(0),
        r => r,
    }
    .map_err(|e| open_error(path, e))
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "nvhv image {}", self.path)?;
        writeln!(f, "  format     {}", self.format_version)?;
        writeln!(f, "  uuid       {}", self.uuid)?;
        writeln!(
            f,
            "  guest      {:?}, {} vCPU{}, {} RAM",
            self.guest,
            self.vcpus,
            if self.vcpus == 1 { "" } else { "s" },
            Bytes(self.ram_bytes)
        )?;
        writeln!(f, "  persist    {}", self.persist_mode)?;
        writeln!(f, "  backing    {}", self.guarantee)?;
        writeln!(f, "  created    {}", utc(self.created_unix))?;
        writeln!(
            f,
            "  epoch      {} ({}, {})",
            self.epoch,
            self.status,
            utc(self.committed_unix_ns / 1_000_000_000)
        )?;
        writeln!(
            f,
            "  state      {} in slot {} (slots of {})",
            Bytes(self.state_bytes),
            self.state_slot,
            Bytes(self.state_slot_bytes)
        )?;
        writeln!(
            f,
            "  redo log   {} reserved, {} pending",
            Bytes(self.log_bytes),
            Bytes(self.log_pending_bytes)
        )?;
        for m in &self.meta_blocks {
            let what = match (&m.epoch, &m.status, &m.problem) {
                (Some(e), Some(s), _) => format!("epoch {e}, {s}"),
                (_, _, Some(p)) => format!("invalid: {p}"),
                _ => "invalid".into(),
            };
            let cur = if m.current { " (current)" } else { "" };
            writeln!(f, "  meta {}     {what}{cur}", m.block)?;
        }
        writeln!(
            f,
            "  size       {} (RAM at offset {:#x})",
            Bytes(self.image_bytes),
            self.ram_offset
        )?;
        let in_use = if self.in_use {
            "yes: another process holds the image, so what is shown may be changing"
        } else {
            "no"
        };
        writeln!(f, "  in use     {in_use}")?;
        match &self.reason {
            None => write!(f, "  resumable  yes"),
            Some(r) => write!(f, "  resumable  no: {r}"),
        }
    }
}

/// A byte count in binary units.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut unit = 0;
        let mut v = self.0;
        while v >= 1024 && v % 1024 == 0 && unit + 1 < UNITS.len() {
            v /= 1024;
            unit += 1;
        }
        if v >= 1024 && unit + 1 < UNITS.len() {
            // Not a whole number of the next unit: one decimal.
            let x = v as f64 / 1024.0;
            return write!(f, "{x:.1} {}", UNITS[unit + 1]);
        }
        write!(f, "{v} {}", UNITS[unit])
    }
}

/// `secs` since the Unix epoch as a UTC date and time.
fn utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::image::tests::{cfg, TempPath};
    use crate::nvram::Image;

    #[test]
    fn test_inspect_reports_and_never_changes_the_file() {
        let p = TempPath::new("inspect");
        let mut img = Image::create(&p.0, &cfg(PersistMode::SuspendOnly), false).unwrap();
        img.commit(Status::Suspended, &[5; 3000]).unwrap();
        let r = inspect(&p.0).unwrap();
        assert!(r.in_use);
        drop(img);
        let before = std::fs::read(&p.0).unwrap();
        let mtime = std::fs::metadata(&p.0).unwrap().modified().unwrap();
        let r = inspect(&p.0).unwrap();
        assert_eq!(std::fs::read(&p.0).unwrap(), before);
        assert_eq!(std::fs::metadata(&p.0).unwrap().modified().unwrap(), mtime);
        assert!(!r.in_use);
        assert!(r.resumable, "{:?}", r.reason);
        assert_eq!(
            (r.epoch, r.status, r.state_bytes, r.vcpus),
            (1, Status::Suspended, 3000, 2)
        );
        assert_eq!(r.format_version, 1);
        assert_eq!(r.ram_bytes, 4 << 20);
        assert_eq!(r.meta_blocks[1].epoch, Some(1));
        assert!(r.meta_blocks[1].current);
        // The lock probe left no lock behind.
        Image::open(&p.0).unwrap();
    }

    #[test]
    fn test_inspect_json_keys_and_display() {
        let p = TempPath::new("inspect-json");
        let mut img = Image::create(&p.0, &cfg(PersistMode::SuspendOnly), false).unwrap();
        img.mark_running().unwrap();
        drop(img);
        let r = inspect(&p.0).unwrap();
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "format_version",
            "ram_bytes",
            "vcpus",
            "epoch",
            "resumable",
            "reason",
        ] {
            assert!(v.get(key).is_some(), "missing key {key}");
        }
        assert_eq!(v["resumable"], false);
        assert_eq!(v["status"], "running");
        assert_eq!(v["persist_mode"], "suspend-only");
        assert!(v["reason"].as_str().unwrap().contains("without suspending"));
        assert_eq!(v["uuid"].as_str().unwrap().len(), 36);
        let text = r.to_string();
        assert!(
            text.contains("resumable  no: the VM was running in suspend-only mode"),
            "{text}"
        );
        assert!(text.contains("4 MiB RAM"), "{text}");
    }

    #[test]
    fn test_inspect_missing_file() {
        let p = TempPath::new("inspect-missing");
        assert!(matches!(inspect(&p.0), Err(ImageError::NotFound(_))));
    }

    #[test]
    fn test_inspect_and_open_refuse_a_fifo_without_hanging() {
        use std::os::unix::ffi::OsStrExt;
        let p = TempPath::new("fifo");
        let c = std::ffi::CString::new(p.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(inspect(&p.0), Err(ImageError::NotRegular(_))));
        assert!(matches!(Image::open(&p.0), Err(ImageError::NotRegular(_))));
    }

    #[test]
    fn test_bytes_and_utc_formatting() {
        assert_eq!(Bytes(0).to_string(), "0 B");
        assert_eq!(Bytes(4 << 20).to_string(), "4 MiB");
        assert_eq!(Bytes(1536).to_string(), "1.5 KiB");
        assert_eq!(Bytes(192 << 10).to_string(), "192 KiB");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
