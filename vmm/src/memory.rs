//! Guest RAM: one sealed memfd mapped `MAP_SHARED`, so that vhost-user backends can map the
//! very same pages from the file descriptor the VMM sends them.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout;

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("could not create the guest memory file (memfd_create)")]
    CreateMemfd(#[source] std::io::Error),
    #[error("could not size the guest memory file to {0} bytes")]
    SizeMemfd(u64, #[source] std::io::Error),
    #[error("could not seal the guest memory file's size")]
    SealMemfd(#[source] std::io::Error),
    #[error("could not allocate {0} bytes of guest memory up front (--prefault); the host may be short of memory")]
    Prefault(u64, #[source] std::io::Error),
    #[error("could not map {0} bytes of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
}

/// Creates guest RAM of `size` bytes laid out by `layout::ram_ranges`, backed by one memfd;
/// with `prefault`, every page is allocated up front.
pub fn create_guest_memory(size: u64, prefault: bool) -> Result<GuestMemory, MemoryError> {
    let file = create_sealed_memfd(c"splitvisor-guest-ram", size)?;
    let memory = map_guest_memory(&file, size)?;
    if prefault {
        populate(&memory)?;
    }
    Ok(memory)
}

/// Maps `file`, guest RAM of `size` bytes made by `create_guest_memory` (a live upgrade's
/// inherited memfd), with the same layout; its pages are the guest's as they were.
pub fn map_guest_memory(file: &File, size: u64) -> Result<GuestMemory, MemoryError> {
    let length = file
        .metadata()
        .map_err(|e| MemoryError::SizeMemfd(size, e))?
        .len();
    if length != size {
        return Err(MemoryError::SizeMemfd(
            size,
            std::io::Error::other(format!("the file has {length} bytes")),
        ));
    }
    let mut offset = 0;
    let mut ranges = Vec::new();
    for (start, len) in layout::ram_ranges(size) {
        let handle = file.try_clone().map_err(MemoryError::CreateMemfd)?;
        ranges.push((start, len as usize, Some(FileOffset::new(handle, offset))));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| MemoryError::Map(size, e))
}

/// Allocates every page now instead of at the guest's first touch, which on these hosts is a
/// costly fault per page (see PLATFORM.md): start-up takes longer, the guest runs faster.
fn populate(memory: &GuestMemory) -> Result<(), MemoryError> {
    use vm_memory::GuestMemoryBackend;
    for region in memory.iter() {
        // SAFETY: the range is exactly one live mapping owned by `memory`; MADV_POPULATE_WRITE
        // only faults its pages in and does not change their contents.
        let ret = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if ret != 0 {
            return Err(MemoryError::Prefault(
                region.len(),
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Total bytes of guest RAM.
pub fn total_size(memory: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryBackend;
    memory.iter().map(|region| region.len()).sum()
}

fn create_sealed_memfd(name: &CStr, size: u64) -> Result<File, MemoryError> {
    // SAFETY: `name` is a valid NUL-terminated string; the flags are plain constants.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::CreateMemfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| MemoryError::SizeMemfd(size, e))?;
    // Backends map this file; sealing its size means no peer can shrink it under the guest
    // (which would turn guest accesses into SIGBUS in the VMM).
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a valid fd with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(MemoryError::SealMemfd(std::io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[test]
    fn memory_is_file_backed_and_sealed() {
        let mem = create_guest_memory(32 << 20, true).unwrap();
        assert_eq!(total_size(&mem), 32 << 20);
        let region = mem.iter().next().unwrap();
        let fo = region.file_offset().expect("regions are memfd-backed");
        assert_eq!(fo.start(), 0);
        assert!(
            fo.file().set_len(1 << 20).is_err(),
            "shrinking must be sealed"
        );

        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // The same bytes are visible through the file, as a backend would see them.
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        fo.file().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }
}
