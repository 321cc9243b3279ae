//! Epoch mode: the redo-log commit ([`Image::commit_epoch`]) and the apply
//! of committed epochs to the RAM image ([`Image::apply_committed`]).
//! Recovery, which reads what this writes, is in `recovery.rs`.
//!
//! One persist per epoch: the log record (header, then the changed bytes of
//! each page) and the machine state go out together and one persist makes
//! them durable; the record is self-validating, so that persist's return is
//! the commit point.
//!
//! In an image of format 3 the records of consecutive epochs follow each
//! other in a log half ([`LogWriter`]), and the RAM image is applied lazily:
//! the committed pages wait in memory ([`Pending`]) and each is written once
//! for many epochs that changed it, early enough that the other half can be
//! reused when this one is full. Each record says through which epoch the
//! RAM image was durably applied when it was written, which is where
//! recovery starts replaying. Images of formats 1 and 2 keep their protocol:
//! one record per half, every epoch applied at once.
//!
//! The protocols, the recovery rules and the argument that they are sound
//! are in `docs/nvram-format.md` ("Epoch commit protocol", "Recovery").

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use std::borrow::Cow;

use super::image::{now_ns, CommitTimes, Image, ImageError};
use super::layout::{Meta, PersistMode, Status, BLOCK, FORMAT_VERSION, FORMAT_VERSION_1};
use super::recovery::{LogEntry, RecordState, RecoveryPlan};
use super::redo::{
    capacity_pages_for, decode_writes, encode_table, half_region, payload_room, runs, Changes,
    PageWrite, Payload, RecordHeader, PAGE, RECORD_HEADER_LEN, RECORD_VERSION, RECORD_VERSION_1,
    RECORD_VERSION_3,
};
use super::storage::Storage;

/// Bytes gathered into one write when writes to consecutive RAM-image bytes
/// are coalesced (replay of pages logged whole).
const COALESCE_BYTES: usize = 1 << 20;

/// Format 3: records written into one log half before the writer moves to
/// the other. It bounds what recovery replays (at most about this many
/// records, and the pages they changed) and sets how often a page that
/// keeps changing is written to the RAM image (about once per half).
pub const RECORDS_PER_HALF: usize = 32;

/// Format 3: bytes of log records newer than the RAM image's applied epoch
/// at most, after each apply: beyond it the oldest pending pages are
/// written until it holds (or nothing is pending). It bounds what recovery
/// replays (this much, or one record if that is larger).
pub const REPLAY_BUDGET_BYTES: u64 = 1 << 20;

/// Format 3: records over which the pages due before the writer may move
/// on are spread (fewer if the half fills sooner), so that the RAM image's
/// applied epoch soon passes the other half's and recovery replays little
/// of it.
const DUE_SPREAD: usize = 8;

/// Format 3: committed pages kept waiting for the RAM image at most; beyond
/// this the oldest are written at once (4 KiB of memory each).
pub const MAX_PENDING_PAGES: usize = 8192;

/// The epoch `commit_epoch` committed and `apply_committed` has not taken yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unapplied {
    pub(super) epoch: u64,
    pub(super) pages: usize,
    pub(super) payload_len: usize,
    pub(super) payload_crc: u32,
}

/// Format 3: committed pages not yet written to the RAM image, each with the
/// first epoch whose change to it the RAM image lacks. The queue holds the
/// pages in the order they became pending (so by that epoch); an entry is
/// stale once its page was written (and maybe became pending again later).
#[derive(Debug, Default)]
pub(super) struct Pending {
    pages: HashMap<u64, (u64, Box<[u8]>)>,
    queue: VecDeque<(u64, u64)>,
    spare: Vec<Box<[u8]>>,
}

impl Pending {
    /// Takes page `pfn`'s committed bytes as of `epoch`.
    fn stage(&mut self, pfn: u64, page: &[u8], epoch: u64) {
        if let Some((_, data)) = self.pages.get_mut(&pfn) {
            data.copy_from_slice(page);
            return;
        }
        let mut data = self
            .spare
            .pop()
            .unwrap_or_else(|| vec![0u8; PAGE as usize].into_boxed_slice());
        data.copy_from_slice(page);
        self.pages.insert(pfn, (epoch, data));
        self.queue.push_back((pfn, epoch));
    }

    /// Whether the queue entry `(pfn, since)` is not stale.
    fn is_current(&self, pfn: u64, since: u64) -> bool {
        self.pages.get(&pfn).is_some_and(|(s, _)| *s == since)
    }

    /// Drops stale entries from the front of the queue.
    fn trim(&mut self) {
        while let Some(&(pfn, since)) = self.queue.front() {
            if self.is_current(pfn, since) {
                break;
            }
            self.queue.pop_front();
        }
    }

    /// The first epoch whose change the RAM image lacks, if any.
    fn oldest(&mut self) -> Option<u64> {
        self.trim();
        self.queue.front().map(|&(_, since)| since)
    }

    /// Pages pending since epoch `through` or earlier.
    fn due(&self, through: u64) -> usize {
        self.queue
            .iter()
            .take_while(|&&(_, since)| since <= through)
            .filter(|&&(pfn, since)| self.is_current(pfn, since))
            .count()
    }

    /// Takes up to `n` of the oldest pending pages, those pending since
    /// epoch `through` or earlier, sorted by page number. Give the buffers
    /// back with [`Pending::recycle`].
    fn take_oldest(&mut self, n: usize, through: u64) -> Vec<(u64, Box<[u8]>)> {
        let mut out = Vec::with_capacity(n.min(self.pages.len()));
        while out.len() < n {
            self.trim();
            match self.queue.front() {
                Some(&(_, since)) if since <= through => {}
                _ => break,
            }
            let Some((pfn, _)) = self.queue.pop_front() else {
                break;
            };
            if let Some((_, data)) = self.pages.remove(&pfn) {
                out.push((pfn, data));
            }
        }
        out.sort_unstable_by_key(|&(pfn, _)| pfn);
        out
    }

    fn recycle(&mut self, pages: Vec<(u64, Box<[u8]>)>) {
        self.spare.extend(pages.into_iter().map(|(_, d)| d));
    }

    /// Whether page `pfn` is pending.
    fn contains(&self, pfn: u64) -> bool {
        self.pages.contains_key(&pfn)
    }

    /// Pages pending.
    pub(super) fn len(&self) -> usize {
        self.pages.len()
    }
}

/// Format 3: where the next record goes, what the log holds that recovery
/// may need, and how far the RAM image is applied.
///
/// Invariants (docs/nvram-format.md, "Format 3"): a half is written again
/// from its start only after a record that says every epoch the half holds
/// is durably applied (`last_applied_through >= live[half]`) has committed;
/// `applied_through` of a record is what the last completed persist made
/// durable, never what is merely issued.
#[derive(Debug)]
pub(super) struct LogWriter {
    /// The half being written and the offset of the next record in it.
    half: usize,
    offset: u64,
    /// Records written into `half` since the writer moved there.
    records: usize,
    /// The newest epoch each half holds that recovery may still need.
    live: [Option<u64>; 2],
    /// `applied_through` of the last record written.
    last_applied_through: u64,
    /// After recovery continued the log (format 3): the restored epoch,
    /// which the next recovery replays up to, from `last_applied_through`,
    /// until a record says it is applied (see
    /// [`LogWriter::replay_unacknowledged`]); 0 otherwise.
    continued_from: u64,
    /// Every epoch up to this one is applied to the RAM image by writes the
    /// last completed persist covered.
    durable_through: u64,
    /// ... by writes issued so far.
    issued_through: u64,
    /// Records per half, and the replay budget (a test may lower them).
    pub(super) records_per_half: usize,
    pub(super) replay_budget: u64,
    /// Bytes of one log half.
    half_bytes: u64,
    /// Pages to write per epoch while the other half's are due (see
    /// [`LogWriter::due_now`]).
    rate: usize,
    /// Epoch and bytes of each record written that is not yet known to be
    /// durably applied.
    written: VecDeque<(u64, u64)>,
    /// Committed pages waiting for the RAM image.
    pub(super) pending: Pending,
    /// Counts since the image was opened: moves to the other half, and
    /// checkpoints (meta records written because no place was free).
    pub(super) switches: u64,
    pub(super) checkpoints: u64,
}

impl LogWriter {
    /// The writer after a meta record of `epoch` (every record is applied).
    pub(super) fn new(epoch: u64, half_bytes: u64) -> LogWriter {
        LogWriter {
            half: ((epoch + 1) % 2) as usize,
            offset: 0,
            records: 0,
            live: [None; 2],
            last_applied_through: epoch,
            continued_from: 0,
            durable_through: epoch,
            issued_through: epoch,
            records_per_half: RECORDS_PER_HALF,
            replay_budget: REPLAY_BUDGET_BYTES,
            half_bytes,
            rate: 0,
            written: VecDeque::new(),
            pending: Pending::default(),
            switches: 0,
            checkpoints: 0,
        }
    }

    /// After a meta record of `epoch`, written once nothing is pending: no
    /// record is needed any more.
    pub(super) fn reset(&mut self, epoch: u64) {
        debug_assert_eq!(self.pending.len(), 0);
        let pending = std::mem::take(&mut self.pending);
        *self = LogWriter {
            records_per_half: self.records_per_half,
            replay_budget: self.replay_budget,
            pending,
            switches: self.switches,
            checkpoints: self.checkpoints,
            ..LogWriter::new(epoch, self.half_bytes)
        };
    }

    /// Format 3, after recovery replayed the records of `plan` without
    /// sealing them: the writer as it stood when the restored record was
    /// written. It goes on after that record in its half; every replayed
    /// epoch counts as issued (recovery wrote its pages) but not durable
    /// (nothing persisted them yet), so the records stay needed until a
    /// persist covers the replay (W1). `None` unless the plan continues the
    /// log ([`RecoveryPlan::continues_log`]).
    pub(super) fn continue_after(&self, plan: &RecoveryPlan) -> Option<LogWriter> {
        if !plan.continues_log() {
            return None;
        }
        let log = plan.log.as_ref()?;
        let restore = plan.restore?;
        let r = plan.record(restore)?.clone();
        let half = log[restore].half;
        let in_sequence =
            |e: &LogEntry| matches!(e.state, RecordState::Valid(_) | RecordState::Applied(_));
        let records = log
            .iter()
            .filter(|e| e.half == half && in_sequence(e) && e.offset <= r.offset)
            .count();
        let other = log
            .iter()
            .filter(|e| e.half == 1 - half && in_sequence(e))
            .filter_map(|e| e.state.epoch())
            .max();
        let durable = r.applied_through.max(plan.meta_epoch);
        let written = plan
            .replay
            .iter()
            .filter_map(|&i| plan.record(i))
            .filter(|h| h.epoch > durable)
            .map(|h| (h.epoch, record_span(h.payload_len)))
            .collect();
        let mut live = [None; 2];
        live[half] = Some(r.epoch);
        live[1 - half] = other;
        Some(LogWriter {
            half,
            offset: r.offset + record_span(r.payload_len),
            records,
            live,
            last_applied_through: r.applied_through,
            continued_from: r.epoch,
            durable_through: durable,
            issued_through: r.epoch,
            records_per_half: self.records_per_half,
            replay_budget: self.replay_budget,
            half_bytes: self.half_bytes,
            rate: 0,
            written,
            pending: Pending::default(),
            switches: self.switches,
            checkpoints: self.checkpoints,
        })
    }

    /// Whether the log still makes a recovery replay what the last one
    /// did: after recovery continued the log, no record yet says that the
    /// replayed epochs are applied. The first record after it cannot (the
    /// replay is durable only once its persist returns), the one after it
    /// does; a VM that goes idle in between writes no record of its own,
    /// and every later recovery would replay the same records again.
    pub(super) fn replay_unacknowledged(&self) -> bool {
        self.last_applied_through < self.continued_from
    }

    /// A persist covering every write issued so far completed.
    pub(super) fn persisted(&mut self) {
        self.durable_through = self.issued_through;
        while self
            .written
            .front()
            .is_some_and(|&(e, _)| e <= self.durable_through)
        {
            self.written.pop_front();
        }
    }

    /// Where a record of `len` bytes goes: after the last one, or at the
    /// start of the other half if that half holds nothing recovery needs.
    /// `None`: neither (the caller applies everything and writes a meta
    /// record first).
    fn place(&self, len: u64) -> Option<(usize, u64)> {
        if self.records < self.records_per_half && self.offset + len <= self.half_bytes {
            return Some((self.half, self.offset));
        }
        let other = 1 - self.half;
        match self.live[other] {
            Some(e) if self.last_applied_through < e => None,
            _ => Some((other, 0)),
        }
    }

    /// Record `epoch` of `len` bytes was written at `(half, offset)`, saying
    /// `applied_through`.
    fn wrote(&mut self, epoch: u64, half: usize, offset: u64, len: u64, applied_through: u64) {
        if half != self.half || offset == 0 {
            self.records = 0;
            self.switches += u64::from(half != self.half);
        }
        self.half = half;
        self.offset = offset + len;
        self.records += 1;
        self.live[half] = Some(epoch);
        self.last_applied_through = applied_through;
        self.written.push_back((epoch, len));
    }

    /// Which pending pages to write after committing an epoch: up to `n`
    /// of those pending since epoch `through` or earlier. The pages the
    /// other half's epochs changed must all be written (and a persist must
    /// follow, and a record saying so) before this half is full; they are
    /// spread over [`DUE_SPREAD`] records, or over the records this half
    /// still takes less two if that is fewer. The rate is worked out again
    /// every [`DUE_SPREAD`] records (the room left may shrink faster than
    /// the record count says).
    fn due_now(&mut self) -> (usize, u64) {
        let Some(through) = self.live[1 - self.half] else {
            return (0, 0);
        };
        if self.records % DUE_SPREAD == 1 {
            let due = self.pending.due(through);
            let left = self.records_per_half.saturating_sub(self.records);
            let left = match self.offset.checked_div(self.records as u64) {
                // Records of this half so far, on average: how many more fit.
                Some(avg) if avg > 0 => {
                    let room = self.half_bytes.saturating_sub(self.offset);
                    left.min(usize::try_from(room / avg).unwrap_or(0))
                }
                _ => left,
            };
            let over = left.saturating_sub(2).clamp(1, DUE_SPREAD);
            self.rate = due.div_ceil(over);
        }
        (self.rate, through)
    }

    /// Bytes of the records written since the last meta record with an
    /// epoch above `through`: what recovery would replay were the RAM image
    /// applied through `through`.
    fn log_after(&self, through: u64) -> u64 {
        self.written
            .iter()
            .rev()
            .take_while(|&&(e, _)| e > through)
            .map(|&(_, len)| len)
            .sum()
    }
}

/// Bytes a record with a payload of `payload_len` bytes takes in its half:
/// its header block and its payload in whole blocks. The next record of
/// the half (format 3) starts there.
pub fn record_span(payload_len: u64) -> u64 {
    BLOCK + payload_len.div_ceil(BLOCK) * BLOCK
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
        match self.header.format_version {
            FORMAT_VERSION_1 => {
                let mut b = encode_table(changes.pfns());
                b.extend_from_slice(&changes.pages);
                (RECORD_VERSION_1, Cow::Owned(b))
            }
            FORMAT_VERSION => (RECORD_VERSION_3, Cow::Borrowed(changes.payload.bytes())),
            _ => (RECORD_VERSION, Cow::Borrowed(changes.payload.bytes())),
        }
    }

    /// Commits epoch `current().epoch + 1`: what changed in guest RAM since
    /// the last epoch (`changes`: for each page written, its changed bytes
    /// relative to what the RAM image holds once every earlier epoch is
    /// applied, and its whole new bytes) and the machine `state` saved with
    /// it.
    ///
    /// Writes the log record (format 3: after the last record, or at the
    /// start of the other half; formats 1 and 2: into log half `epoch % 2`)
    /// and the state into the state slot the current point does not name,
    /// then persists once. When this returns, the epoch is durable: a crash
    /// from then on resumes it or a later one. Then call
    /// [`Image::apply_committed`] with the same changes (no other commit is
    /// accepted before). Entries are applied and replayed in order (a page
    /// logged twice: the later entry's bytes win).
    ///
    /// Format 3, when neither place is free (the other half still holds
    /// records recovery needs: a record larger than the rest of this half,
    /// or pages not written in time): first writes every pending page to the
    /// RAM image, persists, and writes a meta record for the last epoch
    /// (three persists instead of one).
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
        let (version, bytes) = self.encoded(changes);
        let bytes = &bytes[..];
        let half_size = half_region(self.header.geometry.log, 0).size;
        if payload_room(half_size).is_none() || bytes.len() > self.log_room_bytes() {
            return Err(ImageError::LogFull {
                pages: pfns.len(),
                bytes: bytes.len(),
                room: self.log_room_bytes(),
            });
        }
        let state_len = state.len() as u64;
        let slot_bytes = self.header.geometry.state[0].size;
        if state_len > slot_bytes {
            return Err(ImageError::StateTooLarge {
                len: state_len,
                slot_bytes,
            });
        }
        let span = record_span(bytes.len() as u64);
        let (half, offset) = if version == RECORD_VERSION_3 {
            match self.log.place(span) {
                Some(p) => p,
                None => {
                    self.checkpoint()?;
                    self.log.place(span).ok_or(ImageError::Poisoned)?
                }
            }
        } else {
            ((epoch % 2) as usize, 0)
        };
        let applied_through = match version {
            RECORD_VERSION_3 => self.log.durable_through,
            _ => 0,
        };
        let region = half_region(self.header.geometry.log, half);
        // After a checkpoint the current point is its meta record, which
        // names the same slot.
        let slot = 1 - self.current.state_slot.min(1);
        let slot_region = self.header.geometry.state[slot];
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
            applied_through,
            offset,
        };
        let mut head = vec![0u8; BLOCK as usize];
        head[..RECORD_HEADER_LEN].copy_from_slice(&record.encode());
        // From here on a failure leaves what is durable unknown.
        self.poisoned = true;
        let t = Instant::now();
        // ORDER: these three writes may reach the medium in any order and in
        // any part, together with the pages applied since the last persist.
        // None of them touches what the current point needs: the records
        // recovery may replay (format 3: those before `offset` in this half,
        // and the other half's unless `place` found them all applied; formats
        // 1 and 2: the other half) and the state slot the current point names.
        let at = region.offset + offset;
        self.storage.write_at(at + BLOCK, bytes)?;
        self.storage.write_at(slot_region.offset, state)?;
        self.storage.write_at(at, &head)?;
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
        if version == RECORD_VERSION_3 {
            self.log.wrote(epoch, half, offset, span, applied_through);
        }
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

    /// Takes the epoch just committed by [`Image::commit_epoch`] for the RAM
    /// image: pass the same `changes`, which are first checked (the payload
    /// against the record's length and CRC, the pages against every range of
    /// the payload). Formats 1 and 2 write their whole pages now (one write
    /// per run of consecutive pages). Format 3 keeps them pending and writes
    /// as many of the oldest pending pages as keep the other log half
    /// reusable in time (`LogWriter`): a page that changes every epoch is
    /// written about once per half, not once per epoch. Does not persist:
    /// the next commit's persist covers these writes, and until then the
    /// log records can redo them.
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
        if self.header.format_version == FORMAT_VERSION {
            let e = u.epoch;
            for (i, &pfn) in pfns.iter().enumerate() {
                let page = &pages[i * PAGE as usize..(i + 1) * PAGE as usize];
                self.log.pending.stage(pfn, page, e);
            }
            let (n, through) = self.log.due_now();
            self.write_pending(n, through)?;
            // Keep what recovery replays within the budget: write the pages
            // pending since the oldest epoch until the log after the applied
            // epoch fits (a record larger than the budget: everything).
            while self.log.log_after(self.log.issued_through) > self.log.replay_budget {
                let Some(oldest) = self.log.pending.oldest() else {
                    break;
                };
                self.write_pending(usize::MAX, oldest)?;
            }
            let over = self.log.pending.len().saturating_sub(MAX_PENDING_PAGES);
            self.write_pending(over, u64::MAX)?;
            self.poisoned = false;
            self.unapplied = None;
            return Ok(());
        }
        let ram = self.header.geometry.ram.offset;
        // ORDER: no persist here. These writes must be issued after the
        // commit point of their epoch (commit_epoch returned) and before the
        // next persist, which makes them durable before anything that can
        // overwrite this epoch's log record or rely on the RAM image
        // (the next epoch's commit, a meta record).
        self.pages_applied += pfns.len() as u64;
        if let Some(w) = self.written.as_mut() {
            w.extend_from_slice(pfns);
        }
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

    /// Format 3, after recovery continued the log: whether a record must
    /// still be committed, even one that changes nothing, before the
    /// records recovery replayed count as applied
    /// (`LogWriter::replay_unacknowledged`). Epoch mode skips idle epochs
    /// only once this is false.
    pub fn replay_unacknowledged(&self) -> bool {
        self.log.replay_unacknowledged()
    }

    /// From now on keep (`keep`), or stop keeping and forget, the number of
    /// every page an apply writes to the RAM image, for
    /// [`Image::drain_written`].
    pub fn keep_written(&mut self, keep: bool) {
        if keep {
            self.written.get_or_insert_with(Vec::new);
        } else {
            self.written = None;
        }
    }

    /// Hands `f` the pages applies wrote to the RAM image since the last
    /// call (each once per write), and forgets them; `f` is not called
    /// unless [`Image::keep_written`] asked for them. Such a page holds
    /// there its newest committed bytes, unless it is
    /// [pending](Image::is_pending) again.
    pub fn drain_written(&mut self, f: impl FnOnce(&[u64])) {
        if let Some(w) = self.written.as_mut() {
            f(w);
            w.clear();
        }
    }

    /// Format 3: whether page `pfn` has committed bytes the RAM image lacks
    /// (they wait in memory to be written). Formats 1 and 2 write every
    /// committed page at once.
    pub fn is_pending(&self, pfn: u64) -> bool {
        self.log.pending.contains(pfn)
    }

    /// Pages written to the RAM image by applies since the image was opened
    /// (each page of each epoch in formats 1 and 2; format 3 writes a page
    /// once for the epochs that changed it while it was pending).
    pub fn pages_applied(&self) -> u64 {
        self.pages_applied
    }

    /// Format 3: writes up to `n` of the oldest pending pages, those pending
    /// since epoch `through` or earlier (`usize::MAX` and `u64::MAX`: all),
    /// to the RAM image and starts their write-back; the RAM image is then
    /// applied, once persisted, through the epoch before the oldest page
    /// still pending. Does not persist.
    ///
    /// ORDER: only committed pages are pending (staged after their commit
    /// point), so the RAM image never holds an uncommitted byte; and a page's
    /// newest committed bytes stand for every earlier epoch's change to it.
    pub(super) fn write_pending(&mut self, n: usize, through: u64) -> Result<(), ImageError> {
        let taken = self.log.pending.take_oldest(n, through);
        if !taken.is_empty() {
            let writes: Vec<PageWrite<'_>> = taken
                .iter()
                .enumerate()
                .map(|(entry, (pfn, data))| PageWrite {
                    entry,
                    pfn: *pfn,
                    offset: 0,
                    data,
                })
                .collect();
            let ram = self.header.geometry.ram.offset;
            write_pages(&mut self.storage, ram, &writes)?;
            self.pages_applied += taken.len() as u64;
            if let Some(w) = self.written.as_mut() {
                w.extend(taken.iter().map(|&(pfn, _)| pfn));
            }
            let (lo, hi) = (taken[0].0, taken[taken.len() - 1].0);
            // Get the scattered pages on their way while the next epoch runs.
            self.storage
                .start_writeback(ram + lo * PAGE, (hi - lo + 1) * PAGE);
            self.unpersisted = true;
        }
        self.log.pending.recycle(taken);
        self.log.issued_through = match self.log.pending.oldest() {
            Some(since) => since - 1,
            None => self.current.epoch,
        };
        Ok(())
    }

    /// Format 3, when the log has no free place for the next record: writes
    /// every pending page and a meta record for the last committed epoch
    /// (persisting before and after it), after which no record is needed.
    fn checkpoint(&mut self) -> Result<(), ImageError> {
        self.log.checkpoints += 1;
        self.poisoned = true;
        self.write_pending(usize::MAX, u64::MAX)?;
        self.poisoned = false;
        // write_meta persists the pages first.
        let meta = Meta {
            time_unix_ns: now_ns(),
            ..self.current.clone()
        };
        self.write_meta(meta).map(drop)
    }
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
mod tests;
