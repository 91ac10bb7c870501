//! Snapshot and restore of a VM's KVM state and guest memory (issue 15, part 1): the on-disk
//! format (`format`), one vCPU's state (`vcpu_state`), the VM-wide interrupt controllers, PIT
//! and kvmclock (`irqchip`), and guest RAM in a sparse file (`memory_file`). Device state is
//! carried in `format::DeviceState`, filled by the VMM's wiring.

pub mod blob;
pub mod format;
pub mod irqchip;
pub mod memory_file;
pub mod vcpu_state;

#[cfg(test)]
mod format_tests;
#[cfg(test)]
mod tests;

pub use format::{DeviceState, Manifest, SnapshotError, FORMAT_VERSION};
