//! The built-in guests: `no_std` ELF images from the `guest/` workspace,
//! built by `build.rs` and embedded in the binary. [`builtin`] hands out an
//! image by name; [`BUILTIN`] lists names and one-line descriptions (for
//! `--help` and error messages).
//!
//! Adding a guest: its package under `guest/` (member of `guest/Cargo.toml`),
//! its name in `GUESTS` of `build.rs`, and one line in the table below.

/// Declares the table of embedded guests: `name => description`. The image of
/// `name` is `$OUT_DIR/<name>.elf`, put there by `build.rs`.
macro_rules! guests {
    ($($name:literal => $desc:literal,)*) => {
        /// The built-in guests: `(name, one-line description)`.
        pub const BUILTIN: &[(&str, &str)] = &[$(($name, $desc)),*];

        /// The ELF image of the built-in guest `name`, if there is one.
        pub fn builtin(name: &str) -> Option<&'static [u8]> {
            match name {
                $($name => Some(include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".elf"))),)*
                _ => None,
            }
        }
    };
}

guests! {
    "counter" => "every vCPU counts in guest RAM; vCPU 0 prints `counter <vcpu> <value>` every 100 ms",
    "ticker" => "CPL0 entry, 1 kHz LAPIC timer interrupt; vCPU 0 prints `ticks <n>` every 100 ticks",
    "kv" => "the default guest: a Redis-compatible key-value store (RESP2) served over virtio-vsock port 6379",
}

/// Names of the built-in guests, for messages.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().map(|(name, _)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Checks the ELF64 header and program headers; returns the entry CPL
    /// that the image's nvhv note asks for, if any.
    fn check_elf(name: &str, elf: &[u8]) -> Option<u32> {
        const PT_LOAD: u32 = 1;
        const PT_DYNAMIC: u32 = 2;
        const PT_INTERP: u32 = 3;
        const PT_NOTE: u32 = 4;
        assert_eq!(&elf[..4], b"\x7fELF", "{name}: magic");
        assert_eq!(elf[4], 2, "{name}: ELFCLASS64");
        assert_eq!(elf[5], 1, "{name}: little endian");
        assert_eq!(u16_at(elf, 16), 2, "{name}: ET_EXEC");
        assert_eq!(u16_at(elf, 18), 62, "{name}: EM_X86_64");
        let entry = u64_at(elf, 24);
        assert!(
            entry >= nvhv_abi::LOAD_MIN,
            "{name}: entry {entry:#x} below LOAD_MIN"
        );
        let phoff = u64_at(elf, 32) as usize;
        let phentsize = u16_at(elf, 54) as usize;
        let phnum = u16_at(elf, 56) as usize;
        assert!(phentsize >= 56 && phnum > 0, "{name}: program headers");
        let mut cpl = None;
        let mut loads = 0;
        let mut entry_loaded = false;
        for i in 0..phnum {
            let ph = &elf[phoff + i * phentsize..][..56];
            let (kind, flags, off, vaddr, paddr, filesz, memsz) = (
                u32_at(ph, 0),
                u32_at(ph, 4),
                u64_at(ph, 8) as usize,
                u64_at(ph, 16),
                u64_at(ph, 24),
                u64_at(ph, 32) as usize,
                u64_at(ph, 40),
            );
            assert!(
                kind != PT_DYNAMIC && kind != PT_INTERP,
                "{name}: not static"
            );
            if kind == PT_LOAD {
                loads += 1;
                assert!(vaddr >= nvhv_abi::LOAD_MIN, "{name}: segment at {vaddr:#x}");
                assert_eq!(vaddr, paddr, "{name}: identity-mapped segment");
                assert!(
                    filesz as u64 <= memsz && off + filesz <= elf.len(),
                    "{name}: segment size"
                );
                if (vaddr..vaddr + memsz).contains(&entry) {
                    assert!(flags & 1 != 0, "{name}: entry in a non-executable segment");
                    entry_loaded = true;
                }
            }
            if kind == PT_NOTE {
                match nvhv_abi::note_entry_cpl(&elf[off..off + filesz]) {
                    Ok(Some(c)) => cpl = Some(c),
                    Ok(None) => {}
                    Err(e) => panic!("{name}: malformed nvhv note: {e}"),
                }
            }
        }
        assert!(loads > 0, "{name}: no PT_LOAD");
        assert!(
            entry_loaded,
            "{name}: entry {entry:#x} outside the loaded segments"
        );
        cpl
    }

    #[test]
    fn embedded_guests_are_static_x86_64_executables() {
        assert!(!BUILTIN.is_empty());
        for &(name, desc) in BUILTIN {
            assert!(!desc.is_empty());
            let elf = builtin(name).unwrap_or_else(|| panic!("{name} not embedded"));
            check_elf(name, elf);
        }
        assert!(builtin("no-such-guest").is_none());
    }

    #[test]
    fn ticker_asks_for_cpl0_and_counter_does_not() {
        assert_eq!(check_elf("ticker", builtin("ticker").unwrap()), Some(0));
        assert_eq!(check_elf("counter", builtin("counter").unwrap()), None);
    }
}
