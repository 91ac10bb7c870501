//! The identity map the vCPUs start with: 2 MiB pages over RAM and the device hole, all
//! user-accessible, because the project's guest runs its drivers at CPL 3 (PLATFORM.md).

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout::{self, PAGE_DIRS, PDPT, PML4};
use crate::memory::GuestMemory;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE_PAGE: u64 = 1 << 7;
const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER;
const GIB: u64 = 1 << 30;
const PAGE_2M: u64 = 2 << 20;

/// Writes PML4 -> PDPT -> page directories mapping `[0, identity_map_end)` onto itself.
pub fn write_identity_map(memory: &GuestMemory, ram_size: u64) -> Result<(), GuestMemoryError> {
    let end = layout::identity_map_end(ram_size);
    let dirs = end.div_ceil(GIB);
    debug_assert!(dirs <= layout::PAGE_DIRS_MAX, "checked by the memory limit");

    memory.write_obj(PDPT | TABLE_FLAGS, GuestAddress(PML4))?;
    let mut directory = vec![0u8; 4096];
    for gib in 0..dirs {
        let dir_addr = PAGE_DIRS + gib * 0x1000;
        memory.write_obj(dir_addr | TABLE_FLAGS, GuestAddress(PDPT + gib * 8))?;
        for (i, entry) in directory.chunks_exact_mut(8).enumerate() {
            let phys = gib * GIB + i as u64 * PAGE_2M;
            entry.copy_from_slice(&(phys | TABLE_FLAGS | HUGE_PAGE).to_le_bytes());
        }
        memory.write_slice(&directory, GuestAddress(dir_addr))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    /// Walks the tables the way the MMU would and returns the physical address.
    fn translate(memory: &GuestMemory, virt: u64) -> Option<u64> {
        let pml4e: u64 = memory
            .read_obj(GuestAddress(PML4 + ((virt >> 39) & 511) * 8))
            .ok()?;
        if pml4e & PRESENT == 0 || pml4e & USER == 0 {
            return None;
        }
        let pdpte: u64 = memory
            .read_obj(GuestAddress((pml4e & !0xfff) + ((virt >> 30) & 511) * 8))
            .ok()?;
        if pdpte & PRESENT == 0 || pdpte & USER == 0 {
            return None;
        }
        let pde: u64 = memory
            .read_obj(GuestAddress((pdpte & !0xfff) + ((virt >> 21) & 511) * 8))
            .ok()?;
        if pde & PRESENT == 0 || pde & USER == 0 || pde & HUGE_PAGE == 0 {
            return None;
        }
        Some((pde & !(PAGE_2M - 1)) + (virt & (PAGE_2M - 1)))
    }

    #[test]
    fn ram_and_device_hole_are_identity_mapped_for_user_mode() {
        let mem = create_guest_memory(64 << 20, false).unwrap();
        write_identity_map(&mem, 64 << 20).unwrap();
        for addr in [
            0,
            0x10_0000,
            0x3ff_ffff,
            layout::VIRTIO_MMIO_BASE + 0x123,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, addr), Some(addr), "address {addr:#x}");
        }
        assert_eq!(translate(&mem, 0x1_0000_0000), None, "nothing above 4 GiB");
    }
}
