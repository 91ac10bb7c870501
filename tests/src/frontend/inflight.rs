//! The frontend's view of an inflight region (vhost-user spec, "Inflight I/O tracking", split
//! rings), written independently of the daemon's code: tests build and inspect regions with it.

use std::fs::File;
use std::sync::atomic::Ordering;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

const HEADER: usize = 16;
const DESC: usize = 16;

/// Bytes of one queue's area: header plus descriptor states, rounded up to 64 as the daemon
/// lays them out.
pub fn area_len(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).div_ceil(64) * 64
}

/// A region mapped shared in the test process.
pub struct InflightMap {
    map: MmapRegion<()>,
    queue_size: u16,
}

impl InflightMap {
    pub fn new(file: &File, len: u64, queue_size: u16) -> Self {
        let map =
            MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), len as usize)
                .unwrap();
        InflightMap { map, queue_size }
    }

    fn at(&self, queue: usize, field: usize) -> usize {
        queue * area_len(self.queue_size) + field
    }

    fn put<T: vm_memory::AtomicAccess>(&self, at: usize, v: T) {
        self.map
            .as_volatile_slice()
            .store(v, at, Ordering::SeqCst)
            .unwrap();
    }

    fn get<T: vm_memory::AtomicAccess>(&self, at: usize) -> T {
        self.map
            .as_volatile_slice()
            .load(at, Ordering::SeqCst)
            .unwrap()
    }

    /// Write a queue header: version, desc_num, last_batch_head, used_idx.
    pub fn set_header(&self, q: usize, version: u16, desc_num: u16, last_batch: u16, used: u16) {
        self.put(self.at(q, 0), 0u64);
        self.put(self.at(q, 8), version);
        self.put(self.at(q, 10), desc_num);
        self.put(self.at(q, 12), last_batch);
        self.put(self.at(q, 14), used);
    }

    /// Mark `head` in flight (or not) with fetch counter `counter`.
    pub fn set_desc(&self, q: usize, head: u16, inflight: u8, counter: u64) {
        let d = self.at(q, HEADER + DESC * usize::from(head));
        self.put(d, inflight);
        self.put(d + 8, counter);
    }

    pub fn inflight(&self, q: usize, head: u16) -> u8 {
        self.get(self.at(q, HEADER + DESC * usize::from(head)))
    }

    pub fn version(&self, q: usize) -> u16 {
        self.get(self.at(q, 8))
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.get(self.at(q, 14))
    }

    /// Heads currently marked in flight in queue `q`.
    pub fn inflight_heads(&self, q: usize) -> Vec<u16> {
        (0..self.queue_size)
            .filter(|&h| self.inflight(q, h) == 1)
            .collect()
    }
}
