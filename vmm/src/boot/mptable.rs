//! An Intel MultiProcessor table (MP spec 1.4): how the guest learns how many vCPUs it has and
//! where the interrupt controllers are. Small, old, and understood by the project's guest and
//! by Linux alike.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::MPTABLE;
use crate::memory::GuestMemory;

const APIC_ADDRESS: u32 = 0xfee0_0000;
const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Pins on KVM's in-kernel IOAPIC.
const IOAPIC_PINS: u8 = 24;
const ISA_BUS: u8 = 0;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("the MP table does not fit in the BIOS area")]
    TooLarge,
    #[error("could not write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Builds the floating pointer and the configuration table for `vcpus` processors.
pub fn build(vcpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC feature flags
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = vcpus;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, ISA_BUS, pin]);
        entries.extend_from_slice(&[ioapic_id, pin]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, ISA_BUS, 0, 0xff, lint]);
        count += 1;
    }

    let config_addr = MPTABLE + 16;
    let mut config = Vec::with_capacity(44 + entries.len());
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    config.push(4); // spec revision 1.4
    config.push(0); // checksum, below
    config.extend_from_slice(b"SPLITVSR");
    config.extend_from_slice(b"SPLITVISOR  ");
    config.extend_from_slice(&[0; 6]); // no OEM table
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&APIC_ADDRESS.to_le_bytes());
    config.extend_from_slice(&[0; 4]); // no extended table
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(config_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&config);
    floating
}

/// Writes the table at `layout::MPTABLE`.
pub fn write(memory: &GuestMemory, vcpus: u8) -> Result<(), MpTableError> {
    let table = build(vcpus);
    if MPTABLE + table.len() as u64 > 0x10_0000 {
        return Err(MpTableError::TooLarge);
    }
    memory
        .write_slice(&table, GuestAddress(MPTABLE))
        .map_err(MpTableError::Write)
}

/// The byte that makes the sum of all bytes zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_processor_entries_are_right() {
        let table = build(3);
        assert_eq!(&table[0..4], b"_MP_");
        assert_eq!(sum(&table[..16]), 0, "floating pointer checksum");
        let config = &table[16..];
        let len = u16::from_le_bytes([config[4], config[5]]) as usize;
        assert_eq!(len, config.len());
        assert_eq!(sum(config), 0, "configuration table checksum");
        let processors: Vec<_> = config[44..]
            .chunks(20)
            .take_while(|e| e[0] == ENTRY_PROCESSOR)
            .map(|e| (e[1], e[3]))
            .collect();
        assert_eq!(
            processors,
            vec![
                (0, CPU_ENABLED | CPU_BOOTSTRAP),
                (1, CPU_ENABLED),
                (2, CPU_ENABLED)
            ]
        );
    }

    #[test]
    fn largest_table_fits_in_the_bios_area() {
        assert!(MPTABLE + build(u8::MAX).len() as u64 <= 0x10_0000);
    }
}
