//! ACPI tables for Linux guests: RSDP, XSDT, a hardware-reduced FADT, the MADT and a DSDT that
//! describes the virtio-mmio windows, COM1 and the `_S5` (power off) sleep state.
//!
//! The platform is "hardware-reduced" ACPI: no PM1 blocks, no SCI, no GPEs. Power off and reset
//! go through the FADT's sleep control and reset registers, which `devices::acpi_power` serves.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemory;

/// The SLP_TYP value the DSDT's `_S5_` package gives: a guest writes it, with SLP_EN, to the
/// sleep control register to power off.
pub const S5_SLEEP_TYPE: u8 = 5;

const OEM_ID: [u8; 6] = *b"SPLITV";
const OEM_TABLE_ID: [u8; 8] = *b"SPLITVSR";
const OEM_REVISION: u32 = 1;
/// The FADT's hypervisor vendor identity (ACPI 6.0+): any 8 bytes naming the hypervisor.
const HYPERVISOR_VENDOR: [u8; 8] = *b"SPLITVSR";

const LOCAL_APIC_ADDRESS: u32 = 0xfee0_0000;
const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT revision 5 (ACPI 6.3+).
const MADT_REVISION: u8 = 5;
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags 0: polarity and trigger mode conform to the bus (ISA: edge, active high).
const MPS_INTI_CONFORMING: u16 = 0;
/// Processor UID 0xff in a local APIC NMI structure means every processor.
const ALL_PROCESSORS: u8 = 0xff;
/// Local APIC NMIs arrive on LINT1, as on PCs (and as the MP table says).
const NMI_LINT: u8 = 1;
/// The GSI the PIT's ISA IRQ 0 arrives on. KVM's default GSI routing (which splitvisor keeps)
/// wires the in-kernel PIT's GSI 0 to IOAPIC pin 0, unlike QEMU, which reroutes it to pin 2
/// and says so with an IRQ0 -> GSI 2 override. Keep this in step with the GSI routing.
const PIT_GSI: u32 = 0;

/// IA-PC boot architecture flags (FADT `IAPC_BOOT_ARCH`): no VGA, no MSI (there is no PCI),
/// no CMOS RTC. The 8042 flag stays clear: the i8042 device only implements the reset pulse,
/// so Linux must not probe a keyboard controller (`reboot=k` still writes the pulse).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// The Linux virtio-mmio driver's ACPI hardware ID.
const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// Device names are "V" + 3 hex digits, so this many fit in the namespace.
const MAX_VIRTIO_DEVICES: usize = 0x1000;

/// Tables start on 16-byte boundaries (the RSDP must; the others are aligned alike).
const TABLE_ALIGN: u64 = 16;

/// One virtio-mmio device window and its interrupt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmioWindow {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// What the ACPI tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiPlatform {
    pub vcpus: u8,
    pub virtio_mmio: Vec<MmioWindow>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error(
        "the ACPI tables need {size} bytes but only {max} fit at {start:#x}; \
         use fewer vCPUs or devices",
        start = layout::ACPI_START,
        max = layout::ACPI_MAX_SIZE
    )]
    TooLarge { size: u64 },
    #[error(
        "{count} virtio-mmio devices cannot be named in the ACPI namespace (at most {MAX_VIRTIO_DEVICES}); \
         use fewer devices"
    )]
    TooManyDevices { count: usize },
    #[error(
        "virtio-mmio window {index} at {base:#x} (+{size:#x}) does not fit below 4 GiB, \
         which the DSDT's Memory32Fixed descriptor requires"
    )]
    WindowAbove4G { index: usize, base: u64, size: u64 },
    #[error("could not write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Writes every table at `layout::ACPI_START` and returns the RSDP's guest address (for
/// `boot_params.acpi_rsdp_addr`; Linux also finds it by scanning the BIOS area).
pub fn write(memory: &GuestMemory, platform: &AcpiPlatform) -> Result<u64, AcpiError> {
    let (rsdp, tables) = build(platform)?;
    memory
        .write_slice(&tables, GuestAddress(rsdp))
        .map_err(AcpiError::Write)?;
    Ok(rsdp)
}

/// Lays out the tables; returns the RSDP's address and the bytes to write there.
fn build(platform: &AcpiPlatform) -> Result<(u64, Vec<u8>), AcpiError> {
    let dsdt = dsdt(&platform.virtio_mmio)?;
    let madt = madt(platform.vcpus);

    // The XSDT goes last, so that every address it lists is known before it is built.
    let rsdp_addr = layout::ACPI_START;
    let fadt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let xsdt_addr = align(dsdt_addr + dsdt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);

    let size = xsdt_addr + xsdt_bytes.len() as u64 - rsdp_addr;
    if size > layout::ACPI_MAX_SIZE {
        return Err(AcpiError::TooLarge { size });
    }

    let mut out = vec![0u8; size as usize];
    let mut place = |addr: u64, table: &dyn Aml| {
        let mut bytes = Vec::new();
        table.to_aml_bytes(&mut bytes);
        let at = (addr - rsdp_addr) as usize;
        out[at..at + bytes.len()].copy_from_slice(&bytes);
    };
    place(rsdp_addr, &Rsdp::new(OEM_ID, xsdt_addr));
    place(fadt_addr, &fadt(dsdt_addr));
    place(madt_addr, &madt);
    place(dsdt_addr, &dsdt);
    place(xsdt_addr, &xsdt);
    Ok((rsdp_addr, out))
}

fn align(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGN)
}

/// An 8-bit register in I/O space.
fn io_byte_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

fn fadt(dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT).into();
    // Linux's acpi_reboot() only uses an 8-bit reset register at bit offset 0.
    fadt.reset_reg = io_byte_register(layout::ACPI_RESET_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_byte_register(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte_register(layout::ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    fadt.finalize()
}

/// The MADT. The crate's builder has no flags, overrides or NMI structures, so the table is
/// assembled on its generic `Sdt`, with the crate's local APIC and IOAPIC structures.
fn madt(vcpus: u8) -> Sdt {
    let mut madt = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, LOCAL_APIC_ADDRESS);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut entries = Vec::new();
    for id in 0..vcpus {
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    // The same IOAPIC id as the MP table, so both descriptions agree.
    IoApic::new(vcpus, IOAPIC_ADDRESS, 0).to_aml_bytes(&mut entries);

    entries.extend_from_slice(&[MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0, 0]); // ISA bus, IRQ 0
    entries.extend_from_slice(&PIT_GSI.to_le_bytes());
    entries.extend_from_slice(&MPS_INTI_CONFORMING.to_le_bytes());

    entries.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS]);
    entries.extend_from_slice(&MPS_INTI_CONFORMING.to_le_bytes());
    entries.push(NMI_LINT);

    madt.append_slice(&entries);
    madt
}

/// The DSDT: `\_SB_` with the virtio-mmio devices and COM1, and the `\_S5_` sleep state.
fn dsdt(windows: &[MmioWindow]) -> Result<Sdt, AcpiError> {
    if windows.len() > MAX_VIRTIO_DEVICES {
        return Err(AcpiError::TooManyDevices {
            count: windows.len(),
        });
    }
    let mut devices = Vec::new();
    for (index, window) in windows.iter().enumerate() {
        devices.extend_from_slice(&virtio_device(index, window)?);
    }
    devices.extend_from_slice(&com1());
    let system_bus = aml::Scope::raw("\\_SB_".into(), devices);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&system_bus);
    // Package {SLP_TYPa, SLP_TYPb, reserved, reserved}; hardware-reduced ACPI uses SLP_TYPa.
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    let mut s5_bytes = Vec::new();
    aml::Name::new("\\_S5_".into(), &s5).to_aml_bytes(&mut s5_bytes);
    dsdt.append_slice(&s5_bytes);
    Ok(dsdt)
}

/// One virtio-mmio device, as Linux's virtio_mmio driver matches it ("LNRO0005").
fn virtio_device(index: usize, window: &MmioWindow) -> Result<Vec<u8>, AcpiError> {
    let above_4g = || AcpiError::WindowAbove4G {
        index,
        base: window.base,
        size: window.size,
    };
    let base = u32::try_from(window.base).map_err(|_| above_4g())?;
    let size = u32::try_from(window.size).map_err(|_| above_4g())?;
    if base.checked_add(size).is_none() {
        return Err(above_4g());
    }
    let uid = index as u32;
    let memory = aml::Memory32Fixed::new(true, base, size);
    // Consumer, edge-triggered, active-high, exclusive: how KVM's irqfd delivers it.
    let interrupt = aml::Interrupt::new(true, true, false, false, window.gsi);
    let crs = aml::ResourceTemplate::new(vec![&memory, &interrupt]);
    let hid = aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID);
    let uid = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let name = format!("V{index:03X}");
    let mut bytes = Vec::new();
    aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut bytes);
    Ok(bytes)
}

/// COM1, the console's 16550 UART.
fn com1() -> Vec<u8> {
    let port = layout::SERIAL_PORT;
    let io = aml::IO::new(port, port, 1, layout::SERIAL_PORT_LEN as u8);
    let interrupt = aml::Interrupt::new(true, true, false, false, layout::SERIAL_GSI);
    let crs = aml::ResourceTemplate::new(vec![&io, &interrupt]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let mut bytes = Vec::new();
    aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
