//! The inflight I/O tracking region of `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, split rings only.
//!
//! The backend allocates the region (GET_INFLIGHT_FD), the frontend keeps its fd across backend
//! crashes and hands it to every new backend (SET_INFLIGHT_FD). Each queue owns one area:
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;   (16 bytes)
//! desc_num x { u8 inflight; u8 padding[5]; u16 next; u64 counter }              (16 bytes each)
//! ```
//!
//! Areas are 64-byte aligned and laid out one after the other. Every field is naturally aligned,
//! so the backend updates them with single atomic stores in the order the vhost-user spec
//! prescribes; a crash at any point leaves a state `recover` can resolve.

use std::fs::File;
use std::io;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use log::{info, warn};

use super::fdcheck::{check_mappable, seal_size, FdCheckError};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

/// The only region layout version this backend writes and understands.
pub const REGION_VERSION: u16 = 1;
/// Largest split virtqueue the vhost-user spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

const HEADER_LEN: usize = 16;
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
const DESC_STATE_LEN: usize = 16;
const DESC_INFLIGHT_AT: usize = 0;
const DESC_COUNTER_AT: usize = 8;
const AREA_ALIGN: usize = 64;

/// Bytes one queue of `queue_size` descriptors occupies in the region.
pub fn queue_area_len(queue_size: u16) -> usize {
    let raw = HEADER_LEN + DESC_STATE_LEN * usize::from(queue_size);
    raw.div_ceil(AREA_ALIGN) * AREA_ALIGN
}

/// Bytes a region for `num_queues` queues of `queue_size` descriptors needs.
pub fn region_len(num_queues: u16, queue_size: u16) -> usize {
    usize::from(num_queues) * queue_area_len(queue_size)
}

/// Why a region could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("queue_size {0} is not between 1 and {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("num_queues {got} is not between 1 and the device's {max}")]
    NumQueues { got: u16, max: usize },
    #[error("mmap_size {got} is smaller than the {need} bytes {num_queues} queue(s) of {queue_size} descriptors need")]
    TooSmall {
        got: u64,
        need: usize,
        num_queues: u16,
        queue_size: u16,
    },
    #[error("cannot create the region memfd")]
    Create(#[source] io::Error),
    #[error("refusing the region's file")]
    Unmappable(#[source] FdCheckError),
    #[error("cannot map the region")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

/// Check the geometry a frontend asks for against the device.
pub fn check_geometry(
    num_queues: u16,
    queue_size: u16,
    max_queues: usize,
) -> Result<(), InflightError> {
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::QueueSize(queue_size));
    }
    if num_queues == 0 || usize::from(num_queues) > max_queues {
        return Err(InflightError::NumQueues {
            got: num_queues,
            max: max_queues,
        });
    }
    Ok(())
}

/// A fresh zero-filled memfd of `len` bytes for GET_INFLIGHT_FD.
pub fn create_region_file(len: usize) -> Result<File, InflightError> {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked below.
    let fd = unsafe {
        libc::memfd_create(
            c"splitvisor-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(InflightError::Create(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let file = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len as u64).map_err(InflightError::Create)?;
    // Sealed so that the next backend, which gets this fd back, can trust its size.
    seal_size(&file).map_err(InflightError::Create)?;
    Ok(file)
}

/// The region a frontend handed over with SET_INFLIGHT_FD, mapped shared.
pub struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Map `size` bytes at `offset` of `file`, after checking they hold the geometry and lie
    /// inside the file (touching a page past its end would kill the daemon with SIGBUS).
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
    ) -> Result<Self, InflightError> {
        check_geometry(num_queues, queue_size, max_queues)?;
        let need = region_len(num_queues, queue_size);
        if size < need as u64 {
            return Err(InflightError::TooSmall {
                got: size,
                need,
                num_queues,
                queue_size,
            });
        }
        check_mappable(&file, offset, size).map_err(InflightError::Unmappable)?;
        // Only the part the queues use is mapped; the rest of the frontend's area is not ours.
        let map = MmapRegion::from_file(FileOffset::new(file, offset), need)
            .map_err(InflightError::Map)?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
        })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }
}

/// One queue's area of a region, used by that queue's worker only.
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    base: usize,
    /// Descriptor entries the area holds.
    capacity: u16,
    /// Fetch counter of the last head marked in flight.
    counter: u64,
}

/// What a queue resumes with after `InflightQueue::recover`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads fetched by a previous backend and never completed, oldest fetch first.
    pub resubmit: Vec<u16>,
    /// The avail index to continue from: the guest's used index plus the resubmitted heads.
    /// `None` for a region without history (the frontend's SET_VRING_BASE stands).
    pub next_avail: Option<u16>,
}

impl InflightQueue {
    /// The area of queue `queue`, or `None` when the region was made for fewer queues.
    pub fn new(region: Arc<InflightRegion>, queue: usize) -> Option<Self> {
        if queue >= usize::from(region.num_queues) {
            return None;
        }
        let capacity = region.queue_size;
        Some(InflightQueue {
            base: queue * queue_area_len(capacity),
            region,
            capacity,
            counter: 0,
        })
    }

    /// Descriptor entries the area holds (the largest ring it can track).
    pub fn capacity(&self) -> u16 {
        self.capacity
    }

    // Every offset below is inside the mapping: the area fits by construction (`map` checked
    // the size) and callers bound descriptor indices by `capacity`. The stores are atomic and
    // naturally aligned (areas are 64-byte aligned, fields at their own alignment).
    fn store<T: vm_memory::AtomicAccess>(&self, at: usize, val: T) {
        let slice = self.region.map.as_volatile_slice();
        if let Err(e) = slice.store(val, self.base + at, Ordering::Release) {
            warn!("inflight region store at {}: {e}", self.base + at);
        }
    }

    fn load<T: vm_memory::AtomicAccess + Default>(&self, at: usize) -> T {
        let slice = self.region.map.as_volatile_slice();
        slice
            .load(self.base + at, Ordering::Acquire)
            .unwrap_or_else(|e| {
                warn!("inflight region load at {}: {e}", self.base + at);
                T::default()
            })
    }

    fn desc_at(head: u16) -> usize {
        HEADER_LEN + DESC_STATE_LEN * usize::from(head)
    }

    /// Record that `head` was fetched from the avail ring and is about to be processed.
    pub fn fetched(&mut self, head: u16) {
        if head >= self.capacity {
            return;
        }
        self.counter += 1;
        let desc = Self::desc_at(head);
        self.store(desc + DESC_COUNTER_AT, self.counter);
        fence(Ordering::SeqCst);
        self.store(desc + DESC_INFLIGHT_AT, 1u8);
    }

    /// First half of a completion, before `head` goes into the used ring.
    pub fn completing(&self, head: u16) {
        if head < self.capacity {
            self.store(LAST_BATCH_HEAD_AT, head);
        }
    }

    /// Second half of a completion, once the used ring shows `head` at index `used_idx - 1`
    /// (one completion at a time; the worker publishes batches with `cleared`/`published`).
    #[cfg(test)]
    pub fn completed(&self, head: u16, used_idx: u16) {
        if head >= self.capacity {
            return;
        }
        fence(Ordering::SeqCst);
        self.store(Self::desc_at(head) + DESC_INFLIGHT_AT, 0u8);
        fence(Ordering::SeqCst);
        self.store(USED_IDX_AT, used_idx);
    }

    /// A head popped and then given back unused (it is popped again later).
    pub fn returned(&self, head: u16) {
        if head < self.capacity {
            self.store(Self::desc_at(head) + DESC_INFLIGHT_AT, 0u8);
        }
    }

    /// A batch's used index is published: clear one of its heads (call for each, then
    /// `published`).
    pub fn cleared(&self, head: u16) {
        if head < self.capacity {
            fence(Ordering::SeqCst);
            self.store(Self::desc_at(head) + DESC_INFLIGHT_AT, 0u8);
        }
    }

    /// The batch is done: the region's used index follows the ring's.
    pub fn published(&self, used_idx: u16) {
        fence(Ordering::SeqCst);
        self.store(USED_IDX_AT, used_idx);
    }

    /// Start a queue that resumes at the guest's used index (a device completing in pop
    /// order re-pops whatever was in flight): the area starts over from `ring_used_idx`.
    pub fn restart(&mut self, ring_used_idx: u16) {
        self.initialise(ring_used_idx);
    }

    /// Start a queue of `ring_size` entries whose used ring shows `ring_used_idx`: initialise
    /// an unused area, or work out what a previous backend left in flight. Corrupt entries are
    /// logged and dropped, never trusted.
    #[cfg(test)]
    pub fn recover(&mut self, queue: usize, ring_size: u16, ring_used_idx: u16) -> Recovery {
        self.recover_with(queue, ring_size, ring_used_idx, |_| None)
    }

    /// `recover` for a backend that publishes batches: `used_head_at(i)` is the head the used
    /// ring holds at used index `i` (`None` if unreadable). Every head published after the
    /// region's used index - a whole batch whose flags a crash left set - is cleared, not
    /// resubmitted (which would complete it twice).
    pub fn recover_with(
        &mut self,
        queue: usize,
        ring_size: u16,
        ring_used_idx: u16,
        used_head_at: impl Fn(u16) -> Option<u16>,
    ) -> Recovery {
        let version: u16 = self.load(VERSION_AT);
        let desc_num: u16 = self.load(DESC_NUM_AT);
        if version == 0 {
            self.initialise(ring_used_idx);
            return Recovery::default();
        }
        if version != REGION_VERSION || desc_num != self.capacity {
            warn!(
                "queue {queue}: inflight area has version {version} and {desc_num} descriptors, \
                 expected version {REGION_VERSION} and {}; discarding it, nothing is resubmitted",
                self.capacity
            );
            self.initialise(ring_used_idx);
            return Recovery::default();
        }
        let used_idx: u16 = self.load(USED_IDX_AT);
        if used_idx != ring_used_idx {
            // The previous backend published the last completion in the used ring but died
            // before clearing its inflight flag: that head is done.
            let last: u16 = self.load(LAST_BATCH_HEAD_AT);
            if last < self.capacity {
                self.store(Self::desc_at(last) + DESC_INFLIGHT_AT, 0u8);
            }
            let published = ring_used_idx.wrapping_sub(used_idx);
            if published <= ring_size {
                for i in 0..published {
                    match used_head_at(used_idx.wrapping_add(i)) {
                        Some(head) if head < self.capacity => {
                            self.store(Self::desc_at(head) + DESC_INFLIGHT_AT, 0u8)
                        }
                        _ => {}
                    }
                }
            }
            fence(Ordering::SeqCst);
            self.store(USED_IDX_AT, ring_used_idx);
            info!(
                "queue {queue}: used index {ring_used_idx} is ahead of the recorded {used_idx}; \
                 head {last} was already completed"
            );
        }
        let mut pending: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.capacity {
            let desc = Self::desc_at(head);
            match self.load::<u8>(desc + DESC_INFLIGHT_AT) {
                0 => {}
                1 if head < ring_size => pending.push((self.load(desc + DESC_COUNTER_AT), head)),
                flag => {
                    warn!(
                        "queue {queue}: inflight entry {head} has flag {flag} (ring of {ring_size}); dropping it"
                    );
                    self.store(desc + DESC_INFLIGHT_AT, 0u8);
                }
            }
        }
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(counter, _)| counter);
        let resubmit: Vec<u16> = pending.into_iter().map(|(_, head)| head).collect();
        // At most `ring_size` (<= 32768) heads, so the count fits a u16.
        let next_avail = ring_used_idx.wrapping_add(resubmit.len() as u16);
        Recovery {
            resubmit,
            next_avail: Some(next_avail),
        }
    }

    fn initialise(&mut self, ring_used_idx: u16) {
        for head in 0..self.capacity {
            let desc = Self::desc_at(head);
            self.store(desc + DESC_INFLIGHT_AT, 0u8);
            self.store(desc + DESC_COUNTER_AT, 0u64);
        }
        self.counter = 0;
        self.store(0, 0u64);
        self.store(DESC_NUM_AT, self.capacity);
        self.store(LAST_BATCH_HEAD_AT, 0u16);
        // Starting from the ring's used index (not 0) keeps a crash before the first
        // completion from mistaking entry 0 for an already completed last batch.
        self.store(USED_IDX_AT, ring_used_idx);
        fence(Ordering::SeqCst);
        self.store(VERSION_AT, REGION_VERSION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QS: u16 = 8;

    fn region(num_queues: u16) -> Arc<InflightRegion> {
        let len = region_len(num_queues, QS);
        let file = create_region_file(len).unwrap();
        Arc::new(InflightRegion::map(file, 0, len as u64, num_queues, QS, 4).unwrap())
    }

    fn header(q: &InflightQueue) -> (u16, u16, u16, u16) {
        (
            q.load(VERSION_AT),
            q.load(DESC_NUM_AT),
            q.load(LAST_BATCH_HEAD_AT),
            q.load(USED_IDX_AT),
        )
    }

    fn flag(q: &InflightQueue, head: u16) -> u8 {
        q.load(InflightQueue::desc_at(head) + DESC_INFLIGHT_AT)
    }

    #[test]
    fn fresh_area_is_initialised_at_the_rings_used_index() {
        let r = region(2);
        let mut q = InflightQueue::new(r.clone(), 1).unwrap();
        assert!(InflightQueue::new(r, 2).is_none());
        assert_eq!(q.recover(1, QS, 500), Recovery::default());
        assert_eq!(header(&q), (REGION_VERSION, QS, 0, 500));
    }

    #[test]
    fn fetch_and_complete_follow_the_spec_order() {
        let mut q = InflightQueue::new(region(1), 0).unwrap();
        q.recover(0, QS, 0);
        q.fetched(5);
        q.fetched(2);
        assert_eq!((flag(&q, 5), flag(&q, 2)), (1, 1));
        q.completing(2);
        q.completed(2, 1);
        assert_eq!(flag(&q, 2), 0);
        assert_eq!(header(&q), (REGION_VERSION, QS, 2, 1));
        // Out-of-range heads are ignored rather than written past the area.
        q.fetched(QS);
        q.completing(QS);
        q.completed(QS, 2);
        assert_eq!(header(&q).3, 1);
        // A new backend resubmits head 5 and continues after it.
        let mut again = InflightQueue::new(q.region.clone(), 0).unwrap();
        let r = again.recover(0, QS, 1);
        assert_eq!(r.resubmit, [5]);
        assert_eq!(r.next_avail, Some(2));
        // Its next fetch is ordered after the resubmitted one.
        again.fetched(3);
        let counter = |h| again.load::<u64>(InflightQueue::desc_at(h) + DESC_COUNTER_AT);
        assert!(counter(3) > counter(5));
    }

    #[test]
    fn a_batch_published_before_a_crash_is_cleared_not_resubmitted() {
        let mut q = InflightQueue::new(region(1), 0).unwrap();
        q.recover(0, QS, 6);
        for head in [3, 1, 6, 4] {
            q.fetched(head);
        }
        // Heads 3, 1 and 6 are published at used indices 6..9; the backend dies before it
        // clears their flags (and head 4 was never completed).
        q.completing(6);
        let used = |i: u16| [3u16, 1, 6].get(usize::from(i.wrapping_sub(6))).copied();
        let mut again = InflightQueue::new(q.region.clone(), 0).unwrap();
        let r = again.recover_with(0, QS, 9, used);
        assert_eq!(r.resubmit, [4]);
        assert_eq!(r.next_avail, Some(10));
        assert_eq!(
            (flag(&again, 3), flag(&again, 1), flag(&again, 6)),
            (0, 0, 0)
        );
        assert_eq!(header(&again).3, 9);
    }

    #[test]
    fn corrupt_entries_and_headers_are_dropped() {
        let mut q = InflightQueue::new(region(1), 0).unwrap();
        q.recover(0, QS, 0);
        q.store(InflightQueue::desc_at(1) + DESC_INFLIGHT_AT, 7u8);
        q.store(InflightQueue::desc_at(6) + DESC_INFLIGHT_AT, 1u8);
        q.store(InflightQueue::desc_at(3) + DESC_INFLIGHT_AT, 1u8);
        // A ring of 4 cannot have head 6 in flight.
        let r = q.recover(0, 4, 0);
        assert_eq!(r.resubmit, [3]);
        assert_eq!((flag(&q, 1), flag(&q, 6)), (0, 0));
        // A header from another layout is not trusted at all.
        q.store(DESC_NUM_AT, QS * 2);
        assert_eq!(q.recover(0, QS, 9), Recovery::default());
        assert_eq!((flag(&q, 3), header(&q).3), (0, 9));
        q.store(VERSION_AT, 2u16);
        assert_eq!(q.recover(0, QS, 9), Recovery::default());
    }

    #[test]
    fn mapping_checks_geometry_size_and_file_length() {
        let len = region_len(1, QS);
        let file = || create_region_file(len).unwrap();
        let map = |f, off, size, nq, qs| InflightRegion::map(f, off, size, nq, qs, 2).err();
        assert!(matches!(
            map(file(), 0, len as u64, 1, 0),
            Some(InflightError::QueueSize(0))
        ));
        assert!(matches!(
            map(file(), 0, len as u64, 1, 40000),
            Some(InflightError::QueueSize(40000))
        ));
        assert!(matches!(
            map(file(), 0, len as u64, 3, QS),
            Some(InflightError::NumQueues { .. })
        ));
        assert!(matches!(
            map(file(), 0, 64, 1, QS),
            Some(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            map(file(), 4096, len as u64, 1, QS),
            Some(InflightError::Unmappable(FdCheckError::BeyondEnd { .. }))
        ));
        assert!(matches!(
            map(file(), u64::MAX, len as u64, 1, QS),
            Some(InflightError::Unmappable(FdCheckError::BeyondEnd { .. }))
        ));
        assert!(map(file(), 0, len as u64, 1, QS).is_none());
        // A memfd the frontend could still shrink under the mapping.
        // SAFETY: a valid NUL-terminated name; the fd is checked before it is owned.
        let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let unsealed = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        unsealed.set_len(len as u64).unwrap();
        assert!(matches!(
            map(unsealed, 0, len as u64, 1, QS),
            Some(InflightError::Unmappable(FdCheckError::NotSealed))
        ));
    }
}
