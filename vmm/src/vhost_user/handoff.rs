//! Handing a device's backend to another VMM (live migration): the source closes its
//! vhost-user connection, because a daemon serves one frontend per socket and the destination
//! must connect to the same one; if the destination then fails, the source connects again and
//! starts the rings where they stopped, as after a snapshot.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use log::info;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::VhostBackend;
use vhost::VhostUserDirtyLogRegion;

use super::deadline::{exchange, ExchangeError};
use super::manager::BackendManager;
use super::snapshot::DeviceSnapshotError;
use super::{Backend, Candidate, VhostUserDevice, VhostUserError};

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("{id}: could not reconnect to its backend {}", .socket.display())]
    Reconnect {
        id: String,
        socket: PathBuf,
        #[source]
        source: VhostUserError,
    },
    #[error(transparent)]
    Restart(#[from] DeviceSnapshotError),
    #[error("{id}: SET_LOG_BASE on the backend {} failed", .socket.display())]
    SetLog {
        id: String,
        socket: PathBuf,
        #[source]
        source: ExchangeError,
    },
}

impl VhostUserDevice {
    /// Whether the backend can log the pages it writes (LOG_SHMFD and VHOST_F_LOG_ALL).
    fn backend_can_log(&self) -> bool {
        self.backend
            .protocol
            .contains(VhostUserProtocolFeatures::LOG_SHMFD)
            && self.backend.features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
    }

    /// Has the backend log its writes into `log` (`size` bytes): the rings are stopped (as
    /// for a snapshot), the log given, and the rings restarted with VHOST_F_LOG_ALL and
    /// VHOST_VRING_F_LOG. Returns false, changing nothing, if the backend cannot log.
    fn start_logging(&mut self, log: &File, size: u64) -> Result<bool, HandoffError> {
        if self.rings.is_none() || !self.backend_can_log() {
            return Ok(false);
        }
        let bases = self.pause_rings()?;
        let region = VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: 0,
            mmap_handle: log.as_raw_fd(),
        };
        let set = match &mut self.backend.frontend {
            Some(frontend) => exchange(frontend, "SET_LOG_BASE", |f| {
                f.set_log_base(0, Some(region))
            }),
            None => Ok(()),
        };
        if let Some(rings) = &mut self.rings {
            rings.log = set.is_ok();
        }
        self.resume_rings(&bases)?;
        set.map_err(|source| HandoffError::SetLog {
            id: self.id.clone(),
            socket: self.backend.socket.clone(),
            source,
        })?;
        Ok(true)
    }

    /// Takes the backend connection away (the caller closes it); the rings must be stopped
    /// (`pause_rings`).
    fn release_backend(&mut self) -> Option<vhost::vhost_user::Frontend> {
        self.running = false;
        self.backend.frontend.take()
    }

    /// Serves the device on `candidate` (the same backend, reconnected) and starts its rings
    /// at `bases`.
    fn reclaim_backend(
        &mut self,
        candidate: Candidate,
        bases: &[(usize, u16)],
    ) -> Result<(), DeviceSnapshotError> {
        let generation = self.backend.generation + 1;
        self.backend = Backend::connected(candidate, generation);
        self.resume_rings(bases)
    }
}

/// Whether the device's backend may write guest memory without logging it (the driver set
/// up its rings, and they do not log), which KVM's dirty log does not see.
pub fn backend_writes_unlogged(manager: &BackendManager) -> bool {
    manager
        .device()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .device()
        .rings
        .as_ref()
        .is_some_and(|r| !r.log)
}

/// Has the device's backend log its writes into `log` (see `VhostUserDevice::start_logging`);
/// false if it cannot.
pub fn start_logging(
    manager: &BackendManager,
    log: &File,
    size: u64,
) -> Result<bool, HandoffError> {
    manager
        .device()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .device_mut()
        .start_logging(log, size)
}

/// Closes the device's backend connection, its rings stopped, without the manager taking it
/// for a crash.
pub fn release(manager: &BackendManager) {
    manager.unwatch();
    let closed = manager
        .device()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .device_mut()
        .release_backend();
    drop(closed);
}

/// Connects to the device's backend again (waiting up to `wait` while the destination still
/// holds it) and starts the rings at `bases`.
pub fn reclaim(
    manager: &Arc<BackendManager>,
    bases: &[(usize, u16)],
    wait: Duration,
) -> Result<(), HandoffError> {
    let (id, kind, socket) = {
        let device = manager
            .device()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let d = device.device();
        (d.id().to_string(), d.kind(), d.socket().to_path_buf())
    };
    let candidate =
        Candidate::connect(kind, &socket, wait).map_err(|source| HandoffError::Reconnect {
            id: id.clone(),
            socket: socket.clone(),
            source,
        })?;
    manager
        .device()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .device_mut()
        .reclaim_backend(candidate, bases)?;
    if let Err(e) = manager.watch() {
        log::warn!("{id}: {}", crate::error_chain(&e));
    }
    info!(
        "{id}: back on its backend {} after a failed migration",
        socket.display()
    );
    Ok(())
}
