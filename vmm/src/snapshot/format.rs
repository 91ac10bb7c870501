//! The on-disk snapshot format, version 1. A snapshot is a directory:
//!
//! - `snapshot.json`, the manifest: a JSON object whose first field is `format_version` (read
//!   and checked before anything else: a snapshot of another version is refused, naming the
//!   file and both versions), then the sections:
//!   - `created_by`: the program and version that wrote it (informational);
//!   - `memory`: guest RAM's size, page size and regions (guest address, size, offset in
//!     `memory.bin`);
//!   - `vcpus`: one `VcpuState` per vCPU, in index order (registers, special registers,
//!     FPU/XSAVE/XCRs, MSRs, LAPIC, pending events, MP state, debug registers, CPUID, TSC kHz);
//!   - `vm`: the `IrqchipState` (PIC master/slave, IOAPIC, PIT, kvmclock);
//!   - `devices`: one `DeviceState` per device, in attach order: its id, its kind and its
//!     state (`"stateless"`, `{"serial": {registers, in_buffer}}`, or `{"virtio-mmio":
//!     {registers, queues, interrupt, "vhost_user": {socket, features, vring_bases}}}`);
//!
//!   KVM structs are stored as hex strings of their raw bytes, checked against the struct's
//!   size when read; a part the host's KVM could not give is absent and listed, with its errno,
//!   in the section's `unavailable`.
//! - `memory.bin`: guest RAM, the regions back to back at the offsets the manifest gives. It is
//!   a sparse file: all-zero pages are holes (never written), so its size on disk is what the
//!   guest used; its length is exactly the guest's RAM size.
//!
//! Writers bump `FORMAT_VERSION` for any change a reader of the old version would misread.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::irqchip::IrqchipState;
use super::vcpu_state::VcpuState;
pub use crate::device_state::{
    AtaState, AtaTransfer, DeviceData, QueueState, SerialRegisters, VhostUserState, VirtioMmioState,
};

/// The version this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's name inside a snapshot directory.
pub const MANIFEST_FILE: &str = "snapshot.json";
/// Guest RAM's file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";
/// Granularity of the sparse memory file: pages of this size that are all zero are holes.
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{}: no such file; is {} a snapshot directory (made by `splitvisor ctl NAME snapshot DIR`)?", .path.display(), .path.parent().unwrap_or(Path::new("")).display())]
    Missing { path: PathBuf },
    #[error("{}: the file is truncated ({detail}); the snapshot was not written completely, take it again", .path.display())]
    Truncated { path: PathBuf, detail: String },
    #[error("{}: snapshot format version {found}, but this splitvisor reads only version {expected}; restore it with the splitvisor that wrote it", .path.display())]
    VersionMismatch {
        path: PathBuf,
        found: u64,
        expected: u32,
    },
    #[error("{}: not a valid snapshot manifest", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the snapshot has {snapshot} bytes of guest memory but the VM to restore into has {target}: start it with --memory {snapshot_mib}M", snapshot_mib = .snapshot >> 20)]
    MemorySizeMismatch { snapshot: u64, target: u64 },
    #[error("the snapshot's guest memory layout {snapshot:?} differs from the VM's {target:?}")]
    MemoryLayoutMismatch {
        snapshot: Vec<(u64, u64)>,
        target: Vec<(u64, u64)>,
    },
    #[error("the snapshot has {snapshot} vCPU(s) but the VM to restore into has {target}: start it with --vcpus {snapshot}")]
    VcpuCountMismatch { snapshot: usize, target: usize },
    #[error("the snapshot's devices differ from the VM's: {}; give the same --disk/--net ids as when it was taken", describe_device_diff(.missing, .extra))]
    DeviceSetMismatch {
        /// In the snapshot, not in the VM.
        missing: Vec<String>,
        /// In the VM, not in the snapshot.
        extra: Vec<String>,
    },
    #[error("could not read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not write {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not copy guest memory at {addr:#x}")]
    GuestMemory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn describe_device_diff(missing: &[String], extra: &[String]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing in the VM: {}", missing.join(", ")));
    }
    if !extra.is_empty() {
        parts.push(format!("not in the snapshot: {}", extra.join(", ")));
    }
    parts.join("; ")
}

/// A part of the state the host's KVM would not give at capture, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unavailable {
    /// What was not captured, e.g. "vCPU 0 KVM_GET_XSAVE".
    pub part: String,
    /// The errno of the failed ioctl, if it was one.
    pub errno: Option<i32>,
    pub reason: String,
}

impl Unavailable {
    pub fn new(part: String, error: &kvm_ioctls::Error) -> Self {
        Self {
            part,
            errno: Some(error.errno()),
            reason: error.to_string(),
        }
    }

    pub fn other(part: String, reason: &str) -> Self {
        Self {
            part,
            errno: None,
            reason: reason.to_string(),
        }
    }
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} not saved: {}", self.part, self.reason)
    }
}

/// One region of guest RAM and where it is in `memory.bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// Total bytes of guest RAM, and the length of `memory.bin`.
    pub size: u64,
    pub page_size: u64,
    pub regions: Vec<MemoryRegion>,
}

/// One device's saved state: the platform devices (serial port, debug-exit port) first, then
/// the --disk and --net devices in attach order (an ATA disk, each virtio-mmio transport with
/// its vhost-user device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The device's id as given on the command line (`--disk id=...`), or its fixed name.
    pub id: String,
    /// e.g. "virtio-blk", "virtio-net", "serial".
    pub kind: String,
    /// What the device needs to continue where it was.
    #[serde(default)]
    pub state: DeviceData,
}

impl DeviceState {
    /// How the device-set check names it.
    pub fn key(&self) -> String {
        format!("{} ({})", self.id, self.kind)
    }
}

/// `snapshot.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub created_by: String,
    pub memory: MemoryLayout,
    pub vcpus: Vec<VcpuState>,
    pub vm: IrqchipState,
    pub devices: Vec<DeviceState>,
}

/// Only the version field, read first so that a newer format's other fields cannot cause a
/// confusing parse error before the version is checked.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: u64,
}

impl Manifest {
    /// Writes `DIR/snapshot.json` through a temporary file and a rename, so a crash leaves
    /// either no manifest or a whole one.
    pub fn write(&self, dir: &Path) -> Result<(), SnapshotError> {
        let path = dir.join(MANIFEST_FILE);
        let temp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let write_error = |source| SnapshotError::Write {
            path: path.clone(),
            source,
        };
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| write_error(std::io::Error::other(e)))?;
        fs::write(&temp, text).map_err(write_error)?;
        fs::rename(&temp, &path).map_err(write_error)
    }

    /// Reads `DIR/snapshot.json`, checking its version before anything else.
    pub fn read(dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join(MANIFEST_FILE);
        let text = fs::read(&path).map_err(|source| match source.kind() {
            ErrorKind::NotFound => SnapshotError::Missing { path: path.clone() },
            _ => SnapshotError::Read {
                path: path.clone(),
                source,
            },
        })?;
        let parse_error = |source: serde_json::Error| {
            if source.is_eof() {
                SnapshotError::Truncated {
                    path: path.clone(),
                    detail: format!("{} bytes, the JSON ends early", text.len()),
                }
            } else {
                SnapshotError::Parse {
                    path: path.clone(),
                    source,
                }
            }
        };
        let probe: VersionProbe = serde_json::from_slice(&text).map_err(parse_error)?;
        if probe.format_version != u64::from(FORMAT_VERSION) {
            return Err(SnapshotError::VersionMismatch {
                path,
                found: probe.format_version,
                expected: FORMAT_VERSION,
            });
        }
        serde_json::from_slice(&text).map_err(parse_error)
    }

    /// Whether a VM with this memory, vCPU count and devices can take the snapshot.
    pub fn check_target(
        &self,
        memory: &MemoryLayout,
        vcpus: usize,
        devices: &[DeviceState],
    ) -> Result<(), SnapshotError> {
        self.memory.check_target(memory)?;
        if self.vcpus.len() != vcpus {
            return Err(SnapshotError::VcpuCountMismatch {
                snapshot: self.vcpus.len(),
                target: vcpus,
            });
        }
        let keys = |list: &[DeviceState]| list.iter().map(DeviceState::key).collect::<Vec<_>>();
        let (saved, present) = (keys(&self.devices), keys(devices));
        let missing: Vec<String> = saved
            .iter()
            .filter(|k| !present.contains(k))
            .cloned()
            .collect();
        let extra: Vec<String> = present
            .iter()
            .filter(|k| !saved.contains(k))
            .cloned()
            .collect();
        if missing.is_empty() && extra.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::DeviceSetMismatch { missing, extra })
        }
    }
}

impl MemoryLayout {
    /// The same size and regions (guest addresses and sizes) as `target`.
    pub fn check_target(&self, target: &MemoryLayout) -> Result<(), SnapshotError> {
        if self.size != target.size {
            return Err(SnapshotError::MemorySizeMismatch {
                snapshot: self.size,
                target: target.size,
            });
        }
        let ranges = |l: &MemoryLayout| l.regions.iter().map(|r| (r.guest_addr, r.size)).collect();
        let (snapshot, target): (Vec<_>, Vec<_>) = (ranges(self), ranges(target));
        if snapshot != target {
            return Err(SnapshotError::MemoryLayoutMismatch { snapshot, target });
        }
        Ok(())
    }
}
