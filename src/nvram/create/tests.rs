//! Tests of image creation: an image appears at its path only once published, and what every way of not getting there leaves.

use super::*;
use crate::nvram::image::tests::{cfg, created, read_at, TempPath};
use crate::nvram::layout::{FormatError, PersistMode, Status};
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory under /dev/shm (or the temp dir), removed with
/// what it holds on drop: the tests below check that nothing but the
/// image ever appears in it.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("nvhv-test-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        TempDir(dir)
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn overwrite() -> CreateOptions<'static> {
    CreateOptions {
        overwrite: true,
        ..Default::default()
    }
}

fn uuid_at(path: &Path) -> Uuid {
    Image::peek_header(path).unwrap().1.uuid
}

#[test]
fn test_a_new_image_is_at_its_path_only_once_published() {
    let dir = TempDir::new("publish");
    let path = dir.0.join("vm.img");
    let (img, mut new) =
        Image::prepare(&path, &cfg(PersistMode::Epoch), CreateOptions::default()).unwrap();
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
    new.publish().unwrap();
    assert_eq!(dir.entries(), ["vm.img"]);
    // The published file is the image made: same UUID, still locked.
    assert_eq!(uuid_at(&path), img.header().uuid);
    assert!(matches!(Image::open(&path), Err(ImageError::InUse(_))));
    new.publish().unwrap();
    assert_eq!(new.discard(), Discarded::Nothing);
    let header = img.header().clone();
    drop(img);
    assert_eq!(Image::open(&path).unwrap().header(), &header);
}

#[test]
fn test_an_unpublished_image_leaves_the_path_as_it_was() {
    let dir = TempDir::new("discard");
    let path = dir.0.join("vm.img");
    // Nothing there: nothing is left.
    let (img, new) = Image::prepare(&path, &cfg(PersistMode::Epoch), overwrite()).unwrap();
    drop(img);
    assert_eq!(new.discard(), Discarded::Nothing);
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());

    // An image there (`--force`): kept, locked meanwhile, unchanged.
    let old = Image::create(&path, &cfg(PersistMode::SuspendOnly), false).unwrap();
    let old_uuid = old.header().uuid;
    drop(old);
    let before = std::fs::read(&path).unwrap();
    let (img, new) = Image::prepare(&path, &cfg(PersistMode::Epoch), overwrite()).unwrap();
    assert_ne!(img.header().uuid, old_uuid);
    assert_eq!(uuid_at(&path), old_uuid);
    assert!(
        matches!(Image::open(&path), Err(ImageError::InUse(_))),
        "the image being replaced must not be resumed meanwhile"
    );
    drop(img);
    assert_eq!(new.discard(), Discarded::OldKept);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(dir.entries(), ["vm.img"]);
    Image::open(&path).unwrap();
}

#[test]
fn test_overwrite_replaces_the_old_file_at_publish() {
    let dir = TempDir::new("replace");
    let path = dir.0.join("vm.img");
    std::fs::write(&path, b"old").unwrap();
    let (img, mut new) = Image::prepare(&path, &cfg(PersistMode::Epoch), overwrite()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    new.publish().unwrap();
    assert_eq!(uuid_at(&path), img.header().uuid);
    // No name of the image's own is left beside it.
    assert_eq!(dir.entries(), ["vm.img"]);
    // An image another process holds is never replaced.
    match Image::prepare(&path, &cfg(PersistMode::Epoch), overwrite()) {
        Err(ImageError::InUse(p)) => assert_eq!(p, path),
        Err(e) => panic!("expected in use, got {e}"),
        Ok(_) => panic!("replaced an image in use"),
    }
    assert_eq!(uuid_at(&path), img.header().uuid);
}

/// The state a `run --force` killed between the link under its hidden
/// name and the rename leaves: removed once nobody holds it, never
/// while its maker lives; names that are not one of this path's hidden
/// names with a pid, and files that are not images, are left alone.
#[test]
fn test_leftovers_of_a_publish_cut_short_are_removed_once_free() {
    let dir = TempDir::new("leftover");
    let path = dir.0.join("vm.img");
    std::fs::write(&path, b"old").unwrap();
    let (img, new) = Image::prepare(&path, &cfg(PersistMode::Epoch), overwrite()).unwrap();
    let mut hidden = temp_prefix(&path);
    hidden.push("123");
    let hidden = path.with_file_name(hidden);
    link(&new.file, &hidden).unwrap();
    let bytes = allocated(&new.file);
    assert!(bytes > 0);
    let keep = [
        ".vm.img.nvhv-new-",
        ".vm.img.nvhv-new-12a",
        ".x.img.nvhv-new-1",
    ];
    for name in keep {
        std::fs::copy(&hidden, dir.0.join(name)).unwrap();
    }
    std::fs::write(dir.0.join(".vm.img.nvhv-new-9"), vec![0u8; 4096]).unwrap();
    // Its maker still holds it.
    assert_eq!(remove_leftovers(&path), []);
    assert!(hidden.exists());
    // The maker is gone (its descriptors closed, as by a SIGKILL).
    drop((img, new));
    assert_eq!(
        remove_leftovers(&path),
        [Leftover {
            path: hidden.clone(),
            bytes
        }]
    );
    let mut left = vec![".vm.img.nvhv-new-9", "vm.img"];
    left.extend(keep);
    left.sort();
    assert_eq!(dir.entries(), left);
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
}

#[test]
fn test_overwrite_replaces_an_image_whose_name_is_as_long_as_can_be() {
    let dir = TempDir::new("longname");
    let path = dir.0.join("v".repeat(255));
    Image::create(&path, &cfg(PersistMode::Epoch), false).unwrap();
    let img = Image::create(&path, &cfg(PersistMode::Epoch), true).unwrap();
    assert_eq!(uuid_at(&path), img.header().uuid);
    assert_eq!(dir.entries(), ["v".repeat(255)]);
}

#[test]
fn test_a_new_image_is_its_owners_alone_and_a_replacement_keeps_the_old_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("mode");
    let path = dir.0.join("vm.img");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    drop(Image::create(&path, &cfg(PersistMode::Epoch), false).unwrap());
    assert_eq!(mode(&path) & !0o600, 0, "{:o}", mode(&path));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    drop(Image::create(&path, &cfg(PersistMode::Epoch), true).unwrap());
    assert_eq!(mode(&path), 0o640);
}

#[test]
fn test_publish_refuses_a_file_that_appeared_meanwhile() {
    let dir = TempDir::new("race");
    let path = dir.0.join("vm.img");
    let (_img, mut new) =
        Image::prepare(&path, &cfg(PersistMode::Epoch), CreateOptions::default()).unwrap();
    std::fs::write(&path, b"theirs").unwrap();
    let e = new.publish().unwrap_err();
    assert!(matches!(e, ImageError::Exists(_)), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"theirs");
    assert_eq!(dir.entries(), ["vm.img"]);
}

#[test]
fn test_without_unnamed_files_the_image_is_made_in_place() {
    let dir = TempDir::new("inplace");
    let path = dir.0.join("vm.img");
    let c = cfg(PersistMode::Epoch);
    let none = CreateOptions::default();
    let (img, new) = Image::prepare_as(&path, &c, none, Made::InPlace).unwrap();
    assert_eq!(uuid_at(&path), img.header().uuid);
    drop(img);
    assert_eq!(new.discard(), Discarded::Removed);
    assert!(dir.entries().is_empty());
    let (img, mut new) = Image::prepare_as(&path, &c, none, Made::InPlace).unwrap();
    new.publish().unwrap();
    drop((img, new));
    Image::open(&path).unwrap();
    assert!(matches!(
        Image::prepare_as(&path, &c, none, Made::InPlace),
        Err(ImageError::Exists(_))
    ));
}

#[test]
fn test_metadata_larger_than_the_file_system_is_refused_by_name() {
    let dir = TempDir::new("bigmeta");
    let path = dir.0.join("vm.img");
    let huge_log = ImageConfig {
        log_bytes: 1 << 46,
        ..cfg(PersistMode::Epoch)
    };
    match Image::prepare(&path, &huge_log, CreateOptions::default()) {
        Err(e @ ImageError::NoRoomForMetadata { .. }) => {
            assert!(e.to_string().contains("--log-size"), "{e}")
        }
        Err(e) => panic!("expected no room for metadata, got {e}"),
        Ok(_) => panic!("made an image with 64 TiB of redo log"),
    }
    assert!(dir.entries().is_empty());
}

#[test]
fn test_room_for_a_reserve_counts_the_replaced_image_apart() {
    let p = Path::new("/images/vm.img");
    room_for(100, 100, 0, p).unwrap();
    assert!(matches!(
        room_for(101, 100, 0, p),
        Err(ImageError::Reserve {
            bytes: 101,
            free: 100,
            ..
        })
    ));
    let e = room_for(150, 100, 60, p).unwrap_err();
    assert!(matches!(e, ImageError::NoRoomBeside { .. }), "{e}");
    assert!(e.to_string().contains("remove it first"), "{e}");
    assert!(e.to_string().contains("/images/vm.img"), "{e}");
    assert!(matches!(
        room_for(161, 100, 60, p),
        Err(ImageError::Reserve { .. })
    ));
}

#[test]
fn test_create_then_open_round_trip() {
    let (p, img) = created("roundtrip");
    let header = img.header().clone();
    assert_eq!(header.config, cfg(PersistMode::SuspendOnly));
    assert_eq!(img.current().epoch, 0);
    assert_eq!(img.current().status, Status::Created);
    assert_eq!(img.ram_offset() % (2 << 20), 0);
    let len = img.file().metadata().unwrap().len();
    assert_eq!(len, img.ram_offset() + (4 << 20));
    drop(img);
    let img = Image::open(&p.0).unwrap();
    assert_eq!(img.header(), &header);
    assert_eq!(img.current().epoch, 0);
    assert_eq!(img.current().status, Status::Created);
    assert!(matches!(
        img.meta_blocks().blocks[1],
        Err(FormatError::MetaBlank)
    ));
    assert_eq!(img.read_state().unwrap(), Vec::<u8>::new());
    let r = img.resumable().unwrap_err();
    assert!(r.reason.contains("created but never suspended"), "{r}");
}

#[test]
fn test_space_counts_the_sparse_ram_region_and_reserve_allocates_it() {
    let (_p, img) = created("space");
    let s = img.space().unwrap();
    // The 4 MiB RAM region is a hole; the metadata is allocated.
    assert!(
        s.unallocated >= 4 << 20 && s.unallocated < (4 << 20) + (1 << 20),
        "{s:?}"
    );
    assert!(s.free > 0, "{s:?}");
    assert_eq!(s.short(), s.unallocated > s.free);

    let p = TempPath::new("reserved");
    let reported = std::cell::RefCell::new(Vec::new());
    let report = |done, total| reported.borrow_mut().push((done, total));
    let how = CreateOptions {
        overwrite: false,
        reserve_ram: true,
        on_reserve: Some(&report),
        cancelled: None,
    };
    let img = Image::create_with(&p.0, &cfg(PersistMode::Epoch), how).unwrap();
    assert_eq!(img.space().unwrap().unallocated, 0);
    let ram = img.header().ram_bytes();
    assert_eq!(*reported.borrow(), [(ram, ram)]);
    assert!(img.resumable().is_err(), "a new image is not resumable");
    assert!(read_at(&p.0, img.ram_offset(), 8192)
        .iter()
        .all(|&b| b == 0));

    // A RAM region larger than any file system can hold: refused, and
    // no file is left behind.
    let p = TempPath::new("too-big");
    let huge = ImageConfig {
        ram_bytes: 1 << 50,
        ..cfg(PersistMode::Epoch)
    };
    match Image::create_with(&p.0, &huge, how) {
        Err(e @ ImageError::Reserve { bytes, .. }) => {
            assert_eq!(bytes, 1 << 50);
            assert!(e.to_string().contains("cannot reserve 1 PiB"), "{e}");
        }
        Err(e) => panic!("expected a reserve error, got {e}"),
        Ok(_) => panic!("reserved 1 PiB"),
    }
    assert!(!p.0.exists());
}

#[test]
fn test_reserve_allocates_in_pieces_and_reports_each() {
    use std::os::unix::fs::MetadataExt;
    let p = TempPath::new("pieces");
    let file = File::create(&p.0).unwrap();
    file.set_len(8 << 20).unwrap();
    let reported = std::cell::RefCell::new(Vec::new());
    let report = |done, total| reported.borrow_mut().push((done, total));
    let (offset, len) = (1 << 20, (9 << 19) + 4096);
    let how = CreateOptions {
        on_reserve: Some(&report),
        ..Default::default()
    };
    reserve(&file, (offset, len), 1 << 20, &how).unwrap();
    let m = 1u64 << 20;
    assert_eq!(
        *reported.borrow(),
        [
            (m, len),
            (2 * m, len),
            (3 * m, len),
            (4 * m, len),
            (len, len)
        ]
    );
    // The region is allocated, the megabyte before it is not.
    let blocks = file.metadata().unwrap().blocks() * 512;
    assert!(blocks >= len && blocks < len + (1 << 20), "{blocks}");
    assert_eq!(file.metadata().unwrap().len(), 8 << 20);
}

#[test]
fn test_reserve_stops_between_pieces_when_cancelled() {
    let p = TempPath::new("cancel");
    let file = File::create(&p.0).unwrap();
    file.set_len(8 << 20).unwrap();
    let pieces = std::cell::Cell::new(0);
    let report = |_, _| pieces.set(pieces.get() + 1);
    let cancelled = || pieces.get() == 2;
    let how = CreateOptions {
        on_reserve: Some(&report),
        cancelled: Some(&cancelled),
        ..Default::default()
    };
    let e = reserve(&file, (0, 8 << 20), 1 << 20, &how).unwrap_err();
    assert!(matches!(e, ImageError::Cancelled), "{e}");
    assert_eq!(pieces.get(), 2);
}

#[test]
fn test_create_ram_region_is_sparse_and_zero() {
    use std::os::unix::fs::MetadataExt;
    let (p, img) = created("sparse");
    let md = img.file().metadata().unwrap();
    // Allocated: the metadata regions (under 2 MiB), not the 4 MiB of RAM.
    assert!(
        md.blocks() * 512 < img.ram_offset() + (1 << 20),
        "{} blocks",
        md.blocks()
    );
    assert!(read_at(&p.0, img.ram_offset(), 8192)
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn test_create_refuses_existing_file() {
    let p = TempPath::new("exists");
    std::fs::write(&p.0, b"precious").unwrap();
    let e = Image::create(&p.0, &cfg(PersistMode::SuspendOnly), false).unwrap_err();
    assert!(matches!(e, ImageError::Exists(_)), "{e}");
    assert_eq!(std::fs::read(&p.0).unwrap(), b"precious");
    let img = Image::create(&p.0, &cfg(PersistMode::Epoch), true).unwrap();
    assert_eq!(img.header().config.persist, PersistMode::Epoch);
}

#[test]
fn test_create_rejects_bad_config_and_leaves_no_file() {
    let p = TempPath::new("badcfg");
    let mut c = cfg(PersistMode::SuspendOnly);
    c.guest = "g".repeat(65);
    let e = Image::create(&p.0, &c, false).unwrap_err();
    assert!(
        matches!(e, ImageError::Format(FormatError::Config(_))),
        "{e}"
    );
    assert!(!p.0.exists());
}

#[test]
fn test_an_image_in_a_missing_directory_is_refused_naming_the_directory() {
    let dir = TempDir::new("nodir");
    let missing = dir.0.join("not-there");
    let path = missing.join("vm.img");
    let c = cfg(PersistMode::Epoch);
    for made in [Made::Unnamed, Made::InPlace] {
        let e = match Image::prepare_as(&path, &c, CreateOptions::default(), made) {
            Ok(_) => panic!("an image was made in a directory that does not exist"),
            Err(e) => e,
        };
        let ImageError::Create {
            dir: named, source, ..
        } = &e
        else {
            panic!("not a creation error: {e}");
        };
        assert_eq!(named, &missing);
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            format!(
                "cannot create an image at {} (in directory {})",
                path.display(),
                missing.display()
            )
        );
    }
    assert!(dir.entries().is_empty());
}
