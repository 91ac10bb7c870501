//! A vhost-user-blk frontend inside the bench process, for `bench --paths blk-host`: memfd
//! "guest memory" (the VMM's own sealed memfd RAM), one split ring laid out with
//! `splitvisor_wire::ring` offsets, kick and call eventfds, EVENT_IDX when the backend offers
//! it. The control messages are the VMM's (`vhost_user::connection` handshake, `rings::start`
//! / `stop`); the data path - descriptors, avail entries, used entries - is here.
//!
//! Each request slot owns a fixed chain of three descriptors (header, data, status) and fixed
//! buffers, so a request costs one header write and one avail entry.

use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use splitvisor_vmm::memory::{create_guest_memory, GuestMemory, MemoryError};
use splitvisor_vmm::vhost_user::connection::{connect, handshake, ConnectError};
use splitvisor_vmm::vhost_user::deadline::ExchangeError;
use splitvisor_vmm::vhost_user::rings::{self, Resume, Rings};
use splitvisor_vmm::vhost_user::QUEUE_SIZE;
use splitvisor_vmm::virtio::QueueConfig;
use splitvisor_wire::ring;
use vhost::vhost_user::Frontend;
use virtio_bindings::virtio_blk::virtio_blk_outhdr;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    vring_desc, VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Descriptors per request: header, data, status.
pub const DESCS_PER_REQUEST: u32 = 3;
/// The largest ring the frontend lays out: qemu-storage-daemon's limit (VIRTQUEUE_MAX_SIZE).
pub const MAX_RING: u16 = 1024;
/// The most requests in flight: every one needs its own three descriptors.
pub const MAX_QD: u32 = MAX_RING as u32 / DESCS_PER_REQUEST;
/// Bytes of a virtio-blk request header (type, reserved, sector).
const HEADER_LEN: u32 = size_of::<virtio_blk_outhdr>() as u32;
const HEADER_SECTOR: u64 = offset_of!(virtio_blk_outhdr, sector) as u64;
const HEADER_IOPRIO: u64 = offset_of!(virtio_blk_outhdr, ioprio) as u64;
/// Bytes reserved per slot for its header and status byte.
const SLOT_META: u64 = 32;
const PAGE: u64 = 4096;
/// How long the backend gets to answer one control message sequence (connect included).
const CONNECT_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("cannot create the frontend's guest memory")]
    Memory(#[source] MemoryError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot connect")]
    Connect(#[source] ConnectError),
    #[error("cannot set up the ring")]
    SetUp(#[source] ExchangeError),
    #[error("cannot stop the ring")]
    Stop(#[source] ExchangeError),
    #[error("cannot access the frontend's guest memory at {0:#x}")]
    Access(u64, #[source] vm_memory::GuestMemoryError),
    #[error("the backend put descriptor {id} in the used ring, which is no request head (queue depth {qd})")]
    BadUsedId { id: u32, qd: u32 },
    #[error("cannot wait for the call eventfd")]
    Wait(#[source] std::io::Error),
}

/// Where everything lives in the frontend's guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub ring_size: u16,
    pub qd: u32,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub meta: u64,
    pub data: u64,
    pub stride: u64,
    pub total: u64,
}

const fn align_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// The ring size for `qd` requests: three descriptors each, a power of two, at least the
/// VMM's own queue size (so small depths see the ring a guest gets).
pub fn ring_size(qd: u32) -> u16 {
    let wanted = (qd * DESCS_PER_REQUEST).next_power_of_two();
    wanted.clamp(u32::from(QUEUE_SIZE), u32::from(MAX_RING)) as u16
}

impl Layout {
    /// `qd` must be 1..=MAX_QD and `bs` a positive multiple of 512 (checked by the caller).
    pub fn new(qd: u32, bs: u64) -> Layout {
        let ring_size = ring_size(qd);
        let desc = 0;
        let avail = desc + ring::desc_table_len(ring_size);
        let used = align_up(avail + ring::avail_ring_len(ring_size), PAGE);
        let meta = align_up(used + ring::used_ring_len(ring_size), PAGE);
        let data = align_up(meta + SLOT_META * u64::from(qd), PAGE);
        let stride = align_up(bs, PAGE);
        let total = align_up(data + stride * u64::from(qd), 2 << 20);
        Layout {
            ring_size,
            qd,
            desc,
            avail,
            used,
            meta,
            data,
            stride,
            total,
        }
    }

    pub fn header(&self, slot: u32) -> u64 {
        self.meta + SLOT_META * u64::from(slot)
    }

    pub fn status(&self, slot: u32) -> u64 {
        self.header(slot) + u64::from(HEADER_LEN)
    }

    pub fn buffer(&self, slot: u32) -> u64 {
        self.data + self.stride * u64::from(slot)
    }

    /// The head descriptor of `slot`'s chain.
    pub fn head(slot: u32) -> u16 {
        (slot * DESCS_PER_REQUEST) as u16
    }

    /// The slot whose chain starts at descriptor `id`, if it is one.
    pub fn slot_of(&self, id: u32) -> Option<u32> {
        (id.is_multiple_of(DESCS_PER_REQUEST) && id / DESCS_PER_REQUEST < self.qd)
            .then_some(id / DESCS_PER_REQUEST)
    }
}

/// virtio 1.x 2.7.10 `vring_need_event`: whether moving an index from `old` to `new` passes
/// the other side's event index `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A connected backend with one started ring.
pub struct BlkFrontend {
    memory: GuestMemory,
    frontend: Frontend,
    rings: Rings,
    layout: Layout,
    pub event_idx: bool,
    /// The avail index the next published batch ends at.
    next_avail: u16,
    /// The avail index the backend last saw published.
    published: u16,
    last_used: u16,
    pub kicks: u64,
}

impl BlkFrontend {
    /// Connects to the backend on `socket` and starts queue 0 with `layout`'s ring.
    pub fn connect(socket: &Path, layout: Layout) -> Result<BlkFrontend, FrontendError> {
        let memory = create_guest_memory(layout.total, true).map_err(FrontendError::Memory)?;
        let stream = connect(socket, CONNECT_WAIT).map_err(FrontendError::Connect)?;
        let mut conn = handshake(socket, stream, 1).map_err(FrontendError::Connect)?;
        let wanted = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        let driver_features = conn.features & wanted;
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(FrontendError::EventFd);
        let rings = Rings {
            driver_features,
            queues: vec![QueueConfig {
                max_size: layout.ring_size,
                size: layout.ring_size,
                ready: true,
                desc_table: layout.desc,
                avail_ring: layout.avail,
                used_ring: layout.used,
            }],
            kicks: vec![eventfd()?],
            calls: vec![eventfd()?],
            log: false,
        };
        rings::start(
            &mut conn.frontend,
            conn.protocol_features,
            conn.features,
            &memory,
            &rings,
            &[(0, 0)],
            Resume::Fresh,
            None,
        )
        .map_err(FrontendError::SetUp)?;
        Ok(BlkFrontend {
            memory,
            frontend: conn.frontend,
            rings,
            layout,
            event_idx: driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0,
            next_avail: 0,
            published: 0,
            last_used: 0,
            kicks: 0,
        })
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn put<T: vm_memory::ByteValued>(&self, value: T, at: u64) -> Result<(), FrontendError> {
        self.memory
            .write_obj(value, GuestAddress(at))
            .map_err(|e| FrontendError::Access(at, e))
    }

    fn get<T: vm_memory::ByteValued>(&self, at: u64) -> Result<T, FrontendError> {
        self.memory
            .read_obj(GuestAddress(at))
            .map_err(|e| FrontendError::Access(at, e))
    }

    /// Writes every slot's descriptor chain once: `device_writes` for reads (the data buffer
    /// is written by the device), the header fixed at `request_type` (VIRTIO_BLK_T_*).
    pub fn prepare(
        &self,
        request_type: u32,
        bs: u32,
        device_writes: bool,
    ) -> Result<(), FrontendError> {
        let data_flags = if device_writes { VRING_DESC_F_WRITE } else { 0 };
        for slot in 0..self.layout.qd {
            let head = u32::from(Layout::head(slot));
            let chain = [
                (self.layout.header(slot), HEADER_LEN, VRING_DESC_F_NEXT),
                (self.layout.buffer(slot), bs, VRING_DESC_F_NEXT | data_flags),
                (self.layout.status(slot), 1, VRING_DESC_F_WRITE),
            ];
            for (i, (addr, len, flags)) in chain.into_iter().enumerate() {
                let index = head + i as u32;
                let desc = vring_desc {
                    addr,
                    len,
                    flags: flags as u16,
                    next: (index + 1) as u16,
                };
                let at = self.layout.desc + ring::DESC_SIZE * u64::from(index);
                self.put(desc.addr, at + offset_of!(vring_desc, addr) as u64)?;
                self.put(desc.len, at + offset_of!(vring_desc, len) as u64)?;
                self.put(desc.flags, at + offset_of!(vring_desc, flags) as u64)?;
                self.put(desc.next, at + offset_of!(vring_desc, next) as u64)?;
            }
            self.put(request_type, self.layout.header(slot))?;
            self.put(0u32, self.layout.header(slot) + HEADER_IOPRIO)?;
        }
        Ok(())
    }

    /// Queues `slot`'s request at `sector` (not yet visible: see `publish`).
    pub fn submit(&mut self, slot: u32, sector: u64) -> Result<(), FrontendError> {
        self.put(sector, self.layout.header(slot) + HEADER_SECTOR)?;
        self.put(u8::MAX, self.layout.status(slot))?;
        let entry = self.next_avail % self.layout.ring_size;
        self.put(
            Layout::head(slot),
            self.layout.avail + ring::avail_entry(entry),
        )?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Makes the queued requests visible and kicks the backend if it asked to be.
    pub fn publish(&mut self) -> Result<(), FrontendError> {
        if self.next_avail == self.published {
            return Ok(());
        }
        let at = self.layout.avail + ring::AVAIL_IDX;
        self.memory
            .store(self.next_avail, GuestAddress(at), Ordering::Release)
            .map_err(|e| FrontendError::Access(at, e))?;
        // The index store must be visible before the backend's event index is read.
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let event: u16 =
                self.get(self.layout.used + ring::avail_event(self.layout.ring_size))?;
            need_event(event, self.next_avail, self.published)
        } else {
            let flags: u16 = self.get(self.layout.used)?;
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        self.published = self.next_avail;
        if kick {
            self.kicks += 1;
            self.rings.kicks[0].write(1).map_err(FrontendError::Wait)?;
        }
        Ok(())
    }

    fn used_idx(&self) -> Result<u16, FrontendError> {
        let at = self.layout.used + ring::USED_IDX;
        self.memory
            .load(GuestAddress(at), Ordering::Acquire)
            .map_err(|e| FrontendError::Access(at, e))
    }

    /// Appends the completed requests (slot, status byte) to `done`; with EVENT_IDX, asks for
    /// a call at the next completion.
    pub fn completions(&mut self, done: &mut Vec<(u32, u8)>) -> Result<(), FrontendError> {
        let used = self.used_idx()?;
        while self.last_used != used {
            let entry = self.last_used % self.layout.ring_size;
            let id: u32 = self.get(self.layout.used + ring::used_elem(entry))?;
            let slot = self.layout.slot_of(id).ok_or(FrontendError::BadUsedId {
                id,
                qd: self.layout.qd,
            })?;
            done.push((slot, self.get(self.layout.status(slot))?));
            self.last_used = self.last_used.wrapping_add(1);
        }
        if self.event_idx {
            let at = self.layout.avail + ring::used_event(self.layout.ring_size);
            self.memory
                .store(self.last_used, GuestAddress(at), Ordering::Release)
                .map_err(|e| FrontendError::Access(at, e))?;
            fence(Ordering::SeqCst);
        }
        Ok(())
    }

    /// True if the used ring holds entries not yet taken by `completions`.
    pub fn pending(&self) -> Result<bool, FrontendError> {
        Ok(self.used_idx()? != self.last_used)
    }

    /// Waits up to `timeout` for a call; false on timeout or a signal.
    pub fn wait(&self, timeout: Duration) -> Result<bool, FrontendError> {
        let call = &self.rings.calls[0];
        let mut poll = libc::pollfd {
            fd: call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, ms) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            return match err.kind() {
                std::io::ErrorKind::Interrupted => Ok(false),
                _ => Err(FrontendError::Wait(err)),
            };
        }
        if ready > 0 {
            // Non-blocking: resets the counter; EAGAIN (another reader) is harmless.
            let _ = call.read();
        }
        Ok(ready > 0)
    }

    /// Stops the ring (GET_VRING_BASE) so that the backend lets go of the memory.
    pub fn stop(mut self) -> Result<(), FrontendError> {
        rings::stop(&mut self.frontend, &self.rings).map_err(FrontendError::Stop)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_keeps_rings_and_buffers_apart() {
        let l = Layout::new(32, 4096);
        assert_eq!(l.ring_size, 256, "QD32 gets the VMM's queue size");
        assert_eq!(l.avail, 16 * 256);
        assert_eq!(l.used % PAGE, 0);
        assert!(l.used >= l.avail + ring::avail_ring_len(256));
        assert!(l.meta >= l.used + ring::used_ring_len(256));
        assert_eq!(l.status(1), l.meta + 32 + 16);
        assert!(l.data > l.status(31));
        assert_eq!(l.buffer(31) + 4096, l.data + 32 * 4096);
        assert!(l.total >= l.buffer(31) + 4096 && l.total.is_multiple_of(2 << 20));
        // 512-byte requests still get page-aligned buffers.
        assert_eq!(Layout::new(4, 512).stride, PAGE);
    }

    #[test]
    fn ring_size_fits_three_descriptors_per_request() {
        assert_eq!(ring_size(1), 256);
        assert_eq!(ring_size(85), 256);
        assert_eq!(ring_size(86), 512);
        assert_eq!(ring_size(MAX_QD), MAX_RING);
        assert!(u32::from(ring_size(MAX_QD)) >= MAX_QD * DESCS_PER_REQUEST);
    }

    #[test]
    fn used_ids_map_back_to_slots() {
        let l = Layout::new(4, 4096);
        assert_eq!(Layout::head(3), 9);
        assert_eq!(l.slot_of(9), Some(3));
        assert_eq!(l.slot_of(10), None, "not a head");
        assert_eq!(l.slot_of(12), None, "beyond the queue depth");
    }

    #[test]
    fn need_event_follows_the_spec_with_wrap_around() {
        // The other side wants an event once index 5 is passed.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 8, 3));
        assert!(!need_event(5, 5, 3), "5 itself not yet passed");
        assert!(!need_event(9, 8, 3));
        assert!(need_event(u16::MAX, 1, u16::MAX - 1), "across the wrap");
        assert!(!need_event(2, 1, u16::MAX - 1));
    }
}
