//! The register state every vCPU starts in: 64-bit long mode at CPL 0 on the boot GDT and the
//! identity map, at the kernel's entry point (docs/boot-protocol.md, "Direct 64-bit entry").

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::{BootEntry, BootProtocol};
use crate::layout::{BOOT_GDT, PML4};
use crate::memory::GuestMemory;

pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

const NULL_DESCRIPTOR: u64 = 0;
const CODE64_DESCRIPTOR: u64 = 0x00af_9b00_0000_ffff;
const DATA_DESCRIPTOR: u64 = 0x00cf_9300_0000_ffff;
/// A 64-bit TSS descriptor takes two slots; the upper one is zero for a base below 4 GiB.
const TSS_DESCRIPTOR: [u64; 2] = [0x0080_8b00_0000_0067, 0];

/// The project's guest: null, 64-bit code, data, a TSS slot (KVM wants a usable TR; the guest
/// loads its own).
const GUEST_GDT: [u64; 5] = [
    NULL_DESCRIPTOR,
    CODE64_DESCRIPTOR,
    DATA_DESCRIPTOR,
    TSS_DESCRIPTOR[0],
    TSS_DESCRIPTOR[1],
];
/// Linux's 64-bit boot protocol wants `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18.
const LINUX_GDT: [u64; 6] = [
    NULL_DESCRIPTOR,
    NULL_DESCRIPTOR,
    CODE64_DESCRIPTOR,
    DATA_DESCRIPTOR,
    TSS_DESCRIPTOR[0],
    TSS_DESCRIPTOR[1],
];
const LINUX_CODE_SELECTOR: u16 = 0x10;
const LINUX_DATA_SELECTOR: u16 = 0x18;
const LINUX_TSS_SELECTOR: u16 = 0x20;

/// The boot GDT and the selectors into it, for one boot protocol.
struct BootGdt {
    entries: &'static [u64],
    code: u16,
    data: u16,
    tss: u16,
}

fn boot_gdt(protocol: &BootProtocol) -> BootGdt {
    match protocol {
        BootProtocol::SplitvisorGuest { .. } => BootGdt {
            entries: &GUEST_GDT,
            code: CODE_SELECTOR,
            data: DATA_SELECTOR,
            tss: TSS_SELECTOR,
        },
        BootProtocol::Linux { .. } => BootGdt {
            entries: &LINUX_GDT,
            code: LINUX_CODE_SELECTOR,
            data: LINUX_DATA_SELECTOR,
            tss: LINUX_TSS_SELECTOR,
        },
    }
}

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Writes the boot GDT that `sregs` refers to.
pub fn write_boot_gdt(
    memory: &GuestMemory,
    protocol: &BootProtocol,
) -> Result<(), GuestMemoryError> {
    for (i, entry) in boot_gdt(protocol).entries.iter().enumerate() {
        memory.write_obj(*entry, GuestAddress(BOOT_GDT + i as u64 * 8))?;
    }
    Ok(())
}

/// General-purpose registers for vCPU `index`.
pub fn regs(boot: &BootEntry, index: u8) -> kvm_regs {
    let mut regs = kvm_regs {
        rip: boot.entry,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match boot.protocol {
        BootProtocol::SplitvisorGuest { start_info } => {
            regs.rbx = start_info;
            regs.rdi = u64::from(index);
        }
        BootProtocol::Linux { zero_page } => regs.rsi = zero_page,
    }
    regs
}

/// Segment and control registers, starting from what KVM reports for a fresh vCPU.
pub fn sregs(mut sregs: kvm_sregs, protocol: &BootProtocol) -> kvm_sregs {
    let gdt = boot_gdt(protocol);
    let segment = |selector: u16, type_: u8, long: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l: long,
        g: 1,
        ..Default::default()
    };
    sregs.cs = segment(gdt.code, 0xb, 1, 0);
    let data = segment(gdt.data, 0x3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: gdt.tss,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (gdt.entries.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// x87/SSE state as after `FNINIT` with SSE exceptions masked.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: BootProtocol = BootProtocol::SplitvisorGuest { start_info: 0x6000 };

    #[test]
    fn long_mode_with_paging_and_sse() {
        let s = sregs(kvm_sregs::default(), &GUEST);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.selector, CODE_SELECTOR);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cr0 & (1 << 2), 0, "CR0.EM must be clear for SSE");
        assert_ne!(s.cr4 & CR4_OSFXSR, 0);
        assert_eq!(s.cr3, PML4);
    }

    #[test]
    fn aps_get_their_index_in_rdi() {
        let boot = BootEntry {
            entry: 0x10_0000,
            protocol: GUEST,
            format: crate::boot::KernelFormat::SplitvisorGuest,
        };
        let r = regs(&boot, 3);
        assert_eq!((r.rip, r.rbx, r.rdi, r.rsp), (0x10_0000, 0x6000, 3, 0));
    }

    #[test]
    fn linux_gets_the_zero_page_in_rsi_and_boot_cs_0x10() {
        let protocol = BootProtocol::Linux { zero_page: 0x7000 };
        let boot = BootEntry {
            entry: 0x10_0200,
            protocol,
            format: crate::boot::KernelFormat::LinuxBzImage,
        };
        let r = regs(&boot, 0);
        assert_eq!((r.rip, r.rsi, r.rbx), (0x10_0200, 0x7000, 0));
        let s = sregs(kvm_sregs::default(), &protocol);
        assert_eq!(
            (s.cs.selector, s.ds.selector, s.ss.selector),
            (0x10, 0x18, 0x18)
        );
        assert_eq!(s.cs.l, 1);
        // The descriptors behind the selectors are 64-bit code and flat data.
        assert_eq!(LINUX_GDT[usize::from(s.cs.selector) / 8], CODE64_DESCRIPTOR);
        assert_eq!(LINUX_GDT[usize::from(s.ds.selector) / 8], DATA_DESCRIPTOR);
        assert_eq!(usize::from(s.gdt.limit) + 1, LINUX_GDT.len() * 8);
    }
}
