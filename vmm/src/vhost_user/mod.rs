//! The vhost-user frontend: one generic virtio device whose queues are served by a backend
//! daemon over a Unix socket. The VMM does the control plane only - features, config space,
//! the memory table, vring addresses, kick and call eventfds - and then gets out of the way.

pub mod connection;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use log::{error, info, warn};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;

use crate::event_loop::{EventLoop, Next};
use crate::memory::GuestMemory;
use crate::virtio::interrupt::Interrupt;
use crate::virtio::{ActivateError, Activation, QueueConfig, VirtioDevice};
use connection::ConnectError;

/// Queue size offered to drivers.
pub const QUEUE_SIZE: u16 = 256;
/// The most queues a device may have.
pub const MAX_QUEUES: u64 = 64;
/// Config-space bytes read from the backend: `struct virtio_blk_config` up to the write-zeroes
/// fields (older backends reject larger reads), `struct virtio_net_config` up to `mtu`.
const BLK_CONFIG_SIZE: u32 = 60;
const NET_CONFIG_SIZE: u32 = 12;
/// `struct virtio_net_config`: `status` follows the 6-byte `mac`.
const NET_STATUS_OFFSET: usize = 6;

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
    #[error("the backend on {} did not return its configuration (GET_CONFIG)", .0.display())]
    GetConfig(PathBuf, #[source] vhost::Error),
    #[error("the backend on {} offers no VIRTIO_F_VERSION_1; splitvisor drives only virtio 1.x devices", .0.display())]
    NotVersion1(PathBuf),
    #[error("could not watch the backend socket {}", .0.display())]
    Watch(PathBuf, #[source] std::io::Error),
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    id: String,
    kind: DeviceKind,
    socket: PathBuf,
    frontend: Frontend,
    memory: GuestMemory,
    backend_features: u64,
    /// The config space read at connect time; shared with the backend watcher, which clears
    /// the net link bit when the backend goes away.
    config: Arc<Mutex<Vec<u8>>>,
    queue_count: usize,
    enabled_queues: Vec<usize>,
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
        let stream = connection::connect(socket, wait)?;
        let mut conn = connection::handshake(socket, stream, MAX_QUEUES)?;
        if conn.features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserError::NotVersion1(socket.to_path_buf()));
        }
        let size = match kind {
            DeviceKind::Block => BLK_CONFIG_SIZE,
            DeviceKind::Net => NET_CONFIG_SIZE,
        };
        let (_, config) = conn
            .frontend
            .get_config(
                0,
                size,
                VhostUserConfigFlags::WRITABLE,
                &vec![0; size as usize],
            )
            .map_err(|e| VhostUserError::GetConfig(socket.to_path_buf(), e))?;
        let queue_count = queue_count(kind, conn.features, &config, conn.max_queues);
        info!(
            "{id}: connected to {} backend on {} ({queue_count} queue(s), features {:#x})",
            match kind {
                DeviceKind::Block => "block",
                DeviceKind::Net => "net",
            },
            socket.display(),
            conn.features
        );
        Ok(Self {
            id: id.to_string(),
            kind,
            socket: socket.to_path_buf(),
            frontend: conn.frontend,
            memory,
            backend_features: conn.features,
            config: Arc::new(Mutex::new(config)),
            queue_count,
            enabled_queues: Vec::new(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Presents `mac` to the driver instead of the backend's (or its lack of one).
    pub fn override_mac(&mut self, mac: [u8; 6]) {
        let mut config = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        if config.len() >= 6 {
            config[..6].copy_from_slice(&mac);
            self.backend_features |= 1 << VIRTIO_NET_F_MAC;
        }
    }

    /// When the backend's socket closes, the device needs a reset: the driver is told through
    /// `DEVICE_NEEDS_RESET` and a configuration-change interrupt instead of waiting forever.
    pub fn watch_backend(
        &self,
        events: &EventLoop,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), VhostUserError> {
        let id = self.id.clone();
        let socket = self.socket.clone();
        let kind = self.kind;
        let config = self.config.clone();
        events
            .add(
                self.frontend.as_raw_fd(),
                EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                move |_| {
                    if kind == DeviceKind::Net {
                        // A NIC without its backend has no link: say so, the way a cable pull would.
                        let mut config = config.lock().unwrap_or_else(PoisonError::into_inner);
                        if let Some(status) = config.get_mut(NET_STATUS_OFFSET) {
                            *status &= !(VIRTIO_NET_S_LINK_UP as u8);
                        }
                    }
                    error!(
                        "{id}: lost the backend on {} (socket closed); the device now needs a reset",
                        socket.display()
                    );
                    interrupt.set_needs_reset();
                    Next::Remove
                },
            )
            .map_err(|e| VhostUserError::Watch(self.socket.clone(), e))
    }

    fn start_queues(&mut self, activation: &Activation<'_>) -> Result<(), vhost::Error> {
        let protocol_bit =
            self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(activation.driver_features | protocol_bit)?;
        self.frontend.set_mem_table(&memory_regions(&self.memory))?;
        for (index, queue) in activation.queues.iter().enumerate() {
            if !queue.ready {
                continue;
            }
            self.frontend.set_vring_num(index, queue.size)?;
            self.frontend
                .set_vring_addr(index, &vring_addresses(&self.memory, queue)?)?;
            self.frontend.set_vring_base(index, 0)?;
            self.frontend
                .set_vring_call(index, &activation.calls[index])?;
            self.frontend
                .set_vring_kick(index, &activation.kicks[index])?;
            self.frontend.set_vring_enable(index, true)?;
            self.enabled_queues.push(index);
        }
        Ok(())
    }
}

/// How many queues the device exposes: what its config space says, bounded by GET_QUEUE_NUM.
fn queue_count(kind: DeviceKind, features: u64, config: &[u8], max: Option<u64>) -> usize {
    let le16 = |at: usize| {
        config
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let from_config = match kind {
        DeviceKind::Block if features & (1 << VIRTIO_BLK_F_MQ) != 0 => le16(34).unwrap_or(1).max(1),
        DeviceKind::Block => 1,
        DeviceKind::Net if features & (1 << VIRTIO_NET_F_MQ) != 0 => {
            le16(8).unwrap_or(1).max(1) * 2
        }
        DeviceKind::Net => 2,
    };
    let limit = max.unwrap_or(MAX_QUEUES).min(MAX_QUEUES);
    usize::from(from_config).min(limit as usize).max(1)
}

/// The memory table: every guest RAM region with its memfd and offset.
fn memory_regions(memory: &GuestMemory) -> Vec<VhostUserMemoryRegionInfo> {
    memory
        .iter()
        .filter_map(|region| {
            let file = region.file_offset()?;
            Some(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            })
        })
        .collect()
}

/// Vring addresses in the VMM's address space (vhost-user translates them through the memory
/// table), after checking each ring lies in guest RAM.
fn vring_addresses(memory: &GuestMemory, q: &QueueConfig) -> Result<VringConfigData, vhost::Error> {
    let size = u64::from(q.size);
    let host = |gpa: u64, len: u64| -> Result<u64, vhost::Error> {
        if !memory.check_range(GuestAddress(gpa), len as usize) {
            return Err(vhost::Error::InvalidGuestMemory);
        }
        memory
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| vhost::Error::InvalidGuestMemory)
    };
    Ok(VringConfigData {
        queue_max_size: q.max_size,
        queue_size: q.size,
        flags: 0,
        desc_table_addr: host(q.desc_table, 16 * size)?,
        avail_ring_addr: host(q.avail_ring, 6 + 2 * size)?,
        used_ring_addr: host(q.used_ring, 6 + 8 * size)?,
        log_addr: None,
    })
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.virtio_id()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.queue_count]
    }

    fn features(&self) -> u64 {
        self.backend_features & self.kind.passthrough_features()
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
        if let Err(e) =
            self.frontend
                .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
        {
            warn!("{}: SET_CONFIG at {offset:#x} failed: {e}", self.id);
        }
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<(), ActivateError> {
        self.start_queues(&activation).map_err(|e| {
            ActivateError(format!(
                "starting the queues on the backend {} failed: {e}",
                self.socket.display()
            ))
        })
    }

    fn reset(&mut self) {
        for index in std::mem::take(&mut self.enabled_queues) {
            // GET_VRING_BASE stops the ring in the backend.
            if let Err(e) = self
                .frontend
                .set_vring_enable(index, false)
                .and_then(|_| self.frontend.get_vring_base(index))
            {
                warn!("{}: stopping queue {index} failed: {e}", self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_count_follows_config_and_backend_limit() {
        let mut blk = vec![0u8; 60];
        blk[34..36].copy_from_slice(&4u16.to_le_bytes());
        let mq = 1 << VIRTIO_BLK_F_MQ;
        assert_eq!(queue_count(DeviceKind::Block, mq, &blk, Some(8)), 4);
        assert_eq!(queue_count(DeviceKind::Block, mq, &blk, Some(2)), 2);
        assert_eq!(queue_count(DeviceKind::Block, 0, &blk, None), 1);
        let mut net = vec![0u8; 12];
        net[8..10].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            queue_count(DeviceKind::Net, 1 << VIRTIO_NET_F_MQ, &net, None),
            4
        );
        assert_eq!(queue_count(DeviceKind::Net, 0, &net, None), 2);
        assert_eq!(
            queue_count(DeviceKind::Block, mq, &[], None),
            1,
            "short config"
        );
    }

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
