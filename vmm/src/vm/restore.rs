//! Starting a VM from saved state instead of booting it: a snapshot (`run --restore`) or the
//! state a live upgrade hands over; checking the VM fits the state and putting it back.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use log::{info, warn};

use super::{RestoreFrom, VmError};
use crate::attach::{Attached, AttachedDevice};
use crate::boot::{BootEntry, BootProtocol, KernelFormat};
use crate::config::VmConfig;
use crate::devices::serial::SerialConsole;
use crate::layout;
use crate::memory::GuestMemory;
use crate::snapshot::format::{DeviceState, Manifest};
use crate::snapshot::memory_file;
use crate::snapshot::take::{self, SnapshotSource};
use crate::snapshot::vcpu_state::CaptureSupport;
use crate::vcpu::{Vcpu, VcpuContext};

/// Where the VM's state comes from.
pub(crate) enum Start<'a> {
    Boot,
    Snapshot(&'a RestoreFrom<'a>),
    /// A live upgrade: the old process's state, and its guest memory and API listener.
    Upgrade {
        manifest: &'a Manifest,
        memory: &'a File,
        /// CLOCK_MONOTONIC when the VM started in its first process.
        started_at_ns: u64,
        api: Option<&'a UnixListener>,
    },
}

impl Start<'_> {
    /// When the VM started: now, or before the live upgrades it went through.
    pub(crate) fn started(&self) -> std::time::Instant {
        match self {
            Start::Upgrade { started_at_ns, .. } => crate::upgrade::instant_of(*started_at_ns),
            _ => std::time::Instant::now(),
        }
    }

    pub(crate) fn manifest(&self) -> Option<&Manifest> {
        match self {
            Start::Boot => None,
            Start::Snapshot(from) => Some(from.manifest),
            Start::Upgrade { manifest, .. } => Some(manifest),
        }
    }
}

/// Guest memory, interrupt controllers, clock and vCPUs from the snapshot, then the
/// vhost-user devices' rings on their backends (which read them from the restored memory).
/// A live upgrade's guest memory is the old process's memfd: only the rest is put back.
pub(crate) fn restore_state(
    start: &Start,
    vm_fd: &VmFd,
    memory: &GuestMemory,
    vcpus: &mut [Vcpu],
    devices: &[AttachedDevice],
) -> Result<(), VmError> {
    let fds: Vec<&VcpuFd> = vcpus.iter_mut().map(|v| &*v.fd_mut()).collect();
    let (restored, manifest) = match start {
        Start::Boot => return Ok(()),
        Start::Snapshot(from) => (
            take::restore(from.dir, from.manifest, vm_fd, memory, &fds),
            from.manifest,
        ),
        Start::Upgrade { manifest, .. } => (take::restore_cpus(manifest, vm_fd, &fds), *manifest),
    };
    restored
        .and_then(|()| take::restore_devices(manifest, devices))
        .map_err(|e| VmError::Snapshot(Box::new(e)))?;
    info!("VM state restored");
    Ok(())
}

/// What `PUT /vm/snapshot` captures; `None` (snapshots refused) if KVM cannot say which MSRs
/// it has.
pub(crate) fn snapshot_source(
    kvm: &Kvm,
    vm_fd: &Arc<VmFd>,
    memory: &GuestMemory,
    ctx: &VcpuContext,
    serial: &Arc<Mutex<SerialConsole>>,
) -> Option<SnapshotSource> {
    match CaptureSupport::probe(kvm, vm_fd) {
        Ok(support) => Some(SnapshotSource {
            vm: vm_fd.clone(),
            memory: memory.clone(),
            support,
            captures: ctx.capture.clone(),
            serial: serial.clone(),
        }),
        Err(e) => {
            warn!("snapshots will be refused: {}", crate::error_chain(&e));
            None
        }
    }
}

/// Instead of booting: checks that the VM can take the snapshot, puts the ATA disk's state
/// back, and returns the entry its vCPUs are created with (their state is restored later).
pub(crate) fn prepare_restore(
    manifest: &Manifest,
    config: &VmConfig,
    memory: &GuestMemory,
    attached: &Attached,
) -> Result<BootEntry, VmError> {
    check_restore_target(manifest, config, memory, attached)?;
    if let Some((id, disk)) = &attached.ata {
        take::restore_ata(manifest, id, disk).map_err(|e| VmError::Snapshot(Box::new(e)))?;
    }
    Ok(restored_guest_entry())
}

/// A restored VM runs the project's guest (snapshots of Linux guests are refused when taken):
/// the entry and boot tables are in the restored memory and registers, so only the protocol
/// matters here, for the vCPUs' creation.
pub(crate) fn restored_guest_entry() -> BootEntry {
    BootEntry {
        entry: 0,
        protocol: BootProtocol::SplitvisorGuest {
            start_info: layout::START_INFO,
        },
        format: KernelFormat::SplitvisorGuest,
    }
}

/// Whether the VM built from `config` can take the snapshot: same memory, vCPU count and
/// devices (the platform ones a snapshot saves, and any --disk/--net, which it cannot).
pub(crate) fn check_restore_target(
    manifest: &Manifest,
    config: &VmConfig,
    memory: &GuestMemory,
    attached: &Attached,
) -> Result<(), VmError> {
    let mut devices = take::platform_devices();
    devices.extend(attached.devices.iter().map(|d| DeviceState {
        id: d.id.clone(),
        kind: d.kind.name().into(),
        state: Default::default(),
    }));
    devices.extend(attached.ata.iter().map(|(id, _)| DeviceState {
        id: id.clone(),
        kind: take::ATA_KIND.into(),
        state: Default::default(),
    }));
    manifest
        .check_target(
            &memory_file::layout_of(memory),
            usize::from(config.vcpus),
            &devices,
        )
        .map_err(|e| VmError::Snapshot(Box::new(e.into())))
}
