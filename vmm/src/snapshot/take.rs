//! The VMM's side of a snapshot: taking one of the running VM (`PUT /vm/snapshot`, the VM
//! already paused) and putting one back into a freshly built VM (`splitvisor run --restore`).
//! KVM wants a vCPU's ioctls from the thread that runs it, so each parked vCPU thread captures
//! itself (`VcpuCaptures::serve`, called from the pause gate) and hands its state over.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};

use super::format::{DeviceData, DeviceState, Manifest, SnapshotError};
use super::irqchip::{self, IrqchipError};
use super::memory_file;
use super::vcpu_state::{self, CaptureSupport, VcpuState, VcpuStateError};
use crate::attach::AttachedDevice;
use crate::devices::ata::{AtaDisk, DriveStateError};
use crate::devices::serial::SerialConsole;
use crate::memory::GuestMemory;
use crate::pause::PauseGate;
use crate::vhost_user::snapshot::DeviceSnapshotError;

/// How long the parked vCPUs get to capture themselves.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(5);

/// The ids and kinds of the platform devices a snapshot carries, in attach order.
pub const SERIAL_ID: &str = "serial";
pub const DEBUG_EXIT_ID: &str = "debug-exit";
/// The kind of the emulated ATA disk in a snapshot.
pub const ATA_KIND: &str = "ata";

#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error(transparent)]
    Device(#[from] DeviceSnapshotError),
    #[error("vCPU {index} did not capture its state within {}s", CAPTURE_TIMEOUT.as_secs())]
    CaptureTimeout { index: usize },
    #[error("capturing vCPU {index} failed: {message}")]
    Capture { index: usize, message: String },
    #[error(transparent)]
    Write(#[from] SnapshotError),
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("restoring the interrupt controllers failed")]
    Irqchip(#[from] IrqchipError),
    #[error("restoring a vCPU failed")]
    Vcpu(#[from] VcpuStateError),
    #[error("the snapshot's vCPU {0} has no saved state")]
    MissingVcpu(usize),
    #[error("device {id}: the snapshot has it at MMIO {saved:#x}, this VM at {here:#x}; give --disk/--net in the order of the snapshot (or none: the snapshot's are used)")]
    DeviceMoved { id: String, saved: u64, here: u64 },
    #[error("device {id}: the snapshot has no state for it")]
    NoDeviceState { id: String },
    #[error("device {id}: restoring it failed: {reason}")]
    Device { id: String, reason: String },
    #[error("ATA disk {id}")]
    Ata {
        id: String,
        #[source]
        source: DriveStateError,
    },
}

struct CaptureJob {
    support: CaptureSupport,
    results: Vec<Option<Result<VcpuState, String>>>,
}

/// The mailbox between a snapshot and the parked vCPU threads.
#[derive(Default)]
pub struct VcpuCaptures {
    job: Mutex<Option<CaptureJob>>,
    done: Condvar,
}

impl VcpuCaptures {
    fn lock(&self) -> MutexGuard<'_, Option<CaptureJob>> {
        self.job.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Run by parked vCPU `index` on its own thread: captures it if a snapshot asks and it has
    /// not yet. A port or MMIO exit it took is completed first, so that its effect is saved.
    pub fn serve(&self, index: u8, fd: &mut VcpuFd) {
        let support = match self.lock().as_ref() {
            Some(job)
                if job
                    .results
                    .get(usize::from(index))
                    .is_some_and(Option::is_none) =>
            {
                job.support.clone()
            }
            _ => return,
        };
        let result = vcpu_state::complete_pending_io(fd, index)
            .and_then(|()| vcpu_state::capture(fd, index, &support))
            .map_err(|e| crate::error_chain(&e));
        if let Some(slot) = self
            .lock()
            .as_mut()
            .and_then(|job| job.results.get_mut(usize::from(index)))
        {
            *slot = Some(result);
        }
        self.done.notify_all();
    }

    /// Asks the `count` parked vCPUs for their state and waits for all of them.
    fn collect(
        &self,
        pause: &PauseGate,
        count: usize,
        support: &CaptureSupport,
    ) -> Result<Vec<VcpuState>, TakeError> {
        *self.lock() = Some(CaptureJob {
            support: support.clone(),
            results: vec![None; count],
        });
        pause.wake_parked();
        let deadline = Instant::now() + CAPTURE_TIMEOUT;
        let mut job = self.lock();
        loop {
            let pending = job
                .as_ref()
                .and_then(|j| j.results.iter().position(Option::is_none));
            let Some(index) = pending else { break };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *job = None;
                return Err(TakeError::CaptureTimeout { index });
            }
            job = self
                .done
                .wait_timeout(job, left.min(Duration::from_millis(20)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            // A parked vCPU may have missed the wake-up between two waits of its own.
            pause.wake_parked();
        }
        let results = job.take().map(|j| j.results).unwrap_or_default();
        results
            .into_iter()
            .enumerate()
            .map(|(index, result)| match result {
                Some(Ok(state)) => Ok(state),
                Some(Err(message)) => Err(TakeError::Capture { index, message }),
                None => Err(TakeError::CaptureTimeout { index }),
            })
            .collect()
    }
}

/// What a snapshot needs of the VM besides its paused vCPUs.
pub struct SnapshotSource {
    pub vm: Arc<VmFd>,
    pub memory: GuestMemory,
    pub support: CaptureSupport,
    pub captures: Arc<VcpuCaptures>,
    pub serial: Arc<Mutex<SerialConsole>>,
}

/// What a snapshot wrote.
#[derive(Debug)]
pub struct Taken {
    pub memory_bytes: u64,
    pub vcpus: usize,
    pub elapsed: Duration,
    /// Each vhost-user device's rings, stopped for the snapshot: where to restart them.
    pub stopped: Vec<StoppedRings>,
}

/// A device (its index among the attached ones) and where its ready rings stopped.
pub type StoppedRings = (usize, Vec<(usize, u16)>);

/// Stops every vhost-user device's rings (see `VhostUserDevice::pause_rings`) and returns each
/// device's transport and backend state; on failure the rings stopped so far start again.
fn pause_devices(
    devices: &[AttachedDevice],
) -> Result<(Vec<DeviceState>, Vec<StoppedRings>), TakeError> {
    let mut states = Vec::new();
    let mut stopped = Vec::new();
    for (index, d) in devices.iter().enumerate() {
        let mut mmio = d.device.lock().unwrap_or_else(PoisonError::into_inner);
        let bases = match mmio.device_mut().pause_rings() {
            Ok(bases) => bases,
            Err(e) => {
                drop(mmio);
                resume_devices(devices, &stopped);
                return Err(e.into());
            }
        };
        let mut state = mmio.save();
        state.mmio_base = d.mmio_base;
        state.vhost_user = Some(mmio.device().saved_state(bases.clone()));
        states.push(DeviceState {
            id: d.id.clone(),
            kind: d.kind.name().into(),
            state: DeviceData::VirtioMmio(state),
        });
        stopped.push((index, bases));
    }
    Ok((states, stopped))
}

/// Starts the rings `pause_devices` stopped again on their backends; a failure is logged (the
/// device then waits for its backend as after a crash).
pub fn resume_devices(devices: &[AttachedDevice], stopped: &[StoppedRings]) {
    for (index, bases) in stopped {
        let Some(d) = devices.get(*index) else {
            continue;
        };
        let mut mmio = d.device.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = mmio.device_mut().resume_rings(bases) {
            log::warn!("after the snapshot: {}", crate::error_chain(&e));
        }
    }
}

/// The paused VM's state without its memory: what a snapshot's manifest and a migration carry.
pub struct Captured {
    pub vcpus: Vec<VcpuState>,
    pub vm: irqchip::IrqchipState,
    /// Platform devices, the ATA disk and the virtio devices, in attach order.
    pub devices: Vec<DeviceState>,
    /// Each vhost-user device's rings, stopped: where to restart them.
    pub stopped: Vec<StoppedRings>,
}

impl SnapshotSource {
    /// Writes the snapshot of the paused VM with `vcpus` parked vCPUs and `devices` into
    /// `dir`. The devices' rings are left stopped (`Taken::stopped`) for the caller to
    /// restart or not; on failure they are restarted.
    pub fn take(
        &self,
        pause: &PauseGate,
        vcpus: usize,
        devices: (&[AttachedDevice], Option<(&str, &AtaDisk)>),
        dir: &Path,
    ) -> Result<Taken, TakeError> {
        let start = Instant::now();
        let captured = self.capture(pause, vcpus, devices)?;
        let stopped = captured.stopped;
        let manifest = match super::write(
            dir,
            &self.memory,
            captured.vcpus,
            captured.vm,
            captured.devices,
        ) {
            Ok(manifest) => manifest,
            Err(e) => {
                resume_devices(devices.0, &stopped);
                return Err(e.into());
            }
        };
        Ok(Taken {
            memory_bytes: manifest.memory.size,
            vcpus,
            elapsed: start.elapsed(),
            stopped,
        })
    }

    /// Captures the paused VM's vCPUs, interrupt controllers, clock and devices, stopping the
    /// vhost-user devices' rings (`Captured::stopped`; restarted on failure).
    pub fn capture(
        &self,
        pause: &PauseGate,
        vcpus: usize,
        (devices, ata): (&[AttachedDevice], Option<(&str, &AtaDisk)>),
    ) -> Result<Captured, TakeError> {
        let states = self.captures.collect(pause, vcpus, &self.support)?;
        // Before memory: the backends' last writes into it must be in the snapshot.
        let (virtio, stopped) = pause_devices(devices)?;
        let vm_state = irqchip::capture(&self.vm);
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .state();
        let mut saved = platform_devices();
        for device in &mut saved {
            if device.id == SERIAL_ID {
                device.state = DeviceData::Serial(serial.clone().into());
            }
        }
        // In attach order: the ATA disk is a --disk, attached with the others.
        saved.extend(ata.map(|(id, disk)| DeviceState {
            id: id.to_string(),
            kind: ATA_KIND.into(),
            state: DeviceData::Ata(disk.save()),
        }));
        saved.extend(virtio);
        Ok(Captured {
            vcpus: states,
            vm: vm_state,
            devices: saved,
            stopped,
        })
    }
}

/// The platform devices every snapshot has, stateless (their state is filled at capture).
pub fn platform_devices() -> Vec<DeviceState> {
    [SERIAL_ID, DEBUG_EXIT_ID]
        .map(|id| DeviceState {
            id: id.into(),
            kind: id.into(),
            state: DeviceData::Stateless,
        })
        .into()
}

/// The serial port's saved state in `manifest`, if it has one.
pub fn saved_serial(manifest: &Manifest) -> Option<vm_superio::serial::SerialState> {
    manifest.devices.iter().find_map(|d| match &d.state {
        DeviceData::Serial(regs) if d.id == SERIAL_ID => Some(regs.into()),
        _ => None,
    })
}

/// Puts guest memory, the interrupt controllers and clock, and every vCPU back from the
/// snapshot in `dir`. `memory` must be fresh (all zero) and `vcpus` just created, in order.
pub fn restore(
    dir: &Path,
    manifest: &Manifest,
    vm: &VmFd,
    memory: &GuestMemory,
    vcpus: &[&VcpuFd],
) -> Result<(), RestoreError> {
    memory_file::restore(dir, &manifest.memory, memory)?;
    irqchip::restore(vm, &manifest.vm)?;
    for (index, vcpu) in vcpus.iter().enumerate() {
        let state = manifest
            .vcpus
            .get(index)
            .ok_or(RestoreError::MissingVcpu(index))?;
        vcpu_state::restore(vcpu, state)?;
    }
    Ok(())
}

/// Puts the emulated ATA disk's registers and data phase back.
pub fn restore_ata(manifest: &Manifest, id: &str, disk: &AtaDisk) -> Result<(), RestoreError> {
    let saved = manifest.devices.iter().find_map(|s| match &s.state {
        DeviceData::Ata(state) if s.id == id => Some(state),
        _ => None,
    });
    let Some(saved) = saved else {
        return Err(RestoreError::NoDeviceState { id: id.to_string() });
    };
    disk.restore(saved).map_err(|source| RestoreError::Ata {
        id: id.to_string(),
        source,
    })
}

/// Puts each vhost-user device's transport registers back and starts its rings on its
/// backend at the saved positions. Guest memory must be restored first: the backend reads
/// the rings from it.
pub fn restore_devices(
    manifest: &Manifest,
    devices: &[AttachedDevice],
) -> Result<(), RestoreError> {
    for d in devices {
        let saved = manifest.devices.iter().find_map(|s| match &s.state {
            DeviceData::VirtioMmio(state) if s.id == d.id => Some(state),
            _ => None,
        });
        let Some(saved) = saved else {
            return Err(RestoreError::NoDeviceState { id: d.id.clone() });
        };
        if saved.mmio_base != d.mmio_base {
            return Err(RestoreError::DeviceMoved {
                id: d.id.clone(),
                saved: saved.mmio_base,
                here: d.mmio_base,
            });
        }
        let bases = saved
            .vhost_user
            .as_ref()
            .map(|v| v.vring_bases.clone())
            .unwrap_or_default();
        let mut mmio = d.device.lock().unwrap_or_else(PoisonError::into_inner);
        mmio.restore(saved, |device, activation| {
            device.restore_rings(activation, &bases)
        })
        .map_err(|e| RestoreError::Device {
            id: d.id.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}
