//! Getting a guest to its first instruction: load the kernel, write the boot tables, and
//! prepare the registers each vCPU starts with (see `docs/boot-protocol.md`).

pub mod acpi;
pub mod cpuid;
pub mod kernel;
pub mod mptable;
pub mod page_tables;
pub mod start_info;
pub mod vcpu_regs;

use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error("could not write the page tables into guest memory")]
    PageTables(#[source] vm_memory::GuestMemoryError),
    #[error("could not write the boot information")]
    StartInfo(#[from] start_info::StartInfoError),
    #[error("could not write the MP table")]
    MpTable(#[from] mptable::MpTableError),
}

/// Where execution starts and what the boot tables say, for `vcpu_regs` to use.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub entry: u64,
    pub start_info: u64,
}

/// Loads the kernel and writes every table the guest reads at boot.
pub fn prepare(
    memory: &GuestMemory,
    kernel: &crate::config::KernelSource,
    cmdline: &str,
    vcpus: u8,
) -> Result<BootEntry, BootError> {
    let entry = kernel::load(memory, kernel)?;
    page_tables::write_identity_map(memory, crate::memory::total_size(memory))
        .map_err(BootError::PageTables)?;
    let start_info = start_info::write(memory, cmdline)?;
    mptable::write(memory, vcpus)?;
    Ok(BootEntry { entry, start_info })
}
