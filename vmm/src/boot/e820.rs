//! The e820 memory map every guest gets, one table for both boot formats: the project's guest
//! reads it from `hvm_start_info`, Linux from the zero page.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{EBDA_START, HIGH_RAM_START};
use crate::memory::GuestMemory;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One range of the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Low RAM below the EBDA, the reserved BIOS area up to 1 MiB (the MP and ACPI tables live
/// there), then each RAM region from 1 MiB on: below the 32-bit device hole and above 4 GiB.
pub fn memory_map(memory: &GuestMemory) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIGH_RAM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for region in memory.iter() {
        let start = region.start_addr().0.max(HIGH_RAM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{RAM_HOLE_END, RAM_HOLE_START};
    use crate::memory::create_guest_memory;

    #[test]
    fn small_guest_has_low_ram_bios_area_and_high_ram() {
        let mem = create_guest_memory(128 << 20, false).unwrap();
        let map = memory_map(&mem);
        assert_eq!(map.len(), 3);
        assert_eq!(
            (map[0].addr, map[0].size, map[0].kind),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(map[1].addr + map[1].size, HIGH_RAM_START);
        assert_eq!(
            (map[2].addr, map[2].addr + map[2].size),
            (HIGH_RAM_START, 128 << 20)
        );
    }

    #[test]
    fn large_guest_skips_the_device_hole() {
        let mem = create_guest_memory(4 << 30, false).unwrap();
        let map = memory_map(&mem);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, RAM_HOLE_START);
        assert_eq!(map[3].addr, RAM_HOLE_END);
        assert_eq!(map[3].size, (4 << 30) - RAM_HOLE_START);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4 << 30) - (HIGH_RAM_START - EBDA_START));
        // No two ranges overlap, and they are sorted.
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr);
        }
    }
}
