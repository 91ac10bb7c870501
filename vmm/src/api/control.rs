//! What the control API can do to a running VM: report it, pause and resume its vCPUs, stop it,
//! swap a device's backend, and read its counters. Transport-free: `api` maps HTTP onto this.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;

use crate::api::types::{
    AfterSnapshot, AtaCounters, BackendReport, DeviceCounters, DeviceReport, GuestReport,
    MetricsReport, SnapshotReport, StateReport, SwapReport, SwitchReport, VirtioCounters, VmReport,
    VmState,
};
use crate::attach::AttachedDevice;
use crate::bus::Bus;
use crate::devices::ata::AtaDisk;
use crate::pause::PauseGate;
use crate::snapshot::memory_file;
use crate::snapshot::take::{self, SnapshotSource, TakeError};
use crate::snapshot::{Manifest, FORMAT_VERSION};
use crate::upgrade::exec::{ExecRequest, Upgrader};
use crate::upgrade::{self, UpgradeError};
use crate::vcpu::ExitCounters;
use crate::vhost_user::manager::SwapError;
use crate::vhost_user::{SwitchRecord, VhostUserDevice};
use crate::vm_end::{EndSignal, VmEnd};

mod migrate;
pub use migrate::MigrateError;

/// How long `pause` waits for every vCPU to leave `KVM_RUN`.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A swap's new backend is expected to be listening already; this covers a daemon that is
/// just starting, without making a mistyped path cost long.
const SWAP_CONNECT_WAIT: Duration = Duration::from_secs(1);
/// How long a report waits for a device that is busy with its backend (a swap, a recovery,
/// an activation may hold it for up to the message deadline) before it reports the device's
/// last known state instead.
const BUSY_DEVICE_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM is stopping")]
    Stopping,
    #[error("the vCPUs did not stop within {}s", PAUSE_TIMEOUT.as_secs())]
    PauseTimeout,
    #[error("no device {0:?}; GET /vm lists the devices")]
    UnknownDevice(String),
    #[error(
        "device {0:?} is emulated inside the VMM; only vhost-user devices have a backend to swap"
    )]
    NotVhostUser(String),
    #[error(transparent)]
    Swap(#[from] Box<SwapError>),
    #[error("another snapshot or upgrade of this VM is in progress; retry once it is done")]
    Busy,
    #[error("this VM cannot be snapshotted: {0}")]
    SnapshotUnsupported(String),
    #[error("the snapshot failed; the VM continues as before")]
    Snapshot(#[source] Box<TakeError>),
    #[error("the upgrade failed before the new process started; the VM continues as before")]
    Upgrade(#[source] Box<UpgradeError>),
    #[error("{0}; the VM continues as before")]
    UpgradeRefused(#[source] Box<UpgradeError>),
    #[error("the migration failed; the VM continues here as before")]
    Migrate(#[source] Box<MigrateError>),
}

/// The emulated ATA disk, for reporting.
pub struct AtaInfo {
    pub id: String,
    pub disk: AtaDisk,
}

/// What the VM boots, for reporting.
#[derive(Clone, Debug)]
pub struct GuestInfo {
    /// "linux" or "splitvisor guest".
    pub kind: &'static str,
    /// The `--kernel` path, or "<embedded guest>".
    pub kernel: String,
}

pub struct VmControl {
    epoch: Instant,
    guest: GuestInfo,
    vcpus: u8,
    memory_bytes: u64,
    pause: Arc<PauseGate>,
    end: Arc<EndSignal>,
    /// Filled in once the vCPU threads run; used to kick them out of `KVM_RUN`.
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    devices: Vec<AttachedDevice>,
    ata: Option<AtaInfo>,
    exits: Arc<ExitCounters>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    /// Each device's latest report (`GET /vm` entry), given while the device is busy.
    last_reports: Mutex<Vec<Option<DeviceReport>>>,
    /// Device id and its backend daemon's stats socket, for `GET /metrics`.
    backend_stats: Vec<(String, std::path::PathBuf)>,
    /// What `snapshot` captures; `None` if this host's KVM could not say what it can capture.
    snapshot: Option<SnapshotSource>,
    /// The upgrader thread and the binary running now, once the VM runs.
    upgrader: OnceLock<(Upgrader, PathBuf)>,
    /// Held by a snapshot or an upgrade: both capture the vCPUs through one mailbox and stop
    /// the rings, so one at a time.
    capturing: Mutex<()>,
    /// Held by a migration in progress.
    migrating: Mutex<()>,
    /// What `GET /vm/migrate` reports of it.
    progress: Mutex<Option<migrate::Progress>>,
}

/// Everything `VmControl` reports on or acts upon.
pub struct ControlParts {
    pub guest: GuestInfo,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub pause: Arc<PauseGate>,
    pub end: Arc<EndSignal>,
    pub devices: Vec<AttachedDevice>,
    pub ata: Option<AtaInfo>,
    pub exits: Arc<ExitCounters>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    /// Device id and its backend daemon's `--api-socket` (the device's `stats=` key).
    pub backend_stats: Vec<(String, std::path::PathBuf)>,
    pub snapshot: Option<SnapshotSource>,
    /// When the VM started (before any live upgrade): uptimes count from it.
    pub started: Instant,
}

impl VmControl {
    pub fn new(parts: ControlParts) -> Self {
        Self {
            epoch: parts.started,
            guest: parts.guest,
            vcpus: parts.vcpus,
            memory_bytes: parts.memory_bytes,
            pause: parts.pause,
            end: parts.end,
            vcpu_threads: Mutex::new(Vec::new()),
            devices: parts.devices,
            ata: parts.ata,
            exits: parts.exits,
            pio: parts.pio,
            mmio: parts.mmio,
            last_reports: Mutex::new(Vec::new()),
            backend_stats: parts.backend_stats,
            snapshot: parts.snapshot,
            upgrader: OnceLock::new(),
            capturing: Mutex::new(()),
            migrating: Mutex::new(()),
            progress: Mutex::new(None),
        }
    }

    /// Lets `upgrade` exec through `upgrader`; `binary` is the default to run.
    pub fn set_upgrader(&self, upgrader: Upgrader, binary: PathBuf) {
        let _ = self.upgrader.set((upgrader, binary));
    }

    pub fn devices(&self) -> &[AttachedDevice] {
        &self.devices
    }

    /// Records the running vCPU threads (before any API request can pause them).
    pub fn set_vcpu_threads(&self, threads: Vec<libc::pthread_t>) {
        *self.lock_threads() = threads;
    }

    /// Forgets the vCPU threads (they are about to be joined).
    pub fn clear_vcpu_threads(&self) {
        self.lock_threads().clear();
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<libc::pthread_t>> {
        self.vcpu_threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self) -> VmState {
        if self.end.is_stopping() {
            VmState::Stopping
        } else if self.pause.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    fn state_report(&self) -> StateReport {
        StateReport {
            state: self.state(),
        }
    }

    /// Stops every vCPU between two instructions; returns once none runs.
    pub fn pause(&self) -> Result<StateReport, ControlError> {
        if self.end.is_stopping() {
            return Err(ControlError::Stopping);
        }
        self.pause.request_pause();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            let threads = self.lock_threads();
            for &thread in threads.iter() {
                crate::vcpu_kick::kick_vcpu_thread(thread);
            }
            let count = threads.len();
            drop(threads);
            // Kicks repeat: one landing just before a thread re-enters KVM_RUN is lost.
            if self.pause.wait_parked(count, Duration::from_millis(10)) {
                break;
            }
            if self.end.is_stopping() {
                self.pause.resume();
                return Err(ControlError::Stopping);
            }
            if Instant::now() >= deadline {
                self.pause.resume();
                return Err(ControlError::PauseTimeout);
            }
        }
        log::info!("control: VM paused");
        Ok(self.state_report())
    }

    pub fn resume(&self) -> Result<StateReport, ControlError> {
        if self.end.is_stopping() {
            return Err(ControlError::Stopping);
        }
        self.pause.resume();
        log::info!("control: VM resumed");
        Ok(self.state_report())
    }

    /// Ends the VM as SIGTERM would: the VMM stops the vCPUs and exits with status 130.
    pub fn shutdown(&self) -> StateReport {
        log::info!("control: shutdown requested");
        self.end.end(VmEnd::StopRequested);
        self.pause.resume();
        StateReport {
            state: VmState::Stopping,
        }
    }

    /// Pauses the VM (if it runs), writes a snapshot of it into `dir`, then resumes it or, for
    /// `then: stop`, leaves it paused and returns how it ends: the caller ends it with
    /// `end_after_request` once the client has its answer. On failure the VM is left as it
    /// was.
    pub fn snapshot(
        &self,
        dir: &Path,
        then: AfterSnapshot,
    ) -> Result<(SnapshotReport, Option<VmEnd>), ControlError> {
        let source = self.snapshot_source()?;
        let _capturing = self.capturing.try_lock().map_err(|_| ControlError::Busy)?;
        let was_paused = self.pause.is_paused();
        if !was_paused {
            self.pause()?;
        }
        let ata = self.ata.as_ref().map(|a| (a.id.as_str(), &a.disk));
        let taken = source.take(
            &self.pause,
            usize::from(self.vcpus),
            (&self.devices, ata),
            dir,
        );
        let taken = match taken {
            Ok(taken) => taken,
            Err(e) => {
                if !was_paused {
                    self.pause.resume();
                }
                return Err(ControlError::Snapshot(Box::new(e)));
            }
        };
        // With `stop` the rings stay stopped: the backends see the VMM go, and a restored VM
        // starts them where they stopped.
        let (state, then_end) = match then {
            AfterSnapshot::Stop => (
                VmState::Stopping,
                Some(VmEnd::Snapshotted {
                    dir: dir.display().to_string(),
                }),
            ),
            AfterSnapshot::Resume => {
                take::resume_devices(&self.devices, &taken.stopped);
                self.pause.resume();
                (self.state(), None)
            }
        };
        log::info!(
            "control: snapshot of {} MiB written to {} in {} ms, then {}",
            taken.memory_bytes >> 20,
            dir.display(),
            taken.elapsed.as_millis(),
            then.as_str()
        );
        let report = SnapshotReport {
            dir: dir.display().to_string(),
            memory_bytes: taken.memory_bytes,
            vcpus: taken.vcpus,
            elapsed_ms: taken.elapsed.as_millis() as u64,
            state,
        };
        Ok((report, then_end))
    }

    /// Live upgrade (see `crate::upgrade`): checks `binary` (default: the running one), pauses
    /// the VM, captures its state but memory, and re-executes the VMM with it; the new process
    /// answers the request on `client`. Returns only on failure, the VM then running (or
    /// paused) as before.
    pub fn upgrade(&self, binary: Option<&Path>, client: RawFd) -> ControlError {
        let source = match self.snapshot_source() {
            Ok(source) => source,
            Err(e) => return e,
        };
        let Some((upgrader, running)) = self.upgrader.get() else {
            return ControlError::UpgradeRefused(Box::new(UpgradeError::NoUpgrader));
        };
        // Held until the execve replaces the process, or until the failure is answered.
        let Ok(_capturing) = self.capturing.try_lock() else {
            return ControlError::Busy;
        };
        let binary = binary.unwrap_or(running).to_path_buf();
        if let Err(e) = upgrade::check_binary(&binary) {
            return ControlError::UpgradeRefused(Box::new(e));
        }
        let paused_at_ns = upgrade::monotonic_ns();
        let was_paused = self.pause.is_paused();
        if !was_paused {
            if let Err(e) = self.pause() {
                return e;
            }
        }
        let ata = self.ata.as_ref().map(|a| (a.id.as_str(), &a.disk));
        let captured = source.capture(&self.pause, usize::from(self.vcpus), (&self.devices, ata));
        let error = match captured {
            Ok(captured) => {
                let manifest = Manifest {
                    format_version: FORMAT_VERSION,
                    created_by: concat!("splitvisor ", env!("CARGO_PKG_VERSION")).to_string(),
                    memory: memory_file::layout_of(&source.memory),
                    vcpus: captured.vcpus,
                    vm: captured.vm,
                    devices: captured.devices,
                };
                log::info!("control: upgrading to {}", binary.display());
                let request = ExecRequest {
                    started_at_ns: upgrade::monotonic_ns()
                        .saturating_sub(self.epoch.elapsed().as_nanos() as u64),
                    binary,
                    manifest,
                    was_paused,
                    paused_at_ns,
                    client,
                };
                let error = upgrader.exec(request);
                take::resume_devices(&self.devices, &captured.stopped);
                error
            }
            Err(e) => UpgradeError::Capture(e),
        };
        if !was_paused {
            self.pause.resume();
        }
        ControlError::Upgrade(Box::new(error))
    }

    /// Ends the VM as a request asked, after its answer was written.
    pub fn end_after_request(&self, why: VmEnd) {
        self.end.end(why);
        self.pause.resume();
    }

    /// What a snapshot captures, if this VM has only what a snapshot can save.
    fn snapshot_source(&self) -> Result<&SnapshotSource, ControlError> {
        let unsupported = |what: &str| Err(ControlError::SnapshotUnsupported(what.to_string()));
        if self.end.is_stopping() {
            return Err(ControlError::Stopping);
        }
        if self.guest.kind == "linux" {
            return unsupported("snapshots of Linux guests are not supported yet (the in-kernel PIT and the ACPI power ports are not saved)");
        }
        match &self.snapshot {
            Some(source) => Ok(source),
            None => unsupported("this host's KVM did not list its MSRs (KVM_GET_MSR_INDEX_LIST failed at start, see the log)"),
        }
    }

    pub fn swap(&self, id: &str, socket: &Path) -> Result<SwapReport, ControlError> {
        let device = self.vhost_user_device(id)?;
        let record: SwitchRecord = device
            .manager
            .swap(socket, SWAP_CONNECT_WAIT)
            .map_err(Box::new)?;
        Ok(SwapReport {
            id: id.to_string(),
            swap: SwitchReport::from_record(&record, self.epoch),
        })
    }

    fn vhost_user_device(&self, id: &str) -> Result<&AttachedDevice, ControlError> {
        if let Some(d) = self.devices.iter().find(|d| d.id == id) {
            return Ok(d);
        }
        if self.ata.as_ref().is_some_and(|a| a.id == id) {
            return Err(ControlError::NotVhostUser(id.to_string()));
        }
        Err(ControlError::UnknownDevice(id.to_string()))
    }

    fn uptime_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// `GET /vm`.
    pub fn status(&self) -> VmReport {
        let mmio_exits = self.mmio_exits_by_device();
        let mut devices: Vec<DeviceReport> = self
            .devices
            .iter()
            .enumerate()
            .map(|(index, d)| self.device_status(index, d, &mmio_exits))
            .collect();
        if let Some(ata) = &self.ata {
            devices.push(DeviceReport {
                id: ata.id.clone(),
                kind: "block".into(),
                transport: "ata-pio".into(),
                mmio_base: None,
                gsi: None,
                driver_ok: None,
                needs_reset: false,
                busy: false,
                backend: None,
                counters: Some(DeviceCounters::Ata(AtaCounters {
                    commands: ata.disk.commands(),
                    sectors_read: ata.disk.sectors_read(),
                    sectors_written: ata.disk.sectors_written(),
                    errors: ata.disk.errors(),
                })),
            });
        }
        VmReport {
            state: self.state(),
            guest: GuestReport {
                kind: self.guest.kind.to_string(),
                kernel: self.guest.kernel.clone(),
            },
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            uptime_ms: self.uptime_ms(),
            devices,
        }
    }

    /// One device's `GET /vm` entry. A device busy with its backend is not waited for: its
    /// last report is given again, marked `"busy": true`.
    fn device_status(
        &self,
        index: usize,
        d: &AttachedDevice,
        mmio_exits: &[(String, u64)],
    ) -> DeviceReport {
        let mut reports = self
            .last_reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if reports.len() <= index {
            reports.resize(index + 1, None);
        }
        let Some(mut mmio) = lock_briefly(&d.device) else {
            let mut report = reports[index].clone().unwrap_or_else(|| DeviceReport {
                id: d.id.clone(),
                kind: d.kind.name().to_string(),
                transport: "virtio-mmio".into(),
                mmio_base: Some(format!("{:#x}", d.mmio_base)),
                gsi: Some(d.gsi),
                driver_ok: None,
                needs_reset: false,
                busy: true,
                backend: None,
                counters: None,
            });
            report.needs_reset = d.interrupt.needs_reset();
            report.busy = true;
            return report;
        };
        let driver_status = mmio.driver_status();
        let report = DeviceReport {
            id: d.id.clone(),
            kind: d.kind.name().to_string(),
            transport: "virtio-mmio".into(),
            mmio_base: Some(format!("{:#x}", d.mmio_base)),
            gsi: Some(d.gsi),
            driver_ok: Some(driver_status & VIRTIO_CONFIG_S_DRIVER_OK != 0),
            needs_reset: d.interrupt.needs_reset(),
            busy: false,
            backend: backend_report(&d.id, mmio.device(), self.epoch),
            counters: Some(DeviceCounters::Virtio(device_counters(
                d,
                mmio.device_mut(),
                mmio_exits,
            ))),
        };
        reports[index] = Some(report.clone());
        report
    }

    fn mmio_exits_by_device(&self) -> Vec<(String, u64)> {
        self.mmio
            .exit_counts()
            .0
            .into_iter()
            .map(|d| (d.name.to_string(), d.exits))
            .collect()
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> MetricsReport {
        let counters =
            crate::api::stats::counters(&self.exits, &self.pio, &self.mmio, &self.devices);
        let mmio_exits = self.mmio_exits_by_device();
        let devices = self
            .devices
            .iter()
            .enumerate()
            .map(|(index, d)| {
                let counters = match lock_briefly(&d.device) {
                    Some(mut mmio) => Some(device_counters(d, mmio.device_mut(), &mmio_exits)),
                    // Busy with its backend: the counters of the last report.
                    None => self
                        .last_reports
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(index)
                        .and_then(|r| r.as_ref())
                        .and_then(|r| match &r.counters {
                            Some(DeviceCounters::Virtio(c)) => Some(c.clone()),
                            _ => None,
                        }),
                };
                (d.id.clone(), counters)
            })
            .collect();
        MetricsReport {
            uptime_ms: self.uptime_ms(),
            exits: counters.exits,
            virtio: counters.virtio,
            devices,
            backend_stats: crate::api::backend_stats::fetch_all(&self.backend_stats),
        }
    }
}

/// The device's backend as `GET /vm` reports it. `status_json` is the vhost-user module's
/// report; it is read into the shared type here so that the API's shape is defined once.
fn backend_report(id: &str, device: &VhostUserDevice, epoch: Instant) -> Option<BackendReport> {
    let raw = device.status_json(epoch);
    match serde_json::from_value::<BackendReport>(raw.clone()) {
        // A field added to the vhost-user report but not to the API's type would be dropped
        // here: say so (docs/api.yaml and api::types need it too).
        Ok(report) if serde_json::to_value(&report).ok().as_ref() != Some(&raw) => {
            log::error!("control: device {id}: the backend's report has fields the API's BackendReport lacks: {raw}");
            Some(report)
        }
        Ok(report) => Some(report),
        Err(e) => {
            log::error!("control: device {id}: the backend's report does not fit the API: {e}");
            None
        }
    }
}

/// Locks `device` unless it stays busy (talking to its backend) for `BUSY_DEVICE_WAIT`.
fn lock_briefly<T>(device: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    let deadline = Instant::now() + BUSY_DEVICE_WAIT;
    loop {
        match device.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() >= deadline => return None,
            Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_micros(500)),
        }
    }
}

/// What the VMM itself sees of a vhost-user device's traffic. Kicks and bytes go from the
/// guest to the backend without passing through the VMM (ioeventfd, shared memory); the
/// backend's own STATS line has those.
fn device_counters(
    d: &AttachedDevice,
    device: &mut VhostUserDevice,
    mmio_exits: &[(String, u64)],
) -> VirtioCounters {
    VirtioCounters {
        mmio_exits: mmio_exits
            .iter()
            .find(|(name, _)| *name == d.id)
            .map_or(0, |(_, n)| *n),
        used_buffer_interrupts: d.interrupt.used_buffer_interrupts.load(Ordering::Relaxed),
        config_interrupts: d.interrupt.config_interrupts.load(Ordering::Relaxed),
        completed_requests: device.completed_requests(),
    }
}
