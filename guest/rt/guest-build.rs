// Build script shared by every built-in guest binary: each guest's own
// `build.rs` is the single line `include!("../rt/guest-build.rs");`.
//
// A guest is built for the host target (`x86_64-unknown-linux-gnu`, the only
// one installed) but must come out as a static, relocation-free ELF at the
// addresses of `rt/link.ld`, without the C runtime. These flags do that; they
// apply to this package's binaries only, so the `nvhv-rt` library and any
// build scripts are untouched.

fn main() {
    let manifest_dir = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let script = manifest_dir.join("../rt/link.ld");
    let script = script
        .canonicalize()
        .unwrap_or_else(|e| panic!("linker script {}: {e}", script.display()));
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
        "-Wl,-u,_start",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../rt/guest-build.rs");
}
