//! Target `queue_worker` (feature `fuzzing`): one queue worker, run on the calling thread,
//! serving a split ring whose descriptor table, avail and used rings the fuzzer wrote into
//! guest memory, with fuzzed ring addresses, indices, EVENT_IDX and resubmitted heads.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ring_layout_problem, QueueSetup, Worker};
use crate::{DescriptorTable, VhostUserDevice};

/// Reads the fuzzer's bytes front to back; zeroes once they run out.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
}

/// Chains one input may have served before the device stops the worker. A ring in memory
/// nobody else writes yields at most its size (16) plus the resubmitted heads (3) per serve;
/// more means the requests' own data lands on the avail ring and keeps publishing work (a
/// read into the ring): an endless but legitimate stream the worker must stay stoppable in.
/// (A used ring laid over the avail ring, which did the same with every completion, is
/// refused at ring start: fuzz/corpus/queue_worker/hang-used-ring-over-avail-ring.)
const MAX_CHAINS: usize = 64;

/// The fuzzed device, stopping the worker after `MAX_CHAINS` chains.
struct Bounded<D> {
    blk: Arc<D>,
    stop: Arc<AtomicBool>,
    served: AtomicUsize,
}

impl<D: VhostUserDevice> VhostUserDevice for Bounded<D> {
    fn num_queues(&self) -> usize {
        self.blk.num_queues()
    }
    fn max_queue_size(&self) -> u16 {
        self.blk.max_queue_size()
    }
    fn features(&self) -> u64 {
        self.blk.features()
    }
    fn config_space(&self) -> Option<&[u8]> {
        self.blk.config_space()
    }
    fn process(
        &self,
        queue: usize,
        head: u16,
        chain: &[Descriptor],
        memory: &GuestMemoryMmap,
    ) -> u32 {
        if self.served.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_CHAINS {
            self.stop.store(true, Ordering::SeqCst);
        }
        self.blk.process(queue, head, chain, memory)
    }
}

/// How long one input may keep the worker busy: a ring of 16 and 3 resubmitted heads take
/// well under a millisecond, but a worker thread of a fuzzer at nice 19 on a loaded machine
/// most likely waited that long to be scheduled (a hang not reproducible alone). The known wedges are stopped before this.
const SPIN_DEADLINE: Duration = Duration::from_secs(2);
/// How often the harness looks at the avail index while the worker runs.
const POLL: Duration = Duration::from_millis(1);

/// A fresh non-blocking eventfd as a `File` (the worker's kick and call types).
fn eventfd() -> File {
    // SAFETY: plain eventfd(2); the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Input: ring size selector (1..16), flags (bit 0 EVENT_IDX, bit 1 INDIRECT_DESC, bit 2
/// read-only disk, bit 3 a call fd), descriptor table / avail / used addresses in 16-byte
/// units, next avail and next used index, up to three resubmitted heads, then the guest
/// memory image from address 0. `guest_memory` maps the image, `device(readonly, size)` is
/// the device served (bit 2 is its read-only flag).
pub fn queue_worker<D: VhostUserDevice>(
    data: &[u8],
    guest_memory: impl FnOnce(&[u8]) -> GuestMemoryMmap,
    device: impl FnOnce(bool, u16) -> Arc<D>,
) {
    let mut input = Input(data);
    let size = 1u16 << (input.byte() % 5);
    let flags = input.byte();
    let [desc, avail, used] = [(); 3].map(|()| GuestAddress(u64::from(input.byte()) * 16));
    let next_avail = input.u16();
    let next_used = input.u16();
    let resubmit: Vec<u16> = (0..input.byte() % 4).map(|_| input.u16()).collect();
    let memory = guest_memory(input.0);
    let Ok(mut queue) = Queue::new(size) else {
        return;
    };
    let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
    let (lo, hi) = split(desc);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(avail);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(used);
    queue.set_used_ring_address(lo, hi);
    queue.set_event_idx(flags & 1 != 0);
    queue.set_ready(true);
    if !queue.is_valid(&memory) {
        return;
    }
    queue.set_next_avail(next_avail);
    queue.set_next_used(next_used);
    // What the server's ring start refuses (handler.rs), the worker never sees.
    if ring_layout_problem(desc, avail, used, size).is_some() {
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let device = Arc::new(Bounded {
        blk: device(flags & 4 != 0, size),
        stop: stop.clone(),
        served: AtomicUsize::new(0),
    });
    let setup = QueueSetup {
        index: 0,
        queue,
        table: DescriptorTable {
            addr: desc,
            size,
            indirect: flags & 2 != 0,
        },
        kick: eventfd(),
        call: Arc::new(Mutex::new((flags & 8 != 0).then(eventfd))),
        memory: GuestMemoryAtomic::new(memory.clone()),
        inflight: None,
        resubmit,
        log: None,
    };
    let mut worker = Worker {
        signalled_at: std::num::Wrapping(setup.queue.next_used()),
        setup,
        device,
        exit: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        stop,
        bad_chain_log: crate::loglimit::LogLimit::default(),
        batch: Vec::new(),
    };
    // What the worker thread does before it first waits for a kick, on a thread of its own
    // so that a spinning worker can be stopped and reported.
    let stop = worker.stop.clone();
    let (done, finished) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        worker.resubmit();
        let _ = worker.serve();
        let _ = done.send(());
    });
    // The avail index in memory moves only if the worker's own writes (used ring, request
    // data) land on it; the ring is then the guest's own wreck, and the worker stopped early.
    let driver_idx = |memory: &GuestMemoryMmap| {
        memory
            .load::<u16>(avail.unchecked_add(2), Ordering::Acquire)
            .ok()
    };
    let initial_idx = driver_idx(&memory);
    let deadline = Instant::now() + SPIN_DEADLINE;
    let (mut in_time, mut fed_itself) = (false, false);
    while !in_time && !fed_itself && Instant::now() < deadline {
        in_time = finished.recv_timeout(POLL).is_ok();
        fed_itself = driver_idx(&memory) != initial_idx;
    }
    stop.store(true, Ordering::SeqCst);
    thread.join().expect("the worker thread does not panic");
    // A broken ring (avail index too far ahead) ends serve() with an error: in time too.
    if !in_time && !fed_itself {
        panic!("the worker was still serving after {SPIN_DEADLINE:?} on a ring it cannot serve");
    }
}
