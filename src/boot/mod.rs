//! Loading guests: the built-in guest ABI ([`guest_abi`]: page tables, GDT,
//! TSSs, boot-info block) and ELF payloads ([`elf`]).

pub mod elf;
pub mod guest_abi;
