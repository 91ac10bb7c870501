//! Frontend-side test helper: guest RAM in a memfd (shareable over vhost-user) and a split
//! virtqueue laid out in it, driven the way a guest driver would.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};

use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Descriptor flags (virtio spec 2.7.5).
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// Guest memory backed by a memfd, mapped shared in this process.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub gpa: u64,
    pub size: u64,
    file: File,
}

impl GuestRam {
    /// RAM in a memfd sealed against resizing, as a VMM shares it.
    pub fn new(gpa: u64, size: u64) -> Self {
        let ram = Self::unsealed(gpa, size);
        seal_size(&ram.file);
        ram
    }

    /// RAM in a memfd the frontend could still shrink (the daemon must refuse it).
    pub fn unsealed(gpa: u64, size: u64) -> Self {
        // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"splitvisor-test-ram".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(gpa),
            size as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        GuestRam {
            mem,
            gpa,
            size,
            file,
        }
    }

    /// The memfd itself (for tests that resize or misdescribe it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// This process's address of guest address `gpa`.
    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    /// The region for SET_MEM_TABLE (userspace_addr is our own mapping address).
    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.host_addr(self.gpa),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(gpa))
            .unwrap();
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }
}

/// Seal `file` against shrinking and growing, as the splitvisor VMM and QEMU seal guest RAM.
pub fn seal_size(file: &File) {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    // SAFETY: F_ADD_SEALS on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(rc, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
}

/// A split virtqueue at `base`: descriptor table, then avail ring, then the used ring on the
/// next 4 KiB boundary. The test plays the driver.
pub struct SplitVring<'a> {
    ram: &'a GuestRam,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> SplitVring<'a> {
    /// Lay out (and zero) a queue of `size` entries at `base`.
    pub fn new(ram: &'a GuestRam, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
        let end = used + 6 + 8 * u64::from(size);
        ram.fill(base, (end - base) as usize, 0);
        SplitVring {
            ram,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// SET_VRING_ADDR data, in this process's addresses as a VMM would send them.
    pub fn config(&self) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: self.ram.host_addr(self.desc),
            used_ring_addr: self.ram.host_addr(self.used),
            avail_ring_addr: self.ram.host_addr(self.avail),
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
            let m = &self.ram.mem;
            m.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
            m.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
            m.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
            m.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.ram
            .mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        // The ring entry must be visible before the index that publishes it.
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.ram
            .mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        head
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        u16::from_le(self.ram.mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// Used ring entry `i`: (descriptor head, bytes written).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.ram.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.ram.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// EVENT_IDX: ask for an interrupt once the used index passes `idx`.
    pub fn set_used_event(&self, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.ram
            .mem
            .write_obj(idx.to_le(), GuestAddress(at))
            .unwrap();
        fence(Ordering::SeqCst);
    }
}

impl SplitVring<'_> {
    /// Play a backend that completed `head`: append it to the used ring and bump the index.
    pub fn push_used(&self, head: u16, len: u32) {
        let idx = self.used_idx();
        let at = self.used + 4 + 8 * u64::from(idx % self.size);
        let m = &self.ram.mem;
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
}
