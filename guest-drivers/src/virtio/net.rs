//! virtio-net driver over virtio-mmio, driven by polling: RX queue 0 kept full of 2 KiB
//! device-writable buffers, TX queue 1 with one copied buffer per frame (sent one at a time, or
//! in bursts published with one avail-index store and at most one kick), the 12-byte
//! `virtio_net_hdr_v1` in front of every frame, MRG_RXBUF (frames spread over several RX
//! buffers are gathered), EVENT_IDX (kicks only when the device asks for them), and the MAC and
//! link status (VIRTIO_NET_S_LINK_UP) from the device config. No offloads, MQ or control queue.

use super::queue::{Buf, SplitQueue, MAX_SIZE};
use super::{Mmio, F_RING_EVENT_IDX, F_VERSION_1, STATUS_NEEDS_RESET};
use crate::blk::BlkError;
use crate::bump::HEAP;
use crate::cmdline::VirtioMmioDevice;

pub const DEVICE_ID_NET: u32 = 1;

const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;

const CFG_MAC: u64 = 0;
const CFG_STATUS: u64 = 6;
const S_LINK_UP: u16 = 1;

const RX_Q: u16 = 0;
const TX_Q: u16 = 1;

/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const HDR_LEN: usize = 12;
/// Bytes per RX and TX buffer (header included).
const BUF_LEN: usize = 2048;
/// RX buffers `recv` gives back before it publishes them: enough to spread the fence a publish
/// costs, few enough that the device never misses many buffers.
const RX_PUBLISH_BATCH: u16 = 16;
/// Largest frame (without the header) `recv` gathers from merged buffers.
pub const MAX_FRAME: usize = 9216;

/// Counters for reports.
#[derive(Clone, Copy, Default)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    /// QueueNotify writes, both queues.
    pub kicks: u64,
    /// QueueNotify writes for the TX queue (frames sent) and the RX queue (buffers reposted).
    pub tx_kicks: u64,
    pub rx_kicks: u64,
}

pub struct VirtioNet {
    mmio: Mmio,
    pub mac: [u8; 6],
    pub features: u64,
    rx: SplitQueue,
    tx: SplitQueue,
    rx_bufs: u64,
    tx_bufs: u64,
    /// RX buffers reposted but not yet published.
    rx_unpublished: u16,
    /// Gathering area for frames spread over several RX buffers.
    scratch: *mut u8,
    pub stats: NetStats,
}

/// The first announced virtio-mmio window that holds a network device.
pub fn find(devices: &[VirtioMmioDevice]) -> Option<Mmio> {
    devices
        .iter()
        .map(|d| Mmio::new(d.base))
        .find(|m| m.probe() == Some(DEVICE_ID_NET))
}

fn ring_size(mmio: &Mmio, index: u16) -> Result<u16, BlkError> {
    let max = mmio.queue_max(index).min(u32::from(MAX_SIZE));
    if max < 2 {
        mmio.fail();
        return Err(BlkError::Init("virtio-net queue unavailable"));
    }
    Ok(1u16 << (31 - max.leading_zeros()))
}

fn alloc(len: usize) -> Result<u64, BlkError> {
    HEAP.alloc(len as u64, 4096)
        .map(|p| p.as_ptr() as u64)
        .ok_or(BlkError::NoMemory)
}

impl VirtioNet {
    pub fn open(mmio: Mmio) -> Result<VirtioNet, BlkError> {
        let wanted = F_MAC | F_STATUS | F_MRG_RXBUF | F_RING_EVENT_IDX;
        let features = mmio.negotiate(wanted, F_VERSION_1)?;
        let event_idx = features & F_RING_EVENT_IDX != 0;
        let rx_size = ring_size(&mmio, RX_Q)?;
        let tx_size = ring_size(&mmio, TX_Q)?;
        let rx = SplitQueue::new(rx_size, event_idx)?;
        let tx = SplitQueue::new(tx_size, event_idx)?;
        mmio.setup_queue(RX_Q, &rx)?;
        mmio.setup_queue(TX_Q, &tx)?;
        let rx_bufs = alloc(usize::from(rx_size) * BUF_LEN)?;
        let tx_bufs = alloc(usize::from(tx_size) * BUF_LEN)?;
        let scratch = alloc(HDR_LEN + MAX_FRAME)? as *mut u8;
        let mac = if features & F_MAC != 0 {
            mmio.config::<6>(CFG_MAC)
        } else {
            // Locally administered fallback.
            [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
        };
        let mut net = VirtioNet {
            mmio,
            mac,
            features,
            rx,
            tx,
            rx_bufs,
            tx_bufs,
            scratch,
            rx_unpublished: 0,
            stats: NetStats::default(),
        };
        // Fill the RX ring before DRIVER_OK so the device has buffers from the start.
        while net.rx.free() > 0 {
            net.post_rx()?;
        }
        net.mmio.driver_ok();
        if net.mmio.status() & STATUS_NEEDS_RESET != 0 {
            return Err(BlkError::NeedsReset);
        }
        net.kick_rx();
        Ok(net)
    }

    /// Link state: VIRTIO_NET_S_LINK_UP from config (always up without VIRTIO_NET_F_STATUS).
    pub fn link_up(&self) -> bool {
        if self.features & F_STATUS == 0 {
            return true;
        }
        u16::from_le_bytes(self.mmio.config::<2>(CFG_STATUS)) & S_LINK_UP != 0
    }

    /// Whether the device has set DEVICE_NEEDS_RESET (one register read: an exit).
    pub fn needs_reset(&self) -> bool {
        self.mmio.status() & STATUS_NEEDS_RESET != 0
    }

    fn post_rx(&mut self) -> Result<(), BlkError> {
        let id = self.rx.peek_head();
        let addr = self.rx_bufs + u64::from(id) * BUF_LEN as u64;
        self.rx.push(&[Buf {
            addr,
            len: BUF_LEN as u32,
            write: true,
        }])?;
        self.rx_unpublished += 1;
        Ok(())
    }

    /// Publishes the RX buffers given back since the last publish (kicking only if the device
    /// asks for it). `recv` publishes every RX_PUBLISH_BATCH buffers by itself; callers that
    /// drain the ring call this once they find it empty.
    pub fn publish_rx(&mut self) {
        self.kick_rx();
    }

    fn kick_rx(&mut self) {
        self.rx_unpublished = 0;
        if self.rx.publish() {
            self.stats.kicks += 1;
            self.stats.rx_kicks += 1;
            self.mmio.notify(RX_Q);
        }
    }

    fn rx_buf(&self, id: u16) -> *mut u8 {
        (self.rx_bufs + u64::from(id) * BUF_LEN as u64) as *mut u8
    }

    /// Takes one received frame (without the virtio-net header) and hands it to `f`; returns
    /// `Ok(false)` when none was waiting. The buffers go straight back to the device.
    pub fn recv(&mut self, f: impl FnOnce(&[u8])) -> Result<bool, BlkError> {
        let Some((id, len)) = self.rx.pop()? else {
            return Ok(false);
        };
        let first = self.rx_buf(id);
        let len = (len as usize).min(BUF_LEN);
        let mut ok = len >= HDR_LEN;
        let num_buffers = if ok {
            // SAFETY: the device wrote `len` >= HDR_LEN bytes of buffer `id`, ours again.
            u16::from_le_bytes(unsafe { [*first.add(10), *first.add(11)] })
        } else {
            1
        };
        if num_buffers <= 1 || self.features & F_MRG_RXBUF == 0 {
            if ok {
                // SAFETY: as above; the frame is used before the buffer is reposted.
                f(unsafe { core::slice::from_raw_parts(first.add(HDR_LEN), len - HDR_LEN) });
            }
            self.post_rx()?;
        } else {
            // Gather the frame's buffers into the scratch area.
            let scratch = self.scratch;
            let copy = |src: *const u8, n: usize, total: &mut usize| {
                let n = n.min(HDR_LEN + MAX_FRAME - *total);
                // SAFETY: n bytes fit in scratch after `total`; src holds at least n bytes.
                unsafe { core::ptr::copy_nonoverlapping(src, scratch.add(*total), n) };
                *total += n;
            };
            let mut total = 0usize;
            copy(first, len, &mut total);
            self.post_rx()?;
            for _ in 1..num_buffers {
                // The device publishes all of a frame's buffers together.
                let Some((id, len)) = self.rx.pop()? else {
                    ok = false;
                    break;
                };
                copy(self.rx_buf(id), (len as usize).min(BUF_LEN), &mut total);
                self.post_rx()?;
            }
            if ok {
                // SAFETY: scratch holds `total` >= HDR_LEN gathered bytes.
                f(unsafe { core::slice::from_raw_parts(scratch.add(HDR_LEN), total - HDR_LEN) });
            }
        }
        // Publishing costs a full fence: batch it (a few buffers only, see RX_PUBLISH_BATCH).
        if self.rx_unpublished >= RX_PUBLISH_BATCH {
            self.kick_rx();
        }
        if ok {
            self.stats.rx_frames += 1;
        } else {
            self.stats.rx_dropped += 1;
        }
        Ok(true)
    }

    /// Takes completed TX buffers back from the device.
    pub fn reclaim_tx(&mut self) -> Result<(), BlkError> {
        while self.tx.pop()?.is_some() {}
        Ok(())
    }

    /// TX frames the device has not completed yet (after taking back the completed ones).
    pub fn tx_in_flight(&mut self) -> Result<u16, BlkError> {
        self.reclaim_tx()?;
        Ok(self.tx.size() - self.tx.free())
    }

    /// Sends one frame (Ethernet header onwards) built by `build` into a buffer of
    /// `MAX_TX_FRAME` bytes; `build` returns the frame's length. The frame is published at
    /// once and the device kicked only if it asks for it (EVENT_IDX). A full ring drops the
    /// frame (counted in `tx_dropped`).
    pub fn send(&mut self, build: impl FnOnce(&mut [u8]) -> usize) -> Result<(), BlkError> {
        self.reclaim_tx()?;
        if self.tx.free() == 0 {
            self.stats.tx_dropped += 1;
            return Ok(());
        }
        self.push_tx(build)?;
        self.publish_tx();
        Ok(())
    }

    /// Queues up to `max` frames, each built by `build` as in `send`, and publishes them
    /// together: one avail-index store and at most one kick for the whole burst. Returns how
    /// many frames were queued (0 when the ring is full: nothing is dropped, call again).
    pub fn send_burst(
        &mut self,
        max: usize,
        mut build: impl FnMut(&mut [u8]) -> usize,
    ) -> Result<usize, BlkError> {
        self.reclaim_tx()?;
        let n = max.min(usize::from(self.tx.free()));
        for _ in 0..n {
            self.push_tx(&mut build)?;
        }
        if n > 0 {
            self.publish_tx();
        }
        Ok(n)
    }

    /// Copies one frame into the TX buffer of the next free descriptor and queues it (not yet
    /// published). The caller has checked that a descriptor is free.
    fn push_tx(&mut self, build: impl FnOnce(&mut [u8]) -> usize) -> Result<(), BlkError> {
        let id = self.tx.peek_head();
        let addr = self.tx_bufs + u64::from(id) * BUF_LEN as u64;
        // SAFETY: buffer `id` belongs to a free descriptor, so the device is not using it.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, BUF_LEN) };
        buf[..HDR_LEN].fill(0);
        let (_, frame) = buf.split_at_mut(HDR_LEN);
        let len = build(frame).min(MAX_TX_FRAME);
        self.tx.push(&[Buf {
            addr,
            len: (HDR_LEN + len) as u32,
            write: false,
        }])?;
        self.stats.tx_frames += 1;
        Ok(())
    }

    fn publish_tx(&mut self) {
        if self.tx.publish() {
            self.stats.kicks += 1;
            self.stats.tx_kicks += 1;
            self.mmio.notify(TX_Q);
        }
    }
}

/// Largest frame `send` can carry.
pub const MAX_TX_FRAME: usize = BUF_LEN - HDR_LEN;
