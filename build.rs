//! Build script of the `nvhv` crate: builds the built-in `no_std` guests
//! (the separate cargo workspace under `guest/`) and copies their ELF images
//! into `OUT_DIR`, where `src/guests.rs` embeds them with `include_bytes!`.
//!
//! The guests are built by a nested `cargo build --release` with its own
//! target directory inside `OUT_DIR` (sharing the outer build's target
//! directory would deadlock on its lock) and with the outer build's
//! environment (flags, wrappers, profile and target settings) removed, so the
//! guests always get the flags of `guest/rt/guest-build.rs` and nothing else.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest binaries to build and embed, by package (= binary) name. Adding
/// a guest: add its directory to `guest/Cargo.toml`'s members, its name here
/// and a line in the table of `src/guests.rs`.
const GUESTS: &[&str] = &["counter", "ticker", "kv"];

/// The only target installed here; named explicitly so that a `build.target`
/// in some cargo config cannot redirect the guests.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Variables of the outer cargo invocation that must not reach the nested one:
/// they would change its flags, profile, target or target directory.
fn leaks_into_nested_cargo(name: &str) -> bool {
    // Keep what only says where cargo's home, registries and network are, and
    // the jobserver (so the nested build shares the outer build's job slots).
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_MAKEFLAGS",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    if name.starts_with("CARGO_") {
        return !KEEP.iter().any(|k| name.starts_with(k));
    }
    name.starts_with("__CARGO")
        || matches!(
            name,
            "RUSTFLAGS"
                | "RUSTDOCFLAGS"
                | "RUSTC_WRAPPER"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "RUSTC_LINKER"
                | "TARGET"
                | "HOST"
                | "PROFILE"
                | "OPT_LEVEL"
                | "DEBUG"
                | "OUT_DIR"
                | "NUM_JOBS"
        )
}

/// Asks cargo to rerun this script when anything under `dir` changes, except
/// build output (`target/`) and hidden entries.
fn watch_tree(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        println!("cargo:rerun-if-changed={}", dir.display());
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "target" || name.starts_with('.') {
            continue;
        }
        // Cargo watches a directory's whole content.
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
}

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest_dir = manifest_dir.join("guest");
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));

    println!("cargo:rerun-if-changed=build.rs");
    watch_tree(&guest_dir);
    // The kv guest's engine lives in the root workspace (so its tests run with
    // `cargo test --workspace`) and is compiled into the kv guest too.
    watch_tree(&manifest_dir.join("kvstore"));
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("abi/src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("abi/Cargo.toml").display()
    );

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_dir)
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--target-dir")
        .arg(&target_dir);
    for g in GUESTS {
        cmd.arg("--bin").arg(g);
    }
    for (name, _) in env::vars_os() {
        if name.to_str().is_some_and(leaks_into_nested_cargo) {
            cmd.env_remove(&name);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run {} to build the guests: {e}",
            cargo.to_string_lossy()
        )
    });
    assert!(
        status.success(),
        "building the built-in guests failed ({status}); rerun by hand: \
         cargo build --release --manifest-path guest/Cargo.toml"
    );

    let built = target_dir.join(GUEST_TARGET).join("release");
    for g in GUESTS {
        let from = built.join(g);
        let to = out_dir.join(format!("{g}.elf"));
        fs::copy(&from, &to)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    }
}
