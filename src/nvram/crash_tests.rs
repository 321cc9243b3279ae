//! Crash-point enumeration for the epoch commit protocol and recovery.
//!
//! A scenario (epochs with random pages and states, restarts, power cuts in
//! the middle of commits, a suspend) runs on a simulated storage that records
//! every write and every persist in order. Then, for every persist boundary
//! of that trace, every image a power cut there could leave is built from
//! the writes issued since the last completed persist (the "in-flight"
//! writes, which the page cache or the CPU caches may have written back in
//! any subset and any part): none of them, all of them, each one alone and
//! torn at every 8-byte prefix that changes the image (sampled for writes
//! over 4 KiB), each one torn after all earlier ones, and random subsets with
//! random 512-byte sectors missing. Recovery runs on each image, and RAM and
//! state must equal exactly a committed point the crash allows: the one
//! committed before the window, or the commit whose persist ends the window.
//! Recovery itself is then interrupted at each of its own crash points and
//! re-run (sampled), and must reach the same result; and a recovered image
//! must need no further recovery.
//!
//! `cargo test --lib crash_tests -- --nocapture` prints the counts.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use super::backing::BackingError;
use super::layout::{
    Header, ImageConfig, PersistMode, Status, Uuid, FORMAT_VERSION, FORMAT_VERSION_1,
    FORMAT_VERSION_2,
};
use super::redo::{capacity_pages, half_region, Changes, Payload, PAGE};
use super::storage::{MemStorage, Storage};
use super::test_rng::Rng;
use super::Image;

const BLK: usize = 4096;
const RAM_PAGES: u64 = 32;
/// Log halves of 14 blocks: header + one table block + 12 pages.
const LOG_BLOCKS: u64 = 28;
const CAPACITY: usize = 12;

/// One recorded storage operation.
#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        data: Arc<[u8]>,
    },
    /// A persist of `[offset, offset + len)`: only the in-flight writes
    /// inside the range become durable (the weakest guarantee, as on DAX;
    /// `fdatasync` persists everything).
    Persist {
        offset: u64,
        len: u64,
    },
    /// A power cut at a persist: of the writes issued since the last
    /// completed persist, those with `keep[i]` reached the medium.
    Cut {
        keep: Vec<bool>,
    },
}

/// Image bytes as a shared base, a shared layer of durable blocks and a
/// private layer of 4 KiB copy-on-write blocks; optionally records every
/// write and persist, and can simulate a power cut at the next persist.
#[derive(Clone, Default)]
struct Sim {
    base: Arc<Vec<u8>>,
    /// Durable blocks that differ from `base`, by block number.
    mid: Arc<Vec<Option<Arc<[u8]>>>>,
    /// This image's own blocks, by block number.
    top: Vec<Option<Box<[u8]>>>,
    trace: Option<Vec<Op>>,
    /// Which in-flight writes (by offset and length) survive the next cut.
    cut: Option<fn(u64, usize) -> bool>,
    /// When tracing: what is durable, and the writes that are not yet.
    durable: Option<Box<Sim>>,
    inflight: Vec<(u64, Arc<[u8]>)>,
}

fn covers(offset: u64, len: u64, write: &(u64, Arc<[u8]>)) -> bool {
    write.0 >= offset && write.0 + write.1.len() as u64 <= offset.saturating_add(len)
}

impl Sim {
    fn new(base: Arc<Vec<u8>>) -> Sim {
        let blocks = base.len() / BLK;
        Sim {
            base,
            mid: Arc::new(vec![None; blocks]),
            top: vec![None; blocks],
            ..Sim::default()
        }
    }

    fn block(&self, b: u64) -> &[u8] {
        if let Some(Some(x)) = self.top.get(b as usize) {
            return x;
        }
        if let Some(Some(x)) = self.mid.get(b as usize) {
            return x;
        }
        let at = b as usize * BLK;
        &self.base[at..at + BLK]
    }

    /// Writes without recording (building crash images).
    fn poke(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let at = offset as usize + done;
            let (b, within) = ((at / BLK) as u64, at % BLK);
            let n = (BLK - within).min(data.len() - done);
            if self.top[b as usize].is_none() {
                let copy: Box<[u8]> = self.block(b).into();
                self.top[b as usize] = Some(copy);
            }
            if let Some(x) = &mut self.top[b as usize] {
                x[within..within + n].copy_from_slice(&data[done..done + n]);
            }
            done += n;
        }
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read_at(offset, &mut v).unwrap();
        v
    }

    /// Folds the private layer into the shared durable layer.
    fn freeze(&self) -> Sim {
        let mut mid = (*self.mid).clone();
        for (b, x) in self.top.iter().enumerate() {
            if let Some(x) = x {
                mid[b] = Some(Arc::from(&x[..]));
            }
        }
        Sim {
            base: self.base.clone(),
            mid: Arc::new(mid),
            top: vec![None; self.top.len()],
            ..Sim::default()
        }
    }
}

impl Storage for Sim {
    fn size(&self) -> io::Result<u64> {
        Ok(self.base.len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset as usize + buf.len() > self.base.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset as usize + done;
            let (b, within) = ((at / BLK) as u64, at % BLK);
            let n = (BLK - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&self.block(b)[within..within + n]);
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        if offset as usize + data.len() > self.base.len() {
            return Err(BackingError::Write {
                offset,
                len: data.len(),
                source: io::Error::from_raw_os_error(libc::EFBIG),
            });
        }
        self.poke(offset, data);
        if let Some(t) = &mut self.trace {
            let data: Arc<[u8]> = data.into();
            t.push(Op::Write {
                offset,
                data: data.clone(),
            });
            self.inflight.push((offset, data));
        }
        Ok(())
    }

    fn persist(&mut self, offset: u64, len: u64) -> Result<(), BackingError> {
        let Some(durable) = self.durable.as_mut() else {
            if let Some(t) = &mut self.trace {
                t.push(Op::Persist { offset, len });
            }
            return Ok(());
        };
        if let Some(survives) = self.cut.take() {
            // The power fails while this persist is in progress: what is on
            // the medium is what was durable plus the in-flight writes that
            // made it there.
            let writes = std::mem::take(&mut self.inflight);
            let keep: Vec<bool> = writes.iter().map(|(o, d)| survives(*o, d.len())).collect();
            for ((o, d), k) in writes.iter().zip(&keep) {
                if *k {
                    durable.poke(*o, d);
                }
            }
            self.top = durable.top.clone();
            if let Some(t) = &mut self.trace {
                t.push(Op::Cut { keep });
            }
            return Err(BackingError::Sync(io::Error::other("simulated power cut")));
        }
        for w in self.inflight.iter().filter(|w| covers(offset, len, w)) {
            durable.poke(w.0, &w.1);
        }
        self.inflight.retain(|w| !covers(offset, len, w));
        if let Some(t) = &mut self.trace {
            t.push(Op::Persist { offset, len });
        }
        Ok(())
    }
}

/// A committed point: what recovery must restore exactly.
#[derive(Clone, Debug)]
struct Point {
    /// The epoch recovery reports as restored.
    epoch: u64,
    ram: Arc<Vec<u8>>,
    /// `None`: nothing resumable was ever committed.
    state: Option<Arc<Vec<u8>>>,
}

/// What a barrier (persist or power cut) of the trace means for the oracle.
#[derive(Clone, Debug, Default)]
struct Mark {
    /// The commit this barrier completes (or was completing when cut).
    candidate: Option<Point>,
    /// The committed point from this barrier on.
    after: Option<Point>,
}

fn config() -> ImageConfig {
    ImageConfig {
        ram_bytes: RAM_PAGES * PAGE,
        vcpus: 1,
        guest: "crash".into(),
        persist: PersistMode::Epoch,
        log_bytes: LOG_BLOCKS * 4096,
    }
}

/// A freshly formatted image of `cfg` in image format `format` (2 writes
/// delta records, 1 whole-page records).
fn formatted(cfg: &ImageConfig, format: u32) -> (Header, Vec<u8>) {
    let mut header = Header::new(cfg, Uuid::from_random([0x5a; 16]), 1_700_000_000, 0).unwrap();
    header.format_version = format;
    let len = header.geometry.image_len() as usize;
    let img = Image::format(MemStorage::new(len), header.clone()).unwrap();
    (header, img.into_storage().into_bytes())
}

/// The scenario: drives an image through epochs, restarts and power cuts,
/// keeping the oracle's marks.
struct Driver {
    img: Option<Image<Sim>>,
    rng: Rng,
    ram: Vec<u8>,
    point: Point,
    marks: BTreeMap<usize, Mark>,
    hot: Vec<u64>,
    last_state: Vec<u8>,
    epochs: usize,
    /// Format 3: records per log half (small, so that the scenario moves
    /// between the halves often and runs out of room).
    per_half: Option<usize>,
    /// Format 3, over every image opened: moves to the other half,
    /// checkpoints, and pages written to the RAM image by applies.
    switches: u64,
    checkpoints: u64,
    pages_applied: u64,
}

impl Driver {
    fn img(&mut self) -> &mut Image<Sim> {
        self.img.as_mut().expect("image open")
    }

    /// Closes the image (counting what it did) and returns its storage.
    fn close(&mut self) -> Sim {
        let img = self.img.take().unwrap();
        self.switches += img.log.switches;
        self.checkpoints += img.log.checkpoints;
        self.pages_applied += img.pages_applied();
        img.into_storage()
    }

    fn open(&mut self, sim: Sim) -> Image<Sim> {
        let mut img = Image::open_storage(sim).unwrap();
        if let Some(n) = self.per_half {
            // Small enough that the scenario's records exceed it at times.
            img.log.records_per_half = n;
            img.log.replay_budget = 6 * BLK as u64;
        }
        img
    }

    fn last_op(&mut self) -> usize {
        self.img().storage.trace.as_ref().map_or(0, Vec::len) - 1
    }

    fn mark_commit(&mut self, p: Point) {
        let at = self.last_op();
        self.marks.insert(
            at,
            Mark {
                candidate: Some(p.clone()),
                after: Some(p.clone()),
            },
        );
        self.point = p;
    }

    fn mark_running(&mut self) {
        self.img().mark_running().unwrap();
        let p = Point {
            epoch: self.img().current().epoch,
            ..self.point.clone()
        };
        self.mark_commit(p);
    }

    /// Dirty pages for one epoch: hot pages (few words changed, logged as
    /// deltas), new pages (fully random, logged whole), a run of consecutive
    /// pages, sometimes a page twice (its second entry a delta on its first).
    /// Returns the payload and the pages' whole new bytes.
    fn dirty(&mut self, n: usize) -> Changes {
        let mut pfns = Vec::new();
        while pfns.len() < n {
            let pfn = match self.rng.below(4) {
                0 if !self.hot.is_empty() => {
                    self.hot[self.rng.below(self.hot.len() as u64) as usize]
                }
                1 if pfns.len() + 3 <= n => {
                    let start = self.rng.below(RAM_PAGES - 3);
                    pfns.extend([start, start + 1]);
                    start + 2
                }
                _ => self.rng.below(RAM_PAGES),
            };
            if pfns.contains(&pfn) && self.rng.below(4) != 0 {
                continue;
            }
            pfns.push(pfn);
        }
        let mut pages = Vec::with_capacity(n * BLK);
        let mut payload = Payload::default();
        for &pfn in &pfns {
            let at = pfn as usize * BLK;
            let page = &mut self.ram[at..at + BLK];
            let old = page.to_vec();
            if page.iter().all(|&b| b == 0) || self.rng.below(5) == 0 {
                let fresh = self.rng.bytes(BLK);
                page.copy_from_slice(&fresh);
                payload.push_full(pfn, page);
            } else {
                for _ in 0..=self.rng.below(6) {
                    let w = self.rng.below(BLK as u64 / 8) as usize * 8;
                    let v = self.rng.next().to_le_bytes();
                    page[w..w + 8].copy_from_slice(&v);
                }
                if !payload.push_delta(pfn, &old, page) {
                    // Unchanged after all: log it whole (a repeated pfn
                    // must still have its entry, as the table lists it).
                    payload.push_full(pfn, page);
                }
            }
            pages.extend_from_slice(page);
            if !self.hot.contains(&pfn) && self.hot.len() < 6 {
                self.hot.push(pfn);
            }
        }
        Changes { payload, pages }
    }

    /// One epoch with `n` dirty pages; with `cut`, the power fails during
    /// its commit, `cut` choosing which in-flight writes reached the medium.
    fn epoch(&mut self, n: usize, cut: Option<fn(u64, usize) -> bool>, same_state: bool) {
        let before = self.ram.clone();
        let changes = self.dirty(n);
        let state = if same_state {
            self.last_state.clone()
        } else {
            let len = 40 + self.rng.below(1200) as usize;
            self.rng.bytes(len)
        };
        self.last_state = state.clone();
        let p = Point {
            epoch: self.img().current().epoch + 1,
            ram: Arc::new(self.ram.clone()),
            state: Some(Arc::new(state.clone())),
        };
        self.epochs += 1;
        self.img().storage.cut = cut;
        let r = self.img().commit_epoch(&changes, &state);
        if cut.is_none() {
            let t = r.unwrap();
            assert_eq!(t.epoch, p.epoch);
            self.mark_commit(p);
            self.img().apply_committed(&changes).unwrap();
            return;
        }
        assert!(r.is_err(), "the cut persist must fail the commit");
        self.ram = before;
        self.power_cut(p);
    }

    /// After a power cut at the last op: reopen, learn what recovery restores,
    /// recover, and continue from there.
    fn power_cut(&mut self, attempted: Point) {
        let at = self.last_op();
        let sim = self.close();
        let img = self.open(sim);
        let restored = img.recovery_plan().restored_epoch();
        let reset = if restored == attempted.epoch {
            attempted.clone()
        } else {
            assert_eq!(restored, self.point.epoch, "restored an unexpected epoch");
            self.point.clone()
        };
        self.marks.insert(
            at,
            Mark {
                candidate: Some(attempted),
                after: Some(reset.clone()),
            },
        );
        self.ram = (*reset.ram).clone();
        self.point = reset;
        self.img = Some(img);
        self.recover();
    }

    fn recover(&mut self) {
        let r = self.img().recover().unwrap();
        assert_eq!(r.restored_epoch, self.point.epoch);
        if r.meta_written {
            let p = Point {
                epoch: r.epoch,
                ..self.point.clone()
            };
            self.mark_commit(p);
        }
    }

    /// The VMM process exits (or is killed) without a power loss: every
    /// write stays, nothing is lost; the next process opens and recovers.
    fn restart(&mut self) {
        let sim = self.close();
        self.img = Some(self.open(sim));
        self.recover();
    }

    fn suspend(&mut self) {
        let state = self.rng.bytes(300);
        let t = self.img().commit(Status::Suspended, &state).unwrap();
        let p = Point {
            epoch: t.epoch,
            ram: Arc::new(self.ram.clone()),
            state: Some(Arc::new(state)),
        };
        self.mark_commit(p);
    }
}

fn in_state_slot(offset: u64, _len: usize) -> bool {
    // Slots of the test geometry: 12 KiB .. 12 KiB + 2 x 128 KiB.
    !(12288..12288 + 2 * (128 << 10)).contains(&offset)
}

fn only_log_header(offset: u64, len: usize) -> bool {
    // A record's header block (format 3: anywhere in the log); not its
    // payload, unless that is one whole block.
    let log = 12288 + 2 * (128 << 10);
    (log..log + LOG_BLOCKS * 4096).contains(&offset) && len == BLK
}

/// A scenario's recording: the image it started from, every operation, and
/// what each barrier means for the oracle.
struct Recording {
    header: Header,
    base: Arc<Vec<u8>>,
    trace: Vec<Op>,
    marks: BTreeMap<usize, Mark>,
    initial: Point,
    epochs: usize,
    /// What the writer did (format 3): half moves, checkpoints, pages applied.
    switches: u64,
    checkpoints: u64,
    pages_applied: u64,
}

/// Runs the scenario on an image of format `format`.
fn scenario(seed: u64, format: u32) -> Recording {
    record(seed, format, None, |d| {
        d.mark_running();
        d.epoch(5, None, false);
        d.epoch(CAPACITY, None, false);
        d.epoch(3, None, false);
        d.restart();
        d.mark_running();
        d.epoch(0, None, false);
        d.epoch(4, None, false);
        // Torn commit: log record complete, its state write lost.
        d.epoch(4, Some(in_state_slot), false);
        // The next epoch saves the very same state bytes into that slot.
        d.epoch(2, None, true);
        d.epoch(6, None, false);
        // Torn commit: only the record header made it.
        d.epoch(5, Some(only_log_header), false);
        d.mark_running();
        d.epoch(7, None, false);
        d.epoch(3, None, false);
        d.suspend();
        d.restart();
        d.mark_running();
        d.epoch(8, None, false);
        d.epoch(2, None, false);
    })
}

/// Format 3 with 3 records to a half: many small epochs, so that the writer
/// moves between the halves, pages wait and are written while the other
/// half is due, and a record too large for the room left forces a
/// checkpoint; power cuts, restarts and a suspend among them.
fn scenario_lazy(seed: u64) -> Recording {
    record(seed, FORMAT_VERSION, Some(3), |d| {
        d.mark_running();
        for n in [2, 1, 3, 2, 2, 1, 4, 2, 1, 2, 3, 1, 2, 2] {
            d.epoch(n, None, false);
        }
        // A whole half's worth while the other half is still needed.
        d.epoch(CAPACITY, None, false);
        d.epoch(2, None, false);
        d.epoch(3, Some(in_state_slot), false);
        d.epoch(2, None, true);
        for n in [1, 2, 3, 1, 2] {
            d.epoch(n, None, false);
        }
        d.epoch(2, Some(only_log_header), false);
        for n in [3, 1, 2, 2] {
            d.epoch(n, None, false);
        }
        d.restart();
        for n in [2, 3, 1] {
            d.epoch(n, None, false);
        }
        d.suspend();
        d.restart();
        d.mark_running();
        for n in [2, 6, 1, 2] {
            d.epoch(n, None, false);
        }
    })
}

/// Runs `steps` on a fresh image of format `format` and records the trace.
fn record(
    seed: u64,
    format: u32,
    per_half: Option<usize>,
    steps: impl FnOnce(&mut Driver),
) -> Recording {
    let (header, bytes) = formatted(&config(), format);
    assert_eq!(
        capacity_pages(half_region(header.geometry.log, 0).size),
        Some(CAPACITY as u64)
    );
    let base = Arc::new(bytes);
    let mut sim = Sim::new(base.clone());
    sim.trace = Some(Vec::new());
    sim.durable = Some(Box::new(Sim::new(base.clone())));
    let initial = Point {
        epoch: 0,
        ram: Arc::new(vec![0; (RAM_PAGES * PAGE) as usize]),
        state: None,
    };
    let mut d = Driver {
        img: None,
        rng: Rng(seed),
        ram: vec![0; (RAM_PAGES * PAGE) as usize],
        point: initial.clone(),
        marks: BTreeMap::new(),
        hot: Vec::new(),
        last_state: Vec::new(),
        epochs: 0,
        per_half,
        switches: 0,
        checkpoints: 0,
        pages_applied: 0,
    };
    d.img = Some(d.open(sim));
    steps(&mut d);
    let trace = d.img().storage.trace.take().unwrap();
    d.close();
    Recording {
        header,
        base,
        trace,
        marks: d.marks,
        initial,
        epochs: d.epochs,
        switches: d.switches,
        checkpoints: d.checkpoints,
        pages_applied: d.pages_applied,
    }
}

#[derive(Default, Debug)]
struct Stats {
    windows: usize,
    inflight_writes: usize,
    none_or_all: usize,
    torn_alone: usize,
    torn_in_order: usize,
    random_subsets: usize,
    recovery_crash_images: usize,
    from_log: usize,
    from_meta: usize,
    by_epoch: BTreeMap<u64, usize>,
}

impl Stats {
    fn images(&self) -> usize {
        self.none_or_all + self.torn_alone + self.torn_in_order + self.random_subsets
    }
}

/// 8-byte prefix lengths of `new` written over `old` that give distinct
/// images (every point for writes up to 4 KiB; first, middle, last, page
/// boundaries and a few random points for larger ones).
fn tear_points(new: &[u8], old: &[u8], rng: &mut Rng) -> Vec<usize> {
    let len = new.len();
    let mut pts: Vec<usize> = if len <= BLK {
        (8..len).step_by(8).collect()
    } else {
        let mut v = vec![8, len / 2 / 8 * 8, (len - 1) / 8 * 8];
        for k in (BLK..len).step_by(BLK) {
            v.extend([k - 8, k, k + 8]);
        }
        v.extend((0..4).map(|_| (8 + rng.below(len as u64 - 8) as usize) / 8 * 8));
        v
    };
    pts.retain(|&p| p > 0 && p < len);
    pts.sort_unstable();
    pts.dedup();
    let mut kept = Vec::new();
    let mut last = 0;
    for p in pts {
        if new[last..p] != old[last..p] {
            kept.push(p);
            last = p;
        }
    }
    kept
}

/// Checks one crash image: recovery restores exactly one of `allowed`
/// (matched by the restored epoch; with `any_label`, `allowed[0]` whatever
/// epoch number names it); a second open needs no recovery, or (format 3
/// continued the log) recovers the same point again. Returns the
/// restored epoch, the epoch counter after recovery, whether the epoch came
/// from the log, and whether recovery wrote anything.
fn check_image(
    sim: Sim,
    header: &Header,
    allowed: &[&Point],
    any_label: bool,
    what: &dyn Fn() -> String,
) -> (Sim, u64, u64, bool, bool) {
    let mut img = match Image::open_storage(sim) {
        Ok(i) => i,
        Err(e) => panic!("{}: open failed: {e}", what()),
    };
    let planned = img.recovery_plan().restored_epoch();
    let r = img
        .recover()
        .unwrap_or_else(|e| panic!("{}: recover failed: {e}", what()));
    assert_eq!(r.restored_epoch, planned, "{}", what());
    let found = if any_label {
        allowed.first()
    } else {
        allowed.iter().find(|p| p.epoch == r.restored_epoch)
    };
    let Some(p) = found else {
        panic!(
            "{}: restored epoch {} but only {:?} are allowed",
            what(),
            r.restored_epoch,
            allowed.iter().map(|p| p.epoch).collect::<Vec<_>>()
        );
    };
    check_content(&img, header, p, what);
    let sim = img.into_storage();
    let mut again = Image::open_storage(sim).unwrap();
    assert_eq!(again.current().epoch, r.epoch, "{}", what());
    if r.meta_written {
        // Idempotence: a sealed image needs nothing more.
        assert!(
            !again.recovery_plan().needs_writes(),
            "{}: recovery left work to do",
            what()
        );
    } else {
        // Format 3 continued the log: the same plan again, and recovering
        // once more restores the same point.
        assert_eq!(
            again.recovery_plan().restored_epoch(),
            r.restored_epoch,
            "{}: a second open plans another epoch",
            what()
        );
        let r2 = again
            .recover()
            .unwrap_or_else(|e| panic!("{}: second recover failed: {e}", what()));
        assert_eq!(r2.restored_epoch, r.restored_epoch, "{}", what());
        check_content(&again, header, p, what);
    }
    let wrote = r.meta_written || r.pages_replayed > 0;
    (
        again.into_storage(),
        r.restored_epoch,
        r.epoch,
        r.from_log,
        wrote,
    )
}

fn check_content(img: &Image<Sim>, header: &Header, p: &Point, what: &dyn Fn() -> String) {
    match &p.state {
        None => {
            let e = img.resumable().unwrap_err();
            assert!(
                e.reason.contains("no epoch was ever committed"),
                "{}: {e}",
                what()
            );
        }
        Some(state) => {
            img.resumable()
                .unwrap_or_else(|e| panic!("{}: not resumable: {e}", what()));
            let got = img.read_state().unwrap();
            assert!(got == **state, "{}: state differs", what());
            let ram = header.geometry.ram.offset;
            let s = &img.storage;
            for pfn in 0..RAM_PAGES {
                let b = ram / BLK as u64 + pfn;
                let want = &p.ram[pfn as usize * BLK..(pfn as usize + 1) * BLK];
                assert!(
                    s.block(b) == want,
                    "{}: RAM page {pfn} differs from epoch {}",
                    what(),
                    p.epoch
                );
            }
        }
    }
}

/// Builds the image a power cut leaves when of `writes` (issued in order
/// since the last persist over `durable`) the parts `part(i)` reached the medium.
fn crash_image(durable: &Sim, writes: &[(u64, Arc<[u8]>)], part: impl Fn(usize) -> Part) -> Sim {
    let mut s = durable.clone();
    for (i, (o, d)) in writes.iter().enumerate() {
        match part(i) {
            Part::None => {}
            Part::All => s.poke(*o, d),
            Part::Prefix(n) => s.poke(*o, &d[..n]),
            Part::Sectors(mask) => {
                for (k, chunk) in d.chunks(512).enumerate() {
                    if mask >> (k % 64) & 1 == 1 {
                        s.poke(o + (k * 512) as u64, chunk);
                    }
                }
            }
        }
    }
    s
}

#[derive(Clone, Copy)]
enum Part {
    None,
    All,
    Prefix(usize),
    Sectors(u64),
}

/// Recovery of `sim` interrupted at each of its own crash points (sampled
/// variants), then run again: the same RAM, state and epoch counter.
fn check_interrupted_recovery(
    sim: &Sim,
    header: &Header,
    want: &Point,
    want_counter: u64,
    rng: &mut Rng,
    stats: &mut Stats,
) {
    let mut traced = sim.clone();
    traced.trace = Some(Vec::new());
    let mut img = Image::open_storage(traced).unwrap();
    img.recover().unwrap();
    let mut trace = img.into_storage().trace.unwrap();
    // Format 3 may continue the log without a persist: its writes are in
    // flight when recovery returns, so the end is a crash point too.
    if matches!(trace.last(), Some(Op::Write { .. })) {
        trace.push(Op::Persist {
            offset: 0,
            len: u64::MAX,
        });
    }
    let mut durable = sim.clone();
    let mut writes: Vec<(u64, Arc<[u8]>)> = Vec::new();
    for op in &trace {
        match op {
            Op::Write { offset, data } => writes.push((*offset, data.clone())),
            Op::Persist { .. } | Op::Cut { .. } => {
                let n = writes.len();
                let mut variants: Vec<Vec<Part>> = vec![vec![Part::None; n], vec![Part::All; n]];
                for j in 0..n {
                    let mut v = vec![Part::None; n];
                    v[j] = Part::All;
                    variants.push(v.clone());
                    v[j] = Part::Prefix(writes[j].1.len() / 2 / 8 * 8);
                    variants.push(v);
                }
                for _ in 0..4 {
                    variants.push((0..n).map(|_| random_part(rng)).collect());
                }
                for v in variants {
                    let img = crash_image(&durable, &writes, |i| v[i]);
                    let what = || "recovery interrupted".to_string();
                    let (_, _, counter, _, _) = check_image(img, header, &[want], true, &what);
                    assert_eq!(counter, want_counter, "re-recovery epoch counter");
                    stats.recovery_crash_images += 1;
                }
                let Op::Persist { offset, len } = op else {
                    unreachable!("recovery is never cut")
                };
                durable = crash_image(&durable, &writes, |k| {
                    if covers(*offset, *len, &writes[k]) {
                        Part::All
                    } else {
                        Part::None
                    }
                })
                .freeze();
                writes.retain(|w| !covers(*offset, *len, w));
            }
        }
    }
}

fn random_part(rng: &mut Rng) -> Part {
    match rng.below(20) {
        0..=9 => Part::None,
        10..=16 => Part::All,
        _ => Part::Sectors(rng.next()),
    }
}

/// The enumeration's running state.
struct Enumerator<'a> {
    header: &'a Header,
    stats: Stats,
    rng: Rng,
    /// (window, restored epoch) pairs whose recovery was interrupted already.
    interrupted: std::collections::HashSet<(usize, u64)>,
}

impl Enumerator<'_> {
    /// Checks one crash image of the window ending at op `at`.
    fn check(&mut self, img: Sim, at: usize, allowed: &[&Point], what: &dyn Fn() -> String) {
        let what = || format!("window ending at op {at} ({})", what());
        let snapshot = img.clone();
        let (_, restored, counter, from_log, wrote) =
            check_image(img, self.header, allowed, false, &what);
        *self.stats.by_epoch.entry(restored).or_default() += 1;
        if from_log {
            self.stats.from_log += 1;
        } else {
            self.stats.from_meta += 1;
        }
        // Interrupt the recovery of one image per (window, outcome), and of a
        // sample of the others.
        if wrote && (self.interrupted.insert((at, restored)) || self.rng.below(200) == 0) {
            let p = allowed.iter().find(|p| p.epoch == restored).unwrap();
            let want = Point {
                epoch: counter,
                ..(*p).clone()
            };
            check_interrupted_recovery(
                &snapshot,
                self.header,
                &want,
                counter,
                &mut self.rng,
                &mut self.stats,
            );
        }
    }

    /// Every crash image of one window: `writes` issued over `durable` since
    /// the last completed persist, before the barrier at op `at`.
    fn window(
        &mut self,
        durable: &Sim,
        writes: &[(u64, Arc<[u8]>)],
        at: usize,
        allowed: &[&Point],
    ) {
        self.stats.windows += 1;
        self.stats.inflight_writes += writes.len();
        let n = writes.len();
        // (a) none of the in-flight writes durable, (b) all of them.
        let none = crash_image(durable, writes, |_| Part::None);
        self.check(none, at, allowed, &|| "none durable".into());
        let all = crash_image(durable, writes, |_| Part::All);
        self.check(all, at, allowed, &|| "all durable".into());
        self.stats.none_or_all += 2;
        for (j, (o, d)) in writes.iter().enumerate() {
            // (c) write j alone: whole, and torn at every prefix that changes the image.
            let alone = crash_image(
                durable,
                writes,
                |k| if k == j { Part::All } else { Part::None },
            );
            self.check(alone, at, allowed, &|| format!("write {j} at {o:#x} alone"));
            self.stats.torn_alone += 1;
            let old = durable.read(*o, d.len());
            for p in tear_points(d, &old, &mut self.rng) {
                let img = crash_image(durable, writes, |k| {
                    if k == j {
                        Part::Prefix(p)
                    } else {
                        Part::None
                    }
                });
                self.check(img, at, allowed, &|| {
                    format!("write {j} at {o:#x} alone, torn at {p}")
                });
                self.stats.torn_alone += 1;
            }
            // (c') the writes before j durable, j torn, the later ones lost.
            if j > 0 {
                let before =
                    crash_image(
                        durable,
                        writes,
                        |k| if k < j { Part::All } else { Part::None },
                    );
                let old = before.read(*o, d.len());
                for p in tear_points(d, &old, &mut self.rng) {
                    let img = crash_image(durable, writes, |k| match k.cmp(&j) {
                        std::cmp::Ordering::Less => Part::All,
                        std::cmp::Ordering::Equal => Part::Prefix(p),
                        std::cmp::Ordering::Greater => Part::None,
                    });
                    self.check(img, at, allowed, &|| {
                        format!("writes 0..{j} durable, write {j} torn at {p}")
                    });
                    self.stats.torn_in_order += 1;
                }
            }
        }
        // (d) random subsets, some writes with random 512-byte sectors missing.
        if n > 1 {
            for r in 0..48 {
                let parts: Vec<Part> = (0..n).map(|_| random_part(&mut self.rng)).collect();
                let img = crash_image(durable, writes, |k| parts[k]);
                self.check(img, at, allowed, &|| format!("random subset {r}"));
                self.stats.random_subsets += 1;
            }
        }
    }
}

/// Enumerates the crash images of every window of `trace`.
fn enumerate(
    header: &Header,
    base: Arc<Vec<u8>>,
    trace: &[Op],
    marks: &BTreeMap<usize, Mark>,
    initial: Point,
) -> Stats {
    let mut e = Enumerator {
        header,
        stats: Stats::default(),
        rng: Rng(0xc0ff_ee00_d15e_a5e5),
        interrupted: Default::default(),
    };
    let mut durable = Sim::new(base);
    let mut current = initial;
    let mut writes: Vec<(u64, Arc<[u8]>)> = Vec::new();
    for (i, op) in trace.iter().enumerate() {
        if let Op::Write { offset, data } = op {
            writes.push((*offset, data.clone()));
            continue;
        }
        let mark = marks.get(&i).cloned().unwrap_or_default();
        let mut allowed = vec![&current];
        allowed.extend(mark.candidate.as_ref());
        e.window(&durable, &writes, i, &allowed);
        let durable_now: Vec<bool> = match op {
            Op::Cut { keep } => keep.clone(),
            Op::Persist { offset, len } => {
                writes.iter().map(|w| covers(*offset, *len, w)).collect()
            }
            Op::Write { .. } => unreachable!(),
        };
        durable = crash_image(&durable, &writes, |k| {
            if durable_now[k] {
                Part::All
            } else {
                Part::None
            }
        })
        .freeze();
        // A cut ends every in-flight write; a persist only those it covers.
        let mut k = 0;
        writes.retain(|_| {
            k += 1;
            !durable_now[k - 1] && !matches!(op, Op::Cut { .. })
        });
        if let Some(a) = mark.after {
            current = a;
        }
    }
    // The tail: writes no persist covered before the trace ended.
    e.window(&durable, &writes, trace.len(), &[&current]);
    e.stats
}

#[test]
fn test_every_crash_point_of_the_epoch_protocol_recovers_exactly() {
    check_recording(scenario(0x0123_4567_89ab_cdef, FORMAT_VERSION), 10_000);
}

#[test]
fn test_every_crash_point_of_the_format_2_protocol_recovers_exactly() {
    check_recording(scenario(0x0123_4567_89ab_cdef, FORMAT_VERSION_2), 10_000);
}

#[test]
fn test_every_crash_point_of_the_lazy_apply_recovers_exactly() {
    let r = scenario_lazy(0x0bad_cafe_f00d_1234);
    println!(
        "lazy apply: {} moves to the other half, {} checkpoints, {} pages applied",
        r.switches, r.checkpoints, r.pages_applied
    );
    assert!(r.switches >= 6, "{}", r.switches);
    assert!(r.checkpoints >= 1, "{}", r.checkpoints);
    check_recording(r, 10_000);
}

/// Enumerates every crash image of `r` and checks recovery on each.
fn check_recording(r: Recording, min_images: usize) {
    let Recording {
        header,
        base,
        trace,
        marks,
        initial,
        epochs,
        ..
    } = r;
    let persists = trace
        .iter()
        .filter(|o| matches!(o, Op::Persist { .. }))
        .count();
    let cuts = trace.iter().filter(|o| matches!(o, Op::Cut { .. })).count();
    let writes = trace.len() - persists - cuts;
    let s = enumerate(&header, base, &trace, &marks, initial);
    println!(
        "crash-point enumeration: {epochs} epochs, {writes} writes, {persists} persists, \
         {cuts} power cuts in the trace; {} windows with {} in-flight writes",
        s.windows, s.inflight_writes
    );
    println!(
        "crash images checked: {} ({} none/all, {} one write torn or alone, {} torn in order, \
         {} random subsets); restored from the log {}, from a meta record {}",
        s.images(),
        s.none_or_all,
        s.torn_alone,
        s.torn_in_order,
        s.random_subsets,
        s.from_log,
        s.from_meta
    );
    println!(
        "interrupted recoveries re-run: {}; restored epochs: {:?}",
        s.recovery_crash_images, s.by_epoch
    );
    assert_eq!(cuts, 2);
    assert!(s.images() > min_images, "{s:?}");
    assert!(s.recovery_crash_images > 100, "{s:?}");
    // Every committed epoch was restored by some crash image.
    for m in marks.values() {
        if let Some(p) = &m.after {
            assert!(
                s.by_epoch.contains_key(&p.epoch),
                "epoch {} never restored",
                p.epoch
            );
        }
    }
}

/// More scenarios, for a longer run: `cargo test --lib crash_tests -- --ignored --nocapture`.
#[test]
#[ignore = "slow: about 3 s per seed in a debug build"]
fn test_crash_points_more_seeds() {
    let mut images = 0;
    for seed in 1..=8u64 {
        // Half of them on format-1 images (whole-page records).
        let seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let r = match seed % 3 {
            0 => scenario_lazy(seed),
            1 => scenario(seed, FORMAT_VERSION_2),
            _ => scenario(seed, FORMAT_VERSION_1),
        };
        let s = enumerate(&r.header, r.base, &r.trace, &r.marks, r.initial);
        images += s.images() + s.recovery_crash_images;
    }
    println!("crash images checked over 8 more seeds: {images}");
}
