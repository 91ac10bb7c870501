//! Getting a guest to its first instruction: load the kernel, write the boot tables, and
//! prepare the registers each vCPU starts with. The project's guest gets `hvm_start_info`
//! (docs/boot-protocol.md); Linux gets the zero page, an initramfs and ACPI tables.

pub mod acpi;
pub mod cmdline;
pub mod cpuid;
pub mod e820;
pub mod initramfs;
pub mod kernel;
pub mod lapic;
pub mod mptable;
pub mod page_tables;
pub mod start_info;
pub mod vcpu_regs;
pub mod zero_page;

use std::path::Path;

use crate::config::KernelSource;
use crate::memory::GuestMemory;
pub use kernel::KernelFormat;

/// Linux's command line when `--cmdline` is not given: the console on the first serial port,
/// reboot through the keyboard controller (which ends the VM), and a panic reboots after 1 s
/// instead of hanging.
pub const LINUX_DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error("--initramfs {} is for a Linux kernel; the splitvisor guest ({}) takes none", .initramfs.display(), .kernel)]
    InitramfsForSplitvisorGuest {
        initramfs: std::path::PathBuf,
        kernel: String,
    },
    #[error("could not write the page tables into guest memory")]
    PageTables(#[source] vm_memory::GuestMemoryError),
    #[error("could not write the boot information")]
    StartInfo(#[from] start_info::StartInfoError),
    #[error("could not write the kernel command line")]
    Cmdline(#[from] cmdline::CmdlineError),
    #[error("could not write Linux's zero page")]
    ZeroPage(#[from] zero_page::ZeroPageError),
    #[error("could not write the MP table")]
    MpTable(#[from] mptable::MpTableError),
    #[error("could not write the ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
}

/// How the boot CPU finds its boot information.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// The project's guest: RBX = `hvm_start_info`, RDI = vCPU index, every vCPU at the entry.
    SplitvisorGuest { start_info: u64 },
    /// Linux's 64-bit boot protocol: RSI = zero page; only the boot CPU starts, the others wait
    /// for the kernel's INIT/SIPI.
    Linux { zero_page: u64 },
}

/// Where execution starts and what the boot tables say, for `vcpu_regs` to use.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub entry: u64,
    pub protocol: BootProtocol,
    pub format: KernelFormat,
}

/// What to boot, as configured.
pub struct BootRequest<'a> {
    pub kernel: &'a KernelSource,
    pub initramfs: Option<&'a Path>,
    /// `--cmdline`; `None` gives the kernel's default.
    pub cmdline: Option<&'a str>,
    /// Command-line words describing the attached devices (`virtio_mmio.device=...`,
    /// `ata=primary`): the project's guest reads all of them, Linux those of virtio-mmio
    /// devices when it has no ACPI tables to find them in.
    pub device_words: &'a [String],
    pub vcpus: u8,
    /// What the ACPI tables describe, for a Linux guest; `None`: no ACPI tables.
    pub acpi: Option<&'a acpi::AcpiPlatform>,
}

/// Loads the kernel and writes every table the guest reads at boot.
pub fn prepare(memory: &GuestMemory, request: &BootRequest) -> Result<BootEntry, BootError> {
    let kernel = kernel::load(memory, request.kernel)?;
    page_tables::write_identity_map(memory, crate::memory::total_size(memory))
        .map_err(BootError::PageTables)?;
    mptable::write(memory, request.vcpus)?;
    let protocol = if kernel.format.is_linux() {
        prepare_linux(memory, request, &kernel)?
    } else {
        if let Some(initramfs) = request.initramfs {
            return Err(BootError::InitramfsForSplitvisorGuest {
                initramfs: initramfs.to_path_buf(),
                kernel: kernel_name(request.kernel),
            });
        }
        let cmdline = guest_cmdline(request.cmdline.unwrap_or(""), request.device_words);
        BootProtocol::SplitvisorGuest {
            start_info: start_info::write(memory, &cmdline)?,
        }
    };
    Ok(BootEntry {
        entry: kernel.entry,
        protocol,
        format: kernel.format,
    })
}

fn prepare_linux(
    memory: &GuestMemory,
    request: &BootRequest,
    kernel: &kernel::LoadedKernel,
) -> Result<BootProtocol, BootError> {
    let header = kernel.setup_header.as_ref();
    let initramfs = request
        .initramfs
        .map(|path| initramfs::load(memory, path, kernel.footprint_end, header))
        .transpose()?;
    let rsdp = request
        .acpi
        .map(|platform| acpi::write(memory, platform))
        .transpose()?;
    // With ACPI the kernel finds the virtio-mmio devices in the DSDT; naming them on the
    // command line too would create each device twice.
    let words: Vec<String> = if rsdp.is_some() {
        Vec::new()
    } else {
        request
            .device_words
            .iter()
            .filter(|w| w.starts_with("virtio_mmio.device="))
            .cloned()
            .collect()
    };
    let cmdline = guest_cmdline(request.cmdline.unwrap_or(LINUX_DEFAULT_CMDLINE), &words);
    cmdline::write_cmdline(memory, &cmdline, zero_page::cmdline_max(header) + 1)?;
    let info = zero_page::LinuxBootInfo {
        setup_header: header,
        initramfs,
        rsdp,
    };
    Ok(BootProtocol::Linux {
        zero_page: zero_page::write(memory, &info)?,
    })
}

/// The user's command line followed by the device words.
fn guest_cmdline(user: &str, device_words: &[String]) -> String {
    std::iter::once(user)
        .chain(device_words.iter().map(String::as_str))
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn kernel_name(source: &KernelSource) -> String {
    match source {
        KernelSource::Embedded => "the one embedded in splitvisor".to_string(),
        KernelSource::File(path) => format!("--kernel {}", path.display()),
    }
}
