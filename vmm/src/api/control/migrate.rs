//! `PUT /vm/migrate`: the source's side of a live migration (see `crate::migration`). The VM
//! goes on as before unless the destination confirmed it runs the VM there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use super::{ControlError, VmControl};
use crate::api::types::{MigrateReport, MigrationStatus};
use crate::memory::GuestMemory;
use crate::migration::dirty::{self, BackendLog, DirtyLog};
use crate::migration::send::{self, SendError};
use crate::migration::wire::{Address, Stream};
use crate::migration::Hello;
use crate::snapshot::format::{DeviceState, Manifest};
use crate::snapshot::take::{self, Captured, SnapshotSource, StoppedRings};
use crate::snapshot::{memory_file, FORMAT_VERSION};
use crate::vhost_user::handoff;
use crate::vm_end::VmEnd;

/// How long the source waits for the destination to accept the connection.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long the destination gets to restore the VM and connect to the backends.
const RESTORE_WAIT: Duration = Duration::from_secs(60);
/// How long the source waits for its backends after a destination that failed let them go.
const RECLAIM_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Wire(#[from] crate::migration::wire::WireError),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("capturing the VM's state failed")]
    Capture(#[source] take::TakeError),
    #[error("{0}")]
    Unsupported(String),
    #[error("another migration of this VM is in progress")]
    Busy,
    #[error("pre-copy failed")]
    DirtyLog(#[from] dirty::DirtyLogError),
    #[error("pre-copy failed")]
    BackendLog(#[from] crate::vhost_user::handoff::HandoffError),
}

impl VmControl {
    /// Migrates the VM to the destination waiting at `to` (`unix:PATH` or `tcp:HOST:PORT`).
    /// On success the VM is left paused, its backends handed over, and the returned end is
    /// for the caller to apply once the client has its answer; on failure it runs (or stays
    /// paused) as before.
    pub fn migrate(&self, to: &str) -> Result<(MigrateReport, VmEnd), ControlError> {
        let Ok(_migrating) = self.migrating.try_lock() else {
            return Err(migrate_error(MigrateError::Busy));
        };
        // A snapshot or a live upgrade captures the vCPUs through the same mailbox and stops
        // the same rings: one of them at a time.
        let Ok(_capturing) = self.capturing.try_lock() else {
            return Err(ControlError::Busy);
        };
        let start = Instant::now();
        let _progress = self.track(to, start);
        let (address, mut stream, source) = self.propose(to)?;
        self.set_progress(&stream, "pre-copy");
        let (log, precopy) = self.precopy_phase(&mut stream, source)?;
        self.set_progress(&stream, "stop-and-copy");
        let was_paused = self.pause.is_paused();
        if !was_paused {
            self.pause()?;
        }
        let paused_at = Instant::now();
        let stopped = self.stop_and_copy(&mut stream, source, log, precopy.left, was_paused);
        let (memory_bytes, sent, stopped) = stopped?;
        self.set_progress(&stream, "handoff");
        self.switch_over(&mut stream, &stopped, was_paused)?;
        let bytes = precopy.sent.bytes + sent.bytes;
        let report = MigrateReport {
            to: address.to_string(),
            memory_bytes,
            sent_bytes: bytes,
            precopy_rounds: precopy.rounds,
            elapsed_ms: start.elapsed().as_millis() as u64,
            downtime_ms: paused_at.elapsed().as_millis() as u64,
            rate_mib_s: rate_mib_s(bytes, precopy.sent.elapsed + sent.elapsed),
        };
        log::info!(
            "control: migrated to {}: {} MiB sent in {} ms, downtime {} ms",
            report.to,
            report.sent_bytes >> 20,
            report.elapsed_ms,
            report.downtime_ms
        );
        let end = VmEnd::Migrated {
            to: report.to.clone(),
        };
        Ok((report, end))
    }

    /// Checks that the VM can be migrated, connects to the destination and has it check the
    /// header; nothing of the VM is touched yet.
    fn propose(&self, to: &str) -> Result<(Address, Stream, &SnapshotSource), ControlError> {
        let address: Address = to.parse().map_err(migrate_error)?;
        let source = self.snapshot_source()?;
        if let Some(ata) = &self.ata {
            return Err(migrate_error(MigrateError::Unsupported(format!(
                "the emulated ATA disk {} cannot be migrated (its image stays open here); use a vhost-user disk",
                ata.id
            ))));
        }
        let mut stream = Stream::connect(&address, CONNECT_WAIT).map_err(migrate_error)?;
        let layout = memory_file::layout_of(&source.memory);
        let hello = Hello::new(layout, usize::from(self.vcpus), &self.device_keys());
        send::propose(&mut stream, &hello).map_err(migrate_error)?;
        Ok((address, stream, source))
    }

    /// Pre-copy while the VM runs, unless a backend writes guest memory without a dirty log;
    /// the log stays on for the stop.
    fn precopy_phase<'s>(
        &self,
        stream: &mut Stream,
        source: &'s SnapshotSource,
    ) -> Result<(Option<DirtyLog<'s>>, Precopy), ControlError> {
        // Every backend serving rings logs its writes from now on, if it can; those that
        // cannot keep pre-copy off. (A new log each time: an earlier one may be stale.)
        let backend_log = BackendLog::new(&source.memory).map_err(migrate_error)?;
        for d in &self.devices {
            handoff::start_logging(&d.manager, backend_log.file(), backend_log.size())
                .map_err(migrate_error)?;
        }
        let blockers = self.precopy_blockers();
        if !blockers.is_empty() {
            log::info!(
                "control: no pre-copy: the backends of {} write guest memory without a dirty log; stop-and-copy",
                blockers.join(", ")
            );
            return Ok((None, Precopy::default()));
        }
        let mut log = DirtyLog::start(&source.vm, &source.memory).map_err(migrate_error)?;
        log.backend = Some(backend_log);
        let precopy = self.precopy(stream, &log).map_err(migrate_error)?;
        Ok((Some(log), precopy))
    }

    /// The VM paused: captures it (its rings stopped), sends the memory left and the state.
    /// Returns the memory size, what was sent and where the rings stopped; on failure the
    /// rings and (unless `was_paused`) the vCPUs run again.
    fn stop_and_copy(
        &self,
        stream: &mut Stream,
        source: &SnapshotSource,
        log: Option<DirtyLog>,
        left: Option<dirty::Bitmaps>,
        was_paused: bool,
    ) -> Result<(u64, send::Sent, Vec<StoppedRings>), ControlError> {
        let vcpus = usize::from(self.vcpus);
        let captured = source.capture(&self.pause, vcpus, (&self.devices, None));
        let Captured {
            vcpus,
            vm,
            devices,
            stopped,
        } = captured.map_err(|e| {
            if !was_paused {
                self.pause.resume();
            }
            migrate_error(MigrateError::Capture(e))
        })?;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            created_by: concat!("splitvisor ", env!("CARGO_PKG_VERSION")).to_string(),
            memory: memory_file::layout_of(&source.memory),
            vcpus,
            vm,
            devices,
        };
        let sent = self
            .final_copy(stream, &source.memory, (log.as_ref(), left))
            .and_then(|sent| {
                dirty::digest_hook("source", || dirty::digest(&source.memory));
                send::state(stream, &manifest)?;
                Ok(sent)
            });
        drop(log);
        match sent {
            Ok(sent) => Ok((manifest.memory.size, sent, stopped)),
            Err(e) => {
                take::resume_devices(&self.devices, &stopped);
                if !was_paused {
                    self.pause.resume();
                }
                Err(migrate_error(e))
            }
        }
    }

    /// Hands the backends over and waits for the destination to run the VM; if it does not,
    /// takes them back and runs the VM here again (unless `was_paused`).
    fn switch_over(
        &self,
        stream: &mut Stream,
        stopped: &[StoppedRings],
        was_paused: bool,
    ) -> Result<(), ControlError> {
        // The daemons serve one frontend per socket: ours must be closed before the
        // destination connects, which it does only once it has the handoff.
        for d in &self.devices {
            handoff::release(&d.manager);
        }
        if let Err(e) = send::hand_off(stream, RESTORE_WAIT) {
            self.reclaim(stopped);
            if !was_paused {
                self.pause.resume();
            }
            return Err(migrate_error(e));
        }
        Ok(())
    }

    /// Reports a migration to `to` from now until the returned guard is dropped.
    fn track(&self, to: &str, started: Instant) -> ProgressGuard<'_> {
        *self.lock_progress() = Some(Progress {
            to: to.to_string(),
            started,
            phase: "connecting",
            sent: None,
        });
        ProgressGuard(self)
    }

    fn lock_progress(&self) -> std::sync::MutexGuard<'_, Option<Progress>> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_progress(&self, stream: &Stream, phase: &'static str) {
        if let Some(p) = self.lock_progress().as_mut() {
            p.phase = phase;
            p.sent = Some(stream.sent());
        }
    }

    /// `GET /vm/migrate`.
    pub fn migration_status(&self) -> MigrationStatus {
        match self.lock_progress().as_ref() {
            Some(p) => {
                let sent = p.sent.as_ref().map_or(0, |s| s.load(Ordering::Relaxed));
                MigrationStatus {
                    migrating: true,
                    to: Some(p.to.clone()),
                    phase: Some(p.phase.to_string()),
                    sent_bytes: sent,
                    elapsed_ms: p.started.elapsed().as_millis() as u64,
                    rate_mib_s: rate_mib_s(sent, p.started.elapsed()),
                }
            }
            None => MigrationStatus {
                migrating: false,
                to: None,
                phase: None,
                sent_bytes: 0,
                elapsed_ms: 0,
                rate_mib_s: 0,
            },
        }
    }

    /// The devices whose backends may write guest memory now (their rings run) without
    /// logging it, which KVM's dirty log does not see: pre-copy would miss their writes.
    fn precopy_blockers(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter(|d| handoff::backend_writes_unlogged(&d.manager))
            .map(|d| d.id.clone())
            .collect()
    }

    /// Copies guest memory while the VM runs: everything once, then the pages written
    /// meanwhile, round after round, until few are left (`PRECOPY_DONE`) or `PRECOPY_ROUNDS`.
    fn precopy(&self, stream: &mut Stream, log: &DirtyLog) -> Result<Precopy, MigrateError> {
        let memory = log.memory();
        let start = Instant::now();
        let mut bytes = send::memory(stream, memory)?.bytes;
        let mut rounds = 1;
        let left = loop {
            let dirty = log.take()?;
            if dirty::count(&dirty) < PRECOPY_DONE || rounds == PRECOPY_ROUNDS {
                break dirty;
            }
            bytes += send::dirty_pages(stream, memory, &dirty)?;
            rounds += 1;
        };
        log::info!(
            "control: pre-copy: {rounds} round(s), {} MiB, {} page(s) left for the stop",
            bytes >> 20,
            dirty::count(&left)
        );
        Ok(Precopy {
            rounds,
            sent: send::Sent {
                bytes,
                elapsed: start.elapsed(),
            },
            left: Some(left),
        })
    }

    /// The VM paused: the pages pre-copy left and those written since, or all of memory
    /// without pre-copy (or if a device started writing guest memory meanwhile).
    fn final_copy(
        &self,
        stream: &mut Stream,
        memory: &GuestMemory,
        (log, left): (Option<&DirtyLog>, Option<dirty::Bitmaps>),
    ) -> Result<send::Sent, MigrateError> {
        let start = Instant::now();
        let precopied = match (log, left) {
            (Some(log), Some(mut left)) if self.precopy_blockers().is_empty() => {
                let last = log.take()?;
                dirty::merge(&mut left, &last);
                Some(left)
            }
            _ => None,
        };
        let bytes = match precopied {
            Some(dirty) => send::dirty_pages(stream, memory, &dirty)?,
            None => send::memory(stream, memory)?.bytes,
        };
        Ok(send::Sent {
            bytes,
            elapsed: start.elapsed(),
        })
    }

    /// The devices as a migration header names them, in attach order.
    fn device_keys(&self) -> Vec<DeviceState> {
        let mut devices = take::platform_devices();
        devices.extend(self.devices.iter().map(|d| DeviceState {
            id: d.id.clone(),
            kind: d.kind.name().into(),
            state: Default::default(),
        }));
        devices
    }

    /// After a destination failed: every device back on its backend at the stopped positions.
    fn reclaim(&self, stopped: &[StoppedRings]) {
        for (index, d) in self.devices.iter().enumerate() {
            let bases = stopped
                .iter()
                .find(|(i, _)| *i == index)
                .map(|(_, b)| b.as_slice())
                .unwrap_or_default();
            if let Err(e) = handoff::reclaim(&d.manager, bases, RECLAIM_WAIT) {
                log::error!(
                    "after the failed migration: {}; the device waits for its backend",
                    crate::error_chain(&e)
                );
                d.device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .device_mut()
                    .fail();
                d.interrupt.set_needs_reset();
            }
        }
    }
}

/// The migration in progress, for `GET /vm/migrate`.
pub struct Progress {
    to: String,
    started: Instant,
    phase: &'static str,
    /// The stream's byte count, once connected.
    sent: Option<Arc<AtomicU64>>,
}

/// Clears the progress report when the migration ends, however it ends.
struct ProgressGuard<'a>(&'a VmControl);

impl Drop for ProgressGuard<'_> {
    fn drop(&mut self) {
        *self.0.lock_progress() = None;
    }
}

/// Rounds of pre-copy at most, and the dirty pages below which the VM is stopped.
const PRECOPY_ROUNDS: u32 = 30;
const PRECOPY_DONE: u64 = 256;

/// What pre-copy did.
#[derive(Default)]
struct Precopy {
    rounds: u32,
    sent: send::Sent,
    /// The pages dirty at its end, for the stop.
    left: Option<dirty::Bitmaps>,
}

fn migrate_error(e: impl Into<MigrateError>) -> ControlError {
    ControlError::Migrate(Box::new(e.into()))
}

fn rate_mib_s(bytes: u64, elapsed: Duration) -> u64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        ((bytes as f64 / secs) / f64::from(1 << 20)) as u64
    } else {
        0
    }
}
