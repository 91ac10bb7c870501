//! What firmware leaves in each CPU for Linux: the local APIC's LINT pins in virtual-wire mode
//! and a few boot MSRs. The project's guest needs none of it (it polls, at CPL 3).

use kvm_bindings::{kvm_lapic_state, kvm_msr_entry, Msrs};

/// Offsets of the LVT LINT0/LINT1 registers in the local APIC register page.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back: what firmware sets for RAM.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// LINT0 delivers the 8259's interrupts (ExtINT), LINT1 is the NMI line.
pub fn set_virtual_wire(lapic: &mut kvm_lapic_state) {
    set_delivery_mode(lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_delivery_mode(lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
}

fn set_delivery_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let value = (read(lapic, offset) & !APIC_DELIVERY_MODE_MASK) | (mode << 8);
    for (slot, byte) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *slot = byte as _;
    }
}

/// The register page holds little-endian 32-bit registers as C chars.
fn read(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (byte, slot) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *byte = *slot as u8;
    }
    u32::from_le_bytes(bytes)
}

/// MSRs as firmware leaves them: fast string operations on, write-back MTRR default.
pub fn boot_msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ])
    .expect("two MSR entries are far below the wrapper's capacity")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_pins_get_extint_and_nmi_other_bits_kept() {
        let mut lapic = kvm_lapic_state::default();
        for (slot, byte) in lapic.regs[APIC_LVT_LINT0..APIC_LVT_LINT0 + 4]
            .iter_mut()
            .zip(0x0001_0000u32.to_le_bytes())
        {
            *slot = byte as _;
        }
        set_virtual_wire(&mut lapic);
        assert_eq!(read(&lapic, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(read(&lapic, APIC_LVT_LINT1), 0x0000_0400);
    }

    #[test]
    fn boot_msrs_enable_writeback_mtrrs() {
        let msrs = boot_msrs();
        let entries = msrs.as_slice();
        assert_eq!(entries.len(), 2);
        assert!(entries
            .iter()
            .any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == MTRR_ENABLE_WRITEBACK));
    }
}
