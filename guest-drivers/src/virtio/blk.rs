//! virtio-blk driver over virtio-mmio: config (capacity, blk_size, seg_max, num_queues), one or
//! more split queues driven by polling, batched submission with one kick per batch (only when
//! the device asks for it through EVENT_IDX / NO_NOTIFY), bounded waits, and prompt failure
//! when the device sets DEVICE_NEEDS_RESET.

use super::queue::{Buf, SplitQueue, MAX_SIZE};
use super::{Mmio, DEVICE_ID_BLOCK, F_RING_EVENT_IDX, F_VERSION_1, STATUS_NEEDS_RESET};
use crate::blk::{BlkError, BlockDevice, Completion, IoStatus, Op, Request, SECTOR};
use crate::bump::HEAP;
use crate::cmdline::VirtioMmioDevice;
use crate::time;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

const CFG_CAPACITY: u64 = 0;
const CFG_SEG_MAX: u64 = 12;
const CFG_BLK_SIZE: u64 = 20;
const CFG_NUM_QUEUES: u64 = 34;

/// Queues the driver drives at most.
pub const MAX_QUEUES: usize = 8;
/// No completion for this long while requests are pending: the request timed out.
const TIMEOUT_MS: u64 = 8000;
/// How often (while waiting) the status register is read for DEVICE_NEEDS_RESET.
const STATUS_CHECK_MS: u64 = 1;

/// The request header (`virtio_blk_outhdr`).
#[repr(C)]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// One queue with its per-descriptor request headers, status bytes and tags.
struct Queue {
    ring: SplitQueue,
    headers: *mut Header,
    status: *mut u8,
    tags: [u32; MAX_SIZE as usize],
    in_flight: usize,
    completed: u64,
}

/// What `VirtioBlk` learned from the device at setup.
#[derive(Clone, Copy, Default)]
pub struct BlkInfo {
    pub capacity: u64,
    pub blk_size: u32,
    pub seg_max: u32,
    pub num_queues: u16,
    pub features: u64,
}

pub struct VirtioBlk {
    mmio: Mmio,
    pub info: BlkInfo,
    queues: [Option<Queue>; MAX_QUEUES],
    nq: usize,
    next_q: usize,
    kicks: u64,
    last_progress: u64,
    last_status_check: u64,
    broken: bool,
}

impl Queue {
    fn new(size: u16, event_idx: bool) -> Result<Queue, BlkError> {
        let ring = SplitQueue::new(size, event_idx)?;
        let n = u64::from(size);
        let headers = HEAP.alloc(16 * n, 16).ok_or(BlkError::NoMemory)?.as_ptr() as *mut Header;
        let status = HEAP.alloc(n, 8).ok_or(BlkError::NoMemory)?.as_ptr();
        Ok(Queue {
            ring,
            headers,
            status,
            tags: [0; MAX_SIZE as usize],
            in_flight: 0,
            completed: 0,
        })
    }
}

/// The first announced virtio-mmio window that holds a block device.
pub fn find(devices: &[VirtioMmioDevice]) -> Option<Mmio> {
    devices
        .iter()
        .map(|d| Mmio::new(d.base))
        .find(|m| m.probe() == Some(DEVICE_ID_BLOCK))
}

impl VirtioBlk {
    /// Initialises the device with up to `want_queues` queues.
    pub fn open(mmio: Mmio, want_queues: usize) -> Result<VirtioBlk, BlkError> {
        let wanted = F_RING_EVENT_IDX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_MQ;
        let features = mmio.negotiate(wanted, F_VERSION_1)?;
        let info = read_config(&mmio, features);
        let nq = want_queues
            .clamp(1, MAX_QUEUES)
            .min(usize::from(info.num_queues));
        let mut queues: [Option<Queue>; MAX_QUEUES] = Default::default();
        for (i, slot) in queues.iter_mut().enumerate().take(nq) {
            let max = mmio.queue_max(i as u16).min(u32::from(MAX_SIZE));
            if max < 4 {
                mmio.fail();
                return Err(BlkError::Init("queue unavailable or smaller than 4"));
            }
            // Largest power of two <= max (split rings need one).
            let size = 1u16 << (31 - max.leading_zeros());
            let q = Queue::new(size, features & F_RING_EVENT_IDX != 0)?;
            mmio.setup_queue(i as u16, &q.ring)?;
            *slot = Some(q);
        }
        mmio.driver_ok();
        if mmio.status() & STATUS_NEEDS_RESET != 0 {
            return Err(BlkError::NeedsReset);
        }
        Ok(VirtioBlk {
            mmio,
            info,
            queues,
            nq,
            next_q: 0,
            kicks: 0,
            last_progress: time::now(),
            last_status_check: time::now(),
            broken: false,
        })
    }

    fn in_flight(&self) -> usize {
        self.queues.iter().flatten().map(|q| q.in_flight).sum()
    }

    /// Called when a poll found nothing: bounded waiting and the DEVICE_NEEDS_RESET check.
    fn check_stalled(&mut self) -> Result<(), BlkError> {
        if self.in_flight() == 0 {
            self.last_progress = time::now();
            return Ok(());
        }
        let now = time::now();
        if now.wrapping_sub(self.last_status_check) >= time::ms_to_ticks(STATUS_CHECK_MS) {
            self.last_status_check = now;
            if self.mmio.status() & STATUS_NEEDS_RESET != 0 {
                self.broken = true;
                return Err(BlkError::NeedsReset);
            }
        }
        if now.wrapping_sub(self.last_progress) >= time::ms_to_ticks(TIMEOUT_MS) {
            self.broken = true;
            return Err(BlkError::Timeout("virtio-blk"));
        }
        Ok(())
    }
}

fn read_config(mmio: &Mmio, features: u64) -> BlkInfo {
    let u32_at = |off| u32::from_le_bytes(mmio.config::<4>(off));
    BlkInfo {
        capacity: u64::from_le_bytes(mmio.config::<8>(CFG_CAPACITY)),
        blk_size: if features & F_BLK_SIZE != 0 {
            u32_at(CFG_BLK_SIZE)
        } else {
            512
        },
        seg_max: if features & F_SEG_MAX != 0 {
            u32_at(CFG_SEG_MAX)
        } else {
            0
        },
        num_queues: if features & F_MQ != 0 {
            u16::from_le_bytes(mmio.config::<2>(CFG_NUM_QUEUES)).max(1)
        } else {
            1
        },
        features,
    }
}

fn io_status(byte: u8) -> IoStatus {
    match byte {
        0 => IoStatus::Ok,
        2 => IoStatus::Unsupported,
        _ => IoStatus::IoErr,
    }
}

impl BlockDevice for VirtioBlk {
    fn kind(&self) -> &'static str {
        "virtio"
    }
    fn capacity(&self) -> u64 {
        self.info.capacity
    }
    fn read_only(&self) -> bool {
        self.info.features & F_RO != 0
    }
    fn queue_depth(&self) -> usize {
        self.queues
            .iter()
            .flatten()
            .map(|q| usize::from(q.ring.size()) / 3)
            .sum()
    }
    fn max_request_bytes(&self) -> u32 {
        4 << 20
    }
    fn queues(&self) -> usize {
        self.nq
    }

    fn submit(&mut self, req: &Request) -> Result<(), BlkError> {
        if self.broken {
            return Err(BlkError::NeedsReset);
        }
        if u64::from(req.len) % SECTOR != 0 || req.len > self.max_request_bytes() {
            return Err(BlkError::BadRequest);
        }
        let need = if req.op == Op::Flush { 2 } else { 3 };
        let nq = self.nq;
        let qi = (0..nq)
            .map(|i| (self.next_q + i) % nq)
            .find(|&i| {
                self.queues[i]
                    .as_ref()
                    .is_some_and(|q| q.ring.free() >= need)
            })
            .ok_or(BlkError::QueueFull)?;
        self.next_q = (qi + 1) % nq;
        let Some(q) = self.queues[qi].as_mut() else {
            return Err(BlkError::QueueFull);
        };
        let head = q.ring.peek_head();
        let kind = match req.op {
            Op::Read => T_IN,
            Op::Write => T_OUT,
            Op::Flush => T_FLUSH,
        };
        // SAFETY: head < ring size = the number of headers/status bytes allocated; the slot
        // is free (its descriptor is on the free list), so the device is not using it.
        let (hdr, status) = unsafe {
            let h = q.headers.add(usize::from(head));
            h.write_volatile(Header {
                kind,
                reserved: 0,
                sector: req.sector,
            });
            let s = q.status.add(usize::from(head));
            s.write_volatile(0xff);
            (h as u64, s as u64)
        };
        let header = Buf {
            addr: hdr,
            len: 16,
            write: false,
        };
        let data = Buf {
            addr: req.buf,
            len: req.len,
            write: req.op == Op::Read,
        };
        let stat = Buf {
            addr: status,
            len: 1,
            write: true,
        };
        if req.op == Op::Flush {
            q.ring.push(&[header, stat])?;
        } else {
            q.ring.push(&[header, data, stat])?;
        }
        q.tags[usize::from(head)] = req.tag;
        q.in_flight += 1;
        Ok(())
    }

    fn kick(&mut self) {
        for (i, q) in self.queues.iter_mut().enumerate() {
            if let Some(q) = q {
                if q.ring.publish() {
                    self.mmio.notify(i as u16);
                    self.kicks += 1;
                }
            }
        }
    }

    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, BlkError> {
        let mut n = 0;
        for q in self.queues.iter_mut().flatten() {
            while n < out.len() {
                let Some((head, _len)) = q.ring.pop()? else {
                    break;
                };
                // SAFETY: pop checked head < ring size; the device is done with the slot.
                let byte = unsafe { q.status.add(usize::from(head)).read_volatile() };
                out[n] = Completion {
                    tag: q.tags[usize::from(head)],
                    status: io_status(byte),
                };
                q.in_flight = q.in_flight.saturating_sub(1);
                q.completed += 1;
                n += 1;
            }
        }
        if n > 0 {
            self.last_progress = time::now();
        } else {
            self.check_stalled()?;
        }
        Ok(n)
    }

    fn kicks(&self) -> u64 {
        self.kicks
    }

    fn queue_counts(&self, out: &mut [u64]) -> usize {
        let mut n = 0;
        for (slot, q) in out.iter_mut().zip(self.queues.iter().flatten()) {
            *slot = q.completed;
            n += 1;
        }
        n
    }
}
