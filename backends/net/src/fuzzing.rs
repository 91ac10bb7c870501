//! Entry point of the `net_rxtx` fuzz target in `fuzz/` (feature `fuzzing`), and the test that
//! feeds every committed corpus file through it, so that `cargo test` exercises the corpus
//! without building the fuzzer. The entry takes raw fuzzer bytes and must never panic.

use std::sync::{Arc, Mutex};

use splitvisor_vhost_server::DeviceRing;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use crate::ring::{Mem, MAX_FRAME_LEN};
use crate::rxtx::{process_rx, process_tx, MemTap, RxState, TxScratch};
use crate::stats::{PortStats, QueueStats};
use crate::switch::{RxTarget, Switch, SwitchScratch};

/// Guest memory: the fuzzer's image at 0, a hole, a second region (buffers may straddle the
/// end of the first or fall into the hole).
const IMAGE_LEN: usize = 0x8000;
const SECOND_REGION: (u64, usize) = (0x9000, 0x1000);
/// The switch's receiving port: its own guest, RX ring at 0, buffers from 0x100.
const RX_GUEST_LEN: usize = 0x4000;

/// Reads the fuzzer's bytes front to back; zeroes once they run out.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
}

/// Where a ring lives and where it starts, as the fuzzer chose.
struct RingSpec {
    size: u16,
    event_idx: bool,
    addrs: [u64; 3],
    next_avail: u16,
    next_used: u16,
}

impl RingSpec {
    fn read(input: &mut Input) -> Self {
        let size = 1u16 << (input.byte() % 5);
        let event_idx = input.byte() & 1 != 0;
        let addrs = [(); 3].map(|()| u64::from(input.byte()) * 16);
        RingSpec {
            size,
            event_idx,
            addrs,
            next_avail: input.u16(),
            next_used: input.u16(),
        }
    }

    /// The queue, or `None` when the frontend's checks would refuse it.
    fn queue(&self, mem: &Mem) -> Option<Queue> {
        let mut queue = Queue::new(self.size).ok()?;
        let [desc, avail, used] = self.addrs.map(|a| (Some(a as u32), Some((a >> 32) as u32)));
        queue.set_desc_table_address(desc.0, desc.1);
        queue.set_avail_ring_address(avail.0, avail.1);
        queue.set_used_ring_address(used.0, used.1);
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
        queue.is_valid(mem).then_some(queue)
    }
}

thread_local! {
    /// Mapped once: a fresh mapping per input costs more than the input itself.
    static MEMORY: Mem = Mem::from_ranges(&[
        (GuestAddress(0), IMAGE_LEN),
        (GuestAddress(SECOND_REGION.0), SECOND_REGION.1),
    ])
    .expect("fixed test layout maps");
    static RX_MEMORY: Mem =
        Mem::from_ranges(&[(GuestAddress(0), RX_GUEST_LEN)]).expect("rx guest maps");
}

/// Guest memory holding `image` at address 0 and zeroes everywhere else (a handle to the
/// thread's one mapping, rewritten for each input).
fn guest_memory(image: &[u8]) -> Mem {
    static ZEROES: [u8; IMAGE_LEN] = [0; IMAGE_LEN];
    let image = &image[..image.len().min(IMAGE_LEN)];
    MEMORY.with(|memory| {
        let fill = [
            (0, image),
            (image.len() as u64, &ZEROES[image.len()..]),
            (SECOND_REGION.0, &ZEROES[..SECOND_REGION.1]),
        ];
        for (addr, bytes) in fill {
            memory
                .write_slice(bytes, GuestAddress(addr))
                .expect("fixed test layout is writable");
        }
        memory.clone()
    })
}

/// Input: mode (0 TAP TX, 1 TAP RX, 2 switch TX to a second port's RX ring), a ring spec
/// (size selector, EVENT_IDX, desc/avail/used in 16-byte units, next avail, next used), for
/// RX mergeable buffers and up to 3 TAP frames (length u16, bytes), for the switch the
/// receiving ring's spec and image length, then the guest image(s).
pub fn net_rxtx(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.byte() % 3;
    let spec = RingSpec::read(&mut input);
    match mode {
        0 => tap_tx(&spec, input.0),
        1 => {
            let mrg_rxbuf = input.byte() & 1 != 0;
            let tap = MemTap::default();
            for _ in 0..input.byte() % 4 {
                let len = usize::from(input.u16()).min(MAX_FRAME_LEN);
                tap.to_read.borrow_mut().push_back(input.take(len).to_vec());
            }
            tap_rx(&spec, mrg_rxbuf, &tap, input.0);
        }
        _ => {
            let rx_spec = RingSpec::read(&mut input);
            let rx_image_len = usize::from(input.byte()) * 16;
            let rx_image = input.take(rx_image_len);
            switch_tx(&spec, &rx_spec, rx_image, input.0);
        }
    }
}

fn tap_tx(spec: &RingSpec, image: &[u8]) {
    let mem = guest_memory(image);
    let Some(queue) = spec.queue(&mem) else {
        return;
    };
    let mut queue = DeviceRing::new(1, queue);
    let tap = MemTap::default();
    let stats = QueueStats::default();
    if let Ok(batch) = process_tx(&mut queue, &mem, &tap, &mut TxScratch::default(), &stats) {
        assert!(
            batch.used <= usize::from(u16::MAX),
            "more used entries than indices"
        );
    }
    for frame in tap.written.borrow().iter() {
        assert!(frame.len() <= MAX_FRAME_LEN, "a {}-byte frame", frame.len());
    }
}

fn tap_rx(spec: &RingSpec, mrg_rxbuf: bool, tap: &MemTap, image: &[u8]) {
    let mem = guest_memory(image);
    let Some(queue) = spec.queue(&mem) else {
        return;
    };
    let mut queue = DeviceRing::new(0, queue);
    let stats = QueueStats::default();
    let mut rx = RxState::default();
    let _ = process_rx(&mut queue, &mem, tap, &mut rx, mrg_rxbuf, &stats);
}

fn switch_tx(spec: &RingSpec, rx_spec: &RingSpec, rx_image: &[u8], image: &[u8]) {
    let mem = guest_memory(image);
    let Some(queue) = spec.queue(&mem) else {
        return;
    };
    let rx_image = &rx_image[..rx_image.len().min(RX_GUEST_LEN)];
    let rx_mem = RX_MEMORY.with(|rx_mem| {
        let zeroes = vec![0u8; RX_GUEST_LEN - rx_image.len()];
        for (addr, bytes) in [(0, rx_image), (rx_image.len() as u64, &zeroes[..])] {
            rx_mem
                .write_slice(bytes, GuestAddress(addr))
                .expect("fixed rx layout is writable");
        }
        rx_mem.clone()
    });
    let rx_mem = GuestMemoryAtomic::new(rx_mem);
    let stats = (0..2)
        .map(|i| Arc::new(PortStats::new(format!("p{i}"), 1)))
        .collect();
    let switch = Switch::new(stats);
    if let Some(rx_queue) = rx_spec.queue(&rx_mem.memory()) {
        let ring = Arc::new(Mutex::new(DeviceRing::new(0, rx_queue)));
        switch.attach(1, RxTarget::new(ring, rx_mem.clone(), rx_spec.event_idx));
    }
    let mut ring = DeviceRing::new(1, queue);
    let _ = switch.process_tx(0, &mut ring, &mem, &mut SwitchScratch::default());
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Every file of `fuzz/corpus/net_rxtx` goes through the fuzz target's entry point.
    #[test]
    fn net_rxtx_corpus() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/net_rxtx");
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list the corpus {}: {e}", dir.display()))
            .map(|entry| entry.expect("corpus entry").path())
            .collect();
        assert!(!files.is_empty(), "corpus {} is empty", dir.display());
        for path in files {
            super::net_rxtx(&std::fs::read(&path).expect("corpus file readable"));
        }
    }
}
