//! A split virtqueue laid out in guest RAM and driven the way a guest driver would: the test
//! plays the driver (and, for takeover tests, an earlier backend).

use std::sync::atomic::{fence, Ordering};

use vhost::VringConfigData;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::ram::GuestRam;

/// Descriptor flags (virtio spec 2.7.5).
pub const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// A split virtqueue at `base`: descriptor table, then avail ring, then the used ring on the
/// next 4 KiB boundary. The test plays the driver.
pub struct SplitVring {
    mem: GuestMemoryMmap,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl SplitVring {
    /// Lay out (and zero) a queue of `size` entries at `base`.
    pub fn new(ram: &GuestRam, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
        let end = used + 6 + 8 * u64::from(size);
        ram.fill(base, (end - base) as usize, 0);
        SplitVring {
            mem: ram.mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// This process's address of guest address `gpa` (what a VMM puts in SET_VRING_ADDR).
    fn host_addr(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("guest address {gpa:#x} is not in guest RAM: {e}"))
            as u64
    }

    /// SET_VRING_ADDR data, in this process's addresses as a VMM would send them.
    pub fn config(&self) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: self.host_addr(self.desc),
            used_ring_addr: self.host_addr(self.used),
            avail_ring_addr: self.host_addr(self.avail),
            log_addr: None,
        }
    }

    /// Put a chain of `(gpa, len, device_writable)` buffers in the table and make it
    /// available; returns its head index.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            let next = (idx + 1) % self.size;
            let at = self.desc + 16 * u64::from(idx);
            let m = &self.mem;
            m.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
            m.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
            m.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
            m.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        // The ring entry must be visible before the index that publishes it.
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        head
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        u16::from_le(self.mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// Used ring entry `i`: (descriptor head, bytes written).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// EVENT_IDX: ask for an interrupt once the used index passes `idx`.
    pub fn set_used_event(&self, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(idx.to_le(), GuestAddress(at)).unwrap();
        fence(Ordering::SeqCst);
    }
}

impl SplitVring {
    /// Play a backend that completed `head`: append it to the used ring and bump the index.
    pub fn push_used(&self, head: u16, len: u32) {
        let idx = self.used_idx();
        let at = self.used + 4 + 8 * u64::from(idx % self.size);
        let m = &self.mem;
        m.write_obj(u32::from(head).to_le(), GuestAddress(at))
            .unwrap();
        m.write_obj(len.to_le(), GuestAddress(at + 4)).unwrap();
        fence(Ordering::SeqCst);
        m.write_obj(idx.wrapping_add(1).to_le(), GuestAddress(self.used + 2))
            .unwrap();
        fence(Ordering::SeqCst);
    }

    /// The heads of used entries `from..to`, in ring order.
    pub fn used_heads(&self, from: u16, to: u16) -> Vec<u16> {
        (from..to).map(|i| self.used_elem(i).0 as u16).collect()
    }

    /// Write the avail index as it is, without a descriptor behind it (a lying guest).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
    }

    /// The driver goes on making chains available from avail index `idx` (a ring taken over
    /// from earlier backends; see `set_position` for what guest memory says).
    pub fn continue_from(&mut self, idx: u16) {
        self.avail_idx = idx;
    }

    /// Write `avail.idx == used.idx == idx` into guest memory (the driver's own count is
    /// untouched): what a takeover finds once the old backend's last completions landed.
    pub fn set_position(&self, idx: u16) {
        self.set_avail_idx(idx);
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.used + 2))
            .unwrap();
        fence(Ordering::SeqCst);
    }
}
