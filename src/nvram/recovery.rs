//! Recovery of an epoch-mode image: classifying what each place of the
//! redo log holds ([`RecordState`]), planning what a resume restores and
//! replays ([`plan_recovery`], when the image is opened, and by `inspect`
//! without writing), and carrying the plan out ([`Image::recover`]):
//! replaying the committed records the RAM image lacks, idempotently, so
//! that a crash during recovery is safe.
//!
//! The rules and the argument that they are sound are in
//! `docs/nvram-format.md` ("Recovery"); the commit side is in `epoch.rs`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::epoch::record_span;
use super::image::{now_ns, read_err, Image, ImageError};
use super::layout::{Header, Meta, PersistMode, Region, Status, BLOCK, FORMAT_VERSION};
use super::redo::{
    decode_writes, half_region, RecordError, RecordHeader, PAGE, RECORD_HEADER_LEN,
    RECORD_VERSION_3,
};
use super::replay::ReplayPages;
use super::storage::{ReadBytes, Storage};

/// What a place in the redo log holds, as recovery classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// Nothing was ever written there (or the log is too small for a record).
    Blank,
    /// A record the current meta record covers (its epoch is not above the
    /// meta record's), or (format 3) one at or below the epoch through which
    /// the restored record says the RAM image was applied: applied to the
    /// RAM image durably, so it is ignored and its payload is not read.
    Applied(RecordHeader),
    /// A complete record newer than the current meta record: its header and
    /// payload CRCs match, and so does its state's if recovery restores it
    /// (the state of an older record may since have been overwritten: a
    /// later epoch reuses its slot).
    Valid(RecordHeader),
    /// Not a valid record: torn, damaged, foreign, out of sequence, or (the
    /// record recovery would restore) its state slot does not hold its
    /// state. `epoch` when the header itself is intact and ours.
    Invalid {
        /// The record's epoch, if its header is intact and belongs to this image.
        epoch: Option<u64>,
        /// Why the record is not valid.
        problem: RecordError,
    },
}

impl RecordState {
    /// The record header, when it is intact and belongs to this image.
    pub fn record(&self) -> Option<&RecordHeader> {
        match self {
            RecordState::Applied(r) | RecordState::Valid(r) => Some(r),
            _ => None,
        }
    }

    /// The epoch in an intact header of this image, if any.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            RecordState::Applied(r) | RecordState::Valid(r) => Some(r.epoch),
            RecordState::Invalid { epoch, .. } => *epoch,
            RecordState::Blank => None,
        }
    }

    /// A short word for the state: `blank`, `applied`, `valid` or `invalid`.
    pub fn word(&self) -> &'static str {
        match self {
            RecordState::Blank => "blank",
            RecordState::Applied(_) => "applied",
            RecordState::Valid(_) => "valid",
            RecordState::Invalid { .. } => "invalid",
        }
    }
}

/// One place of the redo log recovery looked at: the start of each half
/// (formats 1 and 2), or each record of a half's sequence and the place
/// where the sequence ends (format 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The log half (0 or 1).
    pub half: usize,
    /// Byte offset of the record in its half.
    pub offset: u64,
    /// What is there.
    pub state: RecordState,
}

/// What recovery finds in an image and what it does about it. Computed when
/// the image is opened (and by `inspect`), carried out by [`Image::recover`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryPlan {
    /// The log places looked at; `None` in suspend-only mode (no log is used).
    pub log: Option<Vec<LogEntry>>,
    /// The entries (indices into `log`) whose records are replayed into the
    /// RAM image, oldest first.
    pub replay: Vec<usize>,
    /// `Some(entry)`: the VM continues from that record's epoch and state;
    /// `None`: from the current meta record.
    pub restore: Option<usize>,
    /// Epoch of the current meta record.
    pub meta_epoch: u64,
    /// If recovery writes a meta record, its epoch: the restored epoch, or
    /// higher to cover a torn record numbered above it (see the doc, "Sealing").
    pub seal_epoch: Option<u64>,
}

impl RecoveryPlan {
    /// The plan for an image with nothing in its log (suspend-only mode, or
    /// a fresh image).
    pub(super) fn nothing(header: &Header, meta: &Meta) -> RecoveryPlan {
        RecoveryPlan {
            log: (header.config.persist == PersistMode::Epoch).then(Vec::new),
            replay: Vec::new(),
            restore: None,
            meta_epoch: meta.epoch,
            seal_epoch: None,
        }
    }

    /// Format 3: recovery continues the log after the restored record
    /// instead of sealing it (no intact record header lies above it, so
    /// the seal would name the restored epoch itself; see the doc, "Epoch
    /// mode, format 3", step 6).
    pub fn continues_log(&self) -> bool {
        self.restore
            .and_then(|i| self.record(i))
            .is_some_and(|r| r.version == RECORD_VERSION_3 && self.seal_epoch == Some(r.epoch))
    }

    /// The log bytes (file offset, length) a writer that died before its
    /// last persist completed may have left in the page cache and not on
    /// the disk: every place from the restored record's epoch on (the
    /// restored record, and any intact header above it), or above the meta
    /// record's epoch when nothing is restored. A record is written only
    /// after the one before it committed (W1), so nothing older can be.
    pub(super) fn maybe_unpersisted(&self, header: &Header) -> Vec<(u64, u64)> {
        let from = match self.restore.and_then(|i| self.record(i)) {
            Some(r) => r.epoch,
            None => self.meta_epoch.saturating_add(1),
        };
        let Some(log) = &self.log else {
            return Vec::new();
        };
        log.iter()
            .filter(|e| e.state.epoch().is_some_and(|epoch| epoch >= from))
            .map(|e| {
                let at = half_region(header.geometry.log, e.half).offset + e.offset;
                let len = e
                    .state
                    .record()
                    .map_or(BLOCK, |r| record_span(r.payload_len));
                (at, len)
            })
            .collect()
    }

    fn entry(&self, i: usize) -> Option<&LogEntry> {
        self.log.as_ref()?.get(i)
    }

    pub(super) fn record(&self, i: usize) -> Option<&RecordHeader> {
        self.entry(i)?.state.record()
    }

    /// Epochs replayed, oldest first.
    pub fn replay_epochs(&self) -> Vec<u64> {
        self.replay
            .iter()
            .filter_map(|&i| self.record(i).map(|r| r.epoch))
            .collect()
    }

    /// Page entries replayed in all (a page changed in several epochs counts
    /// once for each).
    pub fn replay_pages(&self) -> u64 {
        self.replay
            .iter()
            .filter_map(|&i| self.record(i).map(|r| r.pages))
            .sum()
    }

    /// Bytes of log records replayed in all (header blocks and payloads).
    pub fn replay_bytes(&self) -> u64 {
        self.replay
            .iter()
            .filter_map(|&i| self.record(i).map(|r| BLOCK + r.payload_len))
            .sum()
    }

    /// The epoch whose RAM and state the VM continues from.
    pub fn restored_epoch(&self) -> u64 {
        self.restore
            .and_then(|i| self.record(i))
            .map_or(self.meta_epoch, |r| r.epoch)
    }

    /// Whether recovery writes to the image (replay and/or a meta record).
    pub fn needs_writes(&self) -> bool {
        self.seal_epoch.is_some()
    }

    /// The committed point after recovery: the meta record recovery writes,
    /// or the current one if it writes none.
    pub(super) fn current(&self, header: &Header, meta: &Meta) -> Meta {
        let Some(epoch) = self.seal_epoch else {
            return meta.clone();
        };
        let mut m = match self.restore.and_then(|i| self.record(i)) {
            Some(r) => Meta {
                epoch,
                status: Status::Committed,
                state_slot: r.state_slot,
                state_len: r.state_len,
                state_crc: r.state_crc,
                time_unix_ns: r.time_unix_ns,
                ..meta.clone()
            },
            None => Meta {
                epoch,
                ..meta.clone()
            },
        };
        (m.log_head, m.log_tail) = (0, header.log_bytes());
        m
    }
}

/// What [`Image::recover`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    /// The committed epoch whose RAM image and machine state the image now holds.
    pub restored_epoch: u64,
    /// Whether that epoch came from the redo log (else from a meta record).
    pub from_log: bool,
    /// The image's epoch counter now (≥ `restored_epoch`; the next commit is one more).
    pub epoch: u64,
    /// Epochs whose log records were replayed into the RAM image, oldest first.
    pub replayed: Vec<u64>,
    /// Page entries written while replaying.
    pub pages_replayed: u64,
    /// Whether a meta record was written (and persisted).
    pub meta_written: bool,
    /// Time spent.
    pub elapsed: Duration,
}

/// Reads the record header at `offset` of log half `half` and classifies
/// it, checking its payload (if `payload`) only when its epoch is above the
/// current meta record's. The state is not checked here (see
/// [`check_state`]).
/// `Err(Blank)` in the result's place: nothing was ever written there.
fn read_record<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    meta: &Meta,
    half: usize,
    offset: u64,
    payload: Option<&mut Payloads>,
) -> Result<RecordState, ImageError> {
    let region = half_region(header.geometry.log, half);
    if region.size < offset + BLOCK {
        return Ok(RecordState::Blank);
    }
    let mut b = [0u8; RECORD_HEADER_LEN];
    s.read_at(region.offset + offset, &mut b)
        .map_err(read_err("redo-log record header"))?;
    let rh = match RecordHeader::parse(&b) {
        Ok(rh) => rh,
        Err(RecordError::Blank) => return Ok(RecordState::Blank),
        Err(problem) => {
            return Ok(RecordState::Invalid {
                epoch: None,
                problem,
            })
        }
    };
    let ours = rh.image_uuid == header.uuid;
    let invalid = |problem| RecordState::Invalid {
        epoch: ours.then_some(rh.epoch),
        problem,
    };
    if let Err(problem) = rh.check(header, half, offset) {
        return Ok(invalid(problem));
    }
    let v3 = header.format_version >= FORMAT_VERSION;
    if v3 != (rh.version == RECORD_VERSION_3) {
        return Ok(invalid(RecordError::Version(rh.version)));
    }
    if rh.epoch <= meta.epoch {
        return Ok(RecordState::Applied(rh));
    }
    if let Some(kept) = payload {
        match check_payload(s, header, region, &rh)? {
            Ok(bytes) => {
                kept.insert((half, offset), bytes);
            }
            Err(problem) => return Ok(invalid(problem)),
        }
    }
    Ok(RecordState::Valid(rh))
}

/// Format 3: checks the payload of a record the scan took on its header
/// (and keeps it in `kept`); if it does not match, the record becomes
/// invalid.
fn verify_payload<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    entry: &mut LogEntry,
    kept: &mut Payloads,
) -> Result<(), ImageError> {
    let RecordState::Valid(rh) = &entry.state else {
        return Ok(());
    };
    // The restored record is verified before the replay loop reaches it
    // again: its payload was checked then and is kept.
    if kept.contains_key(&(entry.half, entry.offset)) {
        return Ok(());
    }
    let region = half_region(header.geometry.log, entry.half);
    match check_payload(s, header, region, rh)? {
        Ok(bytes) => {
            kept.insert((entry.half, entry.offset), bytes);
        }
        Err(problem) => {
            entry.state = RecordState::Invalid {
                epoch: Some(rh.epoch),
                problem,
            };
        }
    }
    Ok(())
}

/// Checks that the state slot a valid record names holds its state; if not,
/// the record becomes invalid.
fn check_state<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    st: &mut RecordState,
) -> Result<(), ImageError> {
    let RecordState::Valid(rh) = st else {
        return Ok(());
    };
    let slot = header.geometry.state[rh.state_slot];
    // Bounded: check() proved state_len <= the slot size (<= 64 MiB).
    let mut state = vec![0u8; rh.state_len as usize];
    s.read_at(slot.offset, &mut state)
        .map_err(read_err("state slot"))?;
    let computed = crc32c::crc32c(&state);
    if computed != rh.state_crc {
        *st = RecordState::Invalid {
            epoch: Some(rh.epoch),
            problem: RecordError::StateCrc {
                slot: rh.state_slot,
                stored: rh.state_crc,
                computed,
            },
        };
    }
    Ok(())
}

/// Reads a record's payload (its length bounded by the half: `check` ran)
/// and checks its CRC. `Ok(Err(_))`: the payload is not the one committed.
fn read_payload<S: Storage + ?Sized>(
    s: &S,
    region: Region,
    rh: &RecordHeader,
) -> Result<Result<ReadBytes, RecordError>, ImageError> {
    let len = usize::try_from(rh.payload_len).unwrap_or(usize::MAX);
    let payload = s
        .read_bytes(region.offset + rh.offset + BLOCK, len)
        .map_err(read_err("redo-log payload"))?;
    let crc = crc32c::crc32c(&payload);
    if crc != rh.payload_crc {
        return Ok(Err(RecordError::PayloadCrc {
            stored: rh.payload_crc,
            computed: crc,
        }));
    }
    Ok(Ok(payload))
}

/// Checks a record's payload: its CRC, then that it decodes (every page in
/// RAM, every range in its page), and returns it. `Ok(Err(_))`: the record
/// is invalid.
fn check_payload<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    region: Region,
    rh: &RecordHeader,
) -> Result<Result<ReadBytes, RecordError>, ImageError> {
    Ok(read_payload(s, region, rh)?.and_then(|payload| {
        decode_writes(rh.version, &payload, rh.pages, header.ram_bytes() / PAGE)?;
        Ok(payload)
    }))
}

/// Payloads read and checked while planning recovery, by (log half, record
/// offset): recovery replays them without reading them again.
pub(super) type Payloads = HashMap<(usize, u64), ReadBytes>;

/// Format 3: the records of log half `half` in sequence from its start (each
/// valid, above the meta record, one epoch after the one before), then the
/// place where the sequence ends if something of ours is there that is not
/// older than the sequence (a torn or damaged record: its epoch must be
/// sealed). Older records past the end are left over from an earlier round
/// of the half and are not looked at.
fn scan_half<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    meta: &Meta,
    half: usize,
) -> Result<Vec<LogEntry>, ImageError> {
    let mut out: Vec<LogEntry> = Vec::new();
    let mut offset = 0;
    let mut prev: Option<u64> = None;
    loop {
        let st = read_record(s, header, meta, half, offset, None)?;
        let next = match &st {
            RecordState::Valid(rh) if prev.is_none_or(|p| rh.epoch == p + 1) => {
                Some(record_span(rh.payload_len))
            }
            _ => None,
        };
        if let Some(span) = next {
            prev = st.epoch();
            out.push(LogEntry {
                half,
                offset,
                state: st,
            });
            offset += span;
            continue;
        }
        // The sequence ends here.
        let st = match (prev, st.epoch()) {
            // At the start of the half: whatever is there, for inspect.
            (None, _) => Some(st),
            // Newer than the sequence: torn (its epoch must be sealed) or
            // out of sequence (damage).
            (Some(p), Some(e)) if e > p => Some(match st {
                RecordState::Valid(_) => RecordState::Invalid {
                    epoch: Some(e),
                    problem: RecordError::OutOfSequence {
                        expected: p + 1,
                        found: e,
                    },
                },
                st => st,
            }),
            // Older: left over from an earlier round of this half.
            _ => None,
        };
        out.extend(st.map(|state| LogEntry {
            half,
            offset,
            state,
        }));
        return Ok(out);
    }
}

/// Works out what recovery does with the image `s` whose current meta record
/// is `meta`: which log records are valid, which are replayed, which epoch
/// and state the VM continues from. Reads only; see docs/nvram-format.md
/// ("Recovery") for the rules and why they are sound.
pub(super) fn plan_recovery<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    meta: &Meta,
) -> Result<RecoveryPlan, ImageError> {
    plan_recovery_keeping(s, header, meta).map(|(plan, _)| plan)
}

/// [`plan_recovery`], also returning the payloads of the records to replay,
/// read and checked on the way (recovery needs them; reading a record of
/// ~190 whole pages again cost ~0.6 ms here, fresh memory included).
pub(super) fn plan_recovery_keeping<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    meta: &Meta,
) -> Result<(RecoveryPlan, Payloads), ImageError> {
    let mut kept = Payloads::new();
    if header.config.persist != PersistMode::Epoch {
        return Ok((RecoveryPlan::nothing(header, meta), kept));
    }
    let v3 = header.format_version >= FORMAT_VERSION;
    let mut log = if v3 {
        let mut log = scan_half(s, header, meta, 0)?;
        log.extend(scan_half(s, header, meta, 1)?);
        log
    } else {
        let mut log = Vec::new();
        for half in 0..2 {
            let mut state = read_record(s, header, meta, half, 0, Some(&mut kept))?;
            check_state(s, header, &mut state)?;
            log.push(LogEntry {
                half,
                offset: 0,
                state,
            });
        }
        log
    };
    let valid = |log: &[LogEntry], epoch: u64| -> Result<Option<usize>, ImageError> {
        let mut found = log
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(&e.state, RecordState::Valid(r) if r.epoch == epoch))
            .map(|(i, _)| i);
        match (found.next(), found.next()) {
            (Some(_), Some(_)) => Err(ImageError::LogConflict(epoch)),
            (i, _) => Ok(i),
        }
    };
    let newest = log
        .iter()
        .filter_map(|e| match &e.state {
            RecordState::Valid(r) => Some(r.epoch),
            _ => None,
        })
        .max();
    // R: the newest valid record whose state is intact; a newest record
    // whose state is torn never committed, and then its predecessor (whose
    // slot it did not touch) is R.
    let mut restore = None;
    let mut top = newest;
    while let Some(e) = top.filter(|&e| e > meta.epoch) {
        let Some(i) = valid(&log, e)? else {
            break;
        };
        if v3 {
            verify_payload(s, header, &mut log[i], &mut kept)?;
            check_state(s, header, &mut log[i].state)?;
        }
        if matches!(log[i].state, RecordState::Valid(_)) {
            restore = Some(i);
            break;
        }
        if newest != Some(e) {
            break;
        }
        top = e.checked_sub(1);
    }
    let replay = match restore {
        None => {
            if let Some(n) = newest.filter(|&n| v3 && n > meta.epoch + 1) {
                // Epoch n - 1 committed (record n was written after its
                // commit point), yet no record of it can be restored.
                return Err(ImageError::LogBroken {
                    epoch: n - 1,
                    why: "its record or its state is damaged".into(),
                });
            }
            Vec::new()
        }
        Some(r) if v3 => {
            let rh = log[r].state.record().cloned().expect("valid");
            let from = rh.applied_through.max(meta.epoch) + 1;
            let mut replay = Vec::new();
            for e in from..=rh.epoch {
                let i = valid(&log, e)?;
                if let Some(i) = i {
                    verify_payload(s, header, &mut log[i], &mut kept)?;
                }
                match i.filter(|&i| matches!(log[i].state, RecordState::Valid(_))) {
                    Some(i) => replay.push(i),
                    None => {
                        return Err(ImageError::LogBroken {
                            epoch: rh.epoch,
                            why: format!(
                                "it needs the record of epoch {e} (the RAM image is applied \
                                 through epoch {}), which is missing or damaged",
                                rh.applied_through
                            ),
                        })
                    }
                }
            }
            // The older records are applied (their payloads are not read).
            for entry in log.iter_mut() {
                if let RecordState::Valid(r) = &entry.state {
                    if r.epoch < from {
                        entry.state = RecordState::Applied(r.clone());
                    }
                }
            }
            replay
        }
        // Formats 1 and 2: R, after Q, the other half's valid record, if
        // older (always the record written just before R).
        Some(r) => match (&log[1 - r].state, log[r].state.epoch()) {
            (RecordState::Valid(q), Some(e)) if q.epoch < e => vec![1 - r, r],
            _ => vec![r],
        },
    };
    // Every intact header of ours must end up at or below the meta record's
    // epoch, so that no record recovery did not replay can ever count again.
    let highest = log.iter().filter_map(|e| e.state.epoch()).max();
    let seal_epoch = highest.filter(|&e| e > meta.epoch);
    // Only what recovery replays is kept.
    let wanted: Vec<(usize, u64)> = replay
        .iter()
        .map(|&i| (log[i].half, log[i].offset))
        .collect();
    kept.retain(|k, _| wanted.contains(k));
    let plan = RecoveryPlan {
        log: Some(log),
        replay,
        restore,
        meta_epoch: meta.epoch,
        seal_epoch,
    };
    Ok((plan, kept))
}

impl<S: Storage> Image<S> {
    /// Carries out the recovery plan made when the image was opened: replays
    /// the valid log records newer than the current meta record into the RAM
    /// image (idempotent), persists, then writes and persists a meta record
    /// for the restored epoch; format 3, when no intact record header lies
    /// above the restored record, neither: the log continues after it and
    /// the next commit's persist covers the replay. Call after opening an epoch-mode image and
    /// before reading its state or mapping its RAM. Does nothing (and writes
    /// nothing) when there is nothing to do, e.g. after a suspend or in
    /// suspend-only mode. Safe to interrupt by a crash and run again.
    pub fn recover(&mut self) -> Result<RecoveryReport, ImageError> {
        let start = Instant::now();
        let plan = self.plan.clone();
        let mut report = RecoveryReport {
            restored_epoch: plan.restored_epoch(),
            from_log: plan.restore.is_some(),
            epoch: self.current.epoch,
            replayed: Vec::new(),
            pages_replayed: 0,
            meta_written: false,
            elapsed: Duration::ZERO,
        };
        if !self.recovery_pending {
            // Views of the log must not outlive recovery (see ReadMap).
            self.replay_payloads.clear();
            report.elapsed = start.elapsed();
            return Ok(report);
        }
        if self.poisoned {
            return Err(ImageError::Poisoned);
        }
        self.poisoned = true;
        // Every replayed record first, then their writes per page. The
        // payloads were read and checked when the image was opened (and it
        // has been locked since); one not kept is read and checked again.
        let mut records = Vec::new();
        let mut kept = std::mem::take(&mut self.replay_payloads);
        let t = Instant::now();
        for &i in &plan.replay {
            let (Some(entry), Some(rh)) = (plan.entry(i), plan.record(i)) else {
                continue;
            };
            let payload = match kept.remove(&(entry.half, entry.offset)) {
                Some(p) => p,
                None => {
                    let region = half_region(self.header.geometry.log, entry.half);
                    read_payload(&self.storage, region, rh)?
                        .map_err(|_| ImageError::LogChanged(rh.epoch))?
                }
            };
            records.push((rh, payload));
        }
        let read_us = t.elapsed().as_micros() as u64;
        let t = Instant::now();
        let ram_pages = self.header.ram_bytes() / PAGE;
        let mut gathered = ReplayPages::default();
        let mut replayed_span = None;
        for (rh, payload) in &records {
            let writes = decode_writes(rh.version, payload, rh.pages, ram_pages)
                .map_err(|_| ImageError::LogChanged(rh.epoch))?;
            gathered.add(&writes);
            report.pages_replayed += rh.pages;
            report.replayed.push(rh.epoch);
        }
        if !records.is_empty() {
            let gather_us = t.elapsed().as_micros() as u64;
            let t = Instant::now();
            // ORDER: after every record is read: each byte ends up as the
            // last record that wrote it says (see `nvram::replay`).
            self.storage.scattered_reads(true);
            let out = gathered.write_out(&mut self.storage, self.header.geometry.ram.offset);
            self.storage.scattered_reads(false);
            let out = out?;
            tracing::debug!(
                pages = out.pages,
                read = out.read,
                reads = out.reads,
                writes = out.writes,
                threads = out.threads,
                read_us,
                gather_us,
                write_us = t.elapsed().as_micros() as u64,
                "replayed pages written"
            );
            self.unpersisted = true;
            replayed_span = out.span;
        }
        self.poisoned = false;
        // Format 3, when no intact record header of this image lies above
        // the restored record (the seal would name that record's epoch, so
        // nothing needs covering): no seal, no persist here. The writer goes
        // on where the log stopped, and the first epoch's persist makes the
        // replayed pages durable, as it does for applied pages (see the doc,
        // "Format 3", "Continuing the log").
        if let Some(w) = self.log.continue_after(&plan) {
            self.log = w;
            self.log_continued = true;
            if let Some((lo, hi)) = replayed_span {
                // Nothing waits on these writes until the first epoch's
                // persist: get them on their way without delaying the resume.
                let ram = self.header.geometry.ram.offset;
                self.storage
                    .start_writeback_idle(ram + lo * PAGE, (hi - lo + 1) * PAGE);
            }
        } else {
            let meta = plan.current(&self.header, &self.meta.current);
            // ORDER: the replayed pages are persisted first, then the meta
            // record that says they are applied is written and persisted.
            let t = Instant::now();
            if self.unpersisted {
                self.persist_all()?;
            }
            let pages_persist = t.elapsed();
            let (_, meta_persist) = self.write_meta(Meta {
                time_unix_ns: now_ns(),
                ..meta
            })?;
            tracing::debug!(
                pages_persist_us = pages_persist.as_micros() as u64,
                meta_persist_us = meta_persist.as_micros() as u64,
                "recovery sealed"
            );
            report.meta_written = true;
        }
        self.recovery_pending = false;
        report.epoch = self.current.epoch;
        report.elapsed = start.elapsed();
        Ok(report)
    }
}
