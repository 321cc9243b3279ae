//! Tests of the epoch commit protocol: commit, apply and recovery round trips (formats 1 to 3), corrupted and misplaced records handled by the rule, the continued log.

use super::*;
use crate::nvram::image::tests::{cfg, TempPath};
use crate::nvram::layout::{Header, ImageConfig, Region, Uuid, FORMAT_VERSION, FORMAT_VERSION_2};
use crate::nvram::redo::{Changes, RecordError, FULL_ENTRY};
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

/// A format-2 image (one record per half, every epoch applied at once):
/// the protocol these tests pin down. Format 3 has its own tests below.
fn mem_image(c: &ImageConfig) -> Image<MemStorage> {
    let mut h = Header::new(c, Uuid::from_random([1; 16]), 0, 0).unwrap();
    h.format_version = FORMAT_VERSION_2;
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
        .log
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|e| e.state.record().map(|r| r.version))
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
    // What a resume decodes while recovery runs: the restored epoch's
    // state, before the replay and unchanged by it.
    assert_eq!(img.restored_state().unwrap(), states[2]);
    assert!(matches!(
        img.mark_running(),
        Err(ImageError::RecoveryPending)
    ));
    assert_eq!(img.resumable(), Ok(()));
    let r = img.recover().unwrap();
    assert_eq!(img.restored_state().unwrap(), states[2]);
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
        img.recovery_plan().log.as_ref().unwrap()[0].state.word(),
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
                plan.log.as_ref().unwrap()[bad].state,
                RecordState::Invalid { .. }
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
            let RecordState::Invalid { problem, epoch } = &plan.log.as_ref().unwrap()[0].state
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

/// [`three_epochs`]' storage, record 4 (all of half 0) as read from it,
/// and the two halves' regions.
fn record_4_of_three_epochs() -> (MemStorage, Vec<u8>, Region, Region) {
    let (img, _) = three_epochs();
    let h = img.header().clone();
    let s = img.into_storage();
    let (r4, r3) = (
        half_region(h.geometry.log, 0),
        half_region(h.geometry.log, 1),
    );
    let mut rec = vec![0; r4.size as usize];
    s.read_at(r4.offset, &mut rec).unwrap();
    (s, rec, r4, r3)
}

#[test]
fn test_two_valid_records_of_one_epoch_are_refused() {
    // Copy record 4 (half 0) into half 1, resealed as a half-1 record.
    let (mut s, mut rec, _, r3) = record_4_of_three_epochs();
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
    let (mut s, rec, r4, r3) = record_4_of_three_epochs();
    s.write_at(r3.offset, &rec).unwrap();
    let img = Image::open_storage(s).unwrap();
    assert!(matches!(
        &img.plan.log.as_ref().unwrap()[1].state,
        RecordState::Invalid {
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
    assert!(matches!(
        &img.plan.log.as_ref().unwrap()[0].state,
        RecordState::Invalid {
            problem: RecordError::Foreign(_),
            epoch: None
        }
    ));
}

/// Format 3: epochs 2..=7 in sequence in half 0, the RAM image applied
/// a little behind (a replay budget of one block). Returns the image's
/// bytes, its header and each epoch's page 1.
fn lazy_epochs() -> (Vec<u8>, Header, Vec<Vec<u8>>) {
    let c = epoch_cfg();
    let c = ImageConfig {
        log_bytes: 64 * BLOCK,
        ..c
    };
    let h = Header::new(&c, Uuid::from_random([1; 16]), 0, 0).unwrap();
    assert_eq!(h.format_version, FORMAT_VERSION);
    let len = h.geometry.image_len() as usize;
    let mut img = Image::format(MemStorage::new(len), h.clone()).unwrap();
    img.log.replay_budget = BLOCK;
    img.mark_running().unwrap();
    let mut ones = Vec::new();
    for e in 2..=7u8 {
        let pfns = [1u64, u64::from(e) + 4];
        let data = pages(&pfns, e);
        let ch = Changes::whole(&pfns, &data);
        img.commit_epoch(&ch, &[e; 64]).unwrap();
        img.apply_committed(&ch).unwrap();
        ones.push(data[..P].to_vec());
    }
    (img.into_storage().into_bytes(), h, ones)
}

/// After a recovery that continued the log, the next recovery replays
/// the same records until a second record is committed: the first
/// cannot say the replay is applied (it is durable only once that
/// record's persist returns), the second, even an empty one, does; and
/// `replay_unacknowledged` says which is which.
#[test]
fn test_a_continued_log_needs_two_records_before_its_replay_counts_as_applied() {
    let (bytes, _, _) = lazy_epochs();
    let mut img = Image::open_storage(MemStorage::from_bytes(bytes)).unwrap();
    assert!(!img.replay_unacknowledged(), "nothing continued yet");
    let replayed = img.recovery_plan().replay_epochs();
    assert!(!replayed.is_empty());
    img.recover().unwrap();
    img.mark_running().unwrap();
    assert!(img.replay_unacknowledged());
    let reopen = |img: Image<MemStorage>| {
        let bytes = img.into_storage().into_bytes();
        let again = Image::open_storage(MemStorage::from_bytes(bytes.clone())).unwrap();
        (again.recovery_plan().replay_epochs(), bytes)
    };
    // One record (epoch 8, a page changed): still replays the old ones.
    let ch = Changes::whole(&[3], &pages(&[3], 8));
    img.commit_epoch(&ch, &[8; 64]).unwrap();
    img.apply_committed(&ch).unwrap();
    assert!(img.replay_unacknowledged());
    let (plan, bytes) = reopen(img);
    assert!(plan.starts_with(&replayed), "{plan:?} {replayed:?}");
    // A second, empty one (epoch 9): only what came after the replay.
    let mut img = Image::open_storage(MemStorage::from_bytes(bytes)).unwrap();
    img.recover().unwrap();
    img.mark_running().unwrap();
    let ch = Changes::whole(&[3], &pages(&[3], 9));
    img.commit_epoch(&ch, &[9; 64]).unwrap();
    img.apply_committed(&ch).unwrap();
    assert!(img.replay_unacknowledged());
    let empty = Changes::whole(&[], &[]);
    img.commit_epoch(&empty, &[10; 64]).unwrap();
    img.apply_committed(&empty).unwrap();
    assert!(!img.replay_unacknowledged());
    let (plan, _) = reopen(img);
    assert!(
        plan.iter().all(|&e| e > 8),
        "the replayed epochs are replayed again: {plan:?}"
    );
}

#[test]
fn test_format_3_replays_from_the_applied_epoch_and_checks_what_it_needs() {
    let (bytes, h, ones) = lazy_epochs();
    let img = Image::open_storage(MemStorage::from_bytes(bytes.clone())).unwrap();
    let plan = img.recovery_plan().clone();
    let log = plan.log.clone().unwrap();
    // Six records in sequence in half 0, then half 1's blank start.
    let epochs: Vec<_> = log.iter().map(|e| (e.half, e.state.epoch())).collect();
    assert_eq!(
        epochs,
        [
            (0, Some(2)),
            (0, Some(3)),
            (0, Some(4)),
            (0, Some(5)),
            (0, Some(6)),
            (0, Some(7)),
            (1, None)
        ]
    );
    let r = log[5].state.record().unwrap();
    assert!(r.applied_through >= 2 && r.applied_through < 7, "{r:?}");
    let needed: Vec<u64> = (r.applied_through + 1..=7).collect();
    assert_eq!(plan.replay_epochs(), needed);
    for e in &log[..(r.applied_through - 1) as usize] {
        assert_eq!(e.state.word(), "applied", "{e:?}");
    }
    // The payloads to replay were kept when the image was opened (and
    // only those), and recovery uses them up.
    let mut kept: Vec<_> = img.replay_payloads.keys().copied().collect();
    kept.sort_unstable();
    let replayed: Vec<_> = plan
        .replay
        .iter()
        .map(|&i| (log[i].half, log[i].offset))
        .collect();
    assert_eq!(kept, replayed);
    // Recovery gives epoch 7: the RAM image's newer pages come from the log.
    let mut img = img;
    img.recover().unwrap();
    assert!(img.replay_payloads.is_empty());
    assert_eq!(img.read_state().unwrap(), vec![7u8; 64]);
    assert_eq!(ram_page(img.storage(), &h, 1), ones[5]);
    // A needed record damaged: refused, never an older epoch.
    let at =
        |i: usize| (half_region(h.geometry.log, 0).offset + log[i].offset + BLOCK + 20) as usize;
    let needed_at = at((r.applied_through - 1) as usize);
    let mut b = bytes.clone();
    b[needed_at] ^= 1;
    let e = Image::open_storage(MemStorage::from_bytes(b)).unwrap_err();
    assert!(matches!(e, ImageError::LogBroken { epoch: 7, .. }), "{e}");
    assert!(e.to_string().contains("missing or damaged"), "{e}");
    // An older one damaged: not read, not needed.
    let mut b = bytes.clone();
    b[at(0)] ^= 1;
    let mut img = Image::open_storage(MemStorage::from_bytes(b)).unwrap();
    assert_eq!(img.recovery_plan().replay_epochs(), needed);
    img.recover().unwrap();
    assert_eq!(img.read_state().unwrap(), vec![7u8; 64]);
    // The newest record's payload damaged: it looks like a torn commit
    // (see "Residual risk" in the format doc), and epoch 6 is restored.
    let mut b = bytes;
    b[at(5)] ^= 1;
    let img = Image::open_storage(MemStorage::from_bytes(b)).unwrap();
    assert_eq!(img.recovery_plan().restored_epoch(), 6);
    assert_eq!(img.recovery_plan().seal_epoch, Some(7));
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
    // Recovery continued the log: until a persist covers the replay,
    // the same records are needed, and replaying them again is exact.
    let mut img = Image::open(&p.0).unwrap();
    assert_eq!(img.recovery_plan().replay_epochs(), [2, 3]);
    assert_eq!(img.resumable(), Ok(()));
    img.recover().unwrap();
    assert_eq!(img.read_state().unwrap(), b"second");
    img.commit(Status::Suspended, b"third").unwrap();
    drop(img);
    let img = Image::open(&p.0).unwrap();
    assert!(!img.recovery_plan().needs_writes());
    assert_eq!(img.resumable(), Ok(()));
    assert_eq!(img.read_state().unwrap(), b"third");
}

/// `drain_written` hands over each page an apply wrote to the RAM image,
/// once, in both log protocols; in format 3 a page waiting to be written
/// is pending (and not handed over) until it is.
#[test]
fn test_written_pages_are_handed_over_once_and_pending_ones_are_not() {
    // Format 2: every committed page is written at its apply.
    let mut img = mem_image(&epoch_cfg());
    img.keep_written(true);
    img.mark_running().unwrap();
    let ch = Changes::whole(&[2, 5], &pages(&[2, 5], 2));
    img.commit_epoch(&ch, &[2; 64]).unwrap();
    img.apply_committed(&ch).unwrap();
    let mut w = Vec::new();
    img.drain_written(|p| w.extend_from_slice(p));
    assert_eq!(w, [2, 5]);
    img.drain_written(|p| w.extend_from_slice(p));
    assert_eq!(w, [2, 5], "handed over once");
    assert!(!img.is_pending(2));

    // Format 3: pages wait in memory; a checkpoint writes them all.
    let c = epoch_cfg();
    let h = Header::new(&c, Uuid::from_random([1; 16]), 0, 0).unwrap();
    assert_eq!(h.format_version, FORMAT_VERSION);
    let len = h.geometry.image_len() as usize;
    let mut img = Image::format(MemStorage::new(len), h).unwrap();
    img.mark_running().unwrap();
    let ch = Changes::whole(&[3, 4], &pages(&[3, 4], 3));
    img.commit_epoch(&ch, &[3; 64]).unwrap();
    img.apply_committed(&ch).unwrap();
    // Not kept unless asked.
    let mut w = Vec::new();
    img.drain_written(|p| w.extend_from_slice(p));
    assert!(w.is_empty());
    img.keep_written(true);
    let pending: Vec<u64> = [3, 4].into_iter().filter(|&p| img.is_pending(p)).collect();
    assert!(!pending.is_empty(), "format 3 applies lazily");
    img.write_pending(usize::MAX, u64::MAX).unwrap();
    img.drain_written(|p| w.extend_from_slice(p));
    w.sort_unstable();
    assert_eq!(w, pending);
    assert!(!img.is_pending(3) && !img.is_pending(4));
    // Stopped: what was kept is forgotten, and nothing more is kept.
    let ch = Changes::whole(&[6], &pages(&[6], 4));
    img.commit_epoch(&ch, &[4; 64]).unwrap();
    img.apply_committed(&ch).unwrap();
    img.keep_written(false);
    img.write_pending(usize::MAX, u64::MAX).unwrap();
    w.clear();
    img.drain_written(|p| w.extend_from_slice(p));
    assert!(w.is_empty());
}

/// What a writer killed before its last persist completed can have left
/// unpersisted in the log (dropped from the page cache at open): the
/// restored record, and any intact header above it, nothing older (W1).
#[test]
fn test_maybe_unpersisted_is_the_restored_record_and_above() {
    let (bytes, h, _) = lazy_epochs();
    let img = Image::open_storage(MemStorage::from_bytes(bytes.clone())).unwrap();
    let plan = img.recovery_plan().clone();
    let log = plan.log.clone().unwrap();
    let half0 = half_region(h.geometry.log, 0).offset;
    let newest = log[5].state.record().unwrap();
    assert_eq!(newest.epoch, 7);
    assert_eq!(
        plan.maybe_unpersisted(&h),
        [(half0 + log[5].offset, record_span(newest.payload_len))]
    );
    // Epoch 7's payload damaged: epoch 6 is restored, and both records
    // (6 restored, 7's intact header above it) may be unpersisted.
    let mut b = bytes;
    b[(half0 + log[5].offset + BLOCK + 20) as usize] ^= 1;
    let img = Image::open_storage(MemStorage::from_bytes(b)).unwrap();
    let plan = img.recovery_plan();
    assert_eq!(plan.restored_epoch(), 6);
    let six = log[4].state.record().unwrap();
    assert_eq!(
        plan.maybe_unpersisted(&h),
        [
            (half0 + log[4].offset, record_span(six.payload_len)),
            (half0 + log[5].offset, BLOCK)
        ]
    );
}
