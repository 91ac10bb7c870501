//! Test helpers: split rings built with virtio-queue's `MockSplitQueue` in test guest memory.

use splitvisor_vhost_server::DeviceRing;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::ring::Mem;

pub const QUEUE_SIZE: u16 = 16;
/// Where test buffers live (rings sit below).
pub const BUF_BASE: u64 = 0x4_0000;

pub fn memory() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("test memory")
}

/// One driver-side ring at `base` in `mem`.
pub struct Ring<'a> {
    pub vq: MockSplitQueue<'a, Mem>,
    mem: &'a Mem,
    next_desc: u16,
}

impl<'a> Ring<'a> {
    pub fn new(mem: &'a Mem, base: u64) -> Self {
        Ring {
            vq: MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE),
            mem,
            next_desc: 0,
        }
    }

    /// Make one chain available: `(guest address, length, device-writable)` per descriptor.
    pub fn add_chain(&mut self, descs: &[(u64, u32, bool)]) {
        let first = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = 0u16;
                if write {
                    flags |= virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
                }
                if i + 1 < descs.len() {
                    flags |= virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
                }
                let next = first + i as u16 + 1;
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.vq.add_desc_chains(&raw, first).expect("add chain");
        self.next_desc += descs.len() as u16;
    }

    /// The device's view of the ring (no inflight region, no call fd).
    pub fn queue(&self) -> DeviceRing {
        DeviceRing::new(0, self.vq.create_queue::<Queue>().expect("queue"))
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(self.vq.used_addr().unchecked_add(2))
            .expect("used idx")
    }

    /// `(id, len)` of used element `i`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.vq.used_addr().unchecked_add(4 + 8 * u64::from(i));
        let id: u32 = self.mem.read_obj(at).expect("used id");
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).expect("used len");
        (id, len)
    }
}

/// Read `len` bytes of guest memory.
pub fn read(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out, GuestAddress(addr)).expect("read");
    out
}

/// A frame with a virtio-net header (all zero) and `payload_len` patterned bytes.
pub fn frame(payload_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; crate::ring::VNET_HDR_LEN];
    f.extend((0..payload_len).map(|i| i as u8));
    f
}

#[allow(dead_code)]
pub fn queue_size(q: &Queue) -> u16 {
    q.size()
}
