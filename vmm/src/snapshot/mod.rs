//! Snapshot and restore of a VM's KVM state and guest memory (issue 15, part 1): the on-disk
//! format (`format`), one vCPU's state (`vcpu_state`), the VM-wide interrupt controllers, PIT
//! and kvmclock (`irqchip`), and guest RAM in a sparse file (`memory_file`). Device state is
//! carried in `format::DeviceState`, filled by the VMM's wiring.

pub mod blob;
pub mod format;
pub mod irqchip;
pub mod memory_file;
pub mod take;
pub mod vcpu_state;

#[cfg(test)]
mod format_tests;
#[cfg(test)]
mod tests;

pub use format::{DeviceState, Manifest, SnapshotError, FORMAT_VERSION};

use std::path::Path;

use crate::memory::GuestMemory;

/// Writes a whole snapshot into `dir` (created if needed): guest memory first, the manifest
/// last, so that an interrupted snapshot has no manifest and is refused as missing rather
/// than restored half-written. The VM must be paused, its vCPUs captured after
/// `vcpu_state::complete_pending_io`.
pub fn write(
    dir: &Path,
    memory: &GuestMemory,
    vcpus: Vec<vcpu_state::VcpuState>,
    vm: irqchip::IrqchipState,
    devices: Vec<DeviceState>,
) -> Result<Manifest, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    // A manifest left by an earlier snapshot in this directory must not describe the new
    // memory file while it is being written.
    match std::fs::remove_file(dir.join(format::MANIFEST_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::Write {
                path: dir.join(format::MANIFEST_FILE),
                source: e,
            })
        }
        _ => {}
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        created_by: concat!("splitvisor ", env!("CARGO_PKG_VERSION")).to_string(),
        memory: memory_file::save(dir, memory)?,
        vcpus,
        vm,
        devices,
    };
    manifest.write(dir)?;
    Ok(manifest)
}
