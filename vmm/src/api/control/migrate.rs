//! `PUT /vm/migrate`: the source's side of a live migration (see `crate::migration`). The VM
//! goes on as before unless the destination confirmed it runs the VM there.

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use super::{ControlError, VmControl};
use crate::api::types::MigrateReport;
use crate::migration::send::{self, SendError};
use crate::migration::wire::{Address, Stream};
use crate::migration::Hello;
use crate::snapshot::format::{DeviceState, Manifest};
use crate::snapshot::take::{self, Captured, StoppedRings};
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
}

impl VmControl {
    /// Migrates the VM to the destination waiting at `to` (`unix:PATH` or `tcp:HOST:PORT`).
    /// On success the VM is left paused, its backends handed over, and the returned end is
    /// for the caller to apply once the client has its answer; on failure it runs (or stays
    /// paused) as before.
    pub fn migrate(&self, to: &str) -> Result<(MigrateReport, VmEnd), ControlError> {
        let address: Address = to.parse().map_err(migrate_error)?;
        let source = self.snapshot_source()?;
        if let Some(ata) = &self.ata {
            return Err(ControlError::SnapshotUnsupported(format!(
                "the emulated ATA disk {} cannot be migrated (its image stays open here); use a vhost-user disk",
                ata.id
            )));
        }
        let start = Instant::now();
        let mut stream = Stream::connect(&address, CONNECT_WAIT).map_err(migrate_error)?;
        let vcpus = usize::from(self.vcpus);
        let layout = memory_file::layout_of(&source.memory);
        let hello = Hello::new(layout.clone(), vcpus, &self.device_keys());
        send::propose(&mut stream, &hello).map_err(migrate_error)?;
        let was_paused = self.pause.is_paused();
        if !was_paused {
            self.pause()?;
        }
        let paused_at = Instant::now();
        let resume = |stopped: &[StoppedRings]| {
            take::resume_devices(&self.devices, stopped);
            if !was_paused {
                self.pause.resume();
            }
        };
        let captured = source
            .capture(&self.pause, vcpus, (&self.devices, None))
            .map_err(|e| {
                if !was_paused {
                    self.pause.resume();
                }
                migrate_error(MigrateError::Capture(e))
            })?;
        let Captured {
            vcpus: vcpu_states,
            vm,
            devices,
            stopped,
        } = captured;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            created_by: concat!("splitvisor ", env!("CARGO_PKG_VERSION")).to_string(),
            memory: layout,
            vcpus: vcpu_states,
            vm,
            devices,
        };
        let sent = send::memory(&mut stream, &source.memory)
            .and_then(|sent| send::state(&mut stream, &manifest).map(|()| sent));
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) => {
                resume(&stopped);
                return Err(migrate_error(e));
            }
        };
        // The daemons serve one frontend per socket: ours must be closed before the
        // destination connects, which it does only once it has the handoff.
        for d in &self.devices {
            handoff::release(&d.manager);
        }
        if let Err(e) = send::hand_off(&mut stream, RESTORE_WAIT) {
            self.reclaim(&stopped);
            if !was_paused {
                self.pause.resume();
            }
            return Err(migrate_error(e));
        }
        let report = MigrateReport {
            to: address.to_string(),
            memory_bytes: manifest.memory.size,
            sent_bytes: sent.bytes,
            elapsed_ms: start.elapsed().as_millis() as u64,
            downtime_ms: paused_at.elapsed().as_millis() as u64,
            rate_mib_s: rate_mib_s(sent.bytes, sent.elapsed),
        };
        log::info!(
            "control: migrated to {}: {} MiB sent in {} ms, downtime {} ms",
            report.to,
            report.sent_bytes >> 20,
            report.elapsed_ms,
            report.downtime_ms
        );
        Ok((
            report,
            VmEnd::Migrated {
                to: address.to_string(),
            },
        ))
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
