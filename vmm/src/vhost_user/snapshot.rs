//! A vhost-user device in a snapshot: its rings are stopped on the backend (GET_VRING_BASE)
//! and drained while the VM is paused, so that guest memory is saved with every request the
//! backend fetched completed; after the snapshot they start again on the same backend, and a
//! restored VM starts them on its (re)connected backend at the saved positions - both exactly
//! as a planned swap hands rings over (`rings::start` with `Resume::Handover`).

use std::sync::PoisonError;

use log::info;
use splitvisor_wire::config::NetConfig;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;

use super::deadline::ExchangeError;
use super::rings::{self, Resume, Rings};
use super::{DeviceKind, LinkState, VhostUserDevice, HANDOVER_DRAIN_TIMEOUT};
use crate::device_state::VhostUserState;
use crate::virtio::{ActivateError, Activation};

#[derive(Debug, thiserror::Error)]
pub enum DeviceSnapshotError {
    #[error("{id}: its backend is not connected now ({state}); take the snapshot once it is back")]
    NoBackend { id: String, state: &'static str },
    #[error("{id}: stopping the rings on the backend {socket} failed")]
    Stop {
        id: String,
        socket: String,
        #[source]
        source: ExchangeError,
    },
    #[error("{id}: the backend {socket} had not completed every request it fetched {} ms after stopping; the snapshot would miss its writes", HANDOVER_DRAIN_TIMEOUT.as_millis())]
    Drain { id: String, socket: String },
    #[error("{id}: restarting the rings on the backend {socket} failed")]
    Restart {
        id: String,
        socket: String,
        #[source]
        source: ExchangeError,
    },
}

impl VhostUserDevice {
    /// Stops the rings the backend serves and waits until every request it fetched is
    /// completed; returns where each ready ring stopped (empty if the driver never activated
    /// the device).
    pub fn pause_rings(&mut self) -> Result<Vec<(usize, u16)>, DeviceSnapshotError> {
        let Some(rings) = &self.rings else {
            return Ok(Vec::new());
        };
        let socket = self.backend.socket.display().to_string();
        let frontend = match (&mut self.backend.frontend, self.running) {
            (Some(frontend), true) if self.backend.state == LinkState::Connected => frontend,
            _ => {
                return Err(DeviceSnapshotError::NoBackend {
                    id: self.id.clone(),
                    state: match self.backend.state {
                        LinkState::Connected => "not serving the rings",
                        LinkState::Lost { .. } => "reconnecting",
                        LinkState::Failed => "failed",
                    },
                })
            }
        };
        let bases = rings::stop(frontend, rings).map_err(|source| DeviceSnapshotError::Stop {
            id: self.id.clone(),
            socket: socket.clone(),
            source,
        })?;
        self.running = false;
        if !rings.wait_completed(&self.memory, &bases, HANDOVER_DRAIN_TIMEOUT) {
            return Err(DeviceSnapshotError::Drain {
                id: self.id.clone(),
                socket,
            });
        }
        Ok(bases)
    }

    /// Starts the rings stopped by `pause_rings` again on the same backend, at `bases`.
    pub fn resume_rings(&mut self, bases: &[(usize, u16)]) -> Result<(), DeviceSnapshotError> {
        let (Some(rings), Some(frontend)) = (&self.rings, &mut self.backend.frontend) else {
            return Ok(());
        };
        self.inflight = rings::start(
            frontend,
            self.backend.protocol,
            self.backend.features,
            &self.memory,
            rings,
            bases,
            Resume::Handover,
            None,
        )
        .map_err(|source| DeviceSnapshotError::Restart {
            id: self.id.clone(),
            socket: self.backend.socket.display().to_string(),
            source,
        })?;
        rings.kick_all();
        self.running = true;
        Ok(())
    }

    /// What a snapshot keeps of the device besides its transport's registers.
    pub fn saved_state(&self, vring_bases: Vec<(usize, u16)>) -> VhostUserState {
        let mac = (self.kind == DeviceKind::Net
            && self.offered_features & (1 << VIRTIO_NET_F_MAC) != 0)
            .then(|| {
                NetConfig::from_prefix(&self.config.lock().unwrap_or_else(PoisonError::into_inner))
                    .mac()
            });
        VhostUserState {
            socket: self.backend.socket.display().to_string(),
            offered_features: self.offered_features,
            mac,
            vring_bases,
        }
    }

    /// Starts a restored driver's rings on this (newly connected) backend at the saved
    /// positions, as a swap hands them over: the driver negotiated `activation`'s features
    /// with the old backend, so this one must offer all of them.
    pub fn restore_rings(
        &mut self,
        activation: Activation<'_>,
        bases: &[(usize, u16)],
    ) -> Result<(), ActivateError> {
        let missing = activation.driver_features & !self.offered_features;
        if missing != 0 {
            return Err(ActivateError(format!(
                "the backend on {} lacks feature bits {missing:#x} that the guest negotiated",
                self.backend.socket.display()
            )));
        }
        let clone_all = |fds: &[vmm_sys_util::eventfd::EventFd]| {
            fds.iter()
                .map(|fd| fd.try_clone())
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| ActivateError(format!("duplicating the queue eventfds failed: {e}")))
        };
        let rings = Rings {
            driver_features: activation.driver_features,
            queues: activation.queues.to_vec(),
            kicks: clone_all(activation.kicks)?,
            calls: clone_all(activation.calls)?,
            log: false,
        };
        // Requests completed before the snapshot are not this VMM's to count.
        self.last_used = rings.used_indices(&self.memory);
        self.rings = Some(rings);
        self.resume_rings(bases)
            .map_err(|e| ActivateError(crate::error_chain(&e)))?;
        info!(
            "{}: rings restored on {} at {bases:?}",
            self.id,
            self.backend.socket.display()
        );
        Ok(())
    }
}
