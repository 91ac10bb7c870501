//! The vhost-user frontend: one generic virtio device whose queues are served by a backend
//! daemon over a Unix socket. The VMM does the control plane only - features, config space,
//! the memory table, vring addresses, kick and call eventfds - and then gets out of the way.
//!
//! The backend behind a device can change while the guest runs: a planned swap hands the rings
//! from one backend to another (`BackendManager::swap`), and a backend that dies is waited for
//! and given the rings again, with its inflight region, when it comes back (`manager`).

mod candidate;
pub mod connection;
pub mod deadline;
pub mod handoff;
pub mod manager;
pub mod rings;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde_json::{json, Value};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_BLK_SIZE;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MAC,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use splitvisor_wire::config::{BlkConfig, NetConfig};

use crate::memory::GuestMemory;
use crate::virtio::{ActivateError, Activation, VirtioDevice};
pub use candidate::Candidate;
use connection::ConnectError;
use deadline::{exchange, ExchangeError};
use rings::{InflightRegion, Resume, Rings};

/// Queue size offered to drivers.
pub const QUEUE_SIZE: u16 = 256;
/// How long a stopped backend gets to complete requests it fetched before it stopped (a
/// backend may answer GET_VRING_BASE while a request is still being served).
const HANDOVER_DRAIN_TIMEOUT: Duration = Duration::from_millis(500);
/// Backend switches remembered for `GET /vm`.
const HISTORY_LEN: usize = 8;

/// Which kind of device the backend implements; vhost-user itself does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Block,
    Net,
}

impl DeviceKind {
    fn virtio_id(self) -> u32 {
        match self {
            DeviceKind::Block => VIRTIO_ID_BLOCK,
            DeviceKind::Net => VIRTIO_ID_NET,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Block => "block",
            DeviceKind::Net => "net",
        }
    }

    fn config_size(self) -> u32 {
        match self {
            // What both sides know of the config space (see `READ_LEN`); the lengths are
            // small constants.
            DeviceKind::Block => BlkConfig::READ_LEN as u32,
            DeviceKind::Net => NetConfig::READ_LEN as u32,
        }
    }

    /// Features the VMM passes through to the driver: the device-specific bits (minus those
    /// needing a control queue the VMM would have to serve) and the ring features it handles.
    fn passthrough_features(self) -> u64 {
        let transport = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        let device_specific = match self {
            DeviceKind::Block => 0x00ff_ffff,
            DeviceKind::Net => {
                0x00ff_ffff
                    & !(1 << VIRTIO_NET_F_CTRL_VQ
                        | 1 << VIRTIO_NET_F_CTRL_RX
                        | 1 << VIRTIO_NET_F_CTRL_VLAN
                        | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE
                        | 1 << VIRTIO_NET_F_CTRL_RX_EXTRA
                        | 1 << VIRTIO_NET_F_CTRL_MAC_ADDR)
            }
        };
        transport | device_specific
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the backend on {} did not return its configuration", .0.display())]
    GetConfig(PathBuf, #[source] ExchangeError),
    #[error("the backend on {} offers no VIRTIO_F_VERSION_1; splitvisor drives only virtio 1.x devices", .0.display())]
    NotVersion1(PathBuf),
    #[error("could not watch the backend socket {}", .0.display())]
    Watch(PathBuf, #[source] std::io::Error),
}

/// Why a backend cannot take over a device; the device keeps the backend it had.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("the backend on {} is not compatible: {why}", .socket.display())]
    Incompatible { socket: PathBuf, why: String },
    #[error("the backend on {} failed while taking over the rings", .socket.display())]
    Start {
        socket: PathBuf,
        #[source]
        source: ExchangeError,
    },
    #[error("the backend on {} does not track inflight requests (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), so requests its predecessor had in flight would be lost", .0.display())]
    NoInflight(PathBuf),
    #[error("the lost backend on {} did not track inflight requests (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), so what it had in flight is unknown; the device cannot resume safely", .0.display())]
    NoInflightRegion(PathBuf),
    #[error("could not keep a handle on the inflight region")]
    KeepInflight(#[source] std::io::Error),
    #[error("the current backend on {} could not stop its rings{}", .socket.display(), if .source.timed_out() { "; it is treated as lost" } else { "; it keeps serving the device" })]
    Stop {
        socket: PathBuf,
        #[source]
        source: ExchangeError,
    },
}

/// Where the device's backend stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    Connected,
    /// The backend's socket closed; waiting for it to come back.
    Lost {
        since: Instant,
    },
    /// Given up on: the driver was told `DEVICE_NEEDS_RESET`.
    Failed,
}

/// The backend serving the device now.
struct Backend {
    socket: PathBuf,
    /// `None` once the backend is lost.
    frontend: Option<Frontend>,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    state: LinkState,
    since: Instant,
    /// Bumped at each switch, so that news about an older backend is recognised as stale.
    generation: u64,
}

impl Backend {
    fn connected(candidate: Candidate, generation: u64) -> Self {
        Self {
            socket: candidate.socket,
            frontend: Some(candidate.frontend),
            features: candidate.features,
            protocol: candidate.protocol,
            state: LinkState::Connected,
            since: Instant::now(),
            generation,
        }
    }
}

/// Why the backend changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchKind {
    /// `PUT /devices/{id}/backend`: the old backend handed over its ring positions.
    Swap,
    /// The old backend died; its successor resumed from the guest's used index.
    Recovery,
}

/// One completed switch, as logged and reported in `GET /vm`.
#[derive(Clone, Debug)]
pub struct SwitchRecord {
    pub kind: SwitchKind,
    pub from: PathBuf,
    pub to: PathBuf,
    /// Rings stopped (or found stopped) until running on the new backend.
    pub stall: Duration,
    /// From handing the rings to the new backend (the end of `stall` minus the setup
    /// messages) until the guest's first completed request; None if none completed within
    /// 2 s (an idle guest). For a busy guest, the I/O gap of a swap is about the old rings'
    /// stop plus this; after a crash, the new backend's first answer plus this.
    pub first_completion: Option<Duration>,
    /// For a recovery: from losing the backend until the new one served the rings.
    pub outage: Option<Duration>,
    /// Whether the new backend got its predecessor's inflight region to resubmit from.
    pub inflight_region: bool,
    pub at: Instant,
}

impl SwitchRecord {
    pub fn to_json(&self, epoch: Instant) -> Value {
        json!({
            "kind": match self.kind { SwitchKind::Swap => "swap", SwitchKind::Recovery => "recovery" },
            "from": self.from,
            "to": self.to,
            "stall_us": self.stall.as_micros() as u64,
            "first_completion_us": self.first_completion.map(|d| d.as_micros() as u64),
            "outage_ms": self.outage.map(|d| d.as_millis() as u64),
            "inflight_region": self.inflight_region,
            "at_ms": self.at.saturating_duration_since(epoch).as_millis() as u64,
        })
    }
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    id: String,
    kind: DeviceKind,
    memory: GuestMemory,
    backend: Backend,
    /// What the driver was offered at attach time; a replacement must offer all of it.
    offered_features: u64,
    /// The config space read at connect time (with the VMM's changes: MAC, link status).
    config: Arc<Mutex<Vec<u8>>>,
    queue_count: usize,
    /// What the driver set up at `DRIVER_OK`; `None` before that and after a reset.
    rings: Option<Rings>,
    /// Whether the current backend is serving `rings`.
    running: bool,
    /// Whether the lost backend was serving the rings when it went: only then can it have
    /// left requests in flight.
    rings_interrupted: bool,
    inflight: Option<InflightRegion>,
    swaps: u64,
    recoveries: u64,
    history: Vec<SwitchRecord>,
    /// Requests completed since activation, counted from the used rings' `idx` (see
    /// `sample_completions`), and each ready queue's `idx` when last sampled.
    completed: u64,
    last_used: Vec<(usize, u16)>,
    /// The used indices and the time just before the latest switch started the new backend,
    /// from which the first completion after it is timed.
    resumed_from: Option<(Vec<(usize, u16)>, Instant)>,
}

impl VhostUserDevice {
    /// Connects to the backend (waiting up to `wait` for its socket) and reads what it offers.
    pub fn connect(
        id: &str,
        kind: DeviceKind,
        socket: &Path,
        memory: GuestMemory,
        wait: Duration,
    ) -> Result<Self, VhostUserError> {
        let mut candidate = Candidate::connect(kind, socket, wait)?;
        info!(
            "{id}: connected to {} backend on {} ({} queue(s), features {:#x})",
            kind.name(),
            socket.display(),
            candidate.queue_count,
            candidate.features
        );
        let offered_features = candidate.features & kind.passthrough_features();
        Ok(Self {
            id: id.to_string(),
            kind,
            memory,
            offered_features,
            config: Arc::new(Mutex::new(std::mem::take(&mut candidate.config))),
            queue_count: candidate.queue_count,
            backend: Backend::connected(candidate, 0),
            rings: None,
            running: false,
            rings_interrupted: false,
            inflight: None,
            swaps: 0,
            recoveries: 0,
            history: Vec::new(),
            completed: 0,
            last_used: Vec::new(),
            resumed_from: None,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    pub fn socket(&self) -> &Path {
        &self.backend.socket
    }

    pub fn state(&self) -> LinkState {
        self.backend.state
    }

    pub fn generation(&self) -> u64 {
        self.backend.generation
    }

    /// The backend connection's fd, for watching it close.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.backend.frontend.as_ref().map(|f| f.as_raw_fd())
    }

    /// Presents `mac` to the driver instead of the backend's (or its lack of one).
    pub fn override_mac(&mut self, mac: [u8; 6]) {
        let mut config = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        if config.len() >= mac.len() {
            let mut view = NetConfig::from_prefix(&config);
            view.set_mac(mac);
            view.write_prefix(&mut config);
            self.offered_features |= 1 << VIRTIO_NET_F_MAC;
        }
    }

    /// A NIC without its backend has no link: say so, the way a cable pull would.
    fn set_link(&self, up: bool) {
        if self.kind != DeviceKind::Net {
            return;
        }
        let mut config = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        let mut view = NetConfig::from_prefix(&config);
        view.set_link_up(up);
        view.write_prefix(&mut config);
    }

    /// The backend of `generation` closed its socket. Returns false if that backend was
    /// already replaced or given up on (stale news). The caller raises a config-change
    /// interrupt for the link status (net) and starts waiting for the backend.
    pub fn backend_lost(&mut self, generation: u64) -> bool {
        if generation != self.backend.generation || self.backend.state != LinkState::Connected {
            return false;
        }
        self.backend.frontend = None;
        self.backend.state = LinkState::Lost {
            since: Instant::now(),
        };
        self.rings_interrupted = self.running;
        self.running = false;
        self.set_link(false);
        true
    }

    /// Gives up on a lost backend: the driver must reset the device.
    pub fn fail(&mut self) {
        self.backend.state = LinkState::Failed;
        self.backend.frontend = None;
        self.running = false;
    }

    /// Whether a replacement backend can serve this device exactly as the driver knows it.
    fn check_compatible(&self, c: &Candidate) -> Result<(), SwitchError> {
        let incompatible = |why: String| SwitchError::Incompatible {
            socket: c.socket.clone(),
            why,
        };
        let missing = self.offered_features & !c.features;
        if missing != 0 {
            return Err(incompatible(format!(
                "it lacks feature bits {missing:#x} that the driver was offered"
            )));
        }
        if c.queue_count < self.queue_count {
            return Err(incompatible(format!(
                "it serves {} queue(s), the device has {}",
                c.queue_count, self.queue_count
            )));
        }
        if self.kind == DeviceKind::Block {
            let ours =
                BlkConfig::from_prefix(&self.config.lock().unwrap_or_else(PoisonError::into_inner));
            let theirs = BlkConfig::from_prefix(&c.config);
            if ours.capacity() != theirs.capacity() {
                return Err(incompatible(format!(
                    "its disk has {} sectors, the guest's has {}",
                    theirs.capacity(),
                    ours.capacity()
                )));
            }
            if self.offered_features & (1 << VIRTIO_BLK_F_BLK_SIZE) != 0
                && ours.blk_size() != theirs.blk_size()
            {
                return Err(incompatible("its block size differs".into()));
            }
        }
        Ok(())
    }

    /// Makes `candidate` the device's backend; on error the old one stays (if it was alive).
    /// Returns the old backend's connection, which the caller closes after it stopped
    /// watching it, and the record of the switch.
    pub fn switch_to(
        &mut self,
        mut candidate: Candidate,
    ) -> Result<(Option<Frontend>, SwitchRecord), SwitchError> {
        self.check_compatible(&candidate)?;
        self.resumed_from = None;
        let lost_since = match self.backend.state {
            LinkState::Lost { since } => Some(since),
            _ => None,
        };
        let started = Instant::now();
        let mut inflight_region = false;
        let kind = if self.backend.state == LinkState::Connected {
            SwitchKind::Swap
        } else {
            SwitchKind::Recovery
        };
        let resume_rings = self.rings.is_some() && self.backend.state != LinkState::Failed;
        if resume_rings {
            let rings = self.rings.as_ref().expect("checked above");
            let (bases, resume) = match (&mut self.backend.frontend, self.running) {
                (Some(old), true) => {
                    let bases = rings::stop(old, rings).map_err(|source| SwitchError::Stop {
                        socket: self.backend.socket.clone(),
                        source,
                    })?;
                    if !rings.wait_completed(&self.memory, &bases, HANDOVER_DRAIN_TIMEOUT) {
                        warn!(
                            "{}: the old backend had not completed every request it fetched {} ms after stopping; the new one resumes anyway",
                            self.id,
                            HANDOVER_DRAIN_TIMEOUT.as_millis()
                        );
                    }
                    (bases, Resume::Handover)
                }
                _ => (rings.used_indices(&self.memory), Resume::Recovery),
            };
            // A block backend may complete requests out of order: without the inflight
            // region, resuming from the used index could skip or repeat writes. A NIC only
            // risks a repeated or lost frame, which networks tolerate.
            if resume == Resume::Recovery
                && self.kind == DeviceKind::Block
                && self.rings_interrupted
            {
                if self.inflight.is_none() {
                    return Err(SwitchError::NoInflightRegion(self.backend.socket.clone()));
                }
                if !candidate
                    .protocol
                    .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
                {
                    return Err(SwitchError::NoInflight(candidate.socket));
                }
            }
            // A copy: if this backend fails too, the next one still needs the region.
            let kept = match (&self.inflight, resume) {
                (Some(region), Resume::Recovery) => {
                    Some(region.try_clone().map_err(SwitchError::KeepInflight)?)
                }
                _ => None,
            };
            inflight_region = kept.is_some();
            self.resumed_from = Some((rings.used_indices(&self.memory), Instant::now()));
            match rings::start(
                &mut candidate.frontend,
                candidate.protocol,
                candidate.features,
                &self.memory,
                rings,
                &bases,
                resume,
                kept,
            ) {
                Ok(region) => self.inflight = region,
                Err(source) => {
                    if let (Some(old), Resume::Handover) = (&mut self.backend.frontend, resume) {
                        // Give the rings back to the backend that had them.
                        if let Err(e) = rings::start(
                            old,
                            self.backend.protocol,
                            self.backend.features,
                            &self.memory,
                            rings,
                            &bases,
                            Resume::Handover,
                            None,
                        )
                        .map(|region| self.inflight = region)
                        {
                            warn!(
                                "{}: restarting the rings on the old backend failed: {e}",
                                self.id
                            );
                        }
                        rings.kick_all();
                        rings.call_all();
                    }
                    return Err(SwitchError::Start {
                        socket: candidate.socket,
                        source,
                    });
                }
            }
            rings.kick_all();
            rings.call_all();
        }
        let stall = started.elapsed();
        let record = SwitchRecord {
            kind,
            from: self.backend.socket.clone(),
            to: candidate.socket.clone(),
            stall,
            first_completion: None,
            outage: lost_since.map(|since| since.elapsed()),
            inflight_region,
            at: Instant::now(),
        };
        let generation = self.backend.generation + 1;
        let old = std::mem::replace(&mut self.backend, Backend::connected(candidate, generation));
        self.running = resume_rings;
        self.set_link(true);
        match kind {
            SwitchKind::Swap => self.swaps += 1,
            SwitchKind::Recovery => self.recoveries += 1,
        }
        if self.history.len() == HISTORY_LEN {
            self.history.remove(0);
        }
        self.history.push(record.clone());
        Ok((old.frontend, record))
    }

    /// The device's state for `GET /vm`.
    pub fn status_json(&self, epoch: Instant) -> Value {
        let state = match self.backend.state {
            LinkState::Connected => "connected",
            LinkState::Lost { .. } => "reconnecting",
            LinkState::Failed => "failed",
        };
        json!({
            "socket": self.backend.socket,
            "state": state,
            "since_ms": self.backend.since.saturating_duration_since(epoch).as_millis() as u64,
            "features": format!("{:#x}", self.backend.features),
            "inflight_tracking": self.inflight.is_some(),
            "rings_running": self.running,
            "queues": self.queue_count,
            "swaps": self.swaps,
            "recoveries": self.recoveries,
            "history": self.history.iter().map(|r| r.to_json(epoch)).collect::<Vec<_>>(),
        })
    }

    /// The used index of each ready queue now (empty before activation).
    pub fn used_indices(&self) -> Vec<(usize, u16)> {
        self.rings
            .as_ref()
            .map(|r| r.used_indices(&self.memory))
            .unwrap_or_default()
    }

    /// Where the latest switch resumed the rings, and when (see `note_first_completion`).
    pub fn resumed_from(&self) -> Option<(Vec<(usize, u16)>, Instant)> {
        self.resumed_from.clone()
    }

    /// Completes the latest switch's record with when the guest's first request completed.
    pub fn note_first_completion(&mut self, generation: u64, after: Duration) {
        if generation == self.backend.generation {
            if let Some(last) = self.history.last_mut() {
                last.first_completion = Some(after);
            }
        }
    }

    /// Adds the requests completed since the last sample. The used index is 16 bits, so this
    /// is exact as long as it runs before any queue completes 65536 requests (the VMM samples
    /// every few milliseconds).
    pub fn sample_completions(&mut self) {
        let Some(rings) = &self.rings else { return };
        let now = rings.used_indices(&self.memory);
        for &(queue, idx) in &now {
            let before = self
                .last_used
                .iter()
                .find(|(q, _)| *q == queue)
                .map_or(0, |(_, i)| *i);
            self.completed += u64::from(idx.wrapping_sub(before));
        }
        self.last_used = now;
    }

    pub fn completed_requests(&mut self) -> u64 {
        self.sample_completions();
        self.completed
    }

    fn start_rings(&mut self) -> Result<(), ExchangeError> {
        let (Some(rings), Some(frontend)) = (&self.rings, &mut self.backend.frontend) else {
            return Ok(());
        };
        let bases: Vec<(usize, u16)> = rings.ready().map(|i| (i, 0)).collect();
        self.inflight = rings::start(
            frontend,
            self.backend.protocol,
            self.backend.features,
            &self.memory,
            rings,
            &bases,
            Resume::Fresh,
            None,
        )?;
        self.running = true;
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.virtio_id()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.queue_count]
    }

    fn features(&self) -> u64 {
        self.offered_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let start = offset as usize;
        let config = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(src) = config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The only writable fields (blk `wce`, net nothing we pass) are not used by our
        // backends; forward anyway so a backend that supports them sees the write.
        let Some(frontend) = &mut self.backend.frontend else {
            warn!(
                "{}: config write at {offset:#x} while the backend is away; dropped",
                self.id
            );
            return;
        };
        if let Err(e) = exchange(frontend, "SET_CONFIG", |f| {
            f.set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
        }) {
            warn!(
                "{}: config write at {offset:#x} to the backend {}: {e}",
                self.id,
                self.backend.socket.display()
            );
        }
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<(), ActivateError> {
        let clone_all = |fds: &[vmm_sys_util::eventfd::EventFd]| {
            fds.iter()
                .map(|fd| fd.try_clone())
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| ActivateError(format!("duplicating the queue eventfds failed: {e}")))
        };
        // The sample is taken before the rings change: new rings start at used index 0.
        self.sample_completions();
        self.last_used.clear();
        self.rings = Some(Rings {
            driver_features: activation.driver_features,
            queues: activation.queues.to_vec(),
            kicks: clone_all(activation.kicks)?,
            calls: clone_all(activation.calls)?,
            log: false,
        });
        // Without a backend right now, the rings start when one comes back.
        self.start_rings().map_err(|e| {
            ActivateError(format!(
                "starting the queues on the backend {} failed: {}",
                self.backend.socket.display(),
                crate::error_chain(&e)
            ))
        })
    }

    fn reset(&mut self) {
        self.sample_completions();
        self.last_used.clear();
        let rings = self.rings.take();
        if let (Some(rings), Some(frontend), true) =
            (&rings, &mut self.backend.frontend, self.running)
        {
            // GET_VRING_BASE stops the ring in the backend.
            if let Err(e) = rings::stop(frontend, rings) {
                warn!(
                    "{}: stopping the queues on the backend {} failed: {}",
                    self.id,
                    self.backend.socket.display(),
                    crate::error_chain(&e)
                );
            }
        }
        self.running = false;
        // Whatever was in flight belonged to rings the driver just discarded.
        self.inflight = None;
    }

    fn can_operate(&self) -> bool {
        self.backend.state == LinkState::Connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_queue_features_are_not_passed_through() {
        let offered = u64::MAX;
        let net = offered & DeviceKind::Net.passthrough_features();
        assert_eq!(net & (1 << VIRTIO_NET_F_CTRL_VQ), 0);
        assert_ne!(net & (1 << VIRTIO_F_VERSION_1), 0);
        assert_eq!(
            net & (1 << 30),
            0,
            "VHOST_USER_F_PROTOCOL_FEATURES is not a virtio bit"
        );
    }
}
