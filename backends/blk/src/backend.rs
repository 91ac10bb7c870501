//! The virtio-blk device behind the vhost-user server: features, config space, and each
//! request handed to `request`, with per-queue counters.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use splitvisor_wire::config::BlkConfig;
use splitvisor_wire::host::error::error_chain;
use splitvisor_wire::host::loglimit::{burst_note, LogLimit, INTERVAL};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, GuestMemoryMmap};

use crate::disk::Disk;
use crate::request::{process_chain, Completion, DeviceInfo, IoBuffer, RequestError, SECTOR_SIZE};
use crate::stats::{DeviceStats, QueueCounters};
use splitvisor_vhost_server::VhostUserDevice;

/// Virtio feature bits with their names, for logging what a frontend negotiated.
const FEATURE_NAMES: &[(u64, &str)] = &[
    (1 << VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
    (1 << VIRTIO_BLK_F_RO, "RO"),
    (1 << VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
    (1 << VIRTIO_BLK_F_FLUSH, "FLUSH"),
    (1 << VIRTIO_BLK_F_MQ, "MQ"),
    (1 << VIRTIO_BLK_F_DISCARD, "DISCARD"),
    (1 << VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
    (1 << VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
    (1 << VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
    (
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        "PROTOCOL_FEATURES",
    ),
    (1 << VIRTIO_F_VERSION_1, "VERSION_1"),
];

/// `features` as `NAME|NAME|...`.
pub fn feature_names(features: u64) -> String {
    let names: Vec<&str> = FEATURE_NAMES
        .iter()
        .filter(|(mask, _)| features & mask != 0)
        .map(|(_, name)| *name)
        .collect();
    names.join("|")
}

/// The vhost-user-blk device: shared by every frontend connection of the daemon.
pub struct BlkBackend {
    disk: Arc<dyn Disk>,
    info: DeviceInfo,
    queue_size: u16,
    config: Vec<u8>,
    stats: Arc<DeviceStats>,
    /// One bounce buffer per queue; each is only used by that queue's worker.
    buffers: Vec<Mutex<IoBuffer>>,
    /// Per queue: rate limit of the bad-request warnings a guest can cause.
    bad_request_log: Vec<Mutex<LogLimit>>,
    /// Test-only: sleep this long before executing each request (see `TEST_DELAY_ENV`).
    request_delay: Option<Duration>,
    /// How long workers poll their queue after a batch (`--poll-us`).
    poll_window: Duration,
}

impl BlkBackend {
    /// `stats` must have at least `num_queues` queues; `queue_size` is a power of two of at
    /// most 32768 (checked by `run`).
    pub fn new(
        disk: Arc<dyn Disk>,
        info: DeviceInfo,
        num_queues: usize,
        queue_size: u16,
        stats: Arc<DeviceStats>,
    ) -> Self {
        let config = config_space(&info, num_queues);
        BlkBackend {
            disk,
            info,
            queue_size,
            config,
            stats,
            buffers: (0..num_queues).map(|_| Mutex::default()).collect(),
            bad_request_log: (0..num_queues).map(|_| Mutex::default()).collect(),
            request_delay: None,
            poll_window: Duration::ZERO,
        }
    }

    /// Delay every request by `delay` before executing it, so that tests can kill the daemon
    /// while a request is fetched but not completed. Never used outside tests.
    pub fn with_request_delay(mut self, delay: Option<Duration>) -> Self {
        self.request_delay = delay;
        self
    }

    /// Poll each queue this long after a batch before sleeping (see `--poll-us`).
    pub fn with_poll_window(mut self, window: Duration) -> Self {
        self.poll_window = window;
        self
    }

    fn account(&self, queue: usize, done: &Completion) {
        if let Some(counters) = self.stats.queue(queue) {
            QueueCounters::add(&counters.requests, 1);
            QueueCounters::add(&counters.read_bytes, done.read_bytes);
            QueueCounters::add(&counters.write_bytes, done.write_bytes);
        }
        if let Some(err) = &done.error {
            self.warn_bad_request(queue, done, err);
        }
    }

    fn warn_bad_request(&self, queue: usize, done: &Completion, err: &RequestError) {
        let Some(limit) = self.bad_request_log.get(queue) else {
            return;
        };
        let verdict = limit.lock().unwrap_or_else(|e| e.into_inner()).check();
        if verdict.suppressed > 0 {
            warn!(
                "queue {queue}: {} more bad request(s) in the last {}s were not logged",
                verdict.suppressed,
                INTERVAL.as_secs()
            );
        }
        if !verdict.log {
            return;
        }
        let fate = if done.used_len == 0 {
            "returned with length 0 (no usable status byte)".to_string()
        } else {
            format!("failed with status {}", err.status())
        };
        warn!(
            "queue {queue}: request at descriptor {} {fate}: {}{}",
            done.head,
            error_chain(err),
            burst_note(&verdict)
        );
    }

    fn count(&self, queue: usize, counter: impl Fn(&QueueCounters) -> &AtomicU64) {
        if let Some(counters) = self.stats.queue(queue) {
            QueueCounters::add(counter(counters), 1);
        }
    }
}

/// The bytes of `struct virtio_blk_config` for this device.
fn config_space(info: &DeviceInfo, num_queues: usize) -> Vec<u8> {
    let l = &info.limits;
    let mut c = BlkConfig::default();
    c.set_capacity(info.capacity_sectors);
    c.set_seg_max(l.seg_max);
    c.set_blk_size(SECTOR_SIZE as u32);
    // num_queues is limited to MAX_QUEUES by the CLI.
    c.set_num_queues(u16::try_from(num_queues).unwrap_or(u16::MAX));
    // Discard granularity hint: 4 KiB, the size of a hole the filesystem can punch.
    c.set_discard(l.max_discard_sectors, l.max_discard_seg, 8);
    c.set_write_zeroes(l.max_write_zeroes_sectors, l.max_write_zeroes_seg, true);
    c.as_slice().to_vec()
}

impl VhostUserDevice for BlkBackend {
    fn num_queues(&self) -> usize {
        self.buffers.len()
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let mut bits = vec![
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ];
        if self.info.readonly {
            bits.push(VIRTIO_BLK_F_RO);
        } else {
            bits.extend([VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]);
        }
        bits.iter().fold(0, |f, b| f | (1u64 << b))
    }

    fn features_acked(&self, features: u64) {
        info!(
            "frontend negotiated features {features:#x} ({})",
            feature_names(features)
        );
    }

    fn config_space(&self) -> Option<&[u8]> {
        Some(&self.config)
    }

    fn process(
        &self,
        queue: usize,
        head: u16,
        chain: &[Descriptor],
        memory: &GuestMemoryMmap,
    ) -> u32 {
        if let Some(delay) = self.request_delay {
            std::thread::sleep(delay);
        }
        let Some(buffer) = self.buffers.get(queue) else {
            warn!("queue {queue} does not exist; request at descriptor {head} dropped");
            return 0;
        };
        let mut buf = buffer.lock().unwrap_or_else(|e| e.into_inner());
        let done = process_chain(
            head,
            chain,
            memory,
            &self.info,
            self.disk.as_ref(),
            &mut buf,
        );
        self.account(queue, &done);
        done.used_len
    }

    fn poll_window(&self) -> Duration {
        self.poll_window
    }

    fn queue_kicked(&self, queue: usize) {
        self.count(queue, |c| &c.kicks);
    }

    fn queue_signalled(&self, queue: usize) {
        self.count(queue, |c| &c.interrupts);
    }
}
