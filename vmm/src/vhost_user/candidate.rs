//! A backend on trial: connected, handshaken (trying a busy daemon again for a short grace),
//! its config space read and fitted to the queues the transport can expose - everything the
//! VMM learns about a backend before it serves the device (at start, swap and recovery).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::warn;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MQ;

use splitvisor_wire::config::{BlkConfig, NetConfig};
use splitvisor_wire::MAX_QUEUES;

use super::connection::{self, ConnectError};
use super::deadline::{self, exchange};
use super::{DeviceKind, VhostUserError};

/// A backend that answered and passed the handshake, not yet serving the device.
pub struct Candidate {
    pub(super) socket: PathBuf,
    pub(super) frontend: Frontend,
    pub(super) features: u64,
    pub(super) protocol: VhostUserProtocolFeatures,
    pub(super) config: Vec<u8>,
    pub(super) queue_count: usize,
}

impl Candidate {
    /// Connects to `socket` (retrying up to `wait`), negotiates, and reads the config space.
    pub fn connect(
        kind: DeviceKind,
        socket: &Path,
        wait: Duration,
    ) -> Result<Self, VhostUserError> {
        let (_sequence, mut conn) = handshake_when_free(socket, wait)?;
        if conn.features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserError::NotVersion1(socket.to_path_buf()));
        }
        let size = kind.config_size();
        let (_, config) = exchange(&mut conn.frontend, "GET_CONFIG", |f| {
            f.get_config(
                0,
                size,
                VhostUserConfigFlags::WRITABLE,
                &vec![0; size as usize],
            )
        })
        .map_err(|e| VhostUserError::GetConfig(socket.to_path_buf(), e))?;
        let queue_count = queue_count(kind, conn.features, &config, conn.max_queues);
        let mut config = config;
        fit_config_to_queues(kind, conn.features, &mut config, queue_count);
        Ok(Self {
            socket: socket.to_path_buf(),
            frontend: conn.frontend,
            features: conn.features,
            protocol: conn.protocol_features,
            config,
            queue_count,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// How long a daemon that turned us away as busy is tried again at least: one that is still
/// letting go of our own previous connection (a reconnect after a swap or a backend crash)
/// accepts within a few milliseconds; one serving another VM never does.
const BUSY_GRACE: Duration = Duration::from_secs(1);

/// Connect and handshake, trying again while the daemon says busy, for `wait` (at least
/// `BUSY_GRACE`); the sequence deadline of the attempt that passed is returned with it.
fn handshake_when_free(
    socket: &Path,
    wait: Duration,
) -> Result<(deadline::Sequence, connection::Connection), VhostUserError> {
    let started = Instant::now();
    let mut connect_wait = wait;
    loop {
        let stream = connection::connect(socket, connect_wait)?;
        // A retry waits only for what is left (the daemon answered once, so it is there).
        connect_wait = wait.saturating_sub(started.elapsed());
        let sequence = deadline::sequence(deadline::SEQUENCE_TIMEOUT);
        match connection::handshake(socket, stream, u64::from(MAX_QUEUES)) {
            Ok(conn) => return Ok((sequence, conn)),
            Err(busy @ ConnectError::Busy { .. }) => {
                if started.elapsed() >= wait.max(BUSY_GRACE) {
                    return Err(busy.into());
                }
                log::debug!("{}: busy, trying again", socket.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How many queues the device exposes: what its config space says, bounded by GET_QUEUE_NUM
/// and by what the transport offers (`MAX_QUEUES`). A backend's count is peer data: it is
/// computed wide, so an absurd one is clamped instead of overflowing.
pub(super) fn queue_count(
    kind: DeviceKind,
    features: u64,
    config: &[u8],
    max: Option<u64>,
) -> usize {
    let from_config = match kind {
        DeviceKind::Block if features & (1 << VIRTIO_BLK_F_MQ) != 0 => {
            u64::from(BlkConfig::from_prefix(config).num_queues()).max(1)
        }
        DeviceKind::Block => 1,
        DeviceKind::Net if features & (1 << VIRTIO_NET_F_MQ) != 0 => {
            u64::from(NetConfig::from_prefix(config).max_virtqueue_pairs()).max(1) * 2
        }
        DeviceKind::Net => 2,
    };
    let transport = u64::from(MAX_QUEUES);
    let limit = max.unwrap_or(transport).min(transport);
    if from_config > limit {
        warn!("the backend's config space offers {from_config} queues; the device exposes {limit}");
    }
    from_config.min(limit).max(1) as usize
}

/// Makes the config space the guest reads agree with the queues the device exposes, so a
/// driver never asks for queues the transport does not have.
pub(super) fn fit_config_to_queues(
    kind: DeviceKind,
    features: u64,
    config: &mut [u8],
    queues: usize,
) {
    let count = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
    match kind {
        DeviceKind::Block if features & (1 << VIRTIO_BLK_F_MQ) != 0 => {
            let mut view = BlkConfig::from_prefix(config);
            view.set_num_queues(count(queues));
            view.write_prefix(config);
        }
        DeviceKind::Net if features & (1 << VIRTIO_NET_F_MQ) != 0 => {
            let mut view = NetConfig::from_prefix(config);
            view.set_max_virtqueue_pairs(count(queues / 2));
            view.write_prefix(config);
        }
        _ => {}
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

    /// A backend claiming 0x8000 queue pairs once overflowed a u16 (a debug-build panic; one
    /// queue in release builds): it gets the transport's maximum, and the config space the
    /// guest reads says so.
    #[test]
    fn absurd_backend_queue_counts_are_clamped_and_the_config_agrees() {
        let mq = 1 << VIRTIO_NET_F_MQ;
        let mut net = vec![0u8; 12];
        net[8..10].copy_from_slice(&0x8000u16.to_le_bytes());
        let count = queue_count(DeviceKind::Net, mq, &net, Some(u64::MAX));
        assert_eq!(count, usize::from(MAX_QUEUES));
        fit_config_to_queues(DeviceKind::Net, mq, &mut net, count);
        assert_eq!(u16::from_le_bytes([net[8], net[9]]), MAX_QUEUES / 2);

        let blk_mq = 1 << VIRTIO_BLK_F_MQ;
        let mut blk = vec![0u8; 60];
        blk[34..36].copy_from_slice(&u16::MAX.to_le_bytes());
        let count = queue_count(DeviceKind::Block, blk_mq, &blk, Some(4));
        assert_eq!(count, 4);
        fit_config_to_queues(DeviceKind::Block, blk_mq, &mut blk, count);
        assert_eq!(u16::from_le_bytes([blk[34], blk[35]]), 4);
        // Without MQ the field is not the device's to report; it stays as the backend sent it.
        let mut plain = vec![0xaau8; 60];
        fit_config_to_queues(DeviceKind::Block, 0, &mut plain, 1);
        assert_eq!(plain[34..36], [0xaa, 0xaa]);
    }
}
