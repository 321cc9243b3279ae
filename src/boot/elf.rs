//! ELF payloads for the built-in guest ABI: loads the `PT_LOAD` segments with
//! linux-loader and reads nvhv's own note (entry CPL) from the `PT_NOTE`
//! segments.

use std::io::Cursor;

use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::GuestAddress;

use crate::devices::GuestMemory;
use crate::vstate::vcpu::EntryCpl;

/// Errors while loading a guest ELF.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// linux-loader refused the ELF or a segment does not fit in RAM.
    #[error("cannot load the guest ELF")]
    Load(#[source] linux_loader::loader::Error),
    /// The ELF's nvhv note asks for something unsupported.
    #[error("guest ELF's nvhv note asks for entry CPL {0}; only 0 and 3 exist")]
    BadCpl(u32),
    /// The ELF is malformed where we parse it ourselves.
    #[error("malformed guest ELF: {0}")]
    Malformed(&'static str),
    /// A segment lies below the ABI's first free address.
    #[error("guest ELF loads below {min:#x} (entry {entry:#x}), over the ABI's fixed structures", min = nvhv_abi::LOAD_MIN)]
    TooLow {
        /// Entry point.
        entry: u64,
    },
}

/// A loaded guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedElf {
    /// Entry point.
    pub entry: u64,
    /// End of the highest segment, rounded up to a page.
    pub end: u64,
    /// Privilege level the guest asks to be entered at.
    pub cpl: EntryCpl,
}

/// Load `image` into `mem`. Segments must lie in `[LOAD_MIN, ram)`.
pub fn load(mem: &GuestMemory, image: &[u8]) -> Result<LoadedElf, ElfError> {
    let cpl = entry_cpl(image)?;
    let mut cursor = Cursor::new(image);
    let r = Elf::load(
        mem,
        None,
        &mut cursor,
        Some(GuestAddress(nvhv_abi::LOAD_MIN)),
    )
    .map_err(|e| match e {
        linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::InvalidEntryAddress) => {
            ElfError::TooLow {
                entry: read_u64(image, 24).unwrap_or(0),
            }
        }
        e => ElfError::Load(e),
    })?;
    Ok(LoadedElf {
        entry: r.kernel_load.0,
        end: r.kernel_end.div_ceil(4096) * 4096,
        cpl,
    })
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The CPL the guest asks for in its nvhv note (`PT_NOTE`, name "nvhv", type
/// [`nvhv_abi::NOTE_TYPE_ENTRY_CPL`]); CPL3 when there is no such note.
pub fn entry_cpl(image: &[u8]) -> Result<EntryCpl, ElfError> {
    const PT_NOTE: u32 = 4;
    let bad = ElfError::Malformed;
    if image.get(..4) != Some(b"\x7fELF") {
        return Err(bad("no ELF magic"));
    }
    let phoff = read_u64(image, 32).ok_or(bad("short header"))? as usize;
    let phentsize = read_u16(image, 54).ok_or(bad("short header"))? as usize;
    let phnum = read_u16(image, 56).ok_or(bad("short header"))? as usize;
    if phentsize < 56 {
        return Err(bad("program header size"));
    }
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or(bad("phdr overflow"))?)
            .ok_or(bad("phdr overflow"))?;
        let p_type = read_u32(image, ph).ok_or(bad("phdr out of file"))?;
        if p_type != PT_NOTE {
            continue;
        }
        let off = read_u64(image, ph + 8).ok_or(bad("phdr out of file"))? as usize;
        let size = read_u64(image, ph + 32).ok_or(bad("phdr out of file"))? as usize;
        let notes = image
            .get(off..off.checked_add(size).ok_or(bad("note overflow"))?)
            .ok_or(bad("note out of file"))?;
        match nvhv_abi::note_entry_cpl(notes).map_err(bad)? {
            Some(0) => return Ok(EntryCpl::Cpl0),
            Some(3) => return Ok(EntryCpl::Cpl3),
            Some(n) => return Err(ElfError::BadCpl(n)),
            None => {}
        }
    }
    Ok(EntryCpl::Cpl3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_elf_is_malformed() {
        assert!(matches!(
            entry_cpl(b"QFI\xfb...."),
            Err(ElfError::Malformed(_))
        ));
        assert!(matches!(entry_cpl(b"\x7fELF"), Err(ElfError::Malformed(_))));
    }
}
