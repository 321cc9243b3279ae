//! The built-in guest ABI, host side: writes the identity page tables, the
//! GDT, one TSS per vCPU (with an I/O permission bitmap that opens only the
//! guest's ports — IOPL is ignored on our hosts) and the boot-info block into
//! guest RAM at the addresses fixed by the `nvhv_abi` crate.

use nvhv_abi::{BootInfo, MmioWindow};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::GuestMemory;
use crate::nvram::Bytes as ByteCount;

/// Errors while laying out the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum GuestAbiError {
    /// Guest RAM is too small for the fixed structures, stacks and the guest.
    #[error("guest RAM of {} is too small: the built-in ABI needs at least {} for this many vCPUs", ByteCount(*ram), ByteCount(*need))]
    RamTooSmall {
        /// RAM size.
        ram: u64,
        /// Minimum.
        need: u64,
    },
    /// Guest RAM is too large for the page-directory area.
    #[error("guest RAM of {} is too large: the built-in ABI maps at most {}", ByteCount(*ram), ByteCount(*max))]
    RamTooLarge {
        /// RAM size.
        ram: u64,
        /// Largest RAM the ABI's page directories map.
        max: u64,
    },
    /// Too many vCPUs.
    #[error("{0} vCPUs requested; the built-in ABI supports 1 to {max}", max = nvhv_abi::MAX_VCPUS)]
    Vcpus(u32),
    /// Writing guest memory failed.
    #[error("writing boot structures into guest memory failed")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
/// Limit of each TSS: 0x68 bytes of TSS, 8 KiB of I/O bitmap, one 0xff end byte.
pub const TSS_LIMIT: u32 = 0x68 + 8192;
/// Number of fixed GDT entries before the TSS descriptors.
const GDT_FIXED: u64 = 5;
/// Ports the guest may use: the serial port's 8 registers and the nvhv ports.
const GUEST_PORTS: &[(u16, u16)] = &[
    (nvhv_abi::SERIAL_PORT, 8),
    (nvhv_abi::WAIT_PORT, 4),
    (nvhv_abi::EXIT_PORT, 4),
    (nvhv_abi::PANIC_PORT, 4),
    (nvhv_abi::OUTPUT_DEPS_PORT, 4),
];

/// GDT limit for `vcpus` TSS descriptors.
pub fn gdt_limit(vcpus: u32) -> u16 {
    (GDT_FIXED * 8 + 16 * vcpus as u64 - 1) as u16
}

/// Where things are for a VM of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// RAM size.
    pub ram_bytes: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// Base of the MMIO device area (1 GiB, after RAM and never below 4 GiB,
    /// so the local APIC page at 0xfee00000 is always identity-mapped).
    pub mmio_base: u64,
    /// End of the identity mapping.
    pub map_end: u64,
}

impl Layout {
    /// Compute and check the layout.
    pub fn new(ram_bytes: u64, vcpus: u32) -> Result<Self, GuestAbiError> {
        if vcpus == 0 || vcpus > nvhv_abi::MAX_VCPUS {
            return Err(GuestAbiError::Vcpus(vcpus));
        }
        let need = nvhv_abi::LOAD_MIN + MIB2 + vcpus as u64 * nvhv_abi::STACK_SIZE;
        if ram_bytes < need {
            return Err(GuestAbiError::RamTooSmall {
                ram: ram_bytes,
                need,
            });
        }
        let mmio_base = ram_bytes.div_ceil(GIB).max(4) * GIB;
        let map_end = mmio_base + GIB;
        // One page directory per GiB, between PD_ADDR and LOAD_MIN; the
        // MMIO GiB above RAM takes one of them.
        let directories = (nvhv_abi::LOAD_MIN - nvhv_abi::PD_ADDR) / 4096;
        if map_end / GIB > directories {
            return Err(GuestAbiError::RamTooLarge {
                ram: ram_bytes,
                max: (directories - 1) * GIB,
            });
        }
        Ok(Layout {
            ram_bytes,
            vcpus,
            mmio_base,
            map_end,
        })
    }

    /// Lowest byte of the vCPU stacks.
    pub fn stacks_base(&self) -> u64 {
        self.ram_bytes - self.vcpus as u64 * nvhv_abi::STACK_SIZE
    }

    /// Base of the `i`th virtio-mmio window.
    pub fn mmio_window(&self, i: usize) -> MmioWindow {
        MmioWindow {
            base: self.mmio_base + i as u64 * 0x1000,
            size: 0x200,
        }
    }
}

/// Whether guest memory holds page tables written with `confine` (see
/// [`write_system_tables`]): read from the image, so that a VM created
/// before confinement existed (or a CPL0 guest) is never treated as confined.
/// The guest cannot change these entries: they lie in its read-only 2 MiB.
pub fn is_confining(mem: &GuestMemory) -> bool {
    let r = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).ok();
    r(nvhv_abi::PML4_ADDR) == Some(nvhv_abi::PDPT_ADDR | 0x7)
        && r(nvhv_abi::PDPT_ADDR) == Some(nvhv_abi::PD_ADDR | 0x7)
        && r(nvhv_abi::PD_ADDR) == Some(PDE_LOW_CONFINED)
}

fn w64(mem: &GuestMemory, addr: u64, v: u64) -> Result<(), GuestAbiError> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(GuestAbiError::Write)
}

/// Page-directory entry flags: present, writable, user, 2 MiB page.
const PDE_RW_USER: u64 = 0x87;
/// The first 2 MiB for a CPL3 guest: present, user, 2 MiB, read-only.
const PDE_LOW_CONFINED: u64 = 0x85;

/// Write page tables, GDT and TSSs for `layout`.
///
/// With `confine` (guests entered at CPL3), the guest cannot leave CPL3
/// without a triple fault, nor change what only CPL0 can: the first 2 MiB
/// (page tables, GDT, TSSs, boot info) are read-only to it, so no call gate
/// or page-table entry can be forged. With the entry state (no IDT, no
/// `syscall`, no `sysenter`), that lets an epoch re-read only the registers
/// a CPL3 guest can change ([`is_confining`], `Vcpu::save`). (The local
/// APIC stays reachable where RAM does not cover it: its registers are
/// re-read every epoch.)
pub fn write_system_tables(
    mem: &GuestMemory,
    layout: &Layout,
    confine: bool,
) -> Result<(), GuestAbiError> {
    // Page tables: PML4[0] -> PDPT; PDPT[g] -> PD g; PD entries map 2 MiB pages.
    // The user bit (0x4) is set at every level, or CPL3 instruction fetches fault.
    w64(mem, nvhv_abi::PML4_ADDR, nvhv_abi::PDPT_ADDR | 0x7)?;
    for g in 0..layout.map_end / GIB {
        let pd = nvhv_abi::PD_ADDR + g * 4096;
        w64(mem, nvhv_abi::PDPT_ADDR + g * 8, pd | 0x7)?;
        let mut table = [0u8; 4096];
        for (e, chunk) in table.chunks_exact_mut(8).enumerate() {
            let addr = g * GIB + e as u64 * MIB2;
            let flags = match addr {
                0 if confine => PDE_LOW_CONFINED,
                _ => PDE_RW_USER,
            };
            chunk.copy_from_slice(&(addr | flags).to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd))
            .map_err(GuestAbiError::Write)?;
    }

    // GDT: null, kernel CS64, kernel DS, user DS, user CS64, then 16-byte TSS descriptors.
    let fixed: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    for (i, d) in fixed.iter().enumerate() {
        w64(mem, nvhv_abi::GDT_ADDR + i as u64 * 8, *d)?;
    }
    for v in 0..layout.vcpus as u64 {
        let base = nvhv_abi::TSS_ADDR + v * nvhv_abi::TSS_STRIDE;
        let limit = TSS_LIMIT as u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89u64 << 40) // present, type 9 (available 64-bit TSS)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let desc = nvhv_abi::GDT_ADDR + (GDT_FIXED + 2 * v) * 8;
        w64(mem, desc, low)?;
        w64(mem, desc + 8, base >> 32)?;

        // The TSS: RSP0 at 4, I/O map base at 0x66, then the bitmap (1 = denied).
        let mut tss = vec![0u8; (TSS_LIMIT + 1) as usize];
        let rsp0 = nvhv_abi::stack_top(layout.ram_bytes, v as u32);
        tss[4..12].copy_from_slice(&rsp0.to_le_bytes());
        tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
        tss[0x68..].fill(0xff);
        for &(first, count) in GUEST_PORTS {
            for p in first..first + count {
                tss[0x68 + p as usize / 8] &= !(1 << (p % 8));
            }
        }
        mem.write_slice(&tss, GuestAddress(base))
            .map_err(GuestAbiError::Write)?;
    }
    Ok(())
}

/// Write the boot-info block.
pub fn write_boot_info(mem: &GuestMemory, info: &BootInfo) -> Result<(), GuestAbiError> {
    // SAFETY-free: BootInfo is plain `repr(C)` data; copy it field by field as bytes.
    let bytes = boot_info_bytes(info);
    mem.write_slice(&bytes, GuestAddress(nvhv_abi::BOOT_INFO_ADDR))
        .map_err(GuestAbiError::Write)
}

/// Write the wall-clock record: Unix time = kvmclock + `unix_minus_kvmclock_ns`.
/// Called before the guest first runs and on every resume (kvmclock continues
/// from its saved value while Unix time moved on).
pub fn write_wall_clock(
    mem: &GuestMemory,
    unix_minus_kvmclock_ns: i64,
) -> Result<(), GuestAbiError> {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&nvhv_abi::WALL_CLOCK_MAGIC.to_le_bytes());
    b[8..].copy_from_slice(&unix_minus_kvmclock_ns.to_le_bytes());
    mem.write_slice(&b, GuestAddress(nvhv_abi::WALL_CLOCK_ADDR))
        .map_err(GuestAbiError::Write)
}

/// Serialize [`BootInfo`] in its `repr(C)` layout (all fields are little-endian integers).
fn boot_info_bytes(i: &BootInfo) -> Vec<u8> {
    let mut b = Vec::with_capacity(core::mem::size_of::<BootInfo>());
    b.extend_from_slice(&i.magic.to_le_bytes());
    b.extend_from_slice(&i.version.to_le_bytes());
    b.extend_from_slice(&i.vcpus.to_le_bytes());
    for v in [
        i.ram_bytes,
        i.map_end,
        i.image_end,
        i.stacks_base,
        i.tsc_khz,
        i.kvmclock_addr,
        i.seed,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&i.mmio_count.to_le_bytes());
    b.extend_from_slice(&i._pad.to_le_bytes());
    for w in &i.mmio {
        b.extend_from_slice(&w.base.to_le_bytes());
        b.extend_from_slice(&w.size.to_le_bytes());
    }
    debug_assert_eq!(b.len(), core::mem::size_of::<BootInfo>());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem(size: usize) -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn layout_keeps_mmio_above_4g_and_ram() {
        let l = Layout::new(64 << 20, 2).unwrap();
        assert_eq!(l.mmio_base, 4 * GIB);
        let l = Layout::new(5 * GIB + 1, 1).unwrap();
        assert_eq!(l.mmio_base, 6 * GIB);
        assert!(matches!(
            Layout::new(1 << 20, 1),
            Err(GuestAbiError::RamTooSmall { .. })
        ));
        assert!(matches!(
            Layout::new(64 << 20, 0),
            Err(GuestAbiError::Vcpus(0))
        ));
        assert!(matches!(
            Layout::new(1 << 40, 1),
            Err(GuestAbiError::RamTooLarge { .. })
        ));
    }

    #[test]
    fn page_tables_identity_map_with_user_bit() {
        let m = mem(8 << 20);
        let l = Layout::new(8 << 20, 1).unwrap();
        write_system_tables(&m, &l, false).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(nvhv_abi::PML4_ADDR)).unwrap();
        assert_eq!(pml4 & 0x7, 0x7);
        // Walk an address in the 4th GiB: 0xfee00000 (local APIC) maps to itself.
        let va = 0xfee0_0000u64;
        let pdpte: u64 = m
            .read_obj(GuestAddress((pml4 & !0xfff) + (va >> 30) * 8))
            .unwrap();
        let pde: u64 = m
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
            .unwrap();
        assert_eq!(pde & !0xfff, va & !(MIB2 - 1));
        assert_eq!(pde & 0x87, 0x87);
        assert!(!is_confining(&m));
    }

    #[test]
    fn confined_tables_make_the_low_2m_read_only() {
        let m = mem(8 << 20);
        let l = Layout::new(8 << 20, 1).unwrap();
        write_system_tables(&m, &l, true).unwrap();
        assert!(is_confining(&m));
        let pde0: u64 = m.read_obj(GuestAddress(nvhv_abi::PD_ADDR)).unwrap();
        assert_eq!(pde0 & 0x2, 0, "first 2 MiB not writable");
        assert_eq!(pde0 & 0x4, 0x4, "but readable from CPL3");
        let other: u64 = m.read_obj(GuestAddress(nvhv_abi::PD_ADDR + 8)).unwrap();
        assert_eq!(other & 0x87, 0x87, "the rest is RAM as before");
        // A forged entry (as after a resume of an older image) is not confining.
        m.write_obj(0x87u64, GuestAddress(nvhv_abi::PD_ADDR))
            .unwrap();
        assert!(!is_confining(&m));
    }

    #[test]
    fn tss_bitmap_opens_only_guest_ports() {
        let m = mem(8 << 20);
        let l = Layout::new(8 << 20, 2).unwrap();
        write_system_tables(&m, &l, false).unwrap();
        let base = nvhv_abi::TSS_ADDR + nvhv_abi::TSS_STRIDE;
        let bit = |port: u16| -> u8 {
            let b: u8 = m
                .read_obj(GuestAddress(base + 0x68 + port as u64 / 8))
                .unwrap();
            (b >> (port % 8)) & 1
        };
        assert_eq!(bit(nvhv_abi::SERIAL_PORT), 0);
        assert_eq!(bit(nvhv_abi::WAIT_PORT), 0);
        assert_eq!(bit(nvhv_abi::OUTPUT_DEPS_PORT), 0);
        assert_eq!(bit(nvhv_abi::OUTPUT_DEPS_PORT + 4), 1);
        assert_eq!(bit(0x80), 1);
        assert_eq!(bit(0x3f7), 1);
        let end: u8 = m.read_obj(GuestAddress(base + TSS_LIMIT as u64)).unwrap();
        assert_eq!(end, 0xff);
    }

    #[test]
    fn boot_info_bytes_match_repr_c_layout() {
        let mut info = BootInfo {
            magic: nvhv_abi::BOOT_INFO_MAGIC,
            version: 1,
            vcpus: 3,
            ram_bytes: 4,
            map_end: 5,
            image_end: 6,
            stacks_base: 7,
            tsc_khz: 8,
            kvmclock_addr: 9,
            seed: 10,
            mmio_count: 1,
            _pad: 0,
            mmio: [MmioWindow::default(); nvhv_abi::MAX_MMIO],
        };
        info.mmio[0] = MmioWindow { base: 11, size: 12 };
        let b = boot_info_bytes(&info);
        let off = core::mem::offset_of!(BootInfo, seed);
        assert_eq!(&b[off..off + 8], &10u64.to_le_bytes());
        let off = core::mem::offset_of!(BootInfo, mmio);
        assert_eq!(&b[off..off + 8], &11u64.to_le_bytes());
        assert_eq!(&b[off + 8..off + 16], &12u64.to_le_bytes());
    }
}
