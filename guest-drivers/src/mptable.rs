//! Intel MP table (MP spec 1.4) scan: the guest counts its vCPUs from the processor entries.

use core::ptr;

const SCAN_START: u64 = 0xf_0000;
const SCAN_END: u64 = 0x10_0000;
const FLOATING_LEN: usize = 16;
const CONFIG_HEADER_LEN: u64 = 44;
const ENTRY_PROCESSOR: u8 = 0;
const PROCESSOR_ENTRY_LEN: u64 = 20;
const OTHER_ENTRY_LEN: u64 = 8;
const CPU_ENABLED: u8 = 1;

fn read_u8(paddr: u64) -> u8 {
    // SAFETY: only called for addresses below 4 GiB inside the BIOS area or the MP table the
    // floating pointer names; all of it is identity mapped and readable at CPL 3.
    unsafe { ptr::read_volatile(paddr as *const u8) }
}

fn read_u16(paddr: u64) -> u16 {
    u16::from_le_bytes([read_u8(paddr), read_u8(paddr + 1)])
}

fn read_u32(paddr: u64) -> u32 {
    u32::from_le_bytes([0, 1, 2, 3].map(|i| read_u8(paddr + i)))
}

fn checksum_ok(paddr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |sum, i| sum.wrapping_add(read_u8(paddr + i))) == 0
}

/// Finds the `_MP_` floating pointer on a 16-byte boundary in `[0xf0000, 0x100000)`.
fn find_floating_pointer() -> Option<u64> {
    (SCAN_START..SCAN_END).step_by(16).find(|&p| {
        read_u32(p) == u32::from_le_bytes(*b"_MP_") && checksum_ok(p, FLOATING_LEN as u64)
    })
}

/// Enabled processor entries in the MP configuration table; `None` without an MP table.
pub fn count_cpus() -> Option<u32> {
    let floating = find_floating_pointer()?;
    let config = u64::from(read_u32(floating + 4));
    if config == 0 {
        // A "default configuration" (feature byte 1 nonzero) always has two processors.
        return (read_u8(floating + 11) != 0).then_some(2);
    }
    if config >= 1 << 32 || read_u32(config) != u32::from_le_bytes(*b"PCMP") {
        return None;
    }
    let table_len = u64::from(read_u16(config + 4));
    if !checksum_ok(config, table_len) {
        return None;
    }
    let entries = read_u16(config + 34);
    let end = config + table_len;
    let mut at = config + CONFIG_HEADER_LEN;
    let mut cpus = 0;
    for _ in 0..entries {
        if at >= end {
            break;
        }
        if read_u8(at) == ENTRY_PROCESSOR {
            if read_u8(at + 3) & CPU_ENABLED != 0 {
                cpus += 1;
            }
            at += PROCESSOR_ENTRY_LEN;
        } else {
            at += OTHER_ENTRY_LEN;
        }
    }
    (cpus > 0).then_some(cpus)
}
