//! Tests of the image: commits and their meta records, resumability, open and locking, refusal of bad files and faulty headers or meta records, torn meta writes, a poisoned image.

use super::*;
use crate::nvram::layout::ImageConfig;
use crate::nvram::layout::Region;
use crate::nvram::{inspect, Successor};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, Ordering};

/// A unique path under /dev/shm (or the temp dir), removed on drop.
pub(crate) struct TempPath(pub(crate) PathBuf);

impl TempPath {
    pub(crate) fn new(tag: &str) -> TempPath {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        TempPath::in_dir(&dir, tag)
    }

    pub(crate) fn in_dir(dir: &Path, tag: &str) -> TempPath {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        TempPath(dir.join(format!("nvhv-test-{}-{n}-{tag}.img", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(crate) fn cfg(persist: PersistMode) -> ImageConfig {
    ImageConfig {
        ram_bytes: 4 << 20,
        vcpus: 2,
        guest: "counter".into(),
        persist,
        log_bytes: 64 << 10,
    }
}

pub(crate) fn created(tag: &str) -> (TempPath, Image) {
    let p = TempPath::new(tag);
    let img = Image::create(&p.0, &cfg(PersistMode::SuspendOnly), false).unwrap();
    (p, img)
}

/// The format error of an open of a file, which names the file.
fn format_err<T>(r: Result<T, ImageError>) -> FormatError {
    match r {
        Err(ImageError::In { source, .. }) => match *source {
            ImageError::Format(e) => e,
            e => panic!("expected a format error, got {e}"),
        },
        Err(e) => panic!("expected a format error naming the file, got {e}"),
        Ok(_) => panic!("expected a format error, got an image"),
    }
}

#[test]
fn test_errors_about_contents_name_the_image() {
    let path = Path::new("/images/vm.img");
    let e = ImageError::Format(FormatError::Empty).in_image(path);
    assert_eq!(
        crate::error_chain(&e),
        "/images/vm.img: image file is empty"
    );
    // Wrapping twice names it once; errors naming it already are kept.
    let e = e.in_image(path);
    assert_eq!(crate::error_chain(&e).matches("vm.img").count(), 1);
    let e = ImageError::InUse(path.to_owned()).in_image(path);
    assert!(matches!(e, ImageError::InUse(_)), "{e}");
    // The chain below is kept (out-of-space detection walks it).
    let full = io::Error::from_raw_os_error(libc::ENOSPC);
    let e = ImageError::Read {
        what: "header",
        source: full,
    }
    .in_image(path);
    assert!(crate::is_out_of_space(&e));
    assert_eq!(
        crate::error_chain(&e),
        format!(
            "/images/vm.img: cannot read the header: {}",
            io::Error::from_raw_os_error(libc::ENOSPC)
        )
    );
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

pub(crate) fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

#[test]
fn test_commit_alternates_meta_blocks_and_state_slots() {
    let (p, mut img) = created("alternate");
    let mut blocks = vec![img.meta_blocks().current_block];
    let mut slots = vec![img.current().state_slot];
    img.mark_running().unwrap();
    blocks.push(img.meta_blocks().current_block);
    slots.push(img.current().state_slot);
    for i in 0..5u8 {
        let state = vec![i; 1000 + usize::from(i)];
        let t = img.commit(Status::Suspended, &state).unwrap();
        assert_eq!(t.epoch, u64::from(i) + 2);
        assert_eq!(t.state_bytes, state.len() as u64);
        assert_eq!(img.read_state().unwrap(), state);
        blocks.push(img.meta_blocks().current_block);
        slots.push(img.current().state_slot);
    }
    assert_eq!(blocks, [0, 1, 0, 1, 0, 1, 0]);
    // mark_running keeps the slot; each commit then takes the other one.
    assert_eq!(slots, [0, 0, 1, 0, 1, 0, 1]);
    assert_eq!(img.current().epoch, 6);
    drop(img);
    let img = Image::open(&p.0).unwrap();
    assert_eq!(img.current().epoch, 6);
    assert_eq!(img.current().status, Status::Suspended);
    assert_eq!(img.read_state().unwrap(), vec![4u8; 1004]);
    assert_eq!(img.resumable(), Ok(()));
    let older = img.meta_blocks().blocks[1].as_ref().unwrap();
    assert_eq!(older.epoch, 5);
}

#[test]
fn test_resumability_by_status_and_mode() {
    let (_p, mut img) = created("resumable");
    img.commit(Status::Suspended, b"state").unwrap();
    assert_eq!(img.resumable(), Ok(()));
    img.mark_running().unwrap();
    let r = img.resumable().unwrap_err();
    assert!(r.reason.contains("stopped without suspending"), "{r}");
    img.commit(Status::Committed, b"state").unwrap();
    assert!(img.resumable().unwrap_err().reason.contains("kept running"));
    drop(img);

    let p2 = TempPath::new("resumable-epoch");
    let mut img = Image::create(&p2.0, &cfg(PersistMode::Epoch), false).unwrap();
    img.mark_running().unwrap();
    assert!(img
        .resumable()
        .unwrap_err()
        .reason
        .contains("names no saved state"));
    img.commit(Status::Committed, b"epoch state").unwrap();
    assert_eq!(img.resumable(), Ok(()));
    img.mark_running().unwrap();
    assert_eq!(img.resumable(), Ok(()));
}

#[test]
fn test_commit_rejects_created_and_oversized_state() {
    let (_p, mut img) = created("reject-commit");
    assert!(matches!(
        img.commit(Status::Created, b"x"),
        Err(ImageError::CommitStatus(_))
    ));
    let slot = img.header().geometry.state[0].size;
    let big = vec![0u8; slot as usize + 1];
    assert!(matches!(
        img.commit(Status::Suspended, &big),
        Err(ImageError::StateTooLarge { .. })
    ));
    let full = vec![7u8; slot as usize];
    img.commit(Status::Suspended, &full).unwrap();
    assert_eq!(img.read_state().unwrap(), full);
    assert_eq!(img.current().epoch, 1);
}

#[test]
fn test_commit_on_file_backing() {
    // /var/tmp is a disk file system on our machines: this exercises fdatasync.
    let dir = Path::new("/var/tmp");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let p = TempPath::in_dir(&dir, "filebacking");
    let mut img = Image::create(&p.0, &cfg(PersistMode::SuspendOnly), false).unwrap();
    let t = img.commit(Status::Suspended, &[1; 30_000]).unwrap();
    assert!(t.total >= t.state_persist + t.meta_persist);
    drop(img);
    assert_eq!(
        Image::open(&p.0).unwrap().read_state().unwrap(),
        vec![1; 30_000]
    );
}

#[test]
fn test_fake_dax_commit() {
    let (p, mut img) = created("fakedax");
    img.storage.backing = Backing::fake_dax(img.file(), img.ram_offset()).unwrap();
    img.commit(Status::Suspended, b"via the mapping").unwrap();
    drop(img);
    let img = Image::open(&p.0).unwrap();
    assert_eq!(img.read_state().unwrap(), b"via the mapping");
}

#[test]
fn test_open_when_free_waits_for_the_lock() {
    let (p, held) = created("whenfree");
    let path = p.0.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let r = Image::open_when_free(&path, Successor::wait(&path).unwrap());
        let _ = tx.send(());
        r
    });
    // While the lock is held the waiter stays blocked (a bug would
    // return InUse or an image here), and the header can still be read.
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    let (_, header) = Image::peek_header(&p.0).unwrap();
    assert_eq!(&header, held.header());
    let uuid = held.header().uuid;
    drop(held);
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the waiter returns once the lock is dropped");
    let (img, _) = waiter.join().unwrap().unwrap();
    assert_eq!(img.header().uuid, uuid);
    // It holds the lock now.
    assert!(matches!(Image::open(&p.0), Err(ImageError::InUse(_))));
}

#[test]
fn test_open_when_free_follows_a_file_replaced_at_the_path() {
    let (p, held) = created("replaced");
    let (other, other_img) = created("replacement");
    let new_uuid = other_img.header().uuid;
    assert_ne!(new_uuid, held.header().uuid);
    drop(other_img);
    let path = p.0.clone();
    let waiter =
        std::thread::spawn(move || Image::open_when_free(&path, Successor::wait(&path).unwrap()));
    // Once the waiter is blocked on the old file's lock (/proc/locks
    // lists it with "->"), replace the file at the path, then let go of
    // the old one: the waiter must notice and take the new one.
    let ino = held.file().metadata().unwrap().ino();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains("->") && l.contains(&format!(":{ino} ")))
    {
        assert!(Instant::now() < deadline, "the waiter never blocked");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::fs::rename(&other.0, &p.0).unwrap();
    drop(held);
    let (img, _) = waiter.join().unwrap().unwrap();
    assert_eq!(img.header().uuid, new_uuid);
}

/// A standby whose predecessor's writer is gone opens the image while the
/// dying process still holds its lock; its claim keeps everyone else out
/// until its own thread has taken the lock, and the lock then.
#[test]
fn test_open_taken_over_claims_until_the_lock_is_free() {
    let (p, held) = created("takenover");
    let uuid = held.header().uuid;
    let successor = Successor::wait(&p.0).unwrap();
    let (taken, _) = Image::open_taken_over(&p.0, successor).unwrap();
    assert_eq!(taken.header().uuid, uuid);
    assert!(matches!(Image::open(&p.0), Err(ImageError::InUse(_))));
    // The predecessor lets go of the lock: the claim goes only once the
    // taken-over image holds the lock.
    let ino = held.file().metadata().unwrap().ino();
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains("OFDLCK") && l.contains(&format!(":{ino} ")))
    {
        assert!(Instant::now() < deadline, "the claim was never let go");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(matches!(Image::open(&p.0), Err(ImageError::InUse(_))));
    assert!(matches!(inspect(&p.0), Ok(r) if r.in_use));
    drop(taken);
    Image::open(&p.0).unwrap();
}

/// Pinned to a thread, the image refuses writes and persists from any
/// other one (and gives out no second handle), and takes them from it.
#[test]
fn test_a_pinned_image_is_written_only_by_its_thread() {
    let (p, mut img) = created("pinned");
    img.pin_writer();
    std::thread::scope(|s| {
        let other = s.spawn(|| {
            let r = img.commit(Status::Suspended, b"from another thread");
            assert!(
                matches!(r, Err(ImageError::Backing(BackingError::WrongThread))),
                "{r:?}"
            );
            assert!(img.storage.second_handle().is_none());
        });
        other.join().unwrap();
    });
    drop(img);
    // Nothing of the refused commit reached the file; the next opener,
    // pinned to this thread, commits from it.
    let mut img = Image::open(&p.0).unwrap();
    assert_ne!(img.read_state().unwrap(), b"from another thread");
    img.pin_writer();
    img.commit(Status::Suspended, b"from its thread").unwrap();
    drop(img);
    assert_eq!(
        Image::open(&p.0).unwrap().read_state().unwrap(),
        b"from its thread"
    );
}

#[test]
fn test_second_open_is_in_use() {
    let (p, img) = created("inuse");
    assert!(matches!(Image::open(&p.0), Err(ImageError::InUse(_))));
    assert!(matches!(
        Image::create(&p.0, &cfg(PersistMode::Epoch), true),
        Err(ImageError::InUse(_))
    ));
    drop(img);
    let img = Image::open(&p.0).unwrap();
    assert!(matches!(Image::open(&p.0), Err(ImageError::InUse(_))));
    drop(img);
    Image::open(&p.0).unwrap();
}

#[test]
fn test_open_missing_and_non_regular() {
    let p = TempPath::new("missing");
    assert!(matches!(Image::open(&p.0), Err(ImageError::NotFound(_))));
    assert!(matches!(
        Image::open(&std::env::temp_dir()),
        Err(ImageError::NotRegular(_))
    ));
}

/// Every bad file below is refused with the expected error and left byte-identical.
fn assert_refused(tag: &str, bytes: &[u8], check: impl Fn(&FormatError) -> bool) {
    let p = TempPath::new(tag);
    std::fs::write(&p.0, bytes).unwrap();
    let mtime = std::fs::metadata(&p.0).unwrap().modified().unwrap();
    let e = format_err(Image::open(&p.0));
    assert!(check(&e), "{tag}: {e}");
    assert!(!e.to_string().contains('\n'));
    let e2 = crate::nvram::inspect(&p.0).inspect_err(|e| {
        assert!(crate::error_chain(e).starts_with(&format!("{}: ", p.0.display())));
    });
    assert_eq!(e, format_err(e2));
    assert_eq!(std::fs::read(&p.0).unwrap(), bytes, "{tag}: file changed");
    assert_eq!(std::fs::metadata(&p.0).unwrap().modified().unwrap(), mtime);
}

fn image_bytes(tag: &str, commits: usize) -> (Header, Vec<u8>) {
    let (p, mut img) = created(tag);
    for i in 0..commits {
        img.commit(Status::Suspended, &vec![i as u8; 500]).unwrap();
    }
    let h = img.header().clone();
    drop(img);
    (h, std::fs::read(&p.0).unwrap())
}

#[test]
fn test_open_rejects_empty_short_and_truncated() {
    let (h, good) = image_bytes("src-trunc", 1);
    assert_refused("empty", &[], |e| *e == FormatError::Empty);
    for cut in [1, 7, 8, 100, HEADER_LEN - 1] {
        assert_refused("short", &good[..cut], |e| {
            matches!(e, FormatError::TooShort { .. })
        });
    }
    let g = h.geometry;
    for cut in [
        HEADER_LEN as u64,
        4095,
        4096,
        g.meta[1].end() - 1,
        g.state[1].offset + 10,
        g.ram.offset,
        g.image_len() - 1,
    ] {
        assert_refused(
            "truncated",
            &good[..cut as usize],
            |e| matches!(e, FormatError::Truncated { need, .. } if *need == g.image_len()),
        );
    }
}

#[test]
fn test_open_rejects_foreign_and_random_bytes() {
    let mut elf = vec![0u8; 8192];
    elf[..16].copy_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    assert_refused("elf", &elf, |e| {
        e.to_string()
            .contains("not an nvhv image (it looks like an ELF")
    });
    let mut qcow = vec![0u8; 1 << 16];
    qcow[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
    assert_refused("qcow2", &qcow, |e| e.to_string().contains("qcow2"));
    let mut x = 0x1234_5678_9abc_def1u64;
    let random: Vec<u8> = (0..100_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    assert_refused("random", &random, |e| {
        *e == FormatError::BadMagic { looks_like: None }
    });
    // What a creation cut short leaves: the header, written last, is zeros.
    assert_refused(
        "zeros",
        &vec![0; 1 << 22],
        |e| matches!(e, FormatError::BadMagic { looks_like: Some(s) } if s.contains("never finished")),
    );
}

#[test]
fn test_open_rejects_header_faults() {
    let (_, good) = image_bytes("src-header", 1);
    for at in [20usize, 60, 130, 200, 255] {
        let mut b = good.clone();
        b[at] ^= 0x10;
        assert_refused("header-flip", &b, |e| {
            matches!(e, FormatError::HeaderCrc { .. } | FormatError::BadHeader(_))
        });
    }
    // Version 4 with a correct CRC: the version check itself refuses it.
    let mut b = good.clone();
    b[8..12].copy_from_slice(&4u32.to_le_bytes());
    b[16..20].fill(0);
    let crc = crc32c::crc32c(&b[..HEADER_LEN]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    assert_refused("version", &b, |e| {
        e.to_string() == "image format 4, this nvhv reads 1 to 3"
    });
    // State slot 1 moved onto state slot 0, CRC re-computed: geometry.
    let mut b = good.clone();
    let state0 = u64::from_le_bytes(b[160..168].try_into().unwrap());
    b[176..184].copy_from_slice(&(state0 + 4096).to_le_bytes());
    b[16..20].fill(0);
    let crc = crc32c::crc32c(&b[..HEADER_LEN]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    assert_refused(
        "overlap",
        &b,
        |e| matches!(e, FormatError::Geometry(m) if m.contains("overlaps")),
    );
}

#[test]
fn test_meta_faults_fall_back_or_refuse() {
    let (h, good) = image_bytes("src-meta", 3);
    let g = h.geometry;
    // Epoch 3 (current) is in block 1, epoch 2 in block 0.
    let (m0, m1) = (g.meta[0].offset as usize, g.meta[1].offset as usize);
    let p = TempPath::new("meta-flip");
    for (block, at, expect_epoch) in [(m1, 20, 2), (m1, 90, 2), (m0, 20, 3), (m0, 50, 3)] {
        let mut b = good.clone();
        b[block + at] ^= 0x01;
        std::fs::write(&p.0, &b).unwrap();
        let img = Image::open(&p.0).unwrap();
        assert_eq!(img.current().epoch, expect_epoch, "flip at {block}+{at}");
        drop(img);
        assert_eq!(std::fs::read(&p.0).unwrap(), b, "open changed the file");
    }
    let mut b = good.clone();
    b[m0 + 30] ^= 0x80;
    b[m1 + 30] ^= 0x80;
    assert_refused("both-meta", &b, |e| {
        matches!(e, FormatError::NoValidMeta { .. })
    });
    let mut b = good.clone();
    b[m0..m0 + META_LEN].fill(0);
    b[m1..m1 + 8].copy_from_slice(b"NOTMETA!");
    assert_refused("both-meta-2", &b, |e| {
        e.to_string() == "neither meta record is valid (block 0: meta record never written; block 1: meta record has bad magic)"
    });
    // Both records copied from another image: foreign UUID.
    let (_, other) = image_bytes("src-meta-other", 3);
    let mut b = good.clone();
    b[m0..m1 + META_LEN].copy_from_slice(&other[m0..m1 + META_LEN]);
    assert_refused(
        "foreign-meta",
        &b,
        |e| matches!(e, FormatError::NoValidMeta { meta0, .. } if matches!(**meta0, FormatError::MetaForeign(_))),
    );
}

#[test]
fn test_torn_meta_write_falls_back_to_previous_epoch() {
    let (p, mut img) = created("torn");
    img.commit(Status::Suspended, b"epoch one").unwrap();
    img.mark_running().unwrap();
    let torn_block = 1 - img.meta_blocks().current_block;
    let Region { offset, .. } = img.header().geometry.meta[torn_block];
    let epoch1 = read_at(&p.0, offset, META_LEN);
    img.commit(Status::Suspended, b"epoch three").unwrap();
    assert_eq!(img.meta_blocks().current_block, torn_block);
    drop(img);
    // The record for epoch 3 is half written: its second half still holds epoch 1's bytes.
    let half = META_LEN / 2;
    assert_ne!(read_at(&p.0, offset + half as u64, half), epoch1[half..]);
    patch(&p.0, offset + half as u64, &epoch1[half..]);
    let img = Image::open(&p.0).unwrap();
    assert_eq!(img.current().epoch, 2);
    assert_eq!(img.current().status, Status::Running);
    assert!(matches!(
        img.meta_blocks().blocks[torn_block],
        Err(FormatError::MetaCrc { .. })
    ));
    // Epoch 2 is the suspend-only Running record: correctly not resumable.
    assert!(img.resumable().is_err());
}

#[test]
fn test_state_slot_corruption_is_reported() {
    let (p, mut img) = created("statecrc");
    img.commit(Status::Suspended, &[9; 4000]).unwrap();
    let region = img.header().geometry.state[img.current().state_slot];
    drop(img);
    patch(&p.0, region.offset + 1234, &[0]);
    let img = Image::open(&p.0).unwrap();
    assert!(matches!(img.read_state(), Err(ImageError::StateCrc { .. })));
    let r = img.resumable().unwrap_err();
    assert!(r.reason.contains("CRC mismatch"), "{r}");
}

#[test]
fn test_poisoned_after_failed_persist_refuses_commits() {
    let (_p, mut img) = created("poison");
    img.poisoned = true;
    assert!(matches!(
        img.commit(Status::Suspended, b"x"),
        Err(ImageError::Poisoned)
    ));
    assert!(matches!(img.mark_running(), Err(ImageError::Poisoned)));
}

/// Rule 3's comparison: what `storage` reads (the page cache, in a resume)
/// against what the disk holds, read past the cache. The same bytes are
/// `Same`; one byte changed in any place is `Differs`; pages left dirty are
/// written out first, so the file against itself is `Same`.
#[test]
fn test_compare_with_disk_reads_the_disk_past_the_cache() {
    let dir = Path::new("/var/tmp");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let p = TempPath::in_dir(&dir, "compare");
    let bytes: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&p.0, &bytes).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p.0)
        .unwrap();
    file.sync_data().unwrap();
    let places = [(100, 50), (4096 + 7, 5000), (3 * 4096 - 1, 1)];
    let mut cache = crate::nvram::storage::MemStorage::new(bytes.len());
    cache.write_at(0, &bytes).unwrap();
    if crate::nvram::backing::open_direct(&file).is_err() {
        // A file system without direct I/O: the disk cannot be told apart.
        assert_eq!(compare_with_disk(&cache, &file, &places), OnDisk::Unknown);
        return;
    }
    assert_eq!(compare_with_disk(&cache, &file, &places), OnDisk::Same);
    for &(offset, len) in &places {
        let at = offset + len - 1;
        let mut changed = crate::nvram::storage::MemStorage::new(bytes.len());
        changed.write_at(0, &bytes).unwrap();
        changed.write_at(at, &[bytes[at as usize] ^ 1]).unwrap();
        assert_eq!(
            compare_with_disk(&changed, &file, &places),
            OnDisk::Differs,
            "a byte changed at {at}"
        );
    }
    file.write_all_at(b"dirty", 4096 + 10).unwrap();
    assert_eq!(compare_with_disk(&file, &file, &places), OnDisk::Same);
}
