//! Guest RAM for a test frontend: a memfd (shareable over vhost-user) mapped in the test
//! process, sealed against resizing as a VMM seals it, or left unsealed for tests of refusal.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
