//! The built-in guest ABI: what the nvhv VMM promises a `no_std` guest at entry,
//! and the ports through which the guest talks back.
//!
//! Both sides compile this crate: the VMM (`nvhv`) fills [`BootInfo`] and builds
//! the page tables and TSS at the addresses below; the guests under `guest/`
//! read them. Everything here is `#[repr(C)]` plain data with fixed addresses,
//! so the layout is the contract. Bump [`BOOT_INFO_VERSION`] on any change.
//!
//! Entry state (`guest/README.md` says how the built-in guests use it):
//! - 64-bit long mode, paging on, every page of `[0, map_end)` identity-mapped
//!   with 2 MiB pages, user bit set at every level (so CPL3 can use them);
//! - CPL3 by default; CPL0 if the ELF carries an nvhv note asking for it
//!   ([`NOTE_NAME`], [`NOTE_TYPE_ENTRY`]);
//! - a CPL3 guest is confined to CPL3: the first 2 MiB (page tables, GDT,
//!   TSSs, boot info, kvmclock) are mapped read-only, `syscall` is disabled
//!   (EFER.SCE = 0), `sysenter` faults and there is no IDT, so any attempt to
//!   reach CPL0 (or to write those tables) is a triple fault. The VMM relies
//!   on it to save only what CPL3 code can change at each epoch;
//! - `rdi` = guest-physical address of the [`BootInfo`] block, `rsi` = vCPU index,
//!   `rsp` = top of this vCPU's stack, `rflags` = 0x2 (no interrupts, no IOPL:
//!   port I/O is granted by the TSS I/O permission bitmap);
//! - every vCPU enters the same entry point at the same time.
#![no_std]

/// Guest-physical address of the level-4 page table.
pub const PML4_ADDR: u64 = 0x1000;
/// Guest-physical address of the (single) page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x2000;
/// Guest-physical address of the GDT (null, kernel CS/DS, user DS/CS, TSS).
pub const GDT_ADDR: u64 = 0x3000;
/// Guest-physical address of the first TSS. vCPU `i` uses `TSS_ADDR + i * TSS_STRIDE`.
pub const TSS_ADDR: u64 = 0x1_0000;
/// Distance between per-vCPU TSSs (0x68 bytes + 8 KiB I/O bitmap + end byte, page aligned).
pub const TSS_STRIDE: u64 = 0x3000;
/// Guest-physical address of the [`BootInfo`] block.
pub const BOOT_INFO_ADDR: u64 = 0x7000;
/// Guest-physical address of the [`WallClock`] record. The VMM writes it
/// before the guest first runs and again on every resume, so guests can tell
/// Unix time: `kvmclock ns + unix_minus_kvmclock_ns`.
pub const WALL_CLOCK_ADDR: u64 = 0x7f00;
/// Magic of a valid [`WallClock`] ("NVHVWALL").
pub const WALL_CLOCK_MAGIC: u64 = u64::from_le_bytes(*b"NVHVWALL");

/// Unix time relative to kvmclock, at [`WALL_CLOCK_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WallClock {
    /// [`WALL_CLOCK_MAGIC`] once the VMM has written the record.
    pub magic: u64,
    /// Unix time in ns minus kvmclock ns, as of the last boot or resume.
    pub unix_minus_kvmclock_ns: i64,
}

/// Guest-physical address of the kvmclock area: vCPU `i` has its
/// `pvclock_vcpu_time_info` (32 bytes) at `KVMCLOCK_ADDR + 32 * i`.
pub const KVMCLOCK_ADDR: u64 = 0x8000;
/// Guest-physical address of the [`Hints`] record: advice the VMM updates
/// while the guest runs (a page of its own, read-only for CPL3 guests like
/// the rest of the first 2 MiB). A guest may ignore it. The VMM writes it
/// without marking the page dirty, so it is not part of the persistent
/// state: after a resume it reads as whatever was last captured, possibly
/// stale, until the VMM writes it again.
pub const HINTS_ADDR: u64 = 0x9000;

/// Advice from the VMM, at [`HINTS_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// Non-zero while the VMM holds output the guest sent (epoch mode: it is
    /// released when the epoch that produced it commits). A guest with
    /// nothing left to do should park at the wait port now instead of
    /// polling: nothing it sends reaches anyone before that commit, and the
    /// commit can start without interrupting a parked guest.
    pub output_held: u32,
}

/// Guest-physical address of the first page directory (one per GiB mapped).
pub const PD_ADDR: u64 = 0x10_0000;
/// First guest-physical address free for the guest's ELF segments.
pub const LOAD_MIN: u64 = 0x20_0000;
/// Maximum number of vCPUs (limited by the TSS area below `PD_ADDR`).
pub const MAX_VCPUS: u32 = 64;
/// Bytes of stack per vCPU, carved from the top of guest RAM downwards.
pub const STACK_SIZE: u64 = 256 * 1024;

/// GDT selectors.
pub const SEL_KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const SEL_KERNEL_DS: u16 = 0x10;
/// User data selector (RPL 3).
pub const SEL_USER_DS: u16 = 0x1b;
/// User 64-bit code selector (RPL 3).
pub const SEL_USER_CS: u16 = 0x23;
/// TSS selector of vCPU `i` is `SEL_TSS_BASE + 16 * i`.
pub const SEL_TSS_BASE: u16 = 0x28;

/// COM1 16550 UART base port (8 registers). Writing THR (offset 0) prints a byte.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Wait port: a 32-bit `out` of a timeout in microseconds parks the vCPU until a
/// device has work for the guest or the timeout passes (0 = no timeout;
/// [`WAIT_FOREVER`]: until the VM stops).
pub const WAIT_PORT: u16 = 0x510;
/// Written to [`WAIT_PORT`]: park this vCPU until the VM stops; device work
/// does not wake it. For vCPUs with nothing to do (the kv guest's vCPUs
/// other than 0), which would otherwise enter the guest again on every
/// device notification only to park again. (A VMM that predates it reads a
/// timeout of ~71 minutes.)
pub const WAIT_FOREVER: u32 = u32::MAX;
/// Exit port: a 32-bit `out` stops the VM (guest-requested power off) with that status.
pub const EXIT_PORT: u16 = 0x514;
/// Panic port: a 32-bit `out` reports a guest panic; the VMM stops the VM and reports it.
pub const PANIC_PORT: u16 = 0x518;

/// Output-dependency port (optional, epoch mode): a 32-bit `out` of the
/// guest-physical address of the guest's output-dependency area (8-byte
/// aligned, in RAM below 4 GiB, owned by the guest; 0 unregisters): a `u64`
/// **state version** followed by [`DEPS_SLOTS`] `u64` **dependency slots**.
/// The guest promises that
/// - the version only grows, and grows after every change of its state
///   that later output may depend on;
/// - before it sends virtio-vsock data on the connection from host port
///   `p`, slot `p % DEPS_SLOTS` is at least the version after the last
///   change that data (or any earlier data on that connection) depends on,
///   and slots only grow.
///
/// In return, data the device takes while that slot is at most the version
/// at the last committed epoch is released at once instead of being held
/// until the epoch that produced it commits (a reply showing only durable
/// state depends on nothing a crash can lose). A guest that never
/// registers has all its output held. The registration is part of the
/// VM's state.
pub const OUTPUT_DEPS_PORT: u16 = 0x51c;
/// Number of per-connection slots after the state version (see
/// [`OUTPUT_DEPS_PORT`]).
pub const DEPS_SLOTS: usize = 1024;

/// vsock CID of the guest (the virtio-vsock device's `guest_cid`).
pub const GUEST_CID: u64 = 3;
/// vsock port on which the built-in key-value guest listens; host connections
/// accepted on `--listen` are forwarded to it.
pub const KV_VSOCK_PORT: u32 = 6379;

/// Name of the ELF note (in a `PT_NOTE` segment) through which a guest asks for
/// entry conditions other than the defaults.
pub const NOTE_NAME: &[u8] = b"nvhv";
/// Note type whose 4-byte descriptor is the CPL to enter at (0 or 3).
pub const NOTE_TYPE_ENTRY_CPL: u32 = 1;

/// Magic at the start of [`BootInfo`] ("NVHVBOOT").
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"NVHVBOOT");
/// Version of the [`BootInfo`] layout.
pub const BOOT_INFO_VERSION: u32 = 1;
/// Maximum number of virtio-mmio windows described in [`BootInfo`].
pub const MAX_MMIO: usize = 8;

/// One virtio-mmio device window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioWindow {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Size of the window in bytes (0x200 for virtio-mmio).
    pub size: u64,
}

/// The boot-info block at [`BOOT_INFO_ADDR`], pointed to by `rdi` at entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM is `[0, ram_bytes)`.
    pub ram_bytes: u64,
    /// Identity mapping covers `[0, map_end)`.
    pub map_end: u64,
    /// First byte after the highest loaded ELF segment (page aligned).
    pub image_end: u64,
    /// Lowest stack byte: stacks occupy `[stacks_base, ram_bytes)`, vCPU `i`'s
    /// stack top is `ram_bytes - i * STACK_SIZE`. Memory in `[image_end, stacks_base)`
    /// is free for the guest's heap.
    pub stacks_base: u64,
    /// TSC frequency in kHz as KVM reports it.
    pub tsc_khz: u64,
    /// Guest-physical address of vCPU 0's kvmclock record (see [`KVMCLOCK_ADDR`]).
    pub kvmclock_addr: u64,
    /// Random seed, fresh for every new VM (not changed by resume).
    pub seed: u64,
    /// Number of valid entries in `mmio`.
    pub mmio_count: u32,
    /// Reserved, zero.
    pub _pad: u32,
    /// virtio-mmio windows, in device order.
    pub mmio: [MmioWindow; MAX_MMIO],
}

/// The kvmclock record KVM maintains for each vCPU (`struct pvclock_vcpu_time_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PvclockVcpuTimeInfo {
    /// Odd while KVM updates the record.
    pub version: u32,
    /// Padding.
    pub pad0: u32,
    /// TSC value at the time `system_time` was sampled.
    pub tsc_timestamp: u64,
    /// Nanoseconds of kvmclock time at `tsc_timestamp`.
    pub system_time: u64,
    /// Multiplier (32.32 fixed point after the shift).
    pub tsc_to_system_mul: u32,
    /// Shift applied to the TSC delta before the multiplier (may be negative).
    pub tsc_shift: i8,
    /// Flags (bit 0: TSC stable).
    pub flags: u8,
    /// Padding.
    pub pad: [u8; 2],
}

impl PvclockVcpuTimeInfo {
    /// kvmclock nanoseconds at TSC value `tsc`, per the pvclock formula.
    pub fn nanos_at(&self, tsc: u64) -> u64 {
        let mut delta = tsc.wrapping_sub(self.tsc_timestamp);
        if self.tsc_shift >= 0 {
            delta <<= self.tsc_shift as u32;
        } else {
            delta >>= (-(self.tsc_shift as i32)) as u32;
        }
        let scaled = ((delta as u128 * self.tsc_to_system_mul as u128) >> 32) as u64;
        self.system_time.wrapping_add(scaled)
    }
}

/// Guest-physical base of the local APIC's xAPIC register page. A guest that
/// programs the LAPIC (the `ticker` built-in guest, at CPL0) reaches it through
/// the identity mapping, so that mapping must cover this page (`map_end` above it).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Offset of the RSP0 field (stack for interrupts taken at CPL3) inside a TSS.
pub const TSS_RSP0_OFFSET: u64 = 4;

/// The entry CPL that an nvhv note asks for, if any: `notes` is the content of
/// one `PT_NOTE` segment (a sequence of standard ELF notes: `namesz`, `descsz`,
/// `type`, the name padded to 4 bytes, the descriptor padded to 4 bytes).
///
/// The note's name is [`NOTE_NAME`], stored with its terminating NUL as the ELF
/// specification says (`namesz` = 5); a name stored without the NUL is accepted
/// too. The first note of type [`NOTE_TYPE_ENTRY_CPL`] wins; its first 4
/// bytes (little endian) are the CPL. `Ok(None)`: no such note. An error
/// names what is malformed: a note whose name or descriptor runs past the
/// segment, or our note with a descriptor shorter than 4 bytes (fewer than 12
/// bytes left at the end are ignored, as padding).
pub fn note_entry_cpl(notes: &[u8]) -> Result<Option<u32>, &'static str> {
    fn word(b: &[u8], at: usize) -> Option<u32> {
        let w = b.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
    }
    fn pad4(n: usize) -> Option<usize> {
        Some(n.checked_add(3)? & !3)
    }
    let mut at = 0usize;
    while at.checked_add(12).is_some_and(|end| end <= notes.len()) {
        let (Some(namesz), Some(descsz), Some(kind)) =
            (word(notes, at), word(notes, at + 4), word(notes, at + 8))
        else {
            return Err("note header");
        };
        let (namesz, descsz) = (namesz as usize, descsz as usize);
        let name_at = at + 12;
        let desc_at = pad4(namesz)
            .and_then(|n| name_at.checked_add(n))
            .ok_or("note name")?;
        let next = pad4(descsz)
            .and_then(|n| desc_at.checked_add(n))
            .ok_or("note descriptor")?;
        let name = name_at
            .checked_add(namesz)
            .and_then(|end| notes.get(name_at..end))
            .ok_or("note name")?;
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        if name == NOTE_NAME && kind == NOTE_TYPE_ENTRY_CPL {
            if descsz < 4 {
                return Err("note descriptor");
            }
            return word(notes, desc_at).map(Some).ok_or("note descriptor");
        }
        at = next;
    }
    Ok(None)
}

/// Stack top of vCPU `index` in a VM with `ram_bytes` of RAM.
pub const fn stack_top(ram_bytes: u64, index: u32) -> u64 {
    ram_bytes - index as u64 * STACK_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_fits_below_kvmclock() {
        assert!(BOOT_INFO_ADDR + core::mem::size_of::<BootInfo>() as u64 <= KVMCLOCK_ADDR);
    }

    #[test]
    fn wall_clock_lies_between_boot_info_and_kvmclock() {
        assert!(BOOT_INFO_ADDR + core::mem::size_of::<BootInfo>() as u64 <= WALL_CLOCK_ADDR);
        assert!(WALL_CLOCK_ADDR + core::mem::size_of::<WallClock>() as u64 <= KVMCLOCK_ADDR);
    }

    #[test]
    fn kvmclock_area_fits_below_tss() {
        assert!(KVMCLOCK_ADDR + 32 * MAX_VCPUS as u64 <= TSS_ADDR);
        assert_eq!(core::mem::size_of::<PvclockVcpuTimeInfo>(), 32);
    }

    #[test]
    fn tss_area_fits_below_page_directories() {
        assert!(TSS_ADDR + TSS_STRIDE * MAX_VCPUS as u64 <= PD_ADDR);
        const { assert!(0x68 + 8192 < TSS_STRIDE) };
    }

    #[test]
    fn entry_cpl_note_parses() {
        // Another vendor's note first, then ours (namesz 5, "nvhv\0" padded to 8).
        let notes: [u8; 40] = [
            4, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, b'G', b'N', b'U', 0, // GNU note, no desc
            5, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, b'n', b'v', b'h', b'v', 0, 0, 0, 0, //
            0, 0, 0, 0,
        ];
        assert_eq!(note_entry_cpl(&notes), Ok(Some(0)));
        let mut cpl3 = notes;
        cpl3[36] = 3;
        assert_eq!(note_entry_cpl(&cpl3), Ok(Some(3)));
        // Name without its NUL.
        let bare: [u8; 20] = [
            4, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, b'n', b'v', b'h', b'v', 3, 0, 0, 0,
        ];
        assert_eq!(note_entry_cpl(&bare), Ok(Some(3)));
        // Other type, empty, a short tail: no note.
        let mut other = notes;
        other[24] = 2;
        assert_eq!(note_entry_cpl(&other), Ok(None));
        assert_eq!(note_entry_cpl(&[]), Ok(None));
        assert_eq!(note_entry_cpl(&notes[..11]), Ok(None));
        // Malformed: our descriptor cut off, a name past the end, a short descriptor.
        assert!(note_entry_cpl(&notes[..38]).is_err());
        assert!(note_entry_cpl(&[0xff; 16]).is_err());
        let mut short = bare;
        short[4] = 2;
        assert!(note_entry_cpl(&short).is_err());
    }

    #[test]
    fn pvclock_formula_scales_and_shifts() {
        let c = PvclockVcpuTimeInfo {
            tsc_timestamp: 1000,
            system_time: 5,
            tsc_to_system_mul: 1 << 31, // x0.5
            tsc_shift: 1,               // x2
            ..Default::default()
        };
        assert_eq!(c.nanos_at(1100), 5 + 100);
        let d = PvclockVcpuTimeInfo { tsc_shift: -1, ..c };
        assert_eq!(d.nanos_at(1100), 5 + 25);
    }
}
