//! Tests for the ACPI tables: read back from guest memory the way Linux finds them.

use super::*;
use crate::memory::create_guest_memory;

const FADT_LEN: usize = 276;

fn windows(count: usize) -> Vec<MmioWindow> {
    (0..count)
        .map(|i| MmioWindow {
            base: layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE,
            size: layout::VIRTIO_MMIO_SIZE,
            gsi: layout::VIRTIO_FIRST_GSI + i as u32,
        })
        .collect()
}

fn platform(vcpus: u8, devices: usize) -> AcpiPlatform {
    AcpiPlatform {
        vcpus,
        virtio_mmio: windows(devices),
    }
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Finds the RSDP as Linux does: "RSD PTR " on a 16-byte boundary in 0xe0000..0x100000.
fn find_rsdp(memory: &GuestMemory) -> u64 {
    let mut bios = vec![0u8; 0x2_0000];
    memory
        .read_slice(&mut bios, GuestAddress(0xe_0000))
        .unwrap();
    let at = (0..bios.len())
        .step_by(16)
        .find(|&at| &bios[at..at + 8] == b"RSD PTR ")
        .expect("no RSDP in the BIOS area");
    0xe_0000 + at as u64
}

/// Reads a whole table by its header's length field; checks that it lies in the ACPI area
/// and that its checksum is right.
fn table(memory: &GuestMemory, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let mut header = [0u8; 36];
    memory.read_slice(&mut header, GuestAddress(addr)).unwrap();
    assert_eq!(&header[..4], signature, "table at {addr:#x}");
    let len = u32_at(&header, 4) as usize;
    assert!(addr >= layout::ACPI_START);
    assert!(addr + len as u64 <= layout::ACPI_START + layout::ACPI_MAX_SIZE);
    let mut bytes = vec![0u8; len];
    memory.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    assert_eq!(
        sum(&bytes),
        0,
        "{} checksum",
        String::from_utf8_lossy(signature)
    );
    bytes
}

/// All tables of a VM, as found from the RSDP.
struct Tables {
    rsdp: Vec<u8>,
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    madt: Vec<u8>,
    dsdt: Vec<u8>,
}

fn write_and_find(platform: &AcpiPlatform) -> Tables {
    let memory = create_guest_memory(64 << 20, false).unwrap();
    let returned = write(&memory, platform).unwrap();
    let rsdp_addr = find_rsdp(&memory);
    assert_eq!(returned, rsdp_addr);
    let mut rsdp = vec![0u8; 36];
    memory
        .read_slice(&mut rsdp, GuestAddress(rsdp_addr))
        .unwrap();
    let xsdt = table(&memory, u64_at(&rsdp, 24), b"XSDT");
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|at| u64_at(&xsdt, at))
        .collect();
    assert_eq!(entries.len(), 2, "the XSDT lists the FADT and the MADT");
    let fadt = table(&memory, entries[0], b"FACP");
    let madt = table(&memory, entries[1], b"APIC");
    let dsdt = table(&memory, u64_at(&fadt, 140), b"DSDT");
    Tables {
        rsdp,
        xsdt,
        fadt,
        madt,
        dsdt,
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| w == &needle)
        .count()
}

#[test]
fn rsdp_and_xsdt_lead_to_every_table() {
    let tables = write_and_find(&platform(2, 8));
    let rsdp = &tables.rsdp;
    assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
    assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
    assert_eq!(tables.xsdt.len(), 36 + 16);
    assert_eq!(tables.fadt.len(), FADT_LEN);
    assert_eq!(
        u32_at(&tables.fadt, 40),
        0,
        "only the 64-bit X_DSDT is used"
    );
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let fadt = write_and_find(&platform(1, 0)).fadt;
    assert_eq!(fadt[8], 6, "FADT revision");
    let flags = u32_at(&fadt, 112);
    assert_eq!(
        flags,
        Flags::HwReducedAcpi as u32 | Flags::ResetRegSup as u32
    );
    assert_eq!(
        u16_at(&fadt, 109),
        0b10_1100,
        "no VGA, no MSI, no CMOS RTC, no 8042"
    );
    let io_byte = |port: u16| {
        let mut gas = vec![1, 8, 0, 1];
        gas.extend_from_slice(&u64::from(port).to_le_bytes());
        gas
    };
    assert_eq!(fadt[116..128], io_byte(layout::ACPI_RESET_PORT));
    assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
    assert_eq!(fadt[244..256], io_byte(layout::ACPI_SLEEP_CONTROL_PORT));
    assert_eq!(fadt[256..268], io_byte(layout::ACPI_SLEEP_STATUS_PORT));
    assert_eq!(&fadt[268..276], b"SPLITVSR");
}

/// MADT entries as (type, bytes).
fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut entries = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let len = madt[at + 1] as usize;
        assert!(len >= 2 && at + len <= madt.len(), "entry at {at} overruns");
        entries.push((madt[at], &madt[at..at + len]));
        at += len;
    }
    entries
}

#[test]
fn madt_has_one_local_apic_per_vcpu_and_the_ioapic() {
    for vcpus in [1u8, 2, 8, 255] {
        let madt = write_and_find(&platform(vcpus, 2)).madt;
        let n = vcpus as usize;
        assert_eq!(madt.len(), 44 + 8 * n + 12 + 10 + 6);
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");
        let entries = madt_entries(&madt);
        let lapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 0).collect();
        assert_eq!(lapics.len(), n);
        for (i, (_, e)) in lapics.iter().enumerate() {
            assert_eq!(
                (e[2], e[3], u32_at(e, 4)),
                (i as u8, i as u8, 1),
                "vCPU {i}"
            );
        }
        let ioapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 1).collect();
        assert_eq!(ioapics.len(), 1);
        let ioapic = ioapics[0].1;
        assert_eq!(ioapic[2], vcpus, "same IOAPIC id as the MP table");
        assert_eq!((u32_at(ioapic, 4), u32_at(ioapic, 8)), (0xfec0_0000, 0));
        let overrides: Vec<_> = entries.iter().filter(|(t, _)| *t == 2).collect();
        assert_eq!(overrides.len(), 1);
        let irq0 = overrides[0].1;
        assert_eq!((irq0[2], irq0[3], u32_at(irq0, 4)), (0, 0, PIT_GSI));
        let nmis: Vec<_> = entries.iter().filter(|(t, _)| *t == 4).collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!((nmis[0].1[2], nmis[0].1[5]), (0xff, 1), "all CPUs, LINT1");
        assert_eq!(entries.len(), n + 3);
    }
}

#[test]
fn dsdt_describes_every_virtio_window_com1_and_s5() {
    let platform = platform(2, 8);
    let dsdt = write_and_find(&platform).dsdt;
    assert_eq!(u32_at(&dsdt, 4) as usize, dsdt.len());
    assert_eq!(count(&dsdt, b"LNRO0005"), 8);
    for (i, w) in platform.virtio_mmio.iter().enumerate() {
        // Memory32Fixed(ReadWrite, base, size)
        let mut memory = vec![0x86, 9, 0, 1];
        memory.extend_from_slice(&(w.base as u32).to_le_bytes());
        memory.extend_from_slice(&(w.size as u32).to_le_bytes());
        // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend_from_slice(&w.gsi.to_le_bytes());
        let mut crs = memory;
        crs.extend_from_slice(&irq);
        assert_eq!(count(&dsdt, &crs), 1, "window {i}");
        assert_eq!(count(&dsdt, format!("V{i:03X}").as_bytes()), 1);
    }
    // EisaId("PNP0501") as a DWord, then IO(Decode16, 0x3f8, 0x3f8, 1, 8) and IRQ 4.
    assert_eq!(count(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
    assert_eq!(count(&dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), 1);
    assert_eq!(count(&dsdt, &[0x89, 6, 0, 0b0011, 1, 4, 0, 0, 0]), 1);
    // Name(\_S5_, Package(4) {5, 0, 0, 0})
    let s5 = [
        b'\\',
        b'_',
        b'S',
        b'5',
        b'_',
        0x12,
        7,
        4,
        0x0a,
        S5_SLEEP_TYPE,
        0,
        0,
        0,
    ];
    assert_eq!(count(&dsdt, &s5), 1);
}

#[test]
fn the_largest_vm_fits_and_too_much_is_an_error() {
    let memory = create_guest_memory(64 << 20, false).unwrap();
    write(&memory, &platform(255, 8)).unwrap();
    write(&memory, &platform(255, 64)).unwrap();
    match write(&memory, &platform(2, 2000)) {
        Err(e @ AcpiError::TooLarge { .. }) => assert!(e.to_string().contains("fewer")),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(matches!(
        write(&memory, &platform(2, 5000)),
        Err(AcpiError::TooManyDevices { count: 5000 })
    ));
    let mut high = platform(1, 1);
    high.virtio_mmio[0].base = 1 << 32;
    assert!(matches!(
        write(&memory, &high),
        Err(AcpiError::WindowAbove4G { index: 0, .. })
    ));
}

#[test]
fn a_failed_guest_memory_write_is_an_error() {
    // 512 KiB of RAM ends below the ACPI area.
    let memory = create_guest_memory(512 << 10, false).unwrap();
    assert!(matches!(
        write(&memory, &platform(1, 1)),
        Err(AcpiError::Write(_))
    ));
}

/// Disassembles every table with ACPICA's `iasl -d`, which rejects malformed AML and reports
/// table fields by name. Skipped when iasl (Debian: acpica-tools) is not installed, except in CI
/// (`CI` set), where .ci/install-deps.sh installs it and its absence is a failure.
#[test]
fn iasl_disassembles_every_table() {
    if std::process::Command::new("iasl")
        .arg("-v")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "iasl is not installed; run .ci/install-deps.sh (acpica-tools)"
        );
        eprintln!("SKIP: iasl not installed (apt-get install acpica-tools)");
        return;
    }
    let tables = write_and_find(&platform(2, 3));
    let dir = std::env::temp_dir().join(format!("splitvisor-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disassemble = |name: &str, bytes: &[u8]| -> String {
        let path = dir.join(format!("{name}.dat"));
        std::fs::write(&path, bytes).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl -d {name}: {log}");
        std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap()
    };
    let dsdt = disassemble("dsdt", &tables.dsdt);
    let fadt = disassemble("fadt", &tables.fadt);
    let madt = disassemble("madt", &tables.madt);
    std::fs::remove_dir_all(&dir).unwrap();

    for text in [
        "Device (V002)",
        "Name (_HID, \"LNRO0005\")",
        "Memory32Fixed (ReadWrite,",
        "0xD0002000,",
        "Name (_HID, EisaId (\"PNP0501\")",
        "Name (\\_S5, Package (0x04)",
    ] {
        assert!(dsdt.contains(text), "DSDT lacks {text:?}:\n{dsdt}");
    }
    for text in [
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
        "Sleep Control Register : [Generic Address Structure]",
        "Value to cause reset : 01",
    ] {
        assert!(fadt.contains(text), "FADT lacks {text:?}:\n{fadt}");
    }
    assert_eq!(madt.matches("Processor Local APIC").count(), 2, "{madt}");
    assert!(madt.contains("Interrupt Source Override"), "{madt}");
}
