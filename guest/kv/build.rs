//! Links this guest with nvhv-rt's linker script and flags (shared by all guests).
include!("../rt/guest-build.rs");
