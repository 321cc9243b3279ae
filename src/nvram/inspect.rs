//! `nvhv inspect`: what an image holds and whether its VM can be resumed,
//! read without changing the file (read-only open, no lock kept), as a
//! serializable report with a human-readable `Display`. In epoch mode it
//! shows the redo-log records and the recovery plan that `Image::recover`
//! would carry out (the same code computes both), without carrying it out.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::Serialize;

use super::backing::{read_from_disk, Backing, BackingKind};
use super::create::{leftovers, Leftover};
use super::image::{
    check_regular, compare_with_disk, open_error, read_validated, resumability, space_of,
    unpersisted_places, ImageError, OnDisk, Space,
};
use super::layout::{PersistMode, Status, Uuid};
use super::lock::{lock, unlock};
use super::recovery::{plan_recovery, LogEntry, RecordState};
use super::redo::{capacity_pages_for, half_region};

/// What `inspect` found. The JSON keys `format_version`, `ram_bytes`, `vcpus`,
/// `epoch`, `resumable` and `reason` are a stable interface.
///
/// `epoch`, `status` and the state fields describe the committed point the
/// VM would continue from: the current meta record, or in epoch mode the
/// epoch recovery restores (which may come from the redo log).
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
    /// The committed epoch the VM would continue from.
    pub epoch: u64,
    /// Its status (`committed` when it comes from the redo log).
    pub status: Status,
    /// Whether `nvhv resume` can continue the VM (ignoring `in_use`).
    pub resumable: bool,
    /// Why not, when `resumable` is false.
    pub reason: Option<String>,
    /// Whether another process holds the image's lock, or a standby's
    /// claim on it, right now (`nvram::lock`).
    pub in_use: bool,
    /// State slot holding that epoch's machine state.
    pub state_slot: usize,
    /// Bytes of saved machine state.
    pub state_bytes: u64,
    /// Capacity of one state slot.
    pub state_slot_bytes: u64,
    /// Bytes reserved for the redo log.
    pub log_bytes: u64,
    /// File offset of the redo log (its two halves, one after the other).
    pub log_offset: u64,
    /// Bytes of redo-log records recovery would replay into the RAM image.
    pub log_pending_bytes: u64,
    /// Most pages one epoch may commit (one log half); 0 without a usable log.
    pub log_capacity_pages: u64,
    /// The log's records (epoch mode only; empty in suspend-only mode).
    pub log_records: Vec<LogRecordReport>,
    /// Epochs whose log records recovery would replay, oldest first.
    pub replay_epochs: Vec<u64>,
    /// Whether opening the image to resume it would write to it (replay
    /// and/or a meta record; `Image::recover`).
    pub recovery_writes: bool,
    /// Format 3: recovery will continue the log after the restored record
    /// rather than write a meta record.
    pub continues_log: bool,
    /// Length of the image file.
    pub image_bytes: u64,
    /// Bytes of the image not yet allocated (holes in a sparse RAM region):
    /// what it may still take from its file system.
    pub unallocated_bytes: u64,
    /// Bytes free on the image's file system.
    pub free_bytes: u64,
    /// File offset of the guest RAM region.
    pub ram_offset: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Time of the current commit, nanoseconds since the Unix epoch.
    pub committed_unix_ns: u64,
    /// Both meta blocks.
    pub meta_blocks: Vec<MetaBlockReport>,
    /// Whole images a `run --force` killed before renaming them over this
    /// path left beside it under a hidden name; the next `run` or
    /// `resume` of the path removes them.
    pub leftovers: Vec<Leftover>,
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

/// One place of the redo log as `inspect` read it: the start of each half
/// (formats 1 and 2), or each record of a half's sequence and where the
/// sequence ends (format 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogRecordReport {
    /// Log half (0 or 1).
    pub half: usize,
    /// Byte offset in the half.
    pub offset: u64,
    /// `blank`, `applied` (covered by the meta record), `valid` or `invalid`.
    pub state: &'static str,
    /// The record's epoch, when its header is intact.
    pub epoch: Option<u64>,
    /// Pages in the record, when its header is intact.
    pub pages: Option<u64>,
    /// Whether recovery would replay it.
    pub replay: bool,
    /// Why the record is invalid, if it is.
    pub problem: Option<String>,
}

/// Reports what the image at `path` holds, without changing it: the file is
/// opened read-only (without updating its access time where permitted), and
/// whether another process holds the image is probed with a non-blocking
/// shared `flock` that is released at once, and a probe of a standby's
/// claim (`nvram::lock`). Fails with the same errors as
/// [`super::Image::open`] on an image that does not validate.
pub fn inspect(path: &Path) -> Result<InspectReport, ImageError> {
    inspect_file(path).map_err(|e| e.in_image(path))
}

/// [`inspect`], its errors not yet naming the image.
fn inspect_file(path: &Path) -> Result<InspectReport, ImageError> {
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
    let mut v = read_validated(&file)?;
    let backing = Backing::detect(&file, v.header.geometry.ram.offset, false)?.kind();
    let mut plan = plan_recovery(&file, &v.header, &v.meta.current)?;
    // What a resume would read: not what a dead writer's failed persist
    // left in the page cache (no settle, though: that is the resume's). Not
    // of an image in use: its writer lives, and persists what it wrote.
    if backing == BackingKind::File && !in_use {
        let cur = plan.current(&v.header, &v.meta.current);
        let places = unpersisted_places(&v.header, &plan, &cur);
        if compare_with_disk(&file, &file, &places) != OnDisk::Same {
            read_from_disk(&file, 0, v.header.geometry.ram.offset);
            v = read_validated(&file)?;
            plan = plan_recovery(&file, &v.header, &v.meta.current)?;
            let cur = plan.current(&v.header, &v.meta.current);
            let places = unpersisted_places(&v.header, &plan, &cur);
            if compare_with_disk(&file, &file, &places) == OnDisk::Differs {
                return Err(ImageError::CacheUnlikeDisk);
            }
        }
    }
    let h = &v.header;
    let cur = &plan.current(h, &v.meta.current);
    let verdict = resumability(&file, h, cur);
    let space = space_of(&file)?;
    let log_records = plan
        .log
        .iter()
        .flatten()
        .enumerate()
        .map(
            |(
                i,
                LogEntry {
                    half,
                    offset,
                    state: st,
                },
            )| LogRecordReport {
                half: *half,
                offset: *offset,
                state: st.word(),
                epoch: st.epoch(),
                pages: st.record().map(|r| r.pages),
                replay: plan.replay.contains(&i),
                problem: match st {
                    RecordState::Invalid { problem, .. } => Some(problem.to_string()),
                    _ => None,
                },
            },
        )
        .collect();
    let log_capacity_pages = match h.config.persist {
        PersistMode::Epoch => {
            capacity_pages_for(h.format_version, half_region(h.geometry.log, 0).size).unwrap_or(0)
        }
        PersistMode::SuspendOnly => 0,
    };
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
        epoch: plan.restored_epoch(),
        status: cur.status,
        resumable: verdict.is_ok(),
        reason: verdict.err().map(|e| e.reason),
        in_use,
        state_slot: cur.state_slot,
        state_bytes: cur.state_len,
        state_slot_bytes: h.geometry.state[0].size,
        log_bytes: h.log_bytes(),
        log_offset: h.geometry.log.offset,
        log_pending_bytes: plan.replay_bytes(),
        log_capacity_pages,
        log_records,
        replay_epochs: plan.replay_epochs(),
        recovery_writes: plan.needs_writes(),
        continues_log: plan.continues_log(),
        image_bytes: v.file_len,
        unallocated_bytes: space.unallocated,
        free_bytes: space.free,
        leftovers: leftovers(path),
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

/// Whether the text report may count `r` in a line of applied records
/// instead of giving it a line of its own.
fn summarised(r: &LogRecordReport) -> bool {
    r.state == "applied" && !r.replay && r.problem.is_none() && r.epoch.is_some()
}

/// The text report's lines for the redo log's records: consecutive applied
/// records of a half (up to 32 a half) make one line; the rest, which
/// recovery looks at, one each.
fn log_lines(mut records: &[LogRecordReport]) -> Vec<String> {
    let mut lines = Vec::new();
    while let Some(r) = records.first() {
        let run = records
            .iter()
            .take_while(|o| o.half == r.half && summarised(o))
            .count();
        if run >= 2 {
            let pages: u64 = records[..run].iter().filter_map(|o| o.pages).sum();
            lines.push(format!(
                "log half {} epochs {}, {run} records, {pages} pages, applied",
                r.half,
                epoch_list(
                    &records[..run]
                        .iter()
                        .filter_map(|o| o.epoch)
                        .collect::<Vec<_>>()
                )
            ));
            records = &records[run..];
            continue;
        }
        let what = match (r.epoch, r.pages, &r.problem) {
            (Some(e), Some(p), _) => format!("epoch {e}, {p} pages, {}", r.state),
            (Some(e), None, Some(why)) => format!("epoch {e}, invalid: {why}"),
            (None, _, Some(why)) => format!("invalid: {why}"),
            _ => r.state.to_string(),
        };
        let replay = if r.replay { " (replay)" } else { "" };
        let at = match r.offset {
            0 => String::new(),
            o => format!(" +{}", Bytes(o)),
        };
        lines.push(format!("log half {}{at} {what}{replay}", r.half));
        records = &records[1..];
    }
    lines
}

/// `epochs` in words: runs of three or more consecutive epochs as `a–b`.
fn epoch_list(epochs: &[u64]) -> String {
    let mut parts = Vec::new();
    let mut rest = epochs;
    while let Some(&first) = rest.first() {
        let run = rest
            .iter()
            .enumerate()
            .take_while(|&(i, &e)| e == first + i as u64)
            .count();
        if run >= 3 {
            parts.push(format!("{first}–{}", rest[run - 1]));
            rest = &rest[run..];
        } else {
            parts.push(first.to_string());
            rest = &rest[1..];
        }
    }
    parts.join(", ")
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
        if self.persist_mode == PersistMode::Epoch {
            writeln!(
                f,
                "  redo log   {} reserved, records of up to {} pages",
                Bytes(self.log_bytes),
                self.log_capacity_pages
            )?;
            for line in log_lines(&self.log_records) {
                writeln!(f, "  {line}")?;
            }
            let plan = match (self.replay_epochs.as_slice(), self.recovery_writes) {
                ([], false) => "nothing to replay".to_string(),
                ([], true) if self.continues_log => {
                    "nothing to replay; continues the log after the restored record".into()
                }
                ([], true) => {
                    "nothing to replay; writes a meta record sealing a torn record".into()
                }
                (epochs, _) => format!(
                    "replays epoch{} {} ({}), then {}",
                    if epochs.len() == 1 { "" } else { "s" },
                    epoch_list(epochs),
                    Bytes(self.log_pending_bytes),
                    if self.continues_log {
                        "continues the log after the restored record (no persist, no meta record)"
                    } else {
                        "writes a meta record"
                    }
                ),
            };
            writeln!(f, "  recovery   {plan}")?;
        } else {
            writeln!(
                f,
                "  redo log   {} reserved, unused in suspend-only mode",
                Bytes(self.log_bytes)
            )?;
        }
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
        let space = Space {
            unallocated: self.unallocated_bytes,
            free: self.free_bytes,
        };
        let short = if space.short() {
            ": the VM stops if it fills"
        } else {
            ""
        };
        writeln!(
            f,
            "  room       {} of it not yet allocated, {} free on its file system{short}",
            Bytes(self.unallocated_bytes),
            Bytes(self.free_bytes)
        )?;
        let in_use = if self.in_use {
            "yes: another process holds the image, so what is shown may be changing"
        } else {
            "no"
        };
        writeln!(f, "  in use     {in_use}")?;
        for l in &self.leftovers {
            writeln!(
                f,
                "  leftover   {} ({}) beside it: an image that a `run --force` killed before putting it here left; the next run or resume of this path removes it",
                l.path.file_name().unwrap_or_default().to_string_lossy(),
                Bytes(l.bytes)
            )?;
        }
        match &self.reason {
            None => write!(f, "  resumable  yes"),
            Some(r) => write!(f, "  resumable  no: {r}"),
        }
    }
}

/// A byte count in binary units ("4 MiB", "1.5 GiB").
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    /// In the largest unit it reaches: whole ("4 MiB"), or with one decimal
    /// ("1.5 KiB", "23.3 GiB").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut x = self.0 as f64;
        let mut unit = 0;
        while x >= 1024.0 && unit + 1 < UNITS.len() {
            x /= 1024.0;
            unit += 1;
        }
        if self.0 % (1u64 << (10 * unit)) == 0 {
            write!(f, "{} {}", self.0 >> (10 * unit), UNITS[unit])
        } else {
            write!(f, "{x:.1} {}", UNITS[unit])
        }
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
    use crate::nvram::redo::Changes;
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
        assert_eq!(r.format_version, 3);
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
    fn test_text_report_shortens_runs_of_applied_records_and_epochs() {
        assert_eq!(epoch_list(&[]), "");
        assert_eq!(epoch_list(&[2, 3]), "2, 3");
        assert_eq!(epoch_list(&[1, 3, 4, 5, 6, 9, 10]), "1, 3–6, 9, 10");
        let record = |half, offset, epoch, state, replay| LogRecordReport {
            half,
            offset,
            state,
            epoch: Some(epoch),
            pages: Some(10),
            replay,
            problem: None,
        };
        let records = [
            record(0, 0, 7, "valid", true),
            record(1, 0, 3, "applied", false),
            record(1, 8192, 4, "applied", false),
            record(1, 16384, 5, "applied", false),
            record(1, 24576, 6, "valid", true),
            record(0, 0, 1, "applied", false),
        ];
        assert_eq!(
            log_lines(&records),
            [
                "log half 0 epoch 7, 10 pages, valid (replay)",
                "log half 1 epochs 3–5, 3 records, 30 pages, applied",
                "log half 1 +24 KiB epoch 6, 10 pages, valid (replay)",
                "log half 0 epoch 1, 10 pages, applied",
            ]
        );
    }

    #[test]
    fn test_inspect_epoch_image_shows_the_recovery_plan_without_writing() {
        let p = TempPath::new("inspect-epoch");
        let mut img = Image::create(&p.0, &cfg(PersistMode::Epoch), false).unwrap();
        img.mark_running().unwrap();
        let page = vec![0xab; 4096];
        img.commit_epoch(&Changes::whole(&[3], &page), b"two")
            .unwrap();
        img.apply_committed(&Changes::whole(&[3], &page)).unwrap();
        img.commit_epoch(
            &Changes::whole(&[4, 5], &[page.clone(), page].concat()),
            b"three",
        )
        .unwrap();
        drop(img);
        let before = std::fs::read(&p.0).unwrap();
        let r = inspect(&p.0).unwrap();
        assert_eq!(std::fs::read(&p.0).unwrap(), before);
        assert!(r.resumable, "{:?}", r.reason);
        assert_eq!((r.epoch, r.status), (3, Status::Committed));
        assert_eq!(r.replay_epochs, [2, 3]);
        assert!(r.recovery_writes);
        // Two records: a header block each, and entries of 4110 bytes; both
        // in half 0 (format 3), the second after the first's blocks; half 1
        // blank.
        assert_eq!(r.log_pending_bytes, (4096 + 4110) + (4096 + 2 * 4110));
        assert_eq!(r.log_records.len(), 3);
        assert_eq!(
            (
                r.log_records[1].half,
                r.log_records[1].offset,
                r.log_records[1].epoch,
                r.log_records[1].pages
            ),
            (0, 3 * 4096, Some(3), Some(2))
        );
        assert_eq!(
            (r.log_records[2].half, r.log_records[2].state),
            (1, "blank")
        );
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "format_version",
            "ram_bytes",
            "vcpus",
            "epoch",
            "resumable",
            "reason",
            "log_records",
            "replay_epochs",
            "log_capacity_pages",
        ] {
            assert!(v.get(key).is_some(), "missing key {key}");
        }
        assert_eq!(v["log_records"][0]["state"], "valid");
        assert_eq!(v["log_records"][0]["replay"], true);
        let text = r.to_string();
        assert!(
            text.contains("log half 0 +12 KiB epoch 3, 2 pages, valid (replay)"),
            "{text}"
        );
        assert!(text.contains("recovery   replays epochs 2, 3"), "{text}");
        // Nothing torn lies above epoch 3: recovery continues the log.
        assert!(r.continues_log);
        assert!(text.contains("then continues the log"), "{text}");
        // What inspect predicted is what recovery does; after a suspend
        // nothing is pending.
        let mut img = Image::open(&p.0).unwrap();
        assert_eq!(img.recover().unwrap().replayed, [2, 3]);
        drop(img);
        // Recovery continued the log (format 3): no persist has covered the
        // replay yet, so the same records are still replayed.
        assert_eq!(inspect(&p.0).unwrap().replay_epochs, [2, 3]);
        let mut img = Image::open(&p.0).unwrap();
        img.recover().unwrap();
        img.commit(Status::Suspended, b"suspended").unwrap();
        drop(img);
        let r = inspect(&p.0).unwrap();
        assert!(!r.recovery_writes && r.replay_epochs.is_empty());
        assert_eq!(r.epoch, 4);
        assert_eq!(v["log_records"][1]["state"], "valid");
        assert_eq!(r.log_records[0].state, "applied");
        assert!(r.to_string().contains("recovery   nothing to replay"));
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
        assert_eq!(Bytes(23847 << 20).to_string(), "23.3 GiB");
        assert_eq!(Bytes(1000).to_string(), "1000 B");
        assert_eq!(Bytes(1536).to_string(), "1.5 KiB");
        assert_eq!(Bytes(192 << 10).to_string(), "192 KiB");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
