//! Snapshot and restore on this host's /dev/kvm: a tiny guest counts at CPL 3 (native speed on
//! PVM) in a register, in memory and in an SSE register, and reports each million with an MMIO
//! write. It is captured at its first report, the original runs on to its second; a second VM
//! restored from the snapshot must reach the very same second report: same count, same SSE
//! sum, same memory, byte for byte.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::format::{Manifest, FORMAT_VERSION};
use super::{irqchip, memory_file, vcpu_state};
use crate::boot::{cpuid, page_tables, vcpu_regs, BootProtocol};
use crate::layout;
use crate::memory::{create_guest_memory, GuestMemory};

const MEMORY_SIZE: u64 = 32 << 20;
const CODE: u64 = layout::HIGH_RAM_START;
const COUNTER: u64 = 0x20_0000;
const STACK_TOP: u64 = 0x30_0000;
/// In the device hole: identity-mapped for user mode, no memslot, so a write exits to us.
const REPORT: u64 = layout::VIRTIO_MMIO_BASE;
const STEP: u64 = 1_000_000;

/// loop: inc rax; mov [rbx], rax; movq xmm0, rax; paddq xmm1, xmm0; cmp rax, rcx; jne loop;
///       mov [rdx], rax; add rcx, 1000000; jmp loop
const GUEST: [u8; 32] = [
    0x48, 0xff, 0xc0, 0x48, 0x89, 0x03, 0x66, 0x48, 0x0f, 0x6e, 0xc0, 0x66, 0x0f, 0xd4, 0xc8, 0x48,
    0x39, 0xc8, 0x75, 0xec, 0x48, 0x89, 0x02, 0x48, 0x81, 0xc1, 0x40, 0x42, 0x0f, 0x00, 0xeb, 0xe0,
];

struct TestVm {
    kvm: Kvm,
    vm: VmFd,
    memory: GuestMemory,
    vcpu: VcpuFd,
}

/// What vm.rs does, reduced: memory, TSS, irqchip, PIT (as for Linux) and one vCPU.
fn create_vm() -> TestVm {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let memory = create_guest_memory(MEMORY_SIZE, false).unwrap();
    for (slot, region) in memory.iter().enumerate() {
        let mapping = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping belongs to `memory`, which lives in the same `TestVm` as the VM
        // fd; the slots do not overlap.
        unsafe { vm.set_user_memory_region(mapping) }.expect("memslot");
    }
    vm.set_tss_address(layout::RAM_HOLE_END as usize - 0x3000)
        .unwrap();
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    vm.create_pit2(kvm_pit_config::default())
        .expect("KVM_CREATE_PIT2");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    TestVm {
        kvm,
        vm,
        memory,
        vcpu,
    }
}

/// Boots the counting guest on a fresh VM: identity map, GDT, code, and a vCPU at CPL 3.
fn boot(t: &TestVm) {
    let protocol = BootProtocol::SplitvisorGuest { start_info: 0 };
    page_tables::write_identity_map(&t.memory, MEMORY_SIZE).unwrap();
    vcpu_regs::write_boot_gdt(&t.memory, &protocol).unwrap();
    t.memory.write_slice(&GUEST, GuestAddress(CODE)).unwrap();
    let mut ids = t.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    cpuid::filter(&mut ids, 0, 1, t.vcpu.get_tsc_khz().ok());
    t.vcpu.set_cpuid2(&ids).unwrap();
    let mut sregs = vcpu_regs::sregs(t.vcpu.get_sregs().unwrap(), &protocol);
    // Straight to user mode (PLATFORM.md): RPL/DPL 3 on code and stack.
    sregs.cs.dpl = 3;
    sregs.cs.selector |= 3;
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.dpl = 3;
        seg.selector |= 3;
    }
    t.vcpu.set_sregs(&sregs).unwrap();
    t.vcpu.set_fpu(&vcpu_regs::fpu()).unwrap();
    t.vcpu
        .set_regs(&kvm_bindings::kvm_regs {
            rip: CODE,
            rflags: 2,
            rsp: STACK_TOP,
            rbx: COUNTER,
            rcx: STEP,
            rdx: REPORT,
            ..Default::default()
        })
        .unwrap();
}

/// Runs until the guest's next report and returns the count it wrote.
fn run_to_report(vcpu: &mut VcpuFd) -> u64 {
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::MmioWrite(addr, data) => {
                assert_eq!(addr, REPORT);
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(data);
                return u64::from_le_bytes(bytes);
            }
            VcpuExit::Intr => {}
            other => {
                let what = format!("{other:?}");
                panic!("unexpected exit {what}");
            }
        }
    }
}

fn all_memory(memory: &GuestMemory) -> Vec<u8> {
    let mut bytes = vec![0u8; MEMORY_SIZE as usize];
    memory.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    bytes
}

/// What must be equal between the original and the restored guest at a report.
fn guest_view(t: &TestVm) -> (u64, u64, [u8; 16], u64) {
    let regs = t.vcpu.get_regs().unwrap();
    let fpu = t.vcpu.get_fpu().unwrap();
    let counter = t.memory.read_obj(GuestAddress(COUNTER)).unwrap();
    (regs.rax, regs.rip, fpu.xmm[1], counter)
}

fn kvm_missing() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "snapshot test: /dev/kvm is missing and CI is set"
    );
    eprintln!("SKIP snapshot test: no /dev/kvm");
    true
}

#[test]
fn restored_vm_continues_where_the_snapshot_was_taken() {
    if kvm_missing() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("splitvisor-snap-kvm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let mut original = create_vm();
    boot(&original);
    assert_eq!(run_to_report(&mut original.vcpu), STEP);
    vcpu_state::complete_pending_io(&mut original.vcpu, 0).unwrap();
    let support = vcpu_state::CaptureSupport::probe(&original.kvm, &original.vm).unwrap();
    let vcpu = vcpu_state::capture(&original.vcpu, 0, &support).unwrap();
    let vm_state = irqchip::capture(&original.vm);
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        created_by: "snapshot test".into(),
        memory: memory_file::save(&dir, &original.memory).unwrap(),
        vcpus: vec![vcpu],
        vm: vm_state,
        devices: Vec::new(),
    };
    manifest.write(&dir).unwrap();
    report_host_support(&manifest);

    // The original goes on to its second report.
    assert_eq!(run_to_report(&mut original.vcpu), 2 * STEP);
    let expected = guest_view(&original);
    assert_eq!(expected.0, 2 * STEP);
    assert_eq!(expected.3, 2 * STEP);

    let mut restored = create_vm();
    let saved = Manifest::read(&dir).unwrap();
    saved
        .check_target(&memory_file::layout_of(&restored.memory), 1, &[])
        .unwrap();
    memory_file::restore(&dir, &saved.memory, &restored.memory).unwrap();
    irqchip::restore(&restored.vm, &saved.vm).unwrap();
    vcpu_state::restore(&restored.vcpu, &saved.vcpus[0]).unwrap();
    assert_eq!(run_to_report(&mut restored.vcpu), 2 * STEP);
    assert_eq!(guest_view(&restored), expected);
    assert!(
        all_memory(&restored.memory) == all_memory(&original.memory),
        "guest memory differs after the same run"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What this host's KVM would not give, in the test's output (the report to the lead).
fn report_host_support(manifest: &Manifest) {
    let vcpu = &manifest.vcpus[0];
    for part in vcpu.unavailable.iter().chain(&manifest.vm.unavailable) {
        eprintln!("unavailable: {part} (errno {:?})", part.errno);
    }
    eprintln!(
        "MSRs: {} saved, {} refused by KVM_GET_MSRS: {:x?}",
        vcpu.msrs.len(),
        vcpu.msrs_refused.len(),
        vcpu.msrs_refused
    );
}
