//! The PVH `hvm_start_info` block with the e820 memory map and the command line: the one
//! boot-information format the project's guest reads, and one Linux also understands.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::GuestAddress;

use super::cmdline::{write_cmdline, CmdlineError};
use super::e820;
use crate::layout::{self, CMDLINE, CMDLINE_MAX, MEMMAP, START_INFO};
use crate::memory::GuestMemory;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

#[derive(Debug, thiserror::Error)]
pub enum StartInfoError {
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error("could not write hvm_start_info into guest memory")]
    Write(#[source] linux_loader::configurator::Error),
}

/// The e820 map in `hvm_start_info`'s format.
pub fn memory_map(memory: &GuestMemory) -> Vec<hvm_memmap_table_entry> {
    let map: Vec<_> = e820::memory_map(memory)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    debug_assert!(map.len() <= layout::MEMMAP_MAX_ENTRIES);
    map
}

/// Writes the command line, the memory map and `hvm_start_info`; returns its address.
pub fn write(memory: &GuestMemory, cmdline: &str) -> Result<u64, StartInfoError> {
    write_cmdline(memory, cmdline, CMDLINE_MAX)?;

    let map = memory_map(memory);
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: MEMMAP,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(START_INFO));
    params.set_sections(&map, GuestAddress(MEMMAP));
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, memory)
        .map_err(StartInfoError::Write)?;
    Ok(START_INFO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::e820::E820_RAM;
    use crate::layout::{EBDA_START, HIGH_RAM_START};
    use crate::memory::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn start_info_points_at_cmdline_and_memory_map() {
        let mem = create_guest_memory(128 << 20, false).unwrap();
        let addr = write(&mem, "selftest foo=bar").unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries, 3);

        let mut cmdline = [0u8; 17];
        mem.read_slice(&mut cmdline, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmdline, b"selftest foo=bar\0");

        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!(
            (last.addr, last.size, last.type_),
            (HIGH_RAM_START, (127 << 20), E820_RAM)
        );
    }

    #[test]
    fn ram_total_in_the_map_matches_the_vm() {
        let mem = create_guest_memory(4 << 30, false).unwrap();
        let ram: u64 = memory_map(&mem)
            .iter()
            .filter(|e| e.type_ == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4 << 30) - (HIGH_RAM_START - EBDA_START));
    }

    #[test]
    fn overlong_command_line_is_rejected() {
        let mem = create_guest_memory(32 << 20, false).unwrap();
        let long = "x".repeat(CMDLINE_MAX);
        assert!(matches!(
            write(&mem, &long),
            Err(StartInfoError::Cmdline(CmdlineError::TooLong { .. }))
        ));
    }
}
