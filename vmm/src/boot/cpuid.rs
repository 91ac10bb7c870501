//! The CPUID the guest sees: what KVM supports, with the topology made coherent (each vCPU its
//! own APIC ID, the processor count right) and the hypervisor bit set.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// The hypervisor leaves (KVM's signature leaf and the timing leaf VMware defined, which
/// Linux and the project's guest read): EAX of the signature leaf is the highest one.
const LEAF_HYPERVISOR_BASE: u32 = 0x4000_0000;
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

/// Adjusts KVM's supported CPUID for vCPU `index` of `count`; with `tsc_khz`, publishes the
/// TSC frequency in leaf 0x4000_0010 (EAX = TSC kHz, EBX = APIC bus kHz).
pub fn filter(cpuid: &mut CpuId, index: u8, count: u8, tsc_khz: Option<u32>) {
    if let Some(khz) = tsc_khz {
        add_timing_leaf(cpuid, khz);
    }
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_TOPOLOGY => {
                // EAX[31:26]: cores per package - 1; one core per vCPU, one package.
                entry.eax = (entry.eax & 0x03ff_ffff) | (u32::from(count.saturating_sub(1)) << 26);
            }
            LEAF_EXTENDED_TOPOLOGY | LEAF_V2_EXTENDED_TOPOLOGY => {
                // Every subleaf reports this vCPU's x2APIC ID in EDX.
                entry.edx = u32::from(index);
            }
            _ => {}
        }
    }
}

fn add_timing_leaf(cpuid: &mut CpuId, tsc_khz: u32) {
    let mut has_base = false;
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_HYPERVISOR_BASE {
            entry.eax = entry.eax.max(LEAF_HYPERVISOR_TIMING);
            has_base = true;
        }
    }
    let present = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_HYPERVISOR_TIMING);
    if has_base && !present {
        let leaf = kvm_bindings::kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR_TIMING,
            eax: tsc_khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        };
        if cpuid.push(leaf).is_err() {
            log::warn!(
                "no room in CPUID for the TSC frequency leaf; guest timings will be estimates"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_ids_and_counts_are_per_vcpu() {
        let entries = [
            kvm_cpuid_entry2 {
                function: LEAF_FEATURES,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_EXTENDED_TOPOLOGY,
                edx: 7,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        filter(&mut cpuid, 2, 4, None);
        let leaf1 = cpuid.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 2);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
        assert_eq!(cpuid.as_slice()[1].edx, 2);
    }

    #[test]
    fn tsc_frequency_is_published_under_the_hypervisor_leaves() {
        let entries = [kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR_BASE,
            eax: 0x4000_0001,
            ..Default::default()
        }];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        filter(&mut cpuid, 0, 1, Some(2_100_000));
        let slice = cpuid.as_slice();
        assert_eq!(slice[0].eax, LEAF_HYPERVISOR_TIMING);
        let timing = slice
            .iter()
            .find(|e| e.function == LEAF_HYPERVISOR_TIMING)
            .unwrap();
        assert_eq!((timing.eax, timing.ebx), (2_100_000, APIC_BUS_KHZ));
    }
}
