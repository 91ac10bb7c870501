//! vhost-user glue: features, config space, guest memory, and queue events -> `request`.

use std::io;
use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use log::{info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::disk::Disk;
use crate::request::{process_chain, Completion, DeviceInfo, IoBuffer, RequestError, SECTOR_SIZE};
use crate::stats::{DeviceStats, QueueCounters};

/// Event id of a queue kick inside its worker thread: every worker serves exactly one queue,
/// so its only vring is at index 0 (the thread index is the queue index).
pub const QUEUE_KICK_EVENT: u16 = 0;

/// Bad requests logged in full before the log is thinned to powers of two.
const WARN_BURST: u64 = 16;

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

/// The vhost-user-blk device of one frontend connection.
pub struct BlkBackend {
    disk: Arc<dyn Disk>,
    info: DeviceInfo,
    queue_size: usize,
    mem: RwLock<GuestMemoryAtomic<GuestMemoryMmap>>,
    config: Vec<u8>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    stats: Arc<DeviceStats>,
    /// One bounce buffer per queue; each is only used by that queue's worker.
    buffers: Vec<Mutex<IoBuffer>>,
    bad_requests: AtomicU64,
}

impl BlkBackend {
    /// `stats` must have at least `num_queues` queues.
    pub fn new(
        disk: Arc<dyn Disk>,
        info: DeviceInfo,
        num_queues: usize,
        queue_size: usize,
        stats: Arc<DeviceStats>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Self {
        let config = config_space(&info, num_queues);
        BlkBackend {
            disk,
            info,
            queue_size,
            mem: RwLock::new(mem),
            config,
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            stats,
            buffers: (0..num_queues).map(|_| Mutex::default()).collect(),
            bad_requests: AtomicU64::new(0),
        }
    }

    /// Features the frontend acknowledged on this connection (0 before SET_FEATURES).
    pub fn acked(&self) -> u64 {
        self.acked_features.load(Ordering::Relaxed)
    }

    fn memory(&self) -> GuestMemoryAtomic<GuestMemoryMmap> {
        self.mem.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Serve queue `queue` until it is empty, with the EVENT_IDX re-check loop so that a
    /// request the driver adds while notifications are off is never missed.
    fn process_queue(&self, queue: usize, vring: &VringRwLock) -> Result<(), QueueError> {
        let counters = self
            .stats
            .queue(queue)
            .ok_or(QueueError::NoSuchQueue(queue))?;
        let buffer = self
            .buffers
            .get(queue)
            .ok_or(QueueError::NoSuchQueue(queue))?;
        let mut buf = buffer.lock().unwrap_or_else(|e| e.into_inner());
        QueueCounters::add(&counters.kicks, 1);
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(QueueError::Notification)?;
            }
            let served = self.drain(queue, vring, &mut buf, counters)?;
            if served > 0
                && vring
                    .needs_notification()
                    .map_err(QueueError::Notification)?
            {
                vring.signal_used_queue().map_err(QueueError::Signal)?;
                QueueCounters::add(&counters.interrupts, 1);
            }
            if !event_idx
                || !vring
                    .enable_notification()
                    .map_err(QueueError::Notification)?
            {
                return Ok(());
            }
        }
    }

    /// Pop, serve and complete every available chain; returns how many were completed.
    fn drain(
        &self,
        queue: usize,
        vring: &VringRwLock,
        buf: &mut IoBuffer,
        counters: &QueueCounters,
    ) -> Result<usize, QueueError> {
        let atomic = self.memory();
        let mem = atomic.memory();
        let mut served = 0;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
            let Some(chain) = chain else {
                return Ok(served);
            };
            let done = process_chain(chain, &self.info, self.disk.as_ref(), buf);
            self.account(queue, counters, &done);
            vring
                .add_used(done.head, done.used_len)
                .map_err(QueueError::AddUsed)?;
            served += 1;
        }
    }

    fn account(&self, queue: usize, counters: &QueueCounters, done: &Completion) {
        QueueCounters::add(&counters.requests, 1);
        QueueCounters::add(&counters.read_bytes, done.read_bytes);
        QueueCounters::add(&counters.write_bytes, done.write_bytes);
        if let Some(err) = &done.error {
            self.warn_bad_request(queue, done, err);
        }
    }

    fn warn_bad_request(&self, queue: usize, done: &Completion, err: &RequestError) {
        let n = self.bad_requests.fetch_add(1, Ordering::Relaxed) + 1;
        if n > WARN_BURST && !n.is_power_of_two() {
            return;
        }
        let suppressed = if n >= WARN_BURST {
            " (further bad-request warnings are rate limited)"
        } else {
            ""
        };
        let fate = if done.used_len == 0 {
            "returned with length 0 (no usable status byte)".to_string()
        } else {
            format!("failed with status {}", err.status())
        };
        warn!(
            "queue {queue}: request at descriptor {} {fate}: {}{suppressed}",
            done.head,
            error_chain(err)
        );
    }
}

/// `err: cause: cause` on one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// Why a queue could not be processed (the queue itself is broken, not one request).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    #[error("cannot update the notification state of the queue")]
    Notification(#[source] virtio_queue::Error),
    #[error("cannot add to the used ring")]
    AddUsed(#[source] virtio_queue::Error),
    #[error("cannot signal the call eventfd")]
    Signal(#[source] io::Error),
}

/// The bytes of `struct virtio_blk_config` for this device (little-endian fields).
fn config_space(info: &DeviceInfo, num_queues: usize) -> Vec<u8> {
    let mut c = vec![0u8; size_of::<virtio_blk_config>()];
    let mut put =
        |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    let l = &info.limits;
    put(
        offset_of!(virtio_blk_config, capacity),
        &info.capacity_sectors.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &l.seg_max.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &(SECTOR_SIZE as u32).to_le_bytes(),
    );
    // num_queues is limited to 64 by the CLI.
    let nq = u16::try_from(num_queues).unwrap_or(u16::MAX);
    put(offset_of!(virtio_blk_config, num_queues), &nq.to_le_bytes());
    put(
        offset_of!(virtio_blk_config, max_discard_sectors),
        &l.max_discard_sectors.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_seg),
        &l.max_discard_seg.to_le_bytes(),
    );
    // Discard granularity hint: 4 KiB, the size of a hole the filesystem can punch.
    put(
        offset_of!(virtio_blk_config, discard_sector_alignment),
        &8u32.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_sectors),
        &l.max_write_zeroes_sectors.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_seg),
        &l.max_write_zeroes_seg.to_le_bytes(),
    );
    put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    c
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.buffers.len()
    }

    fn max_queue_size(&self) -> usize {
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
        bits.iter()
            .fold(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), |f, b| {
                f | (1u64 << b)
            })
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
        info!(
            "frontend negotiated features {features:#x} ({})",
            feature_names(features)
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= self.config.len() => self.config[start..end].to_vec(),
            _ => {
                warn!(
                    "GET_CONFIG {offset}+{size} is outside the {}-byte config space",
                    self.config.len()
                );
                Vec::new()
            }
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue (num_queues <= 64).
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if device_event != QUEUE_KICK_EVENT {
            warn!("worker {thread_id}: ignoring unknown event {device_event}");
            return Ok(());
        }
        let Some(vring) = vrings.first() else {
            warn!("worker {thread_id}: kick without a vring");
            return Ok(());
        };
        // Returning an error would end the worker thread; a broken queue is reported and the
        // next kick (or reconnection) tries again.
        if let Err(e) = self.process_queue(thread_id, vring) {
            warn!("queue {thread_id}: {}", error_chain(&e));
        }
        Ok(())
    }
}
