//! Snapshot and restore on this host's /dev/kvm: a tiny guest on two vCPUs counts at CPL 3
//! (native speed on PVM) in a register, in memory and in an SSE register, and reports each
//! million with an MMIO write. It is captured at its first reports, the original runs on to
//! its second; a second VM restored from the snapshot must reach the very same second reports:
//! same counts on the same vCPUs, same SSE sums, same memory, byte for byte.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_mp_state, kvm_msr_entry, kvm_pit_config, kvm_pit_state2,
    kvm_userspace_memory_region, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::blob::Blob;
use super::format::Manifest;
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
const VCPUS: u8 = 2;
/// vCPU `i` starts counting at `i * START_APART`, so swapped vCPU states would show.
const START_APART: u64 = 5 * STEP;

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
    vcpus: Vec<VcpuFd>,
}

/// What vm.rs does, reduced: memory, TSS, irqchip, PIT (as for Linux) and the vCPUs.
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
    let vcpus = (0..VCPUS)
        .map(|i| vm.create_vcpu(u64::from(i)).expect("KVM_CREATE_VCPU"))
        .collect();
    TestVm {
        kvm,
        vm,
        memory,
        vcpus,
    }
}

/// Boots the counting guest on a fresh VM: identity map, GDT, code, and the vCPUs at CPL 3.
fn boot(t: &TestVm) {
    let protocol = BootProtocol::SplitvisorGuest { start_info: 0 };
    page_tables::write_identity_map(&t.memory, MEMORY_SIZE).unwrap();
    vcpu_regs::write_boot_gdt(&t.memory, &protocol).unwrap();
    t.memory.write_slice(&GUEST, GuestAddress(CODE)).unwrap();
    for (i, vcpu) in (0..VCPUS).zip(&t.vcpus) {
        boot_vcpu(t, vcpu, i, &protocol);
    }
}

fn boot_vcpu(t: &TestVm, vcpu: &VcpuFd, index: u8, protocol: &BootProtocol) {
    let mut ids = t.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    cpuid::filter(&mut ids, index, VCPUS, vcpu.get_tsc_khz().ok());
    vcpu.set_cpuid2(&ids).unwrap();
    let mut sregs = vcpu_regs::sregs(vcpu.get_sregs().unwrap(), protocol);
    // Straight to user mode (PLATFORM.md): RPL/DPL 3 on code and stack.
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.dpl = 3;
        seg.selector |= 3;
    }
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_fpu(&vcpu_regs::fpu()).unwrap();
    let start = u64::from(index) * START_APART;
    vcpu.set_regs(&kvm_bindings::kvm_regs {
        rip: CODE,
        rflags: 2,
        rsp: STACK_TOP,
        rax: start,
        rbx: counter_addr(index),
        rcx: start + STEP,
        rdx: REPORT,
        ..Default::default()
    })
    .unwrap();
    if index > 0 {
        // With the in-kernel LAPIC, an AP waits for INIT/SIPI unless told to run (as vcpu.rs).
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .unwrap();
    }
}

fn counter_addr(index: u8) -> u64 {
    COUNTER + 8 * u64::from(index)
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

/// What must be equal between the original and the restored guest at a report, per vCPU:
/// count, next instruction, SSE sum, count in memory.
fn guest_view(t: &TestVm) -> Vec<(u64, u64, [u8; 16], u64)> {
    (0..VCPUS)
        .zip(&t.vcpus)
        .map(|(i, vcpu)| {
            let regs = vcpu.get_regs().unwrap();
            let fpu = vcpu.get_fpu().unwrap();
            let counter = t.memory.read_obj(GuestAddress(counter_addr(i))).unwrap();
            (regs.rax, regs.rip, fpu.xmm[1], counter)
        })
        .collect()
}

/// Runs every vCPU to its next report; returns the counts.
fn run_all_to_report(t: &mut TestVm) -> Vec<u64> {
    t.vcpus.iter_mut().map(run_to_report).collect()
}

/// The counts the vCPUs report at their `n`th report.
fn counts_at(n: u64) -> Vec<u64> {
    (0..u64::from(VCPUS))
        .map(|i| i * START_APART + n * STEP)
        .collect()
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
    assert_eq!(run_all_to_report(&mut original), counts_at(1));
    let support = vcpu_state::CaptureSupport::probe(&original.kvm, &original.vm).unwrap();
    let mut vcpus = Vec::new();
    for (i, vcpu) in (0..VCPUS).zip(&mut original.vcpus) {
        vcpu_state::complete_pending_io(vcpu, i).unwrap();
        vcpus.push(vcpu_state::capture(vcpu, i, &support).unwrap());
    }
    let vm_state = irqchip::capture(&original.vm);
    let manifest = super::write(&dir, &original.memory, vcpus, vm_state, Vec::new()).unwrap();
    report_host_support(&manifest, &support);

    // The original goes on to its second reports.
    assert_eq!(run_all_to_report(&mut original), counts_at(2));
    let expected = guest_view(&original);
    let counts: Vec<u64> = expected.iter().map(|v| v.0).collect();
    assert_eq!(counts, counts_at(2));

    let mut restored = create_vm();
    let saved = Manifest::read(&dir).unwrap();
    saved
        .check_target(
            &memory_file::layout_of(&restored.memory),
            usize::from(VCPUS),
            &[],
        )
        .unwrap();
    memory_file::restore(&dir, &saved.memory, &restored.memory).unwrap();
    irqchip::restore(&restored.vm, &saved.vm).unwrap();
    for (vcpu, state) in restored.vcpus.iter().zip(&saved.vcpus) {
        vcpu_state::restore(vcpu, state).unwrap();
    }
    // An AP left waiting for INIT/SIPI would block KVM_RUN for ever: check before running.
    let ap_state = restored.vcpus[1].get_mp_state().unwrap().mp_state;
    assert_eq!(
        ap_state, KVM_MP_STATE_RUNNABLE,
        "the AP's MP state was not restored"
    );
    assert_eq!(run_all_to_report(&mut restored), counts_at(2));
    assert_eq!(guest_view(&restored), expected);
    assert!(
        all_memory(&restored.memory) == all_memory(&original.memory),
        "guest memory differs after the same run"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What this host's KVM would not give, in the test's output (the report to the lead).
fn report_host_support(manifest: &Manifest, support: &vcpu_state::CaptureSupport) {
    let vcpu = &manifest.vcpus[0];
    eprintln!(
        "XSAVE area fits kvm_xsave: {}; PVM: {}",
        support.xsave_fits,
        std::path::Path::new("/sys/module/kvm_pvm").exists()
    );
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

/// Distinctive values in every part, set through KVM's own set ioctls, so that a part that is
/// not carried over shows as a difference from a fresh VM.
fn mark(t: &TestVm) {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    t.vm.get_irqchip(&mut chip).unwrap();
    // Redirection entry 3: masked, vector 0x33.
    // SAFETY: for KVM_IRQCHIP_IOAPIC, KVM fills the `ioapic` member.
    let mut ioapic = unsafe { chip.chip.ioapic };
    ioapic.redirtbl[3].bits = (1 << 16) | 0x33;
    chip.chip.ioapic = ioapic;
    t.vm.set_irqchip(&chip).expect("KVM_SET_IRQCHIP (IOAPIC)");
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    t.vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: for KVM_IRQCHIP_PIC_MASTER, KVM fills the `pic` member.
    let mut pic = unsafe { chip.chip.pic };
    pic.imr = 0xfb;
    chip.chip.pic = pic;
    t.vm.set_irqchip(&chip).expect("KVM_SET_IRQCHIP (PIC)");
    let mut pit = t.vm.get_pit2().unwrap();
    pit.channels[0].count = 0x1234;
    pit.channels[0].mode = 2;
    t.vm.set_pit2(&pit).expect("KVM_SET_PIT2");
    t.vm.set_clock(&kvm_clock_data {
        clock: CLOCK_MARK,
        ..Default::default()
    })
    .expect("KVM_SET_CLOCK");
    mark_vcpu(&t.vcpus[0]);
}

/// The vCPU's parts, as `mark` does for the VM's.
fn mark_vcpu(vcpu: &VcpuFd) {
    let mut lapic = vcpu.get_lapic().unwrap();
    lapic.regs[LAPIC_TPR] = 0x20;
    vcpu.set_lapic(&lapic).expect("KVM_SET_LAPIC");
    let mut debug = vcpu.get_debug_regs().unwrap();
    debug.db[0] = 0x1234_5000;
    debug.db[3] = 0x6000;
    vcpu.set_debug_regs(&debug).expect("KVM_SET_DEBUGREGS");
    let mut xcrs = vcpu.get_xcrs().unwrap();
    xcrs.xcrs[0].value = 0x3; // x87 | SSE
    vcpu.set_xcrs(&xcrs).expect("KVM_SET_XCRS");
    let mut events = vcpu.get_vcpu_events().unwrap();
    events.nmi.masked = 1;
    vcpu.set_vcpu_events(&events).expect("KVM_SET_VCPU_EVENTS");
    // Not run again after this: a halted vCPU is as good a mark as any.
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_HALTED,
    })
    .expect("KVM_SET_MP_STATE");
    let msrs = Msrs::from_entries(&MSR_MARKS.map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(vcpu.set_msrs(&msrs).expect("KVM_SET_MSRS"), MSR_MARKS.len());
}

const LAPIC_TPR: usize = 0x80;
/// The LAPIC timer's current count: it runs, so it is not compared.
const LAPIC_TIMER_CCR: std::ops::Range<usize> = 0x390..0x394;
const CLOCK_MARK: u64 = 123_000_000_000;
/// SYSENTER_EIP, STAR, KERNEL_GS_BASE.
const MSR_MARKS: [(u32, u64); 3] = [
    (0x176, 0x1234_5678),
    (0xc000_0081, 0x0023_0010_0000_0000),
    (0xc000_0102, 0x5555_0000),
];
/// IA32_TSC runs between the two captures.
const MSR_IA32_TSC: u32 = 0x10;

/// The PIT state without the host time each channel's count was loaded at.
fn pit_without_load_time(blob: &Blob) -> Blob {
    let mut pit: kvm_pit_state2 = blob.to("PIT").unwrap();
    for channel in &mut pit.channels {
        channel.count_load_time = 0;
    }
    Blob::of(&pit)
}

/// The PIC without its request register: the PIT ticks into it while the test runs.
fn pic_without_requests(blob: &Blob) -> Blob {
    let mut chip: kvm_irqchip = blob.to("PIC").unwrap();
    // SAFETY: for the PIC chip ids, KVM fills the `pic` member.
    let mut pic = unsafe { chip.chip.pic };
    (pic.irr, pic.last_irr) = (0, 0);
    chip.chip.pic = pic;
    Blob::of(&chip)
}

/// The IOAPIC without its request register, for the same reason.
fn ioapic_without_requests(blob: &Blob) -> Blob {
    let mut chip: kvm_irqchip = blob.to("IOAPIC").unwrap();
    // SAFETY: for KVM_IRQCHIP_IOAPIC, KVM fills the `ioapic` member.
    let mut ioapic = unsafe { chip.chip.ioapic };
    ioapic.irr = 0;
    chip.chip.ioapic = ioapic;
    Blob::of(&chip)
}

fn lapic_without_timer_count(blob: &Blob) -> Blob {
    let mut bytes = blob.clone();
    bytes.0[LAPIC_TIMER_CCR].fill(0);
    bytes
}

/// Parts whose restored bytes differ from the saved ones, with the first differing offset.
fn differences(parts: &[(&str, Option<Blob>, Option<Blob>)]) -> Vec<String> {
    parts
        .iter()
        .filter(|(_, saved, again)| saved != again)
        .map(|(name, saved, again)| match (saved, again) {
            (Some(s), Some(a)) => {
                let at = s.0.iter().zip(&a.0).position(|(x, y)| x != y);
                format!("{name}: differs at byte {at:?}")
            }
            _ => format!("{name}: present {} vs {}", saved.is_some(), again.is_some()),
        })
        .collect()
}

#[test]
fn every_part_survives_capture_and_restore_on_this_host() {
    if kvm_missing() {
        return;
    }
    let mut original = create_vm();
    boot(&original);
    assert_eq!(run_to_report(&mut original.vcpus[0]), STEP);
    vcpu_state::complete_pending_io(&mut original.vcpus[0], 0).unwrap();
    mark(&original);
    let support = vcpu_state::CaptureSupport::probe(&original.kvm, &original.vm).unwrap();
    let saved = vcpu_state::capture(&original.vcpus[0], 0, &support).unwrap();
    let saved_vm = irqchip::capture(&original.vm);

    let restored = create_vm();
    let fresh = vcpu_state::capture(&restored.vcpus[0], 0, &support).unwrap();
    let fresh_vm = irqchip::capture(&restored.vm);
    irqchip::restore(&restored.vm, &saved_vm).unwrap();
    vcpu_state::restore(&restored.vcpus[0], &saved).unwrap();
    let again = vcpu_state::capture(&restored.vcpus[0], 0, &support).unwrap();
    let again_vm = irqchip::capture(&restored.vm);

    let pit = |s: &irqchip::IrqchipState| s.pit.as_ref().map(pit_without_load_time);
    let lapic = |s: &vcpu_state::VcpuState| s.lapic.as_ref().map(lapic_without_timer_count);
    let parts = |a: &vcpu_state::VcpuState, b: &irqchip::IrqchipState| {
        vec![
            ("regs", Some(a.regs.clone())),
            ("sregs", Some(a.sregs.clone())),
            ("cpuid", a.cpuid.clone()),
            ("fpu", a.fpu.clone()),
            ("xsave", a.xsave.clone()),
            ("xcrs", a.xcrs.clone()),
            ("lapic", lapic(a)),
            ("events", a.events.clone()),
            ("debug_regs", a.debug_regs.clone()),
            (
                "mp_state",
                a.mp_state.map(|m| Blob(m.to_le_bytes().to_vec())),
            ),
            (
                "pic_master",
                b.pic_master.as_ref().map(pic_without_requests),
            ),
            ("pic_slave", b.pic_slave.as_ref().map(pic_without_requests)),
            ("ioapic", b.ioapic.as_ref().map(ioapic_without_requests)),
            ("pit", pit(b)),
        ]
    };
    let pair = |x: &vcpu_state::VcpuState, xs, y: &vcpu_state::VcpuState, ys| {
        parts(x, xs)
            .into_iter()
            .zip(parts(y, ys))
            .map(|((name, a), (_, b))| (name, a, b))
            .collect::<Vec<_>>()
    };
    let not_restored = differences(&pair(&saved, &saved_vm, &again, &again_vm));
    let unmarked = differences(&pair(&saved, &saved_vm, &fresh, &fresh_vm));
    eprintln!("parts a fresh VM has differently (what restore must carry): {unmarked:?}");
    assert_eq!(not_restored, Vec::<String>::new(), "parts not restored");
    let vcpu_parts = [
        "regs",
        "sregs",
        "fpu",
        "xsave",
        "xcrs",
        "lapic",
        "events",
        "debug_regs",
        "mp_state",
    ];
    for part in vcpu_parts {
        assert!(
            unmarked.iter().any(|d| d.starts_with(&format!("{part}:"))),
            "{part} of a fresh VM equals the saved one: the test would not see a lost restore"
        );
    }
    for part in ["pic_master", "ioapic", "pit"] {
        assert!(unmarked.iter().any(|d| d.starts_with(&format!("{part}:"))));
    }
    check_msrs(&saved, &again);
    let clock: kvm_clock_data = again_vm.clock.as_ref().unwrap().to("kvmclock").unwrap();
    let saved_clock: kvm_clock_data = saved_vm.clock.as_ref().unwrap().to("kvmclock").unwrap();
    assert!(saved_clock.clock >= CLOCK_MARK);
    // It goes on from the saved value (plus the few ms of this test), not from the new VM's 0.
    assert!(
        (saved_clock.clock..saved_clock.clock + 10_000_000_000).contains(&clock.clock),
        "kvmclock {} after restoring {}",
        clock.clock,
        saved_clock.clock
    );
}

/// Every saved MSR comes back, except the TSC, which runs.
fn check_msrs(saved: &vcpu_state::VcpuState, again: &vcpu_state::VcpuState) {
    for (index, data) in MSR_MARKS {
        assert!(
            saved.msrs.contains(&vcpu_state::Msr { index, data }),
            "marked MSR {index:#x} not saved"
        );
    }
    let lost: Vec<_> = saved
        .msrs
        .iter()
        .filter(|m| m.index != MSR_IA32_TSC && !again.msrs.contains(m))
        .collect();
    assert!(lost.is_empty(), "MSRs not restored: {lost:x?}");
}

#[test]
fn an_msr_kvm_refuses_is_set_aside_and_the_rest_saved() {
    if kvm_missing() {
        return;
    }
    let t = create_vm();
    boot(&t);
    let mut support = vcpu_state::CaptureSupport::probe(&t.kvm, &t.vm).unwrap();
    let all = support.msr_indices.clone();
    assert!(all.len() > 2, "KVM lists {} MSRs", all.len());
    // No such MSR: KVM_GET_MSRS stops there.
    const BOGUS: u32 = 0x4fff_0000;
    support.msr_indices.insert(1, BOGUS);
    let state = vcpu_state::capture(&t.vcpus[0], 0, &support).unwrap();
    assert_eq!(state.msrs_refused, vec![BOGUS]);
    let saved: Vec<u32> = state.msrs.iter().map(|m| m.index).collect();
    assert_eq!(saved, all);
}
