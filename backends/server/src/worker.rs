//! One thread per started queue: waits on the kick eventfd (and an exit eventfd), drains the
//! avail ring, hands each chain to the device, publishes the batch's used entries with one
//! used-index store (inflight tracking kept right) and signals the call eventfd at most once
//! per batch as EVENT_IDX allows.

use std::fs::File;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryError,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::DescriptorTable;
use super::dirty_log::DirtyLog;
use super::driven::{DeviceRing, DrivenQueue};
use super::inflight::InflightQueue;
use super::VhostUserDevice;
use crate::loglimit::{burst_note, LogLimit, INTERVAL};

const KICK_TOKEN: u64 = 0;
const EXIT_TOKEN: u64 = 1;
/// Bytes of a used-ring header (`flags`, `idx`), of one used element (`id`, `len`), and where
/// `used.idx` is; where the avail ring's entries start.
const USED_HEADER: u64 = 4;
const USED_ELEM: u64 = 8;
const USED_IDX_AT: u64 = 2;
const AVAIL_HEADER: u64 = 4;
/// Most completions held back before they are published mid-drain, so a long drain of a big
/// ring still lets the driver see progress.
const MAX_BATCH: usize = 64;

/// Why a worker stopped serving its queue before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot wait for kicks")]
    Wait(#[from] io::Error),
    #[error(
        "the driver's avail index {avail} is more than the ring size {size} ahead of the \
         device's {next}: the ring is broken; the queue stays stopped until the frontend \
         sets it up again"
    )]
    AvailAhead { avail: u16, next: u16, size: u16 },
}

/// Why a ring laid out by the frontend cannot be served, or `None` if it can. Checked at ring
/// start, before a worker exists: an avail ring at guest address 0 is "not ready" for
/// virtio-queue (nothing ever pops, while EVENT_IDX's re-check keeps seeing work: a spin), and
/// a used ring over the avail ring's header makes every completion publish new "available"
/// entries (the worker would serve its own writes forever). Real drivers do neither.
pub fn ring_layout_problem(
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    size: u16,
) -> Option<String> {
    use std::mem::size_of;
    use virtio_bindings::virtio_ring::{vring_desc, vring_used_elem};
    let size = u64::from(size);
    // flags + idx + ring[size] + used_event / avail_event (EVENT_IDX).
    let avail_len = 2 + 2 + 2 * size + 2;
    let used_len = 2 + 2 + size_of::<vring_used_elem>() as u64 * size + 2;
    let desc_len = size_of::<vring_desc>() as u64 * size;
    let overlap = |a: GuestAddress, a_len: u64, b: GuestAddress, b_len: u64| {
        a.0 < b.0.saturating_add(b_len) && b.0 < a.0.saturating_add(a_len)
    };
    if avail.0 == 0 {
        Some("the avail ring is at guest address 0".into())
    } else if overlap(used, used_len, avail, avail_len) {
        Some(format!(
            "the used ring ({:#x}, {used_len} bytes) overlaps the avail ring ({:#x}, {avail_len} bytes)",
            used.0, avail.0
        ))
    } else if overlap(used, used_len, desc, desc_len) {
        Some(format!(
            "the used ring ({:#x}, {used_len} bytes) overlaps the descriptor table ({:#x}, {desc_len} bytes)",
            used.0, desc.0
        ))
    } else {
        None
    }
}

/// The call eventfd of a queue; SET_VRING_CALL may replace it while the worker runs.
pub type CallFd = Arc<Mutex<Option<File>>>;

/// Everything a worker needs to serve one queue.
pub struct QueueSetup {
    pub index: usize,
    /// Size, ring addresses, EVENT_IDX and indices already set; ready.
    pub queue: Queue,
    pub table: DescriptorTable,
    pub kick: File,
    pub call: CallFd,
    pub memory: GuestMemoryAtomic<GuestMemoryMmap>,
    pub inflight: Option<InflightQueue>,
    /// Heads a previous backend left in flight, in the order they were fetched.
    pub resubmit: Vec<u16>,
    /// Where the pages written are logged, while the frontend migrates (VHOST_F_LOG_ALL).
    pub log: Option<Arc<DirtyLog>>,
}

/// A queue being served by its worker thread.
pub struct RunningQueue {
    index: usize,
    thread: JoinHandle<Queue>,
    exit: EventFd,
    stop: Arc<AtomicBool>,
}

impl RunningQueue {
    pub fn start<D: VhostUserDevice>(setup: QueueSetup, device: Arc<D>) -> io::Result<Self> {
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let stop = Arc::new(AtomicBool::new(false));
        let index = setup.index;
        let worker = Worker {
            exit: exit.try_clone()?,
            stop: stop.clone(),
            signalled_at: Wrapping(setup.queue.next_used()),
            setup,
            device,
            bad_chain_log: LogLimit::default(),
            batch: Vec::with_capacity(MAX_BATCH),
        };
        let thread = std::thread::Builder::new()
            .name(format!("queue-{index}"))
            .spawn(move || worker.run())?;
        Ok(RunningQueue {
            index,
            thread,
            exit,
            stop,
        })
    }

    /// Start the thread of a queue the device drives itself (`VhostUserDevice::serve_queue`).
    pub fn start_driven<D: VhostUserDevice>(setup: QueueSetup, device: Arc<D>) -> io::Result<Self> {
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let stop = Arc::new(AtomicBool::new(false));
        let index = setup.index;
        let ring = Arc::new(Mutex::new(DeviceRing::started(
            index,
            setup.queue,
            setup.inflight,
            setup.call,
        )));
        let driven = DrivenQueue::new(
            ring.clone(),
            setup.memory,
            setup.kick,
            exit.try_clone()?,
            stop.clone(),
        )?;
        let thread = std::thread::Builder::new()
            .name(format!("queue-{index}"))
            .spawn(move || {
                device.serve_queue(driven);
                let mut ring = DeviceRing::lock(&ring);
                ring.stop();
                std::mem::take(ring.queue_mut())
            })?;
        Ok(RunningQueue {
            index,
            thread,
            exit,
            stop,
        })
    }

    /// Stop after the request in progress, if any, is completed; returns the queue so its
    /// next avail index can be reported. `None` if the worker died.
    pub fn stop(self) -> Option<Queue> {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.exit.write(1) {
            warn!(
                "queue {}: cannot wake the worker to stop it: {e}",
                self.index
            );
        }
        match self.thread.join() {
            Ok(queue) => Some(queue),
            Err(_) => {
                warn!("queue {}: worker thread panicked", self.index);
                None
            }
        }
    }
}

struct Worker<D> {
    setup: QueueSetup,
    device: Arc<D>,
    exit: EventFd,
    stop: Arc<AtomicBool>,
    /// Rate limit of the bad-chain warnings the guest can cause on this queue.
    bad_chain_log: LogLimit,
    /// Served chains (head, used length) whose used entries are not published yet.
    batch: Vec<(u16, u32)>,
    /// The used index when the driver was last considered for a call (EVENT_IDX's "old").
    signalled_at: Wrapping<u16>,
}

impl<D: VhostUserDevice> Worker<D> {
    fn run(mut self) -> Queue {
        let q = self.setup.index;
        if let Err(e) = self.serve_forever() {
            warn!("queue {q}: worker stopped: {e}");
        }
        debug!(
            "queue {q}: stopped at avail index {}",
            self.setup.queue.next_avail()
        );
        self.setup.queue
    }

    fn serve_forever(&mut self) -> Result<(), WorkerError> {
        let epoll = Epoll::new()?;
        let watch = |fd: i32, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        watch(self.setup.kick.as_raw_fd(), KICK_TOKEN)?;
        watch(self.exit.as_raw_fd(), EXIT_TOKEN)?;
        self.resubmit();
        // Requests made available before this worker started (a new backend after a crash
        // or a swap) have no kick coming: look at the ring once on our own.
        self.serve()?;
        let mut events = [EpollEvent::default(); 2];
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            for event in &events[..n] {
                match event.data() {
                    EXIT_TOKEN => return Ok(()),
                    _ => {
                        let mut count = [0u8; 8];
                        // The kick fd is an eventfd: one read clears it. A read error only
                        // means another wakeup is pending, which serve() covers anyway.
                        let _ = (&self.setup.kick).read(&mut count);
                        self.device.queue_kicked(self.setup.index);
                        self.serve()?;
                    }
                }
            }
        }
    }

    /// Complete the requests a previous backend fetched but never completed.
    fn resubmit(&mut self) {
        let heads = std::mem::take(&mut self.setup.resubmit);
        if heads.is_empty() {
            return;
        }
        log::info!(
            "queue {}: resubmitting {} request(s) left in flight: heads {heads:?}",
            self.setup.index,
            heads.len()
        );
        let memory = self.setup.memory.memory();
        for head in heads {
            self.execute(&memory, head);
        }
        self.publish(&memory);
        self.notify(&memory);
    }

    /// Serve the ring until it is empty (or a stop is requested), with the EVENT_IDX re-check
    /// so that a request added while notifications were off is never missed.
    fn serve(&mut self) -> Result<(), WorkerError> {
        let memory = self.setup.memory.memory();
        let event_idx = self.setup.queue.event_idx_enabled();
        loop {
            if event_idx {
                if let Err(e) = self.setup.queue.disable_notification(&*memory) {
                    warn!(
                        "queue {}: cannot disable notifications: {e}",
                        self.setup.index
                    );
                }
            }
            let served = self.drain(&memory);
            if served > 0 {
                self.notify(&memory);
            }
            // Checked after what could be served was: a broken ring would make popping fail
            // and the EVENT_IDX re-check below report work forever.
            self.check_avail(&memory)?;
            if self.stop.load(Ordering::SeqCst) || !event_idx {
                return Ok(());
            }
            if served > 0 && self.poll_for_work(&memory) {
                continue;
            }
            match self.setup.queue.enable_notification(&*memory) {
                Ok(true) => continue,
                Ok(false) => return Ok(()),
                Err(e) => {
                    warn!(
                        "queue {}: cannot enable notifications: {e}",
                        self.setup.index
                    );
                    return Ok(());
                }
            }
        }
    }

    /// After a batch, watch the avail ring (notifications still suppressed) for up to the
    /// device's poll window: a driver that submits again soon is served without a kick and
    /// a wake-up. True when new work arrived; false after the window (or on a stop).
    fn poll_for_work(&self, memory: &GuestMemoryMmap) -> bool {
        let window = self.device.poll_window();
        if window.is_zero() {
            return false;
        }
        let queue = &self.setup.queue;
        let deadline = Instant::now() + window;
        loop {
            match queue.avail_idx(memory, Ordering::Acquire) {
                Ok(avail) if avail.0 != queue.next_avail() => return true,
                Ok(_) => {}
                // Unreadable: popping fails the same way; sleep on the kick fd instead.
                Err(_) => return false,
            }
            if self.stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// A split ring never holds more than its size in published, unserved chains.
    fn check_avail(&self, memory: &GuestMemoryMmap) -> Result<(), WorkerError> {
        let queue = &self.setup.queue;
        let Ok(avail) = queue.avail_idx(memory, Ordering::Acquire) else {
            // Unreadable: popping fails the same way and serves nothing; not a busy loop.
            return Ok(());
        };
        let (avail, next, size) = (avail.0, queue.next_avail(), queue.size());
        if avail.wrapping_sub(next) > size {
            return Err(WorkerError::AvailAhead { avail, next, size });
        }
        Ok(())
    }

    /// Pop and serve every available chain; returns how many were completed.
    fn drain(&mut self, memory: &GuestMemoryMmap) -> usize {
        let mut served = 0;
        // virtio-queue would log an error for every pop from a broken ring.
        if self.check_avail(memory).is_err() {
            return 0;
        }
        while !self.stop.load(Ordering::SeqCst) {
            let Some(chain) = self.setup.queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            if let Some(inflight) = &mut self.setup.inflight {
                inflight.fetched(head);
            }
            self.execute(memory, head);
            served += 1;
            if self.batch.len() >= MAX_BATCH {
                self.publish(memory);
            }
        }
        self.publish(memory);
        served
    }

    /// Serve the chain at `head`; its used entry joins the batch.
    fn execute(&mut self, memory: &GuestMemoryMmap, head: u16) {
        let used_len = match self.setup.table.chain(memory, head) {
            Ok(chain) => {
                let used_len = self.device.process(self.setup.index, head, &chain, memory);
                if let Some(log) = &self.setup.log {
                    // What the device may have written: every device-writable buffer.
                    for d in chain.iter().filter(|d| d.is_write_only()) {
                        log.mark(d.addr().0, u64::from(d.len()));
                    }
                }
                used_len
            }
            Err(e) => {
                self.warn_bad_chain(head, &e);
                0
            }
        };
        self.batch.push((head, used_len));
    }

    /// Write the batch's used entries and make them visible with one release store of
    /// `used.idx`; only then are their inflight flags cleared (a crash in between leaves
    /// them in flight with `last_batch_head` telling the next backend where the batch ended).
    fn publish(&mut self, memory: &GuestMemoryMmap) {
        let Some(&(last, _)) = self.batch.last() else {
            return;
        };
        let queue = &mut self.setup.queue;
        let size = queue.size().max(1);
        let ring = GuestAddress(queue.used_ring());
        let mut next = Wrapping(queue.next_used());
        let written = self.batch.iter().try_for_each(|&(head, len)| {
            let elem = ring.unchecked_add(USED_HEADER + u64::from(next.0 % size) * USED_ELEM);
            memory.write_obj(u32::from(head).to_le(), elem)?;
            memory.write_obj(len.to_le(), elem.unchecked_add(4))?;
            next += Wrapping(1);
            Ok::<_, GuestMemoryError>(())
        });
        let published = written.and_then(|()| {
            if let Some(inflight) = &self.setup.inflight {
                inflight.completing(last);
            }
            memory.store(
                next.0.to_le(),
                ring.unchecked_add(USED_IDX_AT),
                Ordering::Release,
            )
        });
        if let Err(e) = published {
            // The rings were checked at start; only a frontend that remapped memory under a
            // running queue gets here. Like a lost completion: the entries stay in flight.
            warn!(
                "queue {}: cannot publish {} used entries: {e}",
                self.setup.index,
                self.batch.len()
            );
            self.batch.clear();
            return;
        }
        queue.set_next_used(next.0);
        if let Some(log) = &self.setup.log {
            log.mark(ring.0, USED_HEADER + u64::from(size) * USED_ELEM + 2);
        }
        if let Some(inflight) = &self.setup.inflight {
            for &(head, _) in &self.batch {
                inflight.cleared(head);
            }
            inflight.published(next.0);
        }
        self.batch.clear();
    }

    /// EVENT_IDX's rule (the driver wants a call once `used_event` is passed) over everything
    /// published since the last decision; always true without EVENT_IDX.
    fn driver_wants_call(&mut self, memory: &GuestMemoryMmap) -> Result<bool, GuestMemoryError> {
        let queue = &self.setup.queue;
        let new = Wrapping(queue.next_used());
        let old = std::mem::replace(&mut self.signalled_at, new);
        if !queue.event_idx_enabled() {
            return Ok(new != old);
        }
        // The used index store must be visible before used_event is read (virtio 2.7.10).
        fence(Ordering::SeqCst);
        let at = GuestAddress(queue.avail_ring())
            .unchecked_add(AVAIL_HEADER + 2 * u64::from(queue.size()));
        let used_event = Wrapping(u16::from_le(memory.load(at, Ordering::Acquire)?));
        Ok(new - used_event - Wrapping(1) < new - old)
    }

    fn notify(&mut self, memory: &GuestMemoryMmap) {
        match self.driver_wants_call(memory) {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => warn!(
                "queue {}: cannot read the driver's used_event, signalling anyway: {e}",
                self.setup.index
            ),
        }
        let call = self.setup.call.lock().unwrap_or_else(|e| e.into_inner());
        // Without a call fd (not yet set, or the frontend polls) there is nobody to signal.
        if let Some(mut file) = call.as_ref() {
            if let Err(e) = file.write_all(&1u64.to_ne_bytes()) {
                warn!(
                    "queue {}: cannot signal the call eventfd: {e}",
                    self.setup.index
                );
                return;
            }
            self.device.queue_signalled(self.setup.index);
        }
    }

    fn warn_bad_chain(&mut self, head: u16, err: &super::chain::ChainError) {
        let q = self.setup.index;
        let verdict = self.bad_chain_log.check();
        if verdict.suppressed > 0 {
            warn!(
                "queue {q}: {} more unusable chain(s) in the last {}s were not logged",
                verdict.suppressed,
                INTERVAL.as_secs()
            );
        }
        if verdict.log {
            warn!(
                "queue {q}: chain at head {head} is unusable and returned with length 0: {err}{}",
                burst_note(&verdict)
            );
        }
    }
}

#[cfg(test)]
mod layout_tests {
    use super::ring_layout_problem;
    use vm_memory::GuestAddress;

    #[test]
    fn rings_a_driver_lays_out_are_served_and_self_feeding_ones_refused() {
        let g = GuestAddress;
        // Legacy layout of a 256-entry ring: table, avail right after it, used page-aligned.
        assert_eq!(
            ring_layout_problem(g(0x10000), g(0x11000), g(0x12000), 256),
            None
        );
        // Packed back to back (the own guest's and Linux's modern layout) is fine too.
        assert_eq!(
            ring_layout_problem(g(0x1000), g(0x1100), g(0x1128), 16),
            None
        );
        let at_zero = ring_layout_problem(g(0x1000), g(0), g(0x2000), 16).unwrap();
        assert!(at_zero.contains("guest address 0"), "{at_zero}");
        // The used ring's last bytes (avail_event) on the avail header, and the reverse.
        let over = ring_layout_problem(g(0x1000), g(0x2000), g(0x2000 - 4 - 8 * 16), 16).unwrap();
        assert!(over.contains("overlaps the avail ring"), "{over}");
        let over = ring_layout_problem(g(0x1000), g(0x2000), g(0x2020), 16).unwrap();
        assert!(over.contains("overlaps the avail ring"), "{over}");
        let over = ring_layout_problem(g(0x1000), g(0x3000), g(0x10f0), 16).unwrap();
        assert!(over.contains("overlaps the descriptor table"), "{over}");
    }
}

#[cfg(any(test, feature = "fuzzing"))]
#[path = "worker_fuzz.rs"]
pub mod fuzz;
