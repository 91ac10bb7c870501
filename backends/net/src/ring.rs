//! Split-virtqueue helpers shared by the TAP and switch paths: batched used-ring publication
//! (through the server's `DeviceRing`, which keeps the inflight region right), interrupt
//! suppression (EVENT_IDX / NO_INTERRUPT), and scattering one frame over RX chains.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use splitvisor_vhost_server::DeviceRing;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::stats::DropReason;

/// Guest memory as the backend maps it (no dirty-page bitmap).
pub type Mem = GuestMemoryMmap<()>;
/// A host view of part of guest memory.
pub type Slice<'a> = VolatileSlice<'a, ()>;

/// Size of `virtio_net_hdr_v1` (the only header layout with VIRTIO_F_VERSION_1).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` inside `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame (header included) either direction: a 64 KiB GSO frame plus headers.
pub const MAX_FRAME_LEN: usize = 65536 + VNET_HDR_LEN + 14;

/// Errors of the ring helpers: the guest's ring metadata itself is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("failed to publish used entries")]
    Publish(#[source] splitvisor_vhost_server::RingError),
    #[error("failed to read the avail ring flags / used_event")]
    ReadAvail(#[source] vm_memory::GuestMemoryError),
    #[error(
        "the driver's avail index {avail} is more than the ring size {size} ahead of the \
         device's {next}: the ring is broken; it is not served until the driver's index \
         makes sense again"
    )]
    AvailAhead { avail: u16, next: u16, size: u16 },
}

/// A split ring never holds more than its size in published, unserved chains; more means the
/// ring is broken (popping would fail forever while the notification re-check reports work).
pub fn check_avail(queue: &Queue, mem: &Mem) -> Result<(), RingError> {
    let Ok(avail) = queue.avail_idx(mem, Ordering::Acquire) else {
        // Unreadable: popping fails the same way and serves nothing; not a busy loop.
        return Ok(());
    };
    let (avail, next, size) = (avail.0, queue.next_avail(), queue.size());
    if avail.wrapping_sub(next) > size {
        return Err(RingError::AvailAhead { avail, next, size });
    }
    Ok(())
}

/// Used-ring entries collected during one batch, published with a single index update.
#[derive(Debug, Default)]
pub struct UsedBatch {
    entries: Vec<(u16, u32)>,
}

impl UsedBatch {
    pub fn push(&mut self, head: u16, len: u32) {
        self.entries.push((head, len));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn truncate(&mut self, len: usize) {
        self.entries.truncate(len);
    }

    /// Heads collected since entry `start`.
    fn heads_from(&self, start: usize) -> impl Iterator<Item = u16> + '_ {
        self.entries[start..].iter().map(|&(head, _)| head)
    }

    /// Publish all entries with one release store of `used.idx`, so the driver never sees
    /// part of a merged-buffer frame; their inflight flags are cleared after it. Returns how
    /// many were published.
    pub fn publish(&mut self, ring: &mut DeviceRing, mem: &Mem) -> Result<usize, RingError> {
        let count = ring
            .publish(mem, &self.entries)
            .map_err(RingError::Publish)?;
        self.entries.clear();
        Ok(count)
    }
}

/// Whether the driver wants an interrupt now that `used.idx` moved from `old_used` to the queue's
/// `next_used`: honours `used_event` with EVENT_IDX, `VRING_AVAIL_F_NO_INTERRUPT` without it
/// (virtio-queue ignores the latter, and a polling guest relies on it).
pub fn needs_interrupt(queue: &Queue, mem: &Mem, old_used: u16) -> Result<bool, RingError> {
    let new = Wrapping(queue.next_used());
    let old = Wrapping(old_used);
    if new == old {
        return Ok(false);
    }
    // Order the used-ring writes before reading the driver's suppression state.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    if queue.event_idx_enabled() {
        let used_event_addr = avail.unchecked_add(4 + 2 * u64::from(queue.size()));
        let used_event: u16 = mem
            .load(used_event_addr, Ordering::Acquire)
            .map_err(RingError::ReadAvail)?;
        let used_event = Wrapping(u16::from_le(used_event));
        return Ok(new - used_event - Wrapping(1) < new - old);
    }
    let flags: u16 = mem
        .load(avail, Ordering::Acquire)
        .map_err(RingError::ReadAvail)?;
    Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
}

/// Where the bytes of a frame come from (a host buffer, or another guest's TX chain).
pub trait FrameSource {
    /// Total frame length, virtio-net header included.
    fn len(&self) -> usize;
    /// Copy bytes starting at `offset` into `dst`; returns how many were copied.
    fn copy_to(&self, offset: usize, dst: &Slice<'_>) -> Result<usize, DropReason>;
}

impl FrameSource for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn copy_to(&self, offset: usize, dst: &Slice<'_>) -> Result<usize, DropReason> {
        let src = self.get(offset..).unwrap_or_default();
        let n = src.len().min(dst.len());
        dst.copy_from(&src[..n]);
        Ok(n)
    }
}

/// What happened to one frame offered to an RX queue.
#[derive(Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into this many chains (the `num_buffers` value), entries added to the batch.
    Delivered(u16),
    /// Not enough buffers right now; nothing was consumed.
    NoBuffers,
    /// The frame was dropped; any chains consumed were returned with length 0.
    Dropped(DropReason),
}

/// Scatter `src` into the RX queue: one chain, or several with MRG_RXBUF, then patch
/// `num_buffers` in the header. Nothing is published; entries go to `used`.
pub fn write_rx_frame<S: FrameSource + ?Sized>(
    ring: &mut DeviceRing,
    mem: &Mem,
    src: &S,
    mrg_rxbuf: bool,
    used: &mut UsedBatch,
) -> RxOutcome {
    let total = src.len();
    let start_avail = ring.queue().next_avail();
    let size = ring.queue().size();
    let start_used = used.len();
    let mut cursor = RxCursor::default();
    let mut chains: u16 = 0;
    while cursor.offset < total {
        if chains == size || (!mrg_rxbuf && chains == 1) {
            // Even the whole ring (or one chain without MRG_RXBUF) cannot hold the frame.
            ring.rewind(start_avail, used.heads_from(start_used));
            used.truncate(start_used);
            return RxOutcome::Dropped(DropReason::RxTooLarge);
        }
        let Some(chain) = ring.pop(mem) else {
            ring.rewind(start_avail, used.heads_from(start_used));
            used.truncate(start_used);
            return RxOutcome::NoBuffers;
        };
        chains += 1;
        let head = chain.head_index();
        match cursor.fill_chain(chain, mem, src) {
            Ok(written) => used.push(head, written),
            Err(reason) => {
                used.push(head, 0);
                return drop_consumed(used, start_used, reason);
            }
        }
    }
    if total < VNET_HDR_LEN || cursor.num_buffers_at.iter().any(Option::is_none) {
        return drop_consumed(used, start_used, DropReason::RxTooLarge);
    }
    for (i, addr) in cursor.num_buffers_at.iter().flatten().enumerate() {
        if mem.write_obj(chains.to_le_bytes()[i], *addr).is_err() {
            return drop_consumed(used, start_used, DropReason::BadAddress);
        }
    }
    RxOutcome::Delivered(chains)
}

/// Return every chain consumed for a dropped frame with length 0 (the guest sees empty buffers).
fn drop_consumed(used: &mut UsedBatch, start: usize, reason: DropReason) -> RxOutcome {
    for entry in &mut used.entries[start..] {
        entry.1 = 0;
    }
    RxOutcome::Dropped(reason)
}

/// Progress of one frame through the RX chains.
#[derive(Default)]
struct RxCursor {
    offset: usize,
    /// Guest addresses of the two `num_buffers` bytes (they may straddle descriptors).
    num_buffers_at: [Option<GuestAddress>; 2],
}

impl RxCursor {
    fn fill_chain<S: FrameSource + ?Sized>(
        &mut self,
        chain: virtio_queue::DescriptorChain<&Mem>,
        mem: &Mem,
        src: &S,
    ) -> Result<u32, DropReason> {
        let mut written: u32 = 0;
        for desc in chain {
            if !desc.is_write_only() {
                return Err(DropReason::WrongDirection);
            }
            let mut addr = desc.addr();
            for slice in mem.get_slices(desc.addr(), desc.len() as usize) {
                let slice = slice.map_err(|_| DropReason::BadAddress)?;
                let n = src.copy_to(self.offset, &slice)?;
                self.note_header(addr, n);
                self.offset += n;
                written = written.saturating_add(n as u32);
                addr = addr.unchecked_add(slice.len() as u64);
                if self.offset >= src.len() {
                    return Ok(written);
                }
            }
        }
        Ok(written)
    }

    fn note_header(&mut self, addr: GuestAddress, n: usize) {
        for (i, slot) in self.num_buffers_at.iter_mut().enumerate() {
            let want = NUM_BUFFERS_OFFSET + i;
            if (self.offset..self.offset + n).contains(&want) {
                *slot = Some(addr.unchecked_add((want - self.offset) as u64));
            }
        }
    }
}
