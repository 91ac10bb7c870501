//! Linux's zero page (`struct boot_params`, Documentation/arch/x86/boot.rst): the setup header
//! from the bzImage, the command line, the initramfs, the e820 map and the ACPI RSDP, for the
//! 64-bit boot protocol.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::e820;
use super::initramfs::LoadedInitramfs;
use crate::layout::{CMDLINE, ZERO_PAGE};
use crate::memory::GuestMemory;

/// `boot_flag` and `header` of a valid setup header ("HdrS").
const BOOT_FLAG: u16 = 0xaa55;
const HEADER_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader: splitvisor has no registered loader ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Boot protocol version assumed for a vmlinux, which carries no setup header.
const VMLINUX_PROTOCOL: u16 = 0x020f;
/// Linux's default physical alignment for a relocatable kernel.
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Before protocol 2.06 the command line could be at most 255 bytes.
const LEGACY_CMDLINE_MAX: u32 = 255;

#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    #[error("the memory map has {0} entries; the zero page holds at most {max}", max = linux_loader::loader::bootparam::E820_MAX_ENTRIES_ZEROPAGE)]
    TooManyE820Entries(usize),
    #[error("could not write the zero page into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// What the zero page tells the kernel.
pub struct LinuxBootInfo<'a> {
    /// The bzImage's setup header; `None` for a vmlinux.
    pub setup_header: Option<&'a setup_header>,
    pub initramfs: Option<LoadedInitramfs>,
    /// Where the ACPI RSDP is, if the guest has ACPI tables.
    pub rsdp: Option<u64>,
}

/// The longest command line the kernel accepts (without the NUL).
pub fn cmdline_max(header: Option<&setup_header>) -> usize {
    match header {
        Some(h) if h.version >= 0x0206 => h.cmdline_size as usize,
        Some(_) => LEGACY_CMDLINE_MAX as usize,
        None => crate::layout::CMDLINE_MAX - 1,
    }
}

/// Builds the zero page (the command line must already be at `layout::CMDLINE`).
pub fn build(memory: &GuestMemory, info: &LinuxBootInfo) -> Result<boot_params, ZeroPageError> {
    let mut params = boot_params {
        hdr: info.setup_header.copied().unwrap_or_else(vmlinux_header),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.ext_cmd_line_ptr = (CMDLINE >> 32) as u32;
    if let Some(initramfs) = info.initramfs {
        params.hdr.ramdisk_image = initramfs.addr as u32;
        params.ext_ramdisk_image = (initramfs.addr >> 32) as u32;
        params.hdr.ramdisk_size = initramfs.size as u32;
        params.ext_ramdisk_size = (initramfs.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = info.rsdp.unwrap_or(0);
    let map = e820::memory_map(memory);
    if map.len() > params.e820_table.len() {
        return Err(ZeroPageError::TooManyE820Entries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Builds the zero page and writes it at `layout::ZERO_PAGE`; returns its address.
pub fn write(memory: &GuestMemory, info: &LinuxBootInfo) -> Result<u64, ZeroPageError> {
    let params = build(memory, info)?;
    memory
        .write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(ZeroPageError::Write)?;
    Ok(ZERO_PAGE)
}

/// The setup header a bootloader would have read from a bzImage, for a vmlinux that has none.
fn vmlinux_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG,
        header: HEADER_MAGIC,
        version: VMLINUX_PROTOCOL,
        kernel_alignment: KERNEL_ALIGNMENT,
        cmdline_size: cmdline_max(None) as u32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{EBDA_START, HIGH_RAM_START, RAM_HOLE_END, RAM_HOLE_START};
    use crate::memory::create_guest_memory;

    #[test]
    fn zero_page_carries_header_cmdline_initramfs_rsdp_and_e820() {
        let mem = create_guest_memory(4 << 30, false).unwrap();
        let header = setup_header {
            version: 0x020f,
            cmdline_size: 2047,
            setup_sects: 27,
            ..Default::default()
        };
        let info = LinuxBootInfo {
            setup_header: Some(&header),
            initramfs: Some(LoadedInitramfs {
                addr: 0xbf00_0000,
                size: 0x12_3456,
            }),
            rsdp: Some(0xe0000),
        };
        let addr = write(&mem, &info).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(addr, ZERO_PAGE);
        // The bzImage's own fields are kept; the loader's are filled in.
        assert_eq!({ params.hdr.setup_sects }, 27);
        assert_eq!({ params.hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE as u32);
        assert_eq!({ params.hdr.ramdisk_image }, 0xbf00_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x12_3456);
        assert_eq!({ params.ext_ramdisk_image }, 0);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        let table = { params.e820_table };
        let entries: Vec<_> = table[..params.e820_entries as usize]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        assert_eq!(
            entries,
            vec![
                (0, EBDA_START, e820::E820_RAM),
                (EBDA_START, HIGH_RAM_START - EBDA_START, e820::E820_RESERVED),
                (
                    HIGH_RAM_START,
                    RAM_HOLE_START - HIGH_RAM_START,
                    e820::E820_RAM
                ),
                (RAM_HOLE_END, (4 << 30) - RAM_HOLE_START, e820::E820_RAM),
            ]
        );
    }

    #[test]
    fn vmlinux_gets_a_synthesised_header() {
        let mem = create_guest_memory(64 << 20, false).unwrap();
        let info = LinuxBootInfo {
            setup_header: None,
            initramfs: None,
            rsdp: None,
        };
        let params = build(&mem, &info).unwrap();
        assert_eq!({ params.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ params.hdr.header }, HEADER_MAGIC);
        assert_eq!({ params.hdr.ramdisk_size }, 0);
        assert_eq!({ params.acpi_rsdp_addr }, 0);
        assert_eq!(params.e820_entries, 3);
    }

    #[test]
    fn command_line_limit_follows_the_protocol() {
        let modern = setup_header {
            version: 0x020f,
            cmdline_size: 2047,
            ..Default::default()
        };
        let old = setup_header {
            version: 0x0205,
            ..Default::default()
        };
        assert_eq!(cmdline_max(Some(&modern)), 2047);
        assert_eq!(cmdline_max(Some(&old)), 255);
    }
}
