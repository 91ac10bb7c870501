//! Handing a device's backend to another VMM (live migration): the source closes its
//! vhost-user connection, because a daemon serves one frontend per socket and the destination
//! must connect to the same one; if the destination then fails, the source connects again and
//! starts the rings where they stopped, as after a snapshot.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use log::info;

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
}

impl VhostUserDevice {
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

/// Whether the device's backend may write guest memory (the driver set up its rings), which
/// KVM's dirty log does not see.
pub fn backend_may_write(manager: &BackendManager) -> bool {
    manager
        .device()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .device()
        .rings
        .is_some()
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
