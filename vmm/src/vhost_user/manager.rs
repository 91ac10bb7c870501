//! Which backend serves a vhost-user device, over the VM's life: watches the backend's socket,
//! waits for a lost backend to come back on the same socket (and gives it the rings and the
//! inflight region), and carries out planned swaps to another socket. One switch at a time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vmm_sys_util::epoll::EventSet;

use super::{
    Candidate, LinkState, SwitchError, SwitchKind, SwitchRecord, VhostUserDevice, VhostUserError,
};
use crate::event_loop::{EventLoop, Next};
use crate::virtio::interrupt::Interrupt;
use crate::virtio::mmio::VirtioMmio;
use crate::vm_end::EndSignal;

/// How often a lost backend's socket is tried: first quickly (a supervisor restarts a crashed
/// daemon within milliseconds), then less often.
const RETRY_FIRST: Duration = Duration::from_millis(2);
const RETRY_MAX: Duration = Duration::from_millis(20);
/// How long after a switch the first completed request is waited for (and timed).
const FIRST_COMPLETION_WAIT: Duration = Duration::from_secs(2);

pub type SharedDevice = Arc<Mutex<VirtioMmio<VhostUserDevice>>>;

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("device {0}: another backend switch is in progress; try again")]
    Busy(String),
    #[error("device {id}: {} is the socket of the backend it already uses; swap to another backend's socket", .socket.display())]
    SameBackend { id: String, socket: PathBuf },
    #[error("device {id}: could not reach the new backend")]
    Connect {
        id: String,
        #[source]
        source: VhostUserError,
    },
    #[error("device {id}: the swap to {} failed; the device keeps its backend {}", .to.display(), .kept.display())]
    Switch {
        id: String,
        to: PathBuf,
        kept: PathBuf,
        #[source]
        source: Box<SwitchError>,
    },
}

pub struct BackendManager {
    id: String,
    device: SharedDevice,
    interrupt: Arc<Interrupt>,
    events: Arc<EventLoop>,
    end: Arc<EndSignal>,
    reconnect_timeout: Duration,
    /// Held for the whole of a swap or recovery so that they never interleave.
    switching: Mutex<()>,
    /// The event-loop registration watching the current backend's socket.
    watch_token: Mutex<Option<u64>>,
}

impl BackendManager {
    pub fn new(
        id: &str,
        device: SharedDevice,
        interrupt: Arc<Interrupt>,
        events: Arc<EventLoop>,
        end: Arc<EndSignal>,
        reconnect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            id: id.to_string(),
            device,
            interrupt,
            events,
            end,
            reconnect_timeout,
            switching: Mutex::new(()),
            watch_token: Mutex::new(None),
        })
    }

    pub fn device(&self) -> &SharedDevice {
        &self.device
    }

    fn lock_device(&self) -> MutexGuard<'_, VirtioMmio<VhostUserDevice>> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts watching the current backend's socket for a hang-up.
    pub fn watch(self: &Arc<Self>) -> Result<(), VhostUserError> {
        let (fd, generation, socket) = {
            let device = self.lock_device();
            let d = device.device();
            (d.backend_fd(), d.generation(), d.socket().to_path_buf())
        };
        let Some(fd) = fd else { return Ok(()) };
        let manager = Arc::downgrade(self);
        let token = self
            .events
            .add(
                fd,
                EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                move |_| {
                    if let Some(manager) = Weak::upgrade(&manager) {
                        manager.backend_hung_up(generation);
                    }
                    Next::Remove
                },
            )
            .map_err(|e| VhostUserError::Watch(socket, e))?;
        *self
            .watch_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(token);
        Ok(())
    }

    /// Stops watching the backend's socket (before it is closed on purpose).
    pub(super) fn unwatch(&self) {
        if let Some(token) = self
            .watch_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            self.events.remove(token);
        }
    }

    /// Runs on the event-loop thread: everything slow happens on a thread of its own.
    fn backend_hung_up(self: Arc<Self>, generation: u64) {
        let manager = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-recovery", self.id))
            .spawn(move || manager.recover(generation));
        if let Err(e) = spawned {
            error!("{}: could not start the recovery thread: {e}", self.id);
        }
    }

    /// The backend of `generation` is gone: wait for one on the same socket, up to the
    /// reconnect timeout, then give it the rings; or fail the device.
    fn recover(self: Arc<Self>, generation: u64) {
        let socket = {
            let _switching = self
                .switching
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut device = self.lock_device();
            if !device.device_mut().backend_lost(generation) {
                return;
            }
            self.unwatch();
            device.device().socket().to_path_buf()
        };
        // The link status (net) changed.
        self.interrupt.signal_config_change();
        let lost_at = Instant::now();
        if self.reconnect_timeout.is_zero() {
            error!(
                "{}: lost the backend on {} (socket closed); the device now needs a reset",
                self.id,
                socket.display()
            );
            self.give_up(generation);
            return;
        }
        warn!(
            "{}: lost the backend on {} (socket closed); waiting up to {}s for it to come back",
            self.id,
            socket.display(),
            self.reconnect_timeout.as_secs()
        );
        let kind = self.lock_device().device().kind();
        let mut delay = RETRY_FIRST;
        let mut last_error = String::new();
        while lost_at.elapsed() < self.reconnect_timeout && !self.end.is_stopping() {
            match Candidate::connect(kind, &socket, Duration::ZERO) {
                Ok(candidate) => match self.take_over(generation, candidate) {
                    Ok(Some(record)) => {
                        // At the level of the "lost" line, so that users see both.
                        warn!(
                            "{}: recovered: the backend on {} is back after {} ms (rings resumed in {} us{})",
                            self.id,
                            socket.display(),
                            lost_at.elapsed().as_millis(),
                            record.stall.as_micros(),
                            if record.inflight_region {
                                ", inflight requests resubmitted"
                            } else {
                                ""
                            }
                        );
                        return;
                    }
                    // Someone else (a swap) already replaced the lost backend.
                    Ok(None) => return,
                    Err(e @ SwitchError::NoInflightRegion(_)) => {
                        error!(
                            "{}: {}; the device now needs a reset",
                            self.id,
                            crate::error_chain(&e)
                        );
                        self.give_up(generation);
                        return;
                    }
                    Err(e) => last_error = crate::error_chain(&e),
                },
                Err(e) => last_error = crate::error_chain(&e),
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(RETRY_MAX);
        }
        if self.end.is_stopping() {
            return;
        }
        error!(
            "{}: the backend on {} did not come back within {}s (last: {last_error}); the device now needs a reset",
            self.id,
            socket.display(),
            self.reconnect_timeout.as_secs()
        );
        self.give_up(generation);
    }

    /// Gives `candidate` the device if the backend of `generation` is still the lost one.
    fn take_over(
        self: &Arc<Self>,
        generation: u64,
        candidate: Candidate,
    ) -> Result<Option<SwitchRecord>, SwitchError> {
        let _switching = self
            .switching
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let record = {
            let mut device = self.lock_device();
            let d = device.device_mut();
            if d.generation() != generation || !matches!(d.state(), LinkState::Lost { .. }) {
                return Ok(None);
            }
            let (_, record) = d.switch_to(candidate)?;
            record
        };
        self.interrupt.signal_config_change();
        if let Err(e) = self.watch() {
            warn!("{}: {}", self.id, crate::error_chain(&e));
        }
        self.time_first_completion();
        Ok(Some(record))
    }

    /// Times, on a thread of its own, how long after a switch the guest's first request
    /// completes, and adds it to the switch's record (`GET /vm`) and the log.
    fn time_first_completion(self: &Arc<Self>) {
        let (generation, resumed) = {
            let device = self.lock_device();
            (device.device().generation(), device.device().resumed_from())
        };
        let Some((before, started)) = resumed else {
            return;
        };
        let manager = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-timing", self.id))
            .spawn(move || {
                while started.elapsed() < FIRST_COMPLETION_WAIT && !manager.end.is_stopping() {
                    let mut device = manager.lock_device();
                    let d = device.device_mut();
                    if d.generation() != generation {
                        return;
                    }
                    if d.used_indices() != before {
                        let after = started.elapsed();
                        d.note_first_completion(generation, after);
                        drop(device);
                        info!(
                            "{}: first request completed {} us after the new backend took over",
                            manager.id,
                            after.as_micros()
                        );
                        return;
                    }
                    drop(device);
                    std::thread::sleep(Duration::from_micros(100));
                }
            });
        if let Err(e) = spawned {
            warn!("{}: could not time the first completion: {e}", self.id);
        }
    }

    fn give_up(&self, generation: u64) {
        let _switching = self
            .switching
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut device = self.lock_device();
        let d = device.device_mut();
        if d.generation() == generation {
            d.fail();
            drop(device);
            self.interrupt.set_needs_reset();
        }
    }

    /// Moves the device to the backend on `socket` while the guest runs. On any failure the
    /// device keeps the backend it had.
    pub fn swap(
        self: &Arc<Self>,
        socket: &Path,
        wait: Duration,
    ) -> Result<SwitchRecord, SwapError> {
        // A swap that panicked released the lock too (poisoned): it is not "in progress".
        let _switching = match self.switching.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(SwapError::Busy(self.id.clone())),
        };
        let (kind, current) = {
            let device = self.lock_device();
            (
                device.device().kind(),
                device.device().socket().to_path_buf(),
            )
        };
        // The backend serves one frontend at a time: a second connection from us would wait
        // in its listen backlog, unanswered.
        if same_socket(socket, &current) {
            return Err(SwapError::SameBackend {
                id: self.id.clone(),
                socket: socket.to_path_buf(),
            });
        }
        // Connect and negotiate before touching the rings: an unreachable backend costs the
        // guest nothing.
        let candidate =
            Candidate::connect(kind, socket, wait).map_err(|source| SwapError::Connect {
                id: self.id.clone(),
                source,
            })?;
        let (old, record) = {
            let mut device = self.lock_device();
            let d = device.device_mut();
            let kept = d.socket().to_path_buf();
            d.switch_to(candidate).map_err(|source| SwapError::Switch {
                id: self.id.clone(),
                to: socket.to_path_buf(),
                kept,
                source: Box::new(source),
            })?
        };
        // Stop watching the old socket before closing it, so that its fd number cannot be
        // reused under the old registration.
        self.unwatch();
        drop(old);
        if record.kind == SwitchKind::Recovery {
            // The link status (net) changed.
            self.interrupt.signal_config_change();
        }
        if let Err(e) = self.watch() {
            warn!("{}: {}", self.id, crate::error_chain(&e));
        }
        self.time_first_completion();
        info!(
            "{}: swapped backend {} -> {}: rings stopped for {} us",
            self.id,
            record.from.display(),
            record.to.display(),
            record.stall.as_micros()
        );
        Ok(record)
    }
}

/// Whether `a` and `b` name the same socket: the same file if both exist, else the same path.
fn same_socket(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_socket_is_recognised_by_any_path() {
        let dir = std::env::temp_dir().join(format!("sv-same-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("b.sock");
        let _ = std::fs::remove_file(&socket);
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let other = dir.join("other.sock");
        let _ = std::fs::remove_file(&other);
        let _other = std::os::unix::net::UnixListener::bind(&other).unwrap();
        assert!(same_socket(&socket, &dir.join("./b.sock")));
        assert!(same_socket(
            &socket,
            &dir.join("../")
                .join(dir.file_name().unwrap())
                .join("b.sock")
        ));
        assert!(!same_socket(&socket, &other));
        assert!(same_socket(
            Path::new("/nonexistent/x"),
            Path::new("/nonexistent/x")
        ));
        assert!(!same_socket(&socket, Path::new("/nonexistent/x")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
