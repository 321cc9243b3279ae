//! The built-in guests, embedded in the binary at build time (see `build.rs`).
