//! The guest-physical address map: where RAM, boot tables and device windows live.
//! `docs/boot-protocol.md` is the guest-facing description of the same map.

use vm_memory::GuestAddress;

/// Boot GDT the vCPUs start with (the guest loads its own).
pub const BOOT_GDT: u64 = 0x500;
/// PVH `hvm_start_info`, followed by its e820 memory map.
pub const START_INFO: u64 = 0x6000;
pub const MEMMAP: u64 = 0x6100;
pub const MEMMAP_MAX_ENTRIES: usize = 16;
/// Linux's zero page (`struct boot_params`), for a Linux kernel booted through the 64-bit boot
/// protocol.
pub const ZERO_PAGE: u64 = 0x7000;
/// Identity-map page tables: PML4, PDPT, then one page directory per GiB.
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PAGE_DIRS: u64 = 0x10000;
pub const PAGE_DIRS_MAX: u64 = 0x80;
/// Kernel command line (NUL-terminated).
pub const CMDLINE: u64 = 0x90000;
pub const CMDLINE_MAX: usize = 0x9fc00 - 0x90000;
/// End of conventional low RAM; `[EBDA_START, 1 MiB)` is reported reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: the RSDP first (Linux also finds it by scanning 0xe0000-0xfffff), then the
/// XSDT, FADT, MADT and DSDT, all below the MP table.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_MAX_SIZE: u64 = MPTABLE - ACPI_START;
/// The MP table (floating pointer + configuration table) in the BIOS area.
pub const MPTABLE: u64 = 0xf0000;
/// Kernels are loaded at and above 1 MiB.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// RAM stops here and resumes at 4 GiB, leaving room for device windows below 4 GiB.
pub const RAM_HOLE_START: u64 = 0xc000_0000;
pub const RAM_HOLE_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one 4 KiB page each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI for virtio-mmio devices (0-4 are the PIC's legacy lines: timer, keyboard, cascade,
/// COM2, COM1).
pub const VIRTIO_FIRST_GSI: u32 = 5;

/// Legacy I/O ports.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_GSI: u32 = 4;
/// Writing a byte here ends the VM with that byte as the exit status (QEMU's isa-debug-exit
/// uses the same port).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The project's guest's paravirtual console (`devices::pv_console`): a 32-bit write of a line
/// buffer's address prints the line in one exit. Not offered to Linux guests.
pub const PV_CONSOLE_PORT: u16 = 0xf8;
pub const PV_CONSOLE_PORT_LEN: u64 = 4;
/// The i8042 keyboard controller's command port: writing 0xfe pulses the CPU reset line, which
/// is how Linux reboots with `reboot=k`.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// ACPI hardware-reduced sleep control and status registers (one byte each) and the reset
/// register, in I/O space; the FADT points at them.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
/// The value the FADT tells the guest to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 0x1;

/// The guest RAM ranges for a VM of `size` bytes: everything below the hole, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(RAM_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(RAM_HOLE_END), size - low));
    }
    ranges
}

/// The highest guest-physical address (exclusive) the identity map must cover: RAM and the
/// device hole.
pub fn identity_map_end(size: u64) -> u64 {
    ram_ranges(size)
        .iter()
        .map(|(start, len)| start.0 + len)
        .max()
        .unwrap_or(0)
        .max(RAM_HOLE_END)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vms_have_one_ram_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(identity_map_end(256 << 20), RAM_HOLE_END);
    }

    #[test]
    fn large_vms_skip_the_device_hole() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(
            ranges,
            vec![
                (GuestAddress(0), RAM_HOLE_START),
                (GuestAddress(RAM_HOLE_END), (4 << 30) - RAM_HOLE_START)
            ]
        );
        assert_eq!(identity_map_end(4 << 30), RAM_HOLE_END + (1 << 30));
    }

    // The boot tables must not overlap each other or the guest image.
    const _: () = assert!(MEMMAP + (MEMMAP_MAX_ENTRIES as u64) * 24 <= PML4);
    const _: () = assert!(PAGE_DIRS + PAGE_DIRS_MAX * 0x1000 <= CMDLINE);
    const _: () = assert!(CMDLINE + CMDLINE_MAX as u64 <= EBDA_START);
    const _: () = assert!(MEMMAP + (MEMMAP_MAX_ENTRIES as u64) * 24 <= ZERO_PAGE);
    const _: () = assert!(ZERO_PAGE + 0x1000 <= PML4);
    const _: () = assert!(ACPI_START + ACPI_MAX_SIZE <= MPTABLE && EBDA_START <= ACPI_START);

    #[test]
    fn page_directories_cover_the_largest_vm() {
        let end = identity_map_end(crate::config::MAX_MEMORY_BYTES);
        assert!(end.div_ceil(1 << 30) <= PAGE_DIRS_MAX);
    }
}
