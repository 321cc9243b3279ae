//! Epoch mode: the redo-log commit ([`Image::commit_epoch`]), the apply of a
//! committed epoch to the RAM image ([`Image::apply_committed`]), and
//! recovery ([`Image::recover`], planned by [`plan_recovery`] when the image
//! is opened, and by `inspect` without writing).
//!
//! One persist per epoch: the log record (header, then the changed bytes of
//! each page) and the machine state go out together and one persist makes
//! them durable; the record is self-validating, so that persist's return is
//! the commit point.
//! The protocol, the recovery rule and the argument that they are sound are
//! in `docs/nvram-format.md` ("Epoch commit protocol", "Recovery").

use std::time::{Duration, Instant};

use std::borrow::Cow;

use serde::Serialize;

use super::image::{now_ns, read_err, CommitTimes, Image, ImageError};
use super::layout::{Header, Meta, PersistMode, Region, Status, BLOCK, FORMAT_VERSION_1};
use super::redo::{
    capacity_pages_for, decode_writes, encode_table, half_region, payload_room, runs, Changes,
    PageWrite, Payload, RecordError, RecordHeader, PAGE, RECORD_HEADER_LEN, RECORD_VERSION,
    RECORD_VERSION_1,
};
use super::storage::Storage;

/// Bytes gathered into one write when writes to consecutive RAM-image bytes
/// are coalesced (replay of pages logged whole).
const COALESCE_BYTES: usize = 1 << 20;

/// What one half of the redo log holds, as recovery classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HalfState {
    /// Nothing was ever written there (or the log is too small for a record).
    Blank,
    /// A record the current meta record covers (its epoch is not above the
    /// meta record's): applied to the RAM image before that record was
    /// written, so it is ignored and its payload is not read.
    Applied(RecordHeader),
    /// A complete record newer than the current meta record: its header,
    /// payload and state CRCs all match.
    Valid(RecordHeader),
    /// Not a valid record: torn, damaged, foreign, or its state slot has been
    /// reused since. `epoch` when the header itself is intact and ours.
    Invalid {
        /// The record's epoch, if its header is intact and belongs to this image.
        epoch: Option<u64>,
        /// Why the record is not valid.
        problem: RecordError,
    },
}

impl HalfState {
    /// The record header, when it is intact and belongs to this image.
    pub fn record(&self) -> Option<&RecordHeader> {
        match self {
            HalfState::Applied(r) | HalfState::Valid(r) => Some(r),
            _ => None,
        }
    }

    /// The epoch in an intact header of this image, if any.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            HalfState::Applied(r) | HalfState::Valid(r) => Some(r.epoch),
            HalfState::Invalid { epoch, .. } => *epoch,
            HalfState::Blank => None,
        }
    }

    /// A short word for the state: `blank`, `applied`, `valid` or `invalid`.
    pub fn word(&self) -> &'static str {
        match self {
            HalfState::Blank => "blank",
            HalfState::Applied(_) => "applied",
            HalfState::Valid(_) => "valid",
            HalfState::Invalid { .. } => "invalid",
        }
    }
}

/// What recovery finds in an image and what it does about it. Computed when
/// the image is opened (and by `inspect`), carried out by [`Image::recover`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryPlan {
    /// Each log half's record; `None` in suspend-only mode (no log is used).
    pub halves: Option<[HalfState; 2]>,
    /// The halves whose records are replayed into the RAM image, oldest first.
    pub replay: Vec<usize>,
    /// `Some(half)`: the VM continues from that record's epoch and state;
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
            halves: (header.config.persist == PersistMode::Epoch)
                .then_some([HalfState::Blank, HalfState::Blank]),
            replay: Vec::new(),
            restore: None,
            meta_epoch: meta.epoch,
            seal_epoch: None,
        }
    }

    fn record(&self, half: usize) -> Option<&RecordHeader> {
        self.halves.as_ref()?.get(half)?.record()
    }

    /// Epochs replayed, oldest first.
    pub fn replay_epochs(&self) -> Vec<u64> {
        self.replay
            .iter()
            .filter_map(|&h| self.record(h).map(|r| r.epoch))
            .collect()
    }

    /// Pages replayed in all.
    pub fn replay_pages(&self) -> u64 {
        self.replay
            .iter()
            .filter_map(|&h| self.record(h).map(|r| r.pages))
            .sum()
    }

    /// Bytes of log records replayed in all (header blocks and payloads).
    pub fn replay_bytes(&self) -> u64 {
        self.replay
            .iter()
            .filter_map(|&h| self.record(h).map(|r| BLOCK + r.payload_len))
            .sum()
    }

    /// The epoch whose RAM and state the VM continues from.
    pub fn restored_epoch(&self) -> u64 {
        self.restore
            .and_then(|h| self.record(h))
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
        let mut m = match self.restore.and_then(|h| self.record(h)) {
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

/// The epoch `commit_epoch` committed and `apply_committed` has not applied yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unapplied {
    pub(super) epoch: u64,
    pub(super) pages: usize,
    pub(super) payload_len: usize,
    pub(super) payload_crc: u32,
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
    /// Pages written while replaying.
    pub pages_replayed: u64,
    /// Whether a meta record was written (and persisted).
    pub meta_written: bool,
    /// Time spent.
    pub elapsed: Duration,
}

/// Reads the header of log half `half` and classifies the record, reading
/// and checking its payload and state only when its epoch is above the
/// current meta record's.
fn classify<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    meta: &Meta,
    half: usize,
) -> Result<HalfState, ImageError> {
    let region = half_region(header.geometry.log, half);
    if region.size < BLOCK {
        return Ok(HalfState::Blank);
    }
    let mut b = [0u8; RECORD_HEADER_LEN];
    s.read_at(region.offset, &mut b)
        .map_err(read_err("redo-log record header"))?;
    let rh = match RecordHeader::parse(&b) {
        Ok(rh) => rh,
        Err(RecordError::Blank) => return Ok(HalfState::Blank),
        Err(problem) => {
            return Ok(HalfState::Invalid {
                epoch: None,
                problem,
            })
        }
    };
    let ours = rh.image_uuid == header.uuid;
    let invalid = |problem| HalfState::Invalid {
        epoch: ours.then_some(rh.epoch),
        problem,
    };
    if let Err(problem) = rh.check(header, half) {
        return Ok(invalid(problem));
    }
    if rh.epoch <= meta.epoch {
        return Ok(HalfState::Applied(rh));
    }
    if let Err(problem) = check_payload(s, header, region, &rh)? {
        return Ok(invalid(problem));
    }
    let slot = header.geometry.state[rh.state_slot];
    // Bounded: check() proved state_len <= the slot size (<= 64 MiB).
    let mut state = vec![0u8; rh.state_len as usize];
    s.read_at(slot.offset, &mut state)
        .map_err(read_err("state slot"))?;
    let computed = crc32c::crc32c(&state);
    if computed != rh.state_crc {
        return Ok(invalid(RecordError::StateCrc {
            slot: rh.state_slot,
            stored: rh.state_crc,
            computed,
        }));
    }
    Ok(HalfState::Valid(rh))
}

/// Reads a record's payload (its length bounded by the half: `check` ran)
/// and checks its CRC. `Ok(Err(_))`: the payload is not the one committed.
fn read_payload<S: Storage + ?Sized>(
    s: &S,
    region: Region,
    rh: &RecordHeader,
) -> Result<Result<Vec<u8>, RecordError>, ImageError> {
    let len = usize::try_from(rh.payload_len).unwrap_or(usize::MAX);
    let mut payload = vec![0u8; len];
    s.read_at(region.offset + BLOCK, &mut payload)
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
/// RAM, every range in its page). `Ok(Err(_))`: the record is invalid.
fn check_payload<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    region: Region,
    rh: &RecordHeader,
) -> Result<Result<(), RecordError>, ImageError> {
    Ok(read_payload(s, region, rh)?.and_then(|payload| {
        decode_writes(rh.version, &payload, rh.pages, header.ram_bytes() / PAGE).map(drop)
    }))
}

/// Writes `writes` into the RAM region at `ram` (the region's offset), in
/// order; writes that continue each other in the RAM image are gathered
/// into one (up to [`COALESCE_BYTES`]).
fn write_pages<S: Storage + ?Sized>(
    s: &mut S,
    ram: u64,
    writes: &[PageWrite<'_>],
) -> Result<(), ImageError> {
    let mut run: Vec<u8> = Vec::new();
    let mut run_at = 0u64;
    for w in writes {
        let at = ram + w.pfn * PAGE + w.offset as u64;
        if !run.is_empty() && (at != run_at + run.len() as u64 || run.len() >= COALESCE_BYTES) {
            s.write_at(run_at, &run)?;
            run.clear();
        }
        if run.is_empty() {
            run_at = at;
        }
        run.extend_from_slice(w.data);
    }
    if !run.is_empty() {
        s.write_at(run_at, &run)?;
    }
    Ok(())
}

/// Works out what recovery does with the image `s` whose current meta record
/// is `meta`: which log records are valid, which are replayed, which epoch
/// and state the VM continues from. Reads only; see docs/nvram-format.md
/// ("Recovery") for the rule and why it is sound.
pub(super) fn plan_recovery<S: Storage + ?Sized>(
    s: &S,
    header: &Header,
    meta: &Meta,
) -> Result<RecoveryPlan, ImageError> {
    if header.config.persist != PersistMode::Epoch {
        return Ok(RecoveryPlan::nothing(header, meta));
    }
    let halves = [classify(s, header, meta, 0)?, classify(s, header, meta, 1)?];
    let valid = |h: usize| match &halves[h] {
        HalfState::Valid(r) => Some(r.epoch),
        _ => None,
    };
    // R: the valid record with the highest epoch; Q: the other half's valid
    // record, if older (always the record written just before R).
    let (restore, replay) = match (valid(0), valid(1)) {
        (Some(a), Some(b)) if a == b => return Err(ImageError::LogConflict(a)),
        (Some(a), Some(b)) => {
            let r = usize::from(b > a);
            (Some(r), vec![1 - r, r])
        }
        (Some(_), None) => (Some(0), vec![0]),
        (None, Some(_)) => (Some(1), vec![1]),
        (None, None) => (None, vec![]),
    };
    // Every intact header of ours must end up at or below the meta record's
    // epoch, so that no record recovery did not replay can ever count again.
    let highest = halves.iter().filter_map(HalfState::epoch).max();
    let seal_epoch = highest.filter(|&e| e > meta.epoch);
    Ok(RecoveryPlan {
        halves: Some(halves),
        replay,
        restore,
        meta_epoch: meta.epoch,
        seal_epoch,
    })
}

impl<S: Storage> Image<S> {
    /// The most dirty pages one epoch may commit: what one half of the redo
    /// log holds (0 in suspend-only mode or with no log).
    pub fn log_capacity_pages(&self) -> usize {
        if self.header.config.persist != PersistMode::Epoch {
            return 0;
        }
        let half = half_region(self.header.geometry.log, 0);
        capacity_pages_for(self.header.format_version, half.size)
            .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// The most payload bytes one epoch may commit (0 in suspend-only mode
    /// or with no log).
    pub fn log_room_bytes(&self) -> usize {
        if self.header.config.persist != PersistMode::Epoch {
            return 0;
        }
        let half = half_region(self.header.geometry.log, 0);
        payload_room(half.size).map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// The record version and payload `changes` are logged as in this image:
    /// v2 (the delta payload) in images of the current format, v1 (a page
    /// table and whole pages) in format-1 images, which builds before format
    /// 2 must still be able to read.
    fn encoded<'a>(&self, changes: &'a Changes) -> (u32, Cow<'a, [u8]>) {
        if self.header.format_version == FORMAT_VERSION_1 {
            let mut b = encode_table(changes.pfns());
            b.extend_from_slice(&changes.pages);
            (RECORD_VERSION_1, Cow::Owned(b))
        } else {
            (RECORD_VERSION, Cow::Borrowed(changes.payload.bytes()))
        }
    }

    /// Commits epoch `current().epoch + 1`: what changed in guest RAM since
    /// the last epoch (`changes`: for each page written, its changed bytes
    /// relative to what the RAM image holds once every earlier epoch is
    /// applied, and its whole new bytes) and the machine `state` saved with
    /// it.
    ///
    /// Writes the log record into log half `epoch % 2` and the state into
    /// the state slot the current point does not name, then persists once. When
    /// this returns, the epoch is durable: a crash from then on resumes it or
    /// a later one. Then call [`Image::apply_committed`] with the same
    /// changes (no other commit is accepted before). Entries are applied and
    /// replayed in order (a page logged twice: the later entry's bytes win).
    pub fn commit_epoch(
        &mut self,
        changes: &Changes,
        state: &[u8],
    ) -> Result<CommitTimes, ImageError> {
        let start = Instant::now();
        self.ready_to_commit()?;
        if self.header.config.persist != PersistMode::Epoch {
            return Err(ImageError::NotEpochMode);
        }
        let pfns = changes.pfns();
        let ram_pages = self.header.ram_bytes() / PAGE;
        if let Some(&pfn) = pfns.iter().find(|&&p| p >= ram_pages) {
            return Err(ImageError::PfnOutOfRange { pfn, ram_pages });
        }
        if Some(changes.pages.len()) != pfns.len().checked_mul(PAGE as usize) {
            return Err(ImageError::PageBuffer {
                pfns: pfns.len(),
                bytes: changes.pages.len(),
            });
        }
        let epoch = self.next_epoch()?;
        let half = (epoch % 2) as usize;
        let region = half_region(self.header.geometry.log, half);
        let (version, bytes) = self.encoded(changes);
        let bytes = &bytes[..];
        if payload_room(region.size).is_none() || bytes.len() > self.log_room_bytes() {
            return Err(ImageError::LogFull {
                pages: pfns.len(),
                bytes: bytes.len(),
                room: self.log_room_bytes(),
            });
        }
        let slot = 1 - self.current.state_slot.min(1);
        let slot_region = self.header.geometry.state[slot];
        let state_len = state.len() as u64;
        if state_len > slot_region.size {
            return Err(ImageError::StateTooLarge {
                len: state_len,
                slot_bytes: slot_region.size,
            });
        }
        let payload_crc = crc32c::crc32c(bytes);
        let state_crc = crc32c::crc32c(state);
        let time_unix_ns = now_ns();
        let record = RecordHeader {
            version,
            half,
            epoch,
            image_uuid: self.header.uuid,
            pages: pfns.len() as u64,
            payload_len: bytes.len() as u64,
            state_slot: slot,
            state_len,
            state_crc,
            payload_crc,
            time_unix_ns,
        };
        let mut head = vec![0u8; BLOCK as usize];
        head[..RECORD_HEADER_LEN].copy_from_slice(&record.encode());
        // From here on a failure leaves what is durable unknown.
        self.poisoned = true;
        let t = Instant::now();
        // ORDER: these three writes may reach the medium in any order and in
        // any part, together with the previous epoch's apply. None of them
        // touches what the current point needs: the other log half and the
        // state slot the current point names.
        self.storage.write_at(region.offset + BLOCK, bytes)?;
        self.storage.write_at(slot_region.offset, state)?;
        self.storage.write_at(region.offset, &head)?;
        let state_write = t.elapsed();
        let t = Instant::now();
        // ORDER: the commit point. One persist makes the record, the state
        // and the previous epoch's applied pages durable; the record's CRCs
        // prove it complete, so no second (meta) persist is needed. Nothing
        // that depends on epoch `epoch` (released output, apply) may happen
        // before this returns.
        self.persist_all()?;
        let state_persist = t.elapsed();
        self.poisoned = false;
        self.unapplied = Some(Unapplied {
            epoch,
            pages: pfns.len(),
            payload_len: bytes.len(),
            payload_crc,
        });
        self.current = Meta {
            epoch,
            status: Status::Committed,
            state_slot: slot,
            state_len,
            state_crc,
            log_head: 0,
            log_tail: self.header.log_bytes(),
            image_uuid: self.header.uuid,
            time_unix_ns,
        };
        Ok(CommitTimes {
            epoch,
            log_bytes: bytes.len() as u64,
            state_bytes: state_len,
            state_write,
            state_persist,
            meta_write: Duration::ZERO,
            meta_persist: Duration::ZERO,
            total: start.elapsed(),
        })
    }

    /// Writes the epoch just committed by [`Image::commit_epoch`] into the
    /// RAM image: pass the same `changes`. Their whole pages are written
    /// (one write per run of consecutive pages, where the payload's ranges
    /// would take one each), after checking the payload against the record's
    /// length and CRC and the pages against every range of the payload. Does
    /// not persist: the next commit's persist covers these writes, and until
    /// then the log record can redo them.
    pub fn apply_committed(&mut self, changes: &Changes) -> Result<(), ImageError> {
        if self.poisoned {
            return Err(ImageError::Poisoned);
        }
        let Some(u) = self.unapplied else {
            return Err(ImageError::NothingToApply);
        };
        let (pfns, pages) = (changes.pfns(), &changes.pages[..]);
        let (_, bytes) = self.encoded(changes);
        let same = pfns.len() == u.pages
            && bytes.len() == u.payload_len
            && Some(pages.len()) == pfns.len().checked_mul(PAGE as usize)
            && crc32c::crc32c(&bytes) == u.payload_crc
            && matches_pages(&changes.payload, pages, self.header.ram_bytes() / PAGE);
        if !same {
            return Err(ImageError::ApplyMismatch(u.epoch));
        }
        self.poisoned = true;
        let ram = self.header.geometry.ram.offset;
        // ORDER: no persist here. These writes must be issued after the
        // commit point of their epoch (commit_epoch returned) and before the
        // next persist, which makes them durable before anything that can
        // overwrite this epoch's log record or rely on the RAM image
        // (the next epoch's commit, a meta record).
        for (i, n) in runs(pfns) {
            let data = &pages[i * PAGE as usize..(i + n) * PAGE as usize];
            self.storage.write_at(ram + pfns[i] * PAGE, data)?;
        }
        if let (Some(lo), Some(hi)) = (pfns.iter().min(), pfns.iter().max()) {
            // Get the scattered pages on their way while the next epoch runs.
            self.storage
                .start_writeback(ram + lo * PAGE, (hi - lo + 1) * PAGE);
        }
        self.poisoned = false;
        self.unpersisted = true;
        self.unapplied = None;
        Ok(())
    }

    /// Carries out the recovery plan made when the image was opened: replays
    /// the valid log records newer than the current meta record into the RAM
    /// image (idempotent), persists, then writes and persists a meta record
    /// for the restored epoch. Call after opening an epoch-mode image and
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
            report.elapsed = start.elapsed();
            return Ok(report);
        }
        if self.poisoned {
            return Err(ImageError::Poisoned);
        }
        self.poisoned = true;
        for &half in &plan.replay {
            let Some(rh) = plan.record(half) else {
                continue;
            };
            report.pages_replayed += self.replay(half, rh)?;
            report.replayed.push(rh.epoch);
            self.unpersisted = true;
        }
        self.poisoned = false;
        let meta = plan.current(&self.header, &self.meta.current);
        // ORDER: write_meta persists the replayed pages first, then writes
        // the meta record that says they are applied, then persists it.
        self.write_meta(Meta {
            time_unix_ns: now_ns(),
            ..meta
        })?;
        self.recovery_pending = false;
        report.meta_written = true;
        report.epoch = self.current.epoch;
        report.elapsed = start.elapsed();
        Ok(report)
    }

    /// Writes the record in `half` into the RAM image, in entry order, after
    /// checking its payload CRC once more. Returns the pages written.
    fn replay(&mut self, half: usize, rh: &RecordHeader) -> Result<u64, ImageError> {
        let region = half_region(self.header.geometry.log, half);
        let payload = read_payload(&self.storage, region, rh)?
            .map_err(|_| ImageError::LogChanged(rh.epoch))?;
        let writes = decode_writes(
            rh.version,
            &payload,
            rh.pages,
            self.header.ram_bytes() / PAGE,
        )
        .map_err(|_| ImageError::LogChanged(rh.epoch))?;
        write_pages(&mut self.storage, self.header.geometry.ram.offset, &writes)?;
        Ok(rh.pages)
    }
}

/// Whether `pages` (whole pages, one per entry of `payload`) hold every
/// byte `payload` logs for them: the pages apply writes are the committed ones.
fn matches_pages(payload: &Payload, pages: &[u8], ram_pages: u64) -> bool {
    let Ok(writes) = decode_writes(
        RECORD_VERSION,
        payload.bytes(),
        payload.pfns().len() as u64,
        ram_pages,
    ) else {
        return false;
    };
    for w in &writes {
        let Some(page) = pages.get(w.entry * PAGE as usize..(w.entry + 1) * PAGE as usize) else {
            return false;
        };
        if page[w.offset..w.offset + w.data.len()] != *w.data {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::image::tests::{cfg, TempPath};
    use crate::nvram::layout::{ImageConfig, Uuid};
    use crate::nvram::redo::{Changes, FULL_ENTRY};
    use crate::nvram::storage::MemStorage;

    const P: usize = PAGE as usize;

    /// 16 pages of RAM; log halves of 8 blocks (6 pages per record).
    fn epoch_cfg() -> ImageConfig {
        ImageConfig {
            ram_bytes: 16 * PAGE,
            vcpus: 1,
            guest: "t".into(),
            persist: PersistMode::Epoch,
            log_bytes: 16 * BLOCK,
        }
    }

    fn mem_image(c: &ImageConfig) -> Image<MemStorage> {
        let h = Header::new(c, Uuid::from_random([1; 16]), 0, 0).unwrap();
        let len = h.geometry.image_len() as usize;
        Image::format(MemStorage::new(len), h).unwrap()
    }

    fn pages(pfns: &[u64], tag: u8) -> Vec<u8> {
        pfns.iter()
            .flat_map(|&p| (0..P).map(move |i| tag ^ (p as u8) ^ (i as u8)))
            .collect()
    }

    fn ram_page(s: &impl Storage, h: &Header, pfn: u64) -> Vec<u8> {
        let mut b = vec![0; P];
        s.read_at(h.geometry.ram.offset + pfn * PAGE, &mut b)
            .unwrap();
        b
    }

    /// mark_running (epoch 1), epochs 2 and 3 applied, epoch 4 committed
    /// but not applied: records 3 (half 1) and 4 (half 0) are live.
    fn three_epochs() -> (Image<MemStorage>, Vec<Vec<u8>>) {
        let mut img = mem_image(&epoch_cfg());
        img.mark_running().unwrap();
        let mut states = Vec::new();
        for (e, pfns) in [
            (2u8, vec![0u64, 1, 2]),
            (3, vec![2, 3]),
            (4, vec![1, 5, 6, 7]),
        ] {
            let data = pages(&pfns, e);
            let state = vec![e; 100 + usize::from(e)];
            img.commit_epoch(&Changes::whole(&pfns, &data), &state)
                .unwrap();
            if e < 4 {
                img.apply_committed(&Changes::whole(&pfns, &data)).unwrap();
            }
            states.push(state);
        }
        (img, states)
    }

    #[test]
    fn test_format_1_images_get_version_1_records_and_recover() {
        let c = epoch_cfg();
        let mut h = Header::new(&c, Uuid::from_random([1; 16]), 0, 0).unwrap();
        h.format_version = FORMAT_VERSION_1;
        let len = h.geometry.image_len() as usize;
        let mut img = Image::format(MemStorage::new(len), h.clone()).unwrap();
        img.mark_running().unwrap();
        let a = pages(&[2, 3], 1);
        // v1 capacity (a table block and 6 pages) and sizes.
        assert_eq!(img.log_capacity_pages(), 6);
        let t = img
            .commit_epoch(&Changes::whole(&[2, 3], &a), b"one")
            .unwrap();
        assert_eq!(t.log_bytes, 3 * P as u64);
        img.apply_committed(&Changes::whole(&[2, 3], &a)).unwrap();
        // A delta payload is logged as the whole pages in a format-1 image.
        let mut b = a[..P].to_vec();
        b[100] ^= 0xff;
        let mut delta = Changes::default();
        assert!(delta.payload.push_delta(2, &a[..P], &b));
        delta.pages = b.clone();
        img.commit_epoch(&delta, b"two").unwrap();
        let mut s = img.into_storage();
        // Lose the RAM image's pages: recovery must rebuild them from the log.
        s.write_at(h.geometry.ram.offset, &vec![0; 16 * P]).unwrap();
        let mut img = Image::open_storage(s).unwrap();
        let plan = img.recovery_plan().clone();
        let versions: Vec<u32> = plan
            .halves
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|st| st.record().map(|r| r.version))
            .collect();
        assert_eq!(versions, [RECORD_VERSION_1, RECORD_VERSION_1]);
        assert_eq!(plan.replay_epochs(), [2, 3]);
        img.recover().unwrap();
        assert_eq!(img.read_state().unwrap(), b"two");
        assert_eq!(ram_page(img.storage(), &h, 2), b);
        assert_eq!(ram_page(img.storage(), &h, 3), pages(&[3], 1));
    }

    fn reopen(img: Image<MemStorage>) -> Image<MemStorage> {
        Image::open_storage(img.into_storage()).unwrap()
    }

    #[test]
    fn test_commit_apply_recover_round_trip() {
        let (img, states) = three_epochs();
        assert_eq!(img.current().epoch, 4);
        let mut img = reopen(img);
        let plan = img.recovery_plan().clone();
        assert_eq!(plan.replay_epochs(), [3, 4]);
        assert_eq!(plan.restored_epoch(), 4);
        assert_eq!(plan.replay_pages(), 6);
        assert!(matches!(img.read_state(), Err(ImageError::RecoveryPending)));
        assert!(matches!(
            img.mark_running(),
            Err(ImageError::RecoveryPending)
        ));
        assert_eq!(img.resumable(), Ok(()));
        let r = img.recover().unwrap();
        assert_eq!((r.restored_epoch, r.epoch, r.from_log), (4, 4, true));
        assert_eq!((r.replayed.as_slice(), r.pages_replayed), (&[3, 4][..], 6));
        assert!(r.meta_written);
        assert_eq!(img.read_state().unwrap(), states[2]);
        let h = img.header().clone();
        let s = img.into_storage();
        // Page 1: epoch 4; page 2: epoch 3; page 0: epoch 2; page 4: never written.
        assert_eq!(ram_page(&s, &h, 1), pages(&[1], 4));
        assert_eq!(ram_page(&s, &h, 2), pages(&[2], 3));
        assert_eq!(ram_page(&s, &h, 0), pages(&[0], 2));
        assert_eq!(ram_page(&s, &h, 4), vec![0; P]);
        // A second open finds nothing to do and writes nothing.
        let mut img = Image::open_storage(s).unwrap();
        assert!(!img.recovery_plan().needs_writes());
        assert_eq!(
            img.recovery_plan().halves.as_ref().unwrap()[0].word(),
            "applied"
        );
        let before = img.storage.bytes().to_vec();
        let r = img.recover().unwrap();
        assert!(!r.meta_written && r.replayed.is_empty());
        assert_eq!(img.storage.bytes(), &before[..]);
        // And the VM continues: epoch 5 (Running), then 6 into half 0.
        img.mark_running().unwrap();
        img.commit_epoch(&Changes::whole(&[9], &pages(&[9], 6)), b"six")
            .unwrap();
        assert_eq!(img.current().epoch, 6);
    }

    #[test]
    fn test_suspend_in_epoch_mode_needs_no_replay() {
        let (mut img, _) = three_epochs();
        let data = pages(&[1, 5, 6, 7], 4);
        img.apply_committed(&Changes::whole(&[1, 5, 6, 7], &data))
            .unwrap();
        let t = img.commit(Status::Suspended, b"suspended state").unwrap();
        assert_eq!(t.epoch, 5);
        let mut img = reopen(img);
        assert!(!img.recovery_plan().needs_writes());
        assert_eq!(img.recovery_plan().restored_epoch(), 5);
        assert_eq!(img.current().status, Status::Suspended);
        assert_eq!(img.read_state().unwrap(), b"suspended state");
        assert_eq!(img.resumable(), Ok(()));
        assert!(!img.recover().unwrap().meta_written);
        let h = img.header().clone();
        assert_eq!(ram_page(&img.into_storage(), &h, 7), pages(&[7], 4));
    }

    #[test]
    fn test_commit_epoch_refusals() {
        let mut so = mem_image(&ImageConfig {
            persist: PersistMode::SuspendOnly,
            ..epoch_cfg()
        });
        assert!(matches!(
            so.commit_epoch(&Changes::whole(&[], &[]), b"s"),
            Err(ImageError::NotEpochMode)
        ));
        assert_eq!(so.log_capacity_pages(), 0);
        let mut img = mem_image(&epoch_cfg());
        assert_eq!(img.log_capacity_pages(), 6);
        assert!(matches!(
            img.commit_epoch(&Changes::whole(&[16], &[0; P]), b"s"),
            Err(ImageError::PfnOutOfRange {
                pfn: 16,
                ram_pages: 16
            })
        ));
        let seven: Vec<u64> = (0..7).collect();
        assert!(matches!(
            img.commit_epoch(&Changes::whole(&seven, &pages(&seven, 0)), b"s"),
            Err(ImageError::LogFull {
                pages: 7,
                bytes: 28_770,
                room: 28_672
            })
        ));
        let slot = img.header().geometry.state[0].size as usize;
        assert!(matches!(
            img.commit_epoch(&Changes::whole(&[], &[]), &vec![0; slot + 1]),
            Err(ImageError::StateTooLarge { .. })
        ));
        // Nothing was written by the refusals.
        assert_eq!(img.current().epoch, 0);
        assert!(matches!(
            img.apply_committed(&Changes::whole(&[], &[])),
            Err(ImageError::NothingToApply)
        ));
        let six: Vec<u64> = (0..6).collect();
        let data = pages(&six, 1);
        img.commit_epoch(&Changes::whole(&six, &data), b"s")
            .unwrap();
        for e in [
            img.commit_epoch(&Changes::whole(&[], &[]), b"s")
                .unwrap_err(),
            img.commit(Status::Suspended, b"s").unwrap_err(),
            img.mark_running().unwrap_err(),
        ] {
            assert!(matches!(e, ImageError::ApplyPending(1)), "{e}");
        }
        let mut other = data.clone();
        other[5000] ^= 1;
        assert!(matches!(
            img.apply_committed(&Changes::whole(&six, &other)),
            Err(ImageError::ApplyMismatch(1))
        ));
        assert!(matches!(
            img.apply_committed(&Changes::whole(&six[..5], &data[..5 * P])),
            Err(ImageError::ApplyMismatch(1))
        ));
        // The committed payload with other pages (or too few) is refused too.
        let mut committed = Changes::whole(&six, &data);
        committed.pages = other.clone();
        assert!(matches!(
            img.apply_committed(&committed),
            Err(ImageError::ApplyMismatch(1))
        ));
        committed.pages.truncate(5 * P);
        assert!(matches!(
            img.apply_committed(&committed),
            Err(ImageError::ApplyMismatch(1))
        ));
        img.apply_committed(&Changes::whole(&six, &data)).unwrap();
        // An empty epoch (state only) and a full one.
        img.commit_epoch(&Changes::whole(&[], &[]), b"only state")
            .unwrap();
        img.apply_committed(&Changes::whole(&[], &[])).unwrap();
        assert_eq!(img.current().epoch, 2);
    }

    #[test]
    fn test_no_log_region_means_log_full() {
        let mut img = mem_image(&ImageConfig {
            log_bytes: 0,
            ..epoch_cfg()
        });
        assert_eq!(img.log_capacity_pages(), 0);
        assert!(matches!(
            img.commit_epoch(&Changes::whole(&[], &[]), b"s"),
            Err(ImageError::LogFull {
                pages: 0,
                bytes: 0,
                room: 0
            })
        ));
        let img = reopen(img);
        assert!(!img.recovery_plan().needs_writes());
    }

    #[test]
    fn test_duplicate_and_consecutive_pages_apply_in_table_order() {
        let mut img = mem_image(&epoch_cfg());
        let pfns = [3u64, 4, 5, 3];
        let mut data = pages(&pfns, 9);
        data[3 * P..].fill(0xee);
        img.commit_epoch(&Changes::whole(&pfns, &data), b"s")
            .unwrap();
        img.apply_committed(&Changes::whole(&pfns, &data)).unwrap();
        let h = img.header().clone();
        assert_eq!(ram_page(img.storage(), &h, 3), vec![0xee; P]);
        assert_eq!(ram_page(img.storage(), &h, 4), pages(&[4], 9));
        // Replay gives the same result.
        let mut s = img.into_storage();
        s.write_at(h.geometry.ram.offset, &vec![0; 16 * P]).unwrap();
        let mut img = Image::open_storage(s).unwrap();
        img.recover().unwrap();
        assert_eq!(ram_page(img.storage(), &h, 3), vec![0xee; P]);
        assert_eq!(ram_page(img.storage(), &h, 5), pages(&[5], 9));
    }

    /// Flips one bit of the image and reports what recovery would do.
    fn plan_after_flip(bytes: &[u8], at: usize, bit: u8) -> Result<RecoveryPlan, ImageError> {
        let mut b = bytes.to_vec();
        b[at] ^= 1 << bit;
        Image::open_storage(MemStorage::from_bytes(b)).map(|i| i.plan)
    }

    #[test]
    fn test_corrupted_records_are_detected_and_handled_by_the_rule() {
        let (img, _) = three_epochs();
        let h = img.header().clone();
        let bytes = img.into_storage().into_bytes();
        let half = |i| half_region(h.geometry.log, i).offset as usize;
        // Record 4 in half 0 (4 pages), record 3 in half 1; state 4 in slot 1.
        let (r4, r3) = (half(0), half(1));
        let s4 = h.geometry.state[1].offset as usize;
        let invalid_then = |plan: &RecoveryPlan, bad: usize, restored: u64, replay: &[u64]| {
            assert!(
                matches!(
                    plan.halves.as_ref().unwrap()[bad],
                    HalfState::Invalid { .. }
                ),
                "{plan:?}"
            );
            assert_eq!(plan.restored_epoch(), restored);
            assert_eq!(plan.replay_epochs(), replay);
        };
        // Every bit of record 4's header: record 4 invalid, epoch 3 restored.
        for bit in 0..RECORD_HEADER_LEN * 8 {
            let plan = plan_after_flip(&bytes, r4 + bit / 8, (bit % 8) as u8).unwrap();
            invalid_then(&plan, 0, 3, &[3]);
        }
        // Payload and state: detected by their CRCs.
        // (The payload: 4 entries of a whole page, 4110 bytes each.)
        let entry = FULL_ENTRY as usize;
        for (at, why) in [
            (r4 + BLOCK as usize, "payload"),
            (r4 + BLOCK as usize + 8, "payload"),
            (r4 + BLOCK as usize + 4000, "payload"),
            (r4 + BLOCK as usize + entry + 10, "payload"),
            (r4 + BLOCK as usize + 4 * entry - 1, "payload"),
            (s4, "state"),
            (s4 + 103, "state"),
        ] {
            for bit in [0, 3, 7] {
                let plan = plan_after_flip(&bytes, at, bit).unwrap();
                invalid_then(&plan, 0, 3, &[3]);
                let HalfState::Invalid { problem, epoch } = &plan.halves.as_ref().unwrap()[0]
                else {
                    unreachable!()
                };
                assert_eq!(*epoch, Some(4));
                assert!(problem.to_string().contains(why), "{problem}");
            }
        }
        // Record 3 damaged: record 4 alone is replayed (the other half is
        // not its valid predecessor, so apply(3) must be durable: it is).
        let plan = plan_after_flip(&bytes, r3 + 2 * BLOCK as usize + 10, 1).unwrap();
        invalid_then(&plan, 1, 4, &[4]);
        // Both damaged: back to the meta record (epoch 1, running, no state).
        let mut b = bytes.clone();
        b[r3 + 40] ^= 1;
        b[r4 + 40] ^= 1;
        let img = Image::open_storage(MemStorage::from_bytes(b)).unwrap();
        assert_eq!(img.plan.restored_epoch(), 1);
        assert!(img.plan.replay.is_empty());
        // The damaged headers still parse as far as their CRC: no epoch known, no seal.
        assert!(!img.plan.needs_writes());
        let e = img.resumable().unwrap_err();
        assert!(e.reason.contains("no epoch was ever committed"), "{e}");
    }

    #[test]
    fn test_two_valid_records_of_one_epoch_are_refused() {
        let (img, _) = three_epochs();
        let h = img.header().clone();
        let mut s = img.into_storage();
        // Copy record 4 (half 0) into half 1, resealed as a half-1 record.
        let (r4, r3) = (
            half_region(h.geometry.log, 0),
            half_region(h.geometry.log, 1),
        );
        let mut rec = vec![0; r4.size as usize];
        s.read_at(r4.offset, &mut rec).unwrap();
        let mut rh = RecordHeader::parse(&rec).unwrap();
        rh.half = 1;
        rec[..RECORD_HEADER_LEN].copy_from_slice(&rh.encode());
        s.write_at(r3.offset, &rec).unwrap();
        let e = Image::open_storage(s).unwrap_err();
        assert!(matches!(e, ImageError::LogConflict(4)), "{e}");
        assert_eq!(
            e.to_string(),
            "both redo-log halves hold a valid record for epoch 4"
        );
    }

    #[test]
    fn test_record_in_the_wrong_half_or_foreign_is_invalid() {
        let (img, _) = three_epochs();
        let h = img.header().clone();
        let mut s = img.into_storage();
        let (r4, r3) = (
            half_region(h.geometry.log, 0),
            half_region(h.geometry.log, 1),
        );
        let mut rec = vec![0; r4.size as usize];
        s.read_at(r4.offset, &mut rec).unwrap();
        s.write_at(r3.offset, &rec).unwrap();
        let img = Image::open_storage(s).unwrap();
        let halves = img.plan.halves.clone().unwrap();
        assert!(matches!(
            &halves[1],
            HalfState::Invalid {
                problem: RecordError::WrongHalf { .. },
                epoch: Some(4)
            }
        ));
        assert_eq!(img.plan.replay_epochs(), [4]);
        let mut s = img.into_storage();
        let mut rh = RecordHeader::parse(&rec).unwrap();
        rh.image_uuid = Uuid([7; 16]);
        s.write_at(r4.offset, &rh.encode()).unwrap();
        let img = Image::open_storage(s).unwrap();
        let halves = img.plan.halves.clone().unwrap();
        assert!(matches!(
            &halves[0],
            HalfState::Invalid {
                problem: RecordError::Foreign(_),
                epoch: None
            }
        ));
    }

    #[test]
    fn test_epochs_on_a_tmpfs_file_survive_reopen() {
        let p = TempPath::new("epoch-file");
        let c = ImageConfig {
            persist: PersistMode::Epoch,
            ..cfg(PersistMode::Epoch)
        };
        let mut img = Image::create(&p.0, &c, false).unwrap();
        assert!(img.log_capacity_pages() > 0);
        img.mark_running().unwrap();
        let pfns = [0u64, 1023];
        let data = pages(&pfns, 5);
        let t = img
            .commit_epoch(&Changes::whole(&pfns, &data), b"file state")
            .unwrap();
        assert_eq!(t.epoch, 2);
        assert!(t.total >= t.state_persist);
        img.apply_committed(&Changes::whole(&pfns, &data)).unwrap();
        let d2 = pages(&[7], 6);
        img.commit_epoch(&Changes::whole(&[7], &d2), b"second")
            .unwrap();
        drop(img);
        // Killed before apply(3): recovery replays 2 and 3.
        let mut img = Image::open(&p.0).unwrap();
        assert_eq!(img.recovery_plan().replay_epochs(), [2, 3]);
        let r = img.recover().unwrap();
        assert_eq!(r.restored_epoch, 3);
        assert_eq!(img.read_state().unwrap(), b"second");
        let off = img.ram_offset();
        drop(img);
        let bytes = std::fs::read(&p.0).unwrap();
        let page = |pfn: u64| &bytes[(off + pfn * PAGE) as usize..][..P];
        assert_eq!(page(1023), &pages(&[1023], 5)[..]);
        assert_eq!(page(7), &d2[..]);
        let img = Image::open(&p.0).unwrap();
        assert!(!img.recovery_plan().needs_writes());
        assert_eq!(img.resumable(), Ok(()));
    }
}
