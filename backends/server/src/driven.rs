//! Queues a device serves itself (`VhostUserDevice::drives_queue`): the device's thread waits
//! on the kick fd, the server's stop signal and its own event sources (a TAP, another port's
//! frames) and works the ring through `DeviceRing`, which keeps the inflight region in step:
//! a head is marked in flight when popped and cleared once its used entry is published.
//!
//! Such a device completes chains in the order it pops them, so when a queue starts (a new
//! connection, or a new daemon after a crash) the server resumes its avail ring at the
//! guest's used index: every chain popped and not published is popped again, every published
//! one is done.

use std::fs::File;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryError, GuestMemoryMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::inflight::InflightQueue;
use crate::worker::CallFd;

/// Bytes of a used-ring header (`flags`, `idx`) and of one used element (`id`, `len`).
const USED_HEADER: u64 = 4;
const USED_ELEM: u64 = 8;
/// Offset of `idx` in the used ring.
const USED_IDX_AT: u64 = 2;

/// Why a used entry could not be published.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("cannot write the used ring")]
    WriteUsed(#[source] GuestMemoryError),
    #[error("cannot signal the call eventfd")]
    Signal(#[source] io::Error),
}

/// One started queue's ring, with its inflight area and call fd.
pub struct DeviceRing {
    index: usize,
    queue: Queue,
    inflight: Option<InflightQueue>,
    call: Option<CallFd>,
    running: bool,
}

/// A ring shared between the queue's own thread and whoever the device lets deliver into it
/// (the switch's other ports).
pub type SharedRing = Arc<Mutex<DeviceRing>>;

impl DeviceRing {
    /// A ring without inflight tracking or call fd (tests, fuzzing, a device's own use).
    pub fn new(index: usize, queue: Queue) -> Self {
        DeviceRing {
            index,
            queue,
            inflight: None,
            call: None,
            running: true,
        }
    }

    pub(crate) fn started(
        index: usize,
        queue: Queue,
        inflight: Option<InflightQueue>,
        call: CallFd,
    ) -> Self {
        DeviceRing {
            inflight,
            call: Some(call),
            ..DeviceRing::new(index, queue)
        }
    }

    /// Lock a shared ring; a panicked holder left nothing half-published that matters more
    /// than serving on.
    pub fn lock(ring: &SharedRing) -> MutexGuard<'_, DeviceRing> {
        ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// False once the server stopped the queue: nothing may be popped or published any more.
    pub fn is_running(&self) -> bool {
        self.running
    }

    pub(crate) fn stop(&mut self) {
        self.running = false;
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The queue itself, for notification suppression and index reads. Chains are popped
    /// with `pop` and completed with `publish`, which keep the inflight area right.
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// Continue from the used index the guest sees if it moved without us: an earlier
    /// backend's last completions can land after this ring started (a takeover where the old
    /// daemon still finishes its work). Call under the lock before each batch: between batches
    /// a driven queue has nothing in flight, so its avail position follows the used one.
    pub fn follow_guest_used(&mut self, mem: &GuestMemoryMmap) {
        let Ok(in_guest) = self.queue.used_idx(mem, Ordering::Acquire) else {
            return;
        };
        let in_guest = in_guest.0;
        if in_guest == self.queue.next_used() {
            return;
        }
        log::info!(
            "queue {}: used index {in_guest} in guest memory, the queue was at {}: continuing from it",
            self.index,
            self.queue.next_used()
        );
        self.queue.set_next_used(in_guest);
        self.queue.set_next_avail(in_guest);
        if let Some(inflight) = &mut self.inflight {
            inflight.restart(in_guest);
        }
    }

    /// The next available chain, marked in flight.
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
        if !self.running {
            return None;
        }
        let chain = self.queue.iter(mem).ok()?.next()?;
        if let Some(inflight) = &mut self.inflight {
            inflight.fetched(chain.head_index());
        }
        Some(chain)
    }

    /// Give back chains popped since the avail index was `next_avail` (`heads`, not used):
    /// they are popped again later.
    pub fn rewind(&mut self, next_avail: u16, heads: impl IntoIterator<Item = u16>) {
        self.queue.set_next_avail(next_avail);
        if let Some(inflight) = &self.inflight {
            for head in heads {
                inflight.returned(head);
            }
        }
    }

    /// Write `entries` (head, used length) to the used ring and publish them with one release
    /// store of `used.idx`, so the driver sees all or none (a merged RX frame is never seen in
    /// part); their inflight flags are cleared after it. Returns how many were published.
    pub fn publish(
        &mut self,
        mem: &GuestMemoryMmap,
        entries: &[(u16, u32)],
    ) -> Result<usize, RingError> {
        let Some(&(last, _)) = entries.last() else {
            return Ok(0);
        };
        let size = self.queue.size().max(1);
        let ring = GuestAddress(self.queue.used_ring());
        let mut next = Wrapping(self.queue.next_used());
        for &(head, len) in entries {
            let elem = ring.unchecked_add(USED_HEADER + u64::from(next.0 % size) * USED_ELEM);
            mem.write_obj(u32::from(head).to_le(), elem)
                .map_err(RingError::WriteUsed)?;
            mem.write_obj(len.to_le(), elem.unchecked_add(4))
                .map_err(RingError::WriteUsed)?;
            next += Wrapping(1);
        }
        if let Some(inflight) = &self.inflight {
            inflight.completing(last);
        }
        mem.store(
            next.0.to_le(),
            ring.unchecked_add(USED_IDX_AT),
            Ordering::Release,
        )
        .map_err(RingError::WriteUsed)?;
        self.queue.set_next_used(next.0);
        if let Some(inflight) = &self.inflight {
            for &(head, _) in entries {
                inflight.cleared(head);
            }
            inflight.published(next.0);
        }
        Ok(entries.len())
    }

    /// Signal the call eventfd (the caller decided the driver wants it). `Ok(false)` when
    /// there is no call fd to signal (none set yet, or a polling frontend).
    pub fn signal(&self) -> Result<bool, RingError> {
        let Some(call) = &self.call else {
            return Ok(false);
        };
        let call = call.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(mut file) = call.as_ref() else {
            return Ok(false);
        };
        file.write_all(&1u64.to_ne_bytes())
            .map_err(RingError::Signal)?;
        Ok(true)
    }
}

/// What woke a device-driven queue's thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The server stops the queue: return from `serve_queue`.
    Stop,
    /// The driver kicked the queue (the kick eventfd is cleared).
    Kick,
    /// The device's own source with this token became readable.
    Source(u64),
    /// `DrivenQueue::wait_for`'s time passed without an event.
    Timeout,
}

const KICK_TOKEN: u64 = u64::MAX;
const STOP_TOKEN: u64 = u64::MAX - 1;

/// A started queue handed to the device that drives it, on the queue's own thread.
pub struct DrivenQueue {
    pub ring: SharedRing,
    pub memory: GuestMemoryAtomic<GuestMemoryMmap>,
    kick: File,
    stop_fd: EventFd,
    stop: Arc<AtomicBool>,
    epoll: Epoll,
}

impl DrivenQueue {
    pub(crate) fn new(
        ring: SharedRing,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        kick: File,
        stop_fd: EventFd,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let queue = DrivenQueue {
            ring,
            memory,
            kick,
            stop_fd,
            stop,
            epoll,
        };
        queue.watch(queue.kick.as_raw_fd(), KICK_TOKEN, EventSet::IN)?;
        queue.watch(queue.stop_fd.as_raw_fd(), STOP_TOKEN, EventSet::IN)?;
        Ok(queue)
    }

    fn watch(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Also wake for `fd` (with `token`, below `u64::MAX - 1`); edge-triggered, so a source
    /// the device cannot drain right now (no guest buffers) does not wake it again and again.
    pub fn add_source(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.watch(fd, token, EventSet::IN | EventSet::EDGE_TRIGGERED)
    }

    /// Whether the server asked the queue to stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Wait for the next event; a stop wins over everything else.
    pub fn wait(&self) -> io::Result<Wake> {
        self.wait_ms(-1)
    }

    /// `wait`, for at most `timeout` (then `Wake::Timeout`).
    pub fn wait_for(&self, timeout: Duration) -> io::Result<Wake> {
        let ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
        self.wait_ms(ms)
    }

    fn wait_ms(&self, timeout_ms: i32) -> io::Result<Wake> {
        let mut events = [EpollEvent::default(); 4];
        loop {
            if self.stopping() {
                return Ok(Wake::Stop);
            }
            let n = match self.epoll.wait(timeout_ms, &mut events) {
                Ok(0) if timeout_ms >= 0 => return Ok(Wake::Timeout),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let tokens = events[..n].iter().map(EpollEvent::data);
            if self.stopping() || tokens.clone().any(|t| t == STOP_TOKEN) {
                return Ok(Wake::Stop);
            }
            if let Some(token) = tokens.clone().find(|&t| t != KICK_TOKEN) {
                // A kick in the same batch stays readable and is reported next time.
                return Ok(Wake::Source(token));
            }
            if n > 0 {
                let mut count = [0u8; 8];
                // The kick fd is an eventfd: one read clears it; a failed read only means
                // another wakeup is pending.
                let _ = (&self.kick).read(&mut count);
                return Ok(Wake::Kick);
            }
        }
    }
}
