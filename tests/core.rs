//! Persistent VM core, end to end through the `nvhv` binary: counter and
//! ticker guests survive suspend/resume, bad images are refused unchanged,
//! an image in use cannot be opened twice.

mod common;

use common::{counters, inspect_json, nvhv_output, ticks, Scratch, Vmm};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// A new 1-vCPU `counter` VM in a scratch image (persistence `mode`), once
/// it has printed.
fn running_counter(tag: &str, mode: &str) -> (Scratch, std::path::PathBuf, Vmm) {
    let dir = Scratch::new(tag);
    let img = dir.path("vm.img");
    let mut vm = Vmm::start(
        &[
            "run",
            "--image",
            img.to_str().unwrap(),
            "--guest",
            "counter",
            "--persist",
            mode,
        ],
        dir.path("c.log"),
    );
    vm.wait_console("counter output", T, |t| !counters(t, 0).is_empty());
    (dir, img, vm)
}

/// Run `counter` until vCPU(s) printed, suspend with SIGTERM, then resume
/// `rounds` times, checking the counters never go back and keep growing.
fn counter_survives(vcpus: u32, rounds: usize) {
    require_kvm!();
    let dir = Scratch::new(&format!("counter{vcpus}"));
    let img = dir.path("vm.img");
    let img_s = img.to_str().unwrap();
    let v = vcpus.to_string();
    let mut vm = Vmm::start(
        &[
            "run", "--image", img_s, "--guest", "counter", "--vcpus", &v, "--mem", "64M",
        ],
        dir.path("c0.log"),
    );
    vm.wait_console("counter lines for every vCPU", T, |t| {
        (0..vcpus).all(|i| counters(t, i).len() >= 2)
    });
    let st = vm.signal_and_wait(libc::SIGTERM);
    assert!(st.success(), "suspend failed: {}", vm.stderr_text());
    assert!(vm.stderr_text().contains("durable"), "{}", vm.stderr_text());
    assert!(
        vm.console_text().ends_with('\n'),
        "console ends in a cut line"
    );
    let mut last: Vec<u64> = (0..vcpus)
        .map(|i| *counters(&vm.console_text(), i).last().unwrap())
        .collect();

    for round in 1..=rounds {
        let mut vm = Vmm::start(
            &["resume", "--image", img_s],
            dir.path(&format!("c{round}.log")),
        );
        vm.wait_console("two counter lines per vCPU after resume", T, |t| {
            (0..vcpus).all(|i| counters(t, i).len() >= 2)
        });
        let st = vm.signal_and_wait(libc::SIGTERM);
        assert!(
            st.success(),
            "suspend after resume failed: {}",
            vm.stderr_text()
        );
        let text = vm.console_text();
        // A line cut by a stop is carried in the saved state and finished
        // after the resume: no log ends in a cut line or starts with the
        // rest of one.
        assert!(
            text.ends_with('\n'),
            "round {round}: console ends in a cut line"
        );
        for l in text.lines() {
            assert!(
                !l.starts_with(|c: char| c.is_ascii_digit()),
                "round {round}: the rest of a cut line: {l:?}"
            );
        }
        for (i, before) in last.iter_mut().enumerate() {
            let c = counters(&text, i as u32);
            assert!(
                c[0] >= *before,
                "round {round} vCPU {i}: counter went back from {before} to {}",
                c[0]
            );
            assert!(
                c.last().unwrap() > &c[0],
                "round {round} vCPU {i}: counter does not grow after resume: {c:?}"
            );
            *before = *c.last().unwrap();
        }
    }
}

#[test]
fn counter_one_vcpu_survives_three_suspend_resume_cycles() {
    counter_survives(1, 3);
}

#[test]
fn counter_two_vcpus_survive_suspend_resume() {
    counter_survives(2, 1);
}

#[test]
fn ticker_keeps_ticking_after_resume() {
    require_kvm!();
    let dir = Scratch::new("ticker");
    let img = dir.path("vm.img");
    let img_s = img.to_str().unwrap();
    let mut vm = Vmm::start(
        &["run", "--image", img_s, "--guest", "ticker"],
        dir.path("t0.log"),
    );
    vm.wait_console("ticks", T, |t| ticks(t).len() >= 3);
    assert!(
        vm.signal_and_wait(libc::SIGTERM).success(),
        "{}",
        vm.stderr_text()
    );
    let before = *ticks(&vm.console_text()).last().unwrap();
    assert!(before > 0);

    let mut vm = Vmm::start(&["resume", "--image", img_s], dir.path("t1.log"));
    vm.wait_console("ticks after resume", T, |t| ticks(t).len() >= 3);
    assert!(
        vm.signal_and_wait(libc::SIGTERM).success(),
        "{}",
        vm.stderr_text()
    );
    let after = ticks(&vm.console_text());
    assert!(after[0] >= before, "ticks went back: {before} -> {after:?}");
    assert!(
        after.last().unwrap() > &after[0],
        "timer stopped after resume: {after:?}"
    );
}

#[test]
fn inspect_reports_resumable_only_after_an_orderly_suspend() {
    require_kvm!();
    let (_dir, img, mut vm) = running_counter("inspect", "suspend-only");
    let img_s = img.to_str().unwrap();

    // While running: in use, not resumable.
    let j = inspect_json(img_s);
    assert_eq!(j["resumable"], false, "{j}");
    assert_eq!(j["in_use"], true, "{j}");

    // A second process cannot open it.
    let out = nvhv_output(&["resume", "--image", img_s]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");

    assert!(vm.signal_and_wait(libc::SIGTERM).success());
    let j = inspect_json(img_s);
    assert_eq!(j["resumable"], true, "{j}");
    assert_eq!(j["vcpus"], 1);
    assert_eq!(j["ram_bytes"], 64u64 << 20);
    assert!(j["epoch"].as_u64().unwrap() >= 1);
    assert_eq!(j["format_version"], 3);
    // `--image PATH`, as the other commands take the image, says the same;
    // giving both forms, or neither, is a usage error.
    // (Other tests share the file system: its free bytes may differ.)
    let by_flag = nvhv_output(&["inspect", "--json", "--image", img_s]);
    assert!(by_flag.status.success());
    let mut k: serde_json::Value = serde_json::from_slice(&by_flag.stdout).unwrap();
    let mut j = j;
    for report in [&mut j, &mut k] {
        report
            .as_object_mut()
            .unwrap()
            .remove("free_bytes")
            .unwrap();
    }
    assert_eq!(j, k);
    for args in [&["inspect", "--image", img_s, img_s][..], &["inspect"][..]] {
        let out = nvhv_output(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }

    // A reader that goes away (`nvhv inspect IMG | head -1`) is no error.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nvhv"))
        .args(["inspect", img_s])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");
}

#[test]
fn sigkill_in_suspend_only_mode_leaves_an_image_that_is_refused_unchanged() {
    require_kvm!();
    let (_dir, img, mut vm) = running_counter("kill", "suspend-only");
    let img_s = img.to_str().unwrap();
    vm.signal_and_wait(libc::SIGKILL);

    let j = inspect_json(img_s);
    assert_eq!(j["resumable"], false, "{j}");
    assert!(j["reason"].as_str().unwrap().len() > 10, "{j}");
    let before = std::fs::read(&img).unwrap();
    let out = nvhv_output(&["resume", "--image", img_s]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not resumable") && err.contains(img_s),
        "{err}"
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "refused resume changed the image"
    );
    let err = failed_suspend(img_s);
    assert!(err.contains("the image is not resumable"), "{err}");
}

#[test]
fn corrupted_images_are_refused_and_left_byte_identical() {
    require_kvm!();
    let (dir, img, mut vm) = running_counter("corrupt", "epoch");
    assert!(vm.signal_and_wait(libc::SIGTERM).success());
    let good = std::fs::read(&img).unwrap();

    let bad = dir.path("bad.img");
    let bad_s = bad.to_str().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("truncated header", good[..100].to_vec()),
        ("truncated RAM", good[..good.len() / 2].to_vec()),
        ("bit flip in header", {
            let mut b = good.clone();
            b[16] ^= 0xff;
            b
        }),
        (
            "ELF file",
            b"\x7fELF\x02\x01\x01"
                .iter()
                .copied()
                .chain([0u8; 4096])
                .collect(),
        ),
        (
            "qcow2",
            b"QFI\xfb\0\0\0\x03"
                .iter()
                .copied()
                .chain([0u8; 4096])
                .collect(),
        ),
    ];
    for (what, bytes) in cases {
        std::fs::write(&bad, &bytes).unwrap();
        let out = nvhv_output(&["resume", "--image", bad_s]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: not one line: {err}");
        // The error names the file (a user may run many images).
        assert!(err.contains(bad_s), "{what}: the path is not named: {err}");
        assert!(
            std::fs::read(&bad).unwrap() == bytes,
            "{what}: image changed"
        );
        let out = nvhv_output(&["inspect", bad_s]);
        assert!(
            std::fs::read(&bad).unwrap() == bytes,
            "{what}: inspect changed it"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(err.contains(bad_s), "{what}: the path is not named: {err}");
    }
    let out = nvhv_output(&[
        "resume",
        "--image",
        dir.path("missing.img").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));

    // What a run killed while it made the image leaves (the header is
    // written last) is named as such.
    std::fs::write(&bad, vec![0u8; 64 << 10]).unwrap();
    let out = nvhv_output(&["resume", "--image", bad_s]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("creation never finished"), "{err}");
}

#[test]
fn run_refuses_to_overwrite_an_existing_file() {
    require_kvm!();
    let dir = Scratch::new("overwrite");
    let img = dir.path("vm.img");
    std::fs::write(&img, b"precious").unwrap();
    // The counter guest: the kv guest would bind 127.0.0.1:6380, which a
    // test running beside this one may hold for a moment.
    let out = nvhv_output(&[
        "run",
        "--image",
        img.to_str().unwrap(),
        "--guest",
        "counter",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&img).unwrap(), b"precious");
}

/// A listen address that cannot be bound, or a console file that cannot be
/// opened, fails `run` before the image is touched: no new file, and an
/// existing image under `--force` is left as it was.
#[test]
fn run_fails_on_bad_listen_or_console_before_touching_the_image() {
    require_kvm!();
    let dir = Scratch::new("badrun");
    let img = dir.path("vm.img");
    let img_s = img.to_str().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let console = dir.path("no-such-dir/console.log");
    let console_s = console.to_str().unwrap();
    for (opts, says) in [
        (&["--listen", taken_addr.as_str()][..], "cannot listen on"),
        // An ephemeral port: the default one may be held for a moment by a
        // test running beside this one.
        (
            &["--console", console_s, "--listen", "127.0.0.1:0"][..],
            "cannot open console file",
        ),
    ] {
        let mut args = vec!["run", "--image", img_s];
        args.extend_from_slice(opts);
        let out = nvhv_output(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{opts:?}: {err}");
        assert!(err.contains(says), "{opts:?}: {err}");
        assert!(!img.exists(), "{opts:?} left an image behind");
        std::fs::write(&img, b"precious").unwrap();
        args.push("--force");
        let out = nvhv_output(&args);
        assert_eq!(out.status.code(), Some(1), "{opts:?} --force");
        assert_eq!(
            std::fs::read(&img).unwrap(),
            b"precious",
            "{opts:?} --force"
        );
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn nvhv_suspend_commits_through_the_control_socket() {
    require_kvm!();
    let (_dir, img, mut vm) = running_counter("ctl", "epoch");
    let img_s = img.to_str().unwrap();
    let out = nvhv_output(&["suspend", "--image", img_s]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("durable"), "{said}");
    assert!(vm.child.wait().unwrap().success(), "{}", vm.stderr_text());
    // Nobody serves the image any more: a clear error, not a hang, that
    // says what the image holds.
    let err = failed_suspend(img_s);
    assert!(
        err.contains("no running nvhv") && err.contains("already suspended"),
        "{err}"
    );
    let j = inspect_json(img_s);
    assert_eq!(j["resumable"], true, "{j}");
    let missing = img.with_file_name("missing.img");
    let err = failed_suspend(missing.to_str().unwrap());
    assert!(err.contains("no image at"), "{err}");
}

/// `nvhv suspend --image IMG` with no nvhv serving IMG: it fails with
/// status 1; its stderr.
fn failed_suspend(img: &str) -> String {
    let out = nvhv_output(&["suspend", "--image", img]);
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `nvhv suspend` of an image whose nvhv was killed (its control socket
/// left behind, refusing connections) says so and how to continue it.
#[test]
fn nvhv_suspend_after_a_kill_says_resume_continues_the_image() {
    require_kvm!();
    let (_dir, img, mut vm) = running_counter("ctl-kill", "epoch");
    let img_s = img.to_str().unwrap();
    vm.signal_and_wait(libc::SIGKILL);
    assert!(
        std::path::Path::new(&format!("{img_s}.ctl")).exists(),
        "a killed nvhv cannot remove its control socket"
    );
    let err = failed_suspend(img_s);
    assert!(
        err.contains("stopped without a suspend")
            && err.contains(&format!("nvhv resume --image {img_s}")),
        "{err}"
    );
}

/// Epoch options that cannot work are refused with a reason before any file
/// exists; an image whose redo log holds less than the default dirty budget
/// resumes with the budget lowered to what the log holds, and says so.
#[test]
fn unworkable_epoch_options_are_refused_before_an_image_exists() {
    require_kvm!();
    let dir = Scratch::new("policy");
    let img = dir.path("vm.img");
    let img_s = img.to_str().unwrap();
    for (opts, says) in [
        (
            &["--epoch-min", "20ms", "--epoch-max", "10ms"][..],
            "--epoch-min",
        ),
        (&["--dirty-budget", "0"][..], "at least 1 page"),
        (&["--log-size", "1K"][..], "--log-size is too small"),
        (&["--log-size", "8M"][..], "--dirty-budget 1530 or less"),
    ] {
        let mut args = vec!["run", "--image", img_s, "--guest", "counter"];
        args.extend_from_slice(opts);
        let out = nvhv_output(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{opts:?}: {err}");
        assert!(err.contains(says), "{opts:?}: {err}");
        assert!(!img.exists(), "{opts:?} left an image behind");
    }
    let mut vm = Vmm::start(
        &[
            "run",
            "--image",
            img_s,
            "--guest",
            "counter",
            "--log-size",
            "8M",
            "--dirty-budget",
            "1000",
        ],
        dir.path("c.log"),
    );
    vm.wait_console("counter output", T, |t| !counters(t, 0).is_empty());
    assert!(vm.signal_and_wait(libc::SIGTERM).success());
    let mut again = Vmm::start(&["resume", "--image", img_s], dir.path("c2.log"));
    again.wait_console("counter output after resume", T, |t| {
        !counters(t, 0).is_empty()
    });
    assert!(again.signal_and_wait(libc::SIGTERM).success());
    let err = again.stderr_text();
    assert!(
        err.contains("--dirty-budget 16384 does not fit this image's redo log")
            && err.contains("using 1530"),
        "{err}"
    );
}

/// Without `--log-size`, a guest smaller than 128 MiB gets redo-log halves
/// just large enough for all of its RAM logged whole (so its image is not
/// dominated by a 256 MiB log), and a larger guest gets 128 MiB halves.
#[test]
fn the_default_redo_log_follows_a_small_guests_ram() {
    require_kvm!();
    let dir = Scratch::new("logsize");
    for (mem, pages) in [("16M", 4096u64), ("256M", 65_536)] {
        let img = dir.path(&format!("vm-{mem}.img"));
        let img_s = img.to_str().unwrap();
        let mut vm = Vmm::start(
            &["run", "--image", img_s, "--guest", "counter", "--mem", mem],
            dir.path(&format!("c-{mem}.log")),
        );
        vm.wait_console("counter output", T, |t| !counters(t, 0).is_empty());
        assert!(vm.signal_and_wait(libc::SIGTERM).success());
        let j = inspect_json(img_s);
        let capacity = j["log_capacity_pages"].as_u64().unwrap();
        let len = std::fs::metadata(&img).unwrap().len();
        if pages < 32_655 {
            assert!(
                (pages..pages + 2).contains(&capacity),
                "{mem}: a half holds {capacity} pages, want just {pages}: {j}"
            );
            // RAM + two halves of ~1.004 × RAM + a few MiB of the rest.
            assert!(len < 4 * (pages << 12), "{mem}: image of {len} bytes");
        } else {
            assert_eq!(capacity, 32_655, "{mem}: {j}");
        }
    }
}

/// `run --force` killed with SIGKILL at moments spread over its start
/// (while it reserves RAM, formats, builds the VM, commits the first
/// epoch, runs): the path holds either the image it was replacing,
/// unchanged and resumable, or the whole new one, resumable; never a
/// half-made file, and no other file is left beside it.
#[test]
fn run_force_killed_while_making_its_image_leaves_the_old_or_the_new() {
    require_kvm!();
    // tmpfs, and the temp dir's file system (ext4 on the CI machines):
    // unnamed files and their orphan cleanup are each file system's own.
    run_force_killed_in(&Scratch::new("forcekill"));
    run_force_killed_in(&Scratch::under(&std::env::temp_dir(), "forcekill"));
}

fn run_force_killed_in(dir: &Scratch) {
    let img = dir.path("vm.img");
    let img_s = img.to_str().unwrap();
    let mut vm = Vmm::start(
        &["run", "--image", img_s, "--guest", "counter"],
        dir.path("c.log"),
    );
    vm.wait_console("counter output", T, |t| !counters(t, 0).is_empty());
    assert!(vm.signal_and_wait(libc::SIGTERM).success());
    let inspect = || inspect_json(img_s);
    let mut old = (inspect()["uuid"].clone(), std::fs::read(&img).unwrap());
    let (mut kept, mut replaced) = (0, 0);
    for round in 0..16u64 {
        // Every other round reserves 256 MiB first (~0.1 s on tmpfs), so
        // that kills land inside the reserve as well as after it.
        let delay = Duration::from_millis((round / 2) * 15);
        let mut args = vec!["run", "--image", img_s, "--force", "--guest", "counter"];
        if round % 2 == 0 {
            args.extend(["--mem", "256M", "--reserve"]);
        }
        let mut child = common::nvhv()
            .args(&args)
            .arg("--console")
            .arg(dir.path(&format!("c{round}.log")))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap();
        child.wait().unwrap();
        let j = inspect();
        assert_eq!(j["resumable"], true, "round {round}: {j}");
        if j["uuid"] == old.0 {
            assert!(
                std::fs::read(&img).unwrap() == old.1,
                "round {round}: the image being replaced changed"
            );
            kept += 1;
        } else {
            old = (j["uuid"].clone(), std::fs::read(&img).unwrap());
            replaced += 1;
        }
        let mut left: Vec<String> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".log") && !n.ends_with(".stderr") && !n.ends_with(".ctl"))
            .collect();
        left.sort();
        assert_eq!(left, ["vm.img"], "round {round}");
    }
    eprintln!(
        "{}: {kept} rounds left the old image, {replaced} the new one",
        dir.0.display()
    );
    assert!(kept > 0, "no kill landed before the new image was in place");
}

/// A stop signal while nvhv is still starting. `run`: SIGINT in the middle
/// of a `--reserve` cancels it between two pieces, saying so, and leaves
/// the path as it was (nothing, or under `--force` the old image). `resume`:
/// SIGTERM at moments spread over its first 10 ms either lands before nvhv's
/// `main()` has caught it (the default action kills it, silently) or
/// suspends the VM as soon as it runs (exit 0) — some of them before the
/// guest ran, which used to kill nvhv too; the image stays resumable.
#[test]
fn stop_signals_while_starting_cancel_a_run_and_suspend_a_resume() {
    require_kvm!();
    let dir = Scratch::new("startsig");
    let img = dir.path("vm.img");
    let img_s = img.to_str().unwrap();
    let interrupted_reserve = |force: bool| {
        let mut args = vec!["run", "--image", img_s, "--guest", "counter"];
        args.extend(["--mem", "3G", "--reserve"]);
        if force {
            args.push("--force");
        }
        let mut vm = Vmm::start(&args, dir.path("r.log"));
        // The progress line comes once the reserve has run 0.3 s (of ~1 s).
        let deadline = std::time::Instant::now() + T;
        while !vm.stderr_text().contains("reserving") {
            assert!(
                vm.child.try_wait().unwrap().is_none(),
                "{}",
                vm.stderr_text()
            );
            assert!(std::time::Instant::now() < deadline, "no progress line");
            std::thread::sleep(Duration::from_millis(5));
        }
        let st = vm.signal_and_wait(libc::SIGINT);
        let err = vm.stderr_text();
        assert_eq!(st.code(), Some(1), "{err}");
        assert!(
            err.contains("interrupted by SIGINT before the guest ran"),
            "{err}"
        );
        assert!(!err.contains("reserved"), "the reserve finished: {err}");
        let says = if force {
            "is left as it was"
        } else {
            "no image is at"
        };
        assert!(err.contains(says), "{err}");
    };
    interrupted_reserve(false);
    assert!(!img.exists());

    let mut vm = Vmm::start(
        &["run", "--image", img_s, "--guest", "counter"],
        dir.path("c.log"),
    );
    vm.wait_console("counter output", T, |t| !counters(t, 0).is_empty());
    assert!(vm.signal_and_wait(libc::SIGTERM).success());
    let before = std::fs::read(&img).unwrap();
    interrupted_reserve(true);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the old image changed"
    );

    let (mut early, mut killed) = (0, 0);
    for round in 0..60u64 {
        let mut vm = Vmm::start(
            &["resume", "--image", img_s],
            dir.path(&format!("s{round}.log")),
        );
        std::thread::sleep(Duration::from_micros((round % 20) * 500));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
        let Some(st) = common::wait_or_kill(&mut vm.child, T) else {
            panic!("round {round}: the SIGTERM was lost: {}", vm.stderr_text());
        };
        let err = vm.stderr_text();
        if st.code().is_none() {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(st.signal(), Some(libc::SIGTERM), "{err}");
            assert!(err.is_empty(), "killed after main() ran: {err}");
            killed += 1;
        } else {
            assert!(st.success(), "round {round}: {err}");
            assert!(err.contains("suspended: state durable"), "{err}");
            early += usize::from(err.contains("arrived before the guest ran"));
        }
        let j = inspect_json(img_s);
        assert_eq!(j["resumable"], true, "round {round}: {j}");
    }
    eprintln!("{early} resumes suspended a SIGTERM that came before the guest ran, {killed} killed before main()");
    assert!(early > 0, "no SIGTERM landed while a resume was starting");
}

/// SIGHUP (the terminal nvhv runs in hung up: a dropped ssh session) is an
/// orderly stop: a suspend-only VM, which a kill would lose, is suspended
/// and resumable. Started under `nohup` (SIGHUP ignored), nvhv leaves the
/// signal ignored and runs on.
#[test]
fn a_hangup_suspends_the_vm_unless_nvhv_runs_under_nohup() {
    require_kvm!();
    let (dir, img, mut vm) = running_counter("hangup", "suspend-only");
    let st = vm.signal_and_wait(libc::SIGHUP);
    assert!(st.success(), "{st}: {}", vm.stderr_text());
    assert!(
        vm.stderr_text().contains("state durable") && vm.stderr_text().contains("SIGHUP"),
        "{}",
        vm.stderr_text()
    );
    let j = inspect_json(img.to_str().unwrap());
    assert_eq!(j["resumable"], true, "{j}");

    let err = std::fs::File::create(dir.path("nohup.stderr")).unwrap();
    let mut child = std::process::Command::new("nohup")
        .arg(env!("CARGO_BIN_EXE_nvhv"))
        .args(["resume", "--image", img.to_str().unwrap()])
        .arg("--console")
        .arg(dir.path("nohup.log"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .expect("nohup");
    let stderr = || std::fs::read_to_string(dir.path("nohup.stderr")).unwrap_or_default();
    let deadline = std::time::Instant::now() + T;
    while !stderr().contains("resumed") {
        assert!(child.try_wait().unwrap().is_none(), "{}", stderr());
        assert!(std::time::Instant::now() < deadline, "never resumed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on our own child's pid (nohup execs nvhv in place).
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    // It runs on: the console keeps growing after the hangup.
    let lines =
        |p: &std::path::Path| counters(&std::fs::read_to_string(p).unwrap_or_default(), 0).len();
    let before = lines(&dir.path("nohup.log"));
    while lines(&dir.path("nohup.log")) < before + 2 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "SIGHUP stopped nvhv under nohup: {}",
            stderr()
        );
        assert!(std::time::Instant::now() < deadline, "no console output");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = common::wait_or_kill(&mut child, T).expect("SIGTERM did not stop it");
    assert!(st.success(), "{st}: {}", stderr());
    assert!(stderr().contains("after the SIGTERM"), "{}", stderr());
}

/// The terminal nvhv runs in really goes away: nvhv is a session leader
/// on a pseudo-terminal whose master is closed, so the kernel hangs the
/// session up (SIGHUP) and nvhv's stderr turns into a dead terminal. It
/// still suspends and exits 0 (a print to the dead terminal used to panic
/// after the commit: exit 101), and the suspend-only image is resumable.
#[test]
fn a_terminal_that_goes_away_suspends_the_vm() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    require_kvm!();
    let dir = Scratch::new("pty");
    let img = dir.path("vm.img");
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the integers given; the
    // name, termios and winsize pointers may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened for us and are owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = common::nvhv();
    cmd.args(["run", "--image", img.to_str().unwrap()])
        .args(["--persist", "suspend-only", "--guest", "counter"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    let master_fd = master.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls: close
    // the master (openpty's descriptors are inherited, and a master left
    // open in nvhv would keep its terminal alive), setsid, and the ioctl
    // that makes the pty (stdin) the controlling terminal.
    unsafe {
        cmd.pre_exec(move || {
            libc::close(master_fd);
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(slave);
    // Read the terminal until nvhv says it runs and the guest has printed.
    let mut seen = String::new();
    let mut m = std::fs::File::from(master.try_clone().unwrap());
    let deadline = std::time::Instant::now() + T;
    while !(seen.contains("nvhv: running") && seen.contains("counter 0 ")) {
        let mut buf = [0u8; 4096];
        let n = std::io::Read::read(&mut m, &mut buf).unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        assert!(std::time::Instant::now() < deadline, "{seen}");
    }
    drop((m, master));
    let st = common::wait_or_kill(&mut child, T).expect("a hangup did not stop nvhv");
    assert_eq!(st.code(), Some(0), "{st}");
    let j = inspect_json(img.to_str().unwrap());
    assert_eq!(j["resumable"], true, "{j}");
}

/// A `run --force` killed between linking its new image under a hidden
/// name beside the path and renaming it over the path leaves a whole image
/// that nobody knows of (with `--reserve`, all of the VM's RAM). The next
/// resume of the path removes it once its guest runs, and the next run of
/// the path before it makes its image, each saying so. Names it does not
/// own (another pid-less name, another image's) are left alone.
#[test]
fn leftovers_of_a_killed_replacing_run_go_with_the_next_resume_or_run() {
    require_kvm!();
    let (dir, img, mut vm) = running_counter("leftovers", "epoch");
    assert!(vm.signal_and_wait(libc::SIGTERM).success());
    let img_s = img.to_str().unwrap();
    // Above the largest pid_max (2^22): no live process can own it.
    let left = dir.path(".vm.img.nvhv-new-4194305");
    let others = [
        dir.path(".vm.img.nvhv-new-"),
        dir.path(".other.img.nvhv-new-7"),
    ];
    for p in others.iter().chain([&left]) {
        std::fs::copy(&img, p).unwrap();
    }
    let name = left.file_name().unwrap().to_str().unwrap().to_owned();
    let said = |t: &str| t.contains("nvhv: removed") && t.contains(&name);
    // `inspect` names it, and leaves it (and the other names) be.
    let j = inspect_json(img_s);
    let found = j["leftovers"].as_array().expect("leftovers");
    assert_eq!(found.len(), 1, "{j}");
    assert_eq!(found[0]["path"], left.to_str().unwrap(), "{j}");
    assert!(found[0]["bytes"].as_u64().unwrap() > 0, "{j}");
    let text = nvhv_output(&["inspect", img_s]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("leftover   {name}")), "{text}");
    assert!(left.exists());

    let mut vm = Vmm::start(&["resume", "--image", img_s], dir.path("r.log"));
    vm.wait_stderr("the leftover's removal", T, said);
    assert!(!left.exists());
    assert!(vm.stderr_text().contains("resumed"), "{}", vm.stderr_text());
    assert!(vm.signal_and_wait(libc::SIGTERM).success());

    std::fs::copy(&img, &left).unwrap();
    let args = ["run", "--force", "--image", img_s, "--guest", "counter"];
    let mut vm = Vmm::start(&args, dir.path("f.log"));
    vm.wait_console("counter output", T, |t| !counters(t, 0).is_empty());
    let text = vm.stderr_text();
    assert!(said(&text) && !left.exists(), "{text}");
    // Before the image was made: the removal is said before "running".
    assert!(text.find("removed") < text.find("running"), "{text}");
    assert!(vm.signal_and_wait(libc::SIGTERM).success());
    for p in &others {
        assert!(p.exists(), "{} was removed", p.display());
    }
}
