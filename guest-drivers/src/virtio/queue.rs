//! A split virtqueue driven by polling: descriptor table, avail ring and used ring from the
//! bump heap, a free list of descriptors, `VIRTIO_F_RING_EVENT_IDX` (used_event/avail_event)
//! and `VRING_AVAIL_F_NO_INTERRUPT`.
//!
//! Ordering (x86 TSO): stores are not reordered with stores nor loads with loads, so compiler
//! fences order descriptor writes before the avail index and the used index before used
//! entries; the store of the avail index before the load of avail_event needs a full fence.

use crate::blk::BlkError;
use crate::bump::HEAP;
use core::sync::atomic::{compiler_fence, fence, Ordering};

/// Largest ring the driver sets up (a power of two, as split rings require).
pub const MAX_SIZE: u16 = 256;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
/// used_event is kept this far ahead of the driver's used index, out of reach of the device's
/// `[old, new)` window whether the device compares against its previous used index (Linux
/// vhost) or against the index it last signalled at (rust-vmm virtio-queue), which then
/// interrupts at most once per 32768 completions.
const USED_EVENT_AHEAD: u16 = 0x8000;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One buffer of a chain: address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub struct SplitQueue {
    size: u16,
    desc: *mut Desc,
    /// flags, idx, ring[size], used_event
    avail: *mut u16,
    /// flags, idx, ring[size] of (id u32, len u32), avail_event
    used: *mut u16,
    event_idx: bool,
    free_head: u16,
    free_count: u16,
    /// Descriptors per chain head, to put them back on the free list.
    chain_len: [u8; MAX_SIZE as usize],
    avail_idx: u16,
    /// avail idx at the last notification decision.
    kicked_idx: u16,
    last_used: u16,
}

fn alloc(size: u64, align: u64) -> Result<*mut u8, BlkError> {
    HEAP.alloc(size, align)
        .map(|p| p.as_ptr())
        .ok_or(BlkError::NoMemory)
}

impl SplitQueue {
    /// Allocates a queue of `size` entries (a power of two <= MAX_SIZE).
    pub fn new(size: u16, event_idx: bool) -> Result<SplitQueue, BlkError> {
        if size == 0 || !size.is_power_of_two() || size > MAX_SIZE {
            return Err(BlkError::Init("bad queue size"));
        }
        let n = u64::from(size);
        let desc = alloc(16 * n, 4096)? as *mut Desc;
        let avail = alloc(6 + 2 * n, 4096)? as *mut u16;
        let used = alloc(6 + 8 * n, 4096)? as *mut u16;
        for i in 0..size {
            // SAFETY: i < size entries of the freshly allocated table.
            unsafe { (*desc.add(usize::from(i))).next = i + 1 };
        }
        let q = SplitQueue {
            size,
            desc,
            avail,
            used,
            event_idx,
            free_head: 0,
            free_count: size,
            chain_len: [0; MAX_SIZE as usize],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
        };
        // We poll: ask for no interrupts (without EVENT_IDX; used_event covers the other case).
        q.avail_write(0, AVAIL_F_NO_INTERRUPT);
        q.avail_write(
            2 + usize::from(size),
            q.last_used.wrapping_add(USED_EVENT_AHEAD),
        );
        Ok(q)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// The id the next `push` will use as its chain head.
    pub fn peek_head(&self) -> u16 {
        self.free_head
    }

    pub fn free(&self) -> u16 {
        self.free_count
    }

    /// Guest-physical addresses of the descriptor table, avail ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    fn avail_write(&self, index: usize, value: u16) {
        // SAFETY: index <= size + 2 stays within the avail ring allocated in `new`.
        unsafe { self.avail.add(index).write_volatile(value) }
    }

    fn used_read16(&self, index: usize) -> u16 {
        // SAFETY: index <= 2 * size + 2 stays within the used ring allocated in `new`.
        unsafe { self.used.add(index).read_volatile() }
    }

    /// Puts a chain of `bufs` on the avail ring (not yet published); returns its head id.
    pub fn push(&mut self, bufs: &[Buf]) -> Result<u16, BlkError> {
        let n = bufs.len() as u16;
        if n == 0 || n > self.free_count {
            return Err(BlkError::QueueFull);
        }
        let head = self.free_head;
        let mut id = head;
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            // SAFETY: id came from the free list, whose ids are all < size.
            let d = unsafe { &mut *self.desc.add(usize::from(id)) };
            let next = d.next;
            d.addr = b.addr;
            d.len = b.len;
            d.flags = if b.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            if last {
                self.free_head = next;
            } else {
                id = next;
            }
        }
        self.free_count -= n;
        self.chain_len[usize::from(head)] = n as u8;
        let slot = 2 + usize::from(self.avail_idx % self.size);
        self.avail_write(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(head)
    }

    /// Publishes pushed chains; returns whether the device wants a notification.
    pub fn publish(&mut self) -> bool {
        if self.avail_idx == self.kicked_idx {
            return false;
        }
        compiler_fence(Ordering::Release);
        self.avail_write(1, self.avail_idx);
        // The device may read avail idx and then decide on avail_event; order our store
        // before our load of its flags / avail_event (store-load needs a real fence).
        fence(Ordering::SeqCst);
        let old = self.kicked_idx;
        self.kicked_idx = self.avail_idx;
        if self.event_idx {
            let event = self.used_read16(2 + 4 * usize::from(self.size));
            need_event(event, self.avail_idx, old)
        } else {
            self.used_read16(0) & USED_F_NO_NOTIFY == 0
        }
    }

    /// Takes one completed chain off the used ring: `(head id, bytes written)`. A head id the
    /// driver never handed out is an error, not a panic.
    pub fn pop(&mut self) -> Result<Option<(u16, u32)>, BlkError> {
        let used_idx = self.used_read16(1);
        if used_idx == self.last_used {
            return Ok(None);
        }
        compiler_fence(Ordering::Acquire);
        let elem = 2 + 4 * usize::from(self.last_used % self.size);
        // SAFETY: elem indexes u16 units of the used ring: entry i starts at 2 + 4 * i.
        let (id, len) = unsafe {
            let p = self.used.add(elem) as *const u32;
            (p.read_volatile(), p.add(1).read_volatile())
        };
        let n = usize::try_from(id)
            .ok()
            .and_then(|i| self.chain_len.get(i).copied())
            .unwrap_or(0);
        if n == 0 {
            return Err(BlkError::DeviceBug("used id out of range or not in flight"));
        }
        self.last_used = self.last_used.wrapping_add(1);
        // Keep used_event half the index space ahead: a poller wants no interrupts.
        self.avail_write(
            2 + usize::from(self.size),
            self.last_used.wrapping_add(USED_EVENT_AHEAD),
        );
        self.release(id as u16, n);
        Ok(Some((id as u16, len)))
    }

    fn release(&mut self, head: u16, n: u8) {
        self.chain_len[usize::from(head)] = 0;
        let mut tail = head;
        for _ in 1..n {
            // SAFETY: the chain's ids are < size (the driver wrote them in `push`).
            tail = unsafe { (*self.desc.add(usize::from(tail))).next };
        }
        // SAFETY: as above.
        unsafe { (*self.desc.add(usize::from(tail))).next = self.free_head };
        self.free_head = head;
        self.free_count += u16::from(n);
    }
}

/// `vring_need_event`: notify if `event` lies in `[old, new)` (mod 2^16).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}
