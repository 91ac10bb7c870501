//! The dirty page logs pre-copy reads: KVM's over guest RAM (while it is on,
//! `KVM_GET_DIRTY_LOG` returns and clears the pages the vCPUs wrote since the last call) and
//! the vhost-user backends' (`BackendLog`): a backend writes guest memory through its own
//! mapping, which KVM does not see, so it logs its writes itself. A backend that cannot
//! keeps pre-copy off (`VmControl::precopy_blockers`).

use std::fs::File;
use std::hash::Hasher;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU8, Ordering};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;
use crate::snapshot::format::{MemoryLayout, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("KVM_SET_USER_MEMORY_REGION (dirty logging {}) for guest RAM at {addr:#x} failed", if *.on { "on" } else { "off" })]
    Switch {
        on: bool,
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("could not create the backends' dirty log")]
    BackendLog(#[source] std::io::Error),
    #[error("KVM_GET_DIRTY_LOG for guest RAM at {addr:#x} failed")]
    Read {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The vhost-user dirty log the backends write into (VHOST_USER_PROTOCOL_F_LOG_SHMFD): a
/// shared memfd, one bit per 4 KiB page of guest physical memory, which the VMM reads and
/// clears byte by byte with atomic swaps while the backends set bits.
pub struct BackendLog {
    file: File,
    bytes: *const AtomicU8,
    len: usize,
}

// SAFETY: the mapping is only accessed with atomic byte operations and lives until drop.
unsafe impl Send for BackendLog {}
// SAFETY: as above.
unsafe impl Sync for BackendLog {}

impl BackendLog {
    /// A zeroed log covering guest physical memory up to the end of `memory`'s last region.
    pub fn new(memory: &GuestMemory) -> Result<Self, DirtyLogError> {
        let end = memory
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0);
        let pages = end.div_ceil(PAGE_SIZE);
        let len = usize::try_from(pages.div_ceil(8).max(1)).map_err(|_| {
            DirtyLogError::BackendLog(std::io::Error::from_raw_os_error(libc::EINVAL))
        })?;
        // SAFETY: a constant NUL-terminated name and plain flags.
        let fd = unsafe { libc::memfd_create(c"splitvisor-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(DirtyLogError::BackendLog(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)
            .map_err(DirtyLogError::BackendLog)?;
        // SAFETY: a fresh shared mapping of the whole file, unmapped only in `drop`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyLogError::BackendLog(std::io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            bytes: ptr.cast(),
            len,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// Moves the pages logged since the last call into `bitmaps` (one per region of `memory`).
    pub fn take_into(&self, memory: &GuestMemory, bitmaps: &mut Bitmaps) {
        let regions: Vec<(u64, u64)> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
        for index in 0..self.len {
            // SAFETY: `index` is inside the mapping of `len` bytes.
            let byte = unsafe { &*self.bytes.add(index) };
            if byte.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let bits = byte.swap(0, Ordering::Relaxed);
            for bit in (0..8).filter(|b| bits & (1 << b) != 0) {
                let addr = (index as u64 * 8 + bit) * PAGE_SIZE;
                let found = regions
                    .iter()
                    .enumerate()
                    .find(|(_, (start, len))| addr >= *start && addr < start + len);
                if let Some((r, (start, _))) = found {
                    let page = (addr - start) / PAGE_SIZE;
                    if let Some(word) = bitmaps
                        .get_mut(r)
                        .and_then(|b| b.get_mut((page / 64) as usize))
                    {
                        *word |= 1 << (page % 64);
                    }
                }
            }
        }
    }
}

impl Drop for BackendLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.bytes as *mut libc::c_void, self.len) };
    }
}

/// Each region's dirty pages: one bit per page, in region order.
pub type Bitmaps = Vec<Vec<u64>>;

/// Dirty logging on every memslot of `memory` (slot = region index, as `vm::register_memory`
/// numbers them) until dropped.
pub struct DirtyLog<'a> {
    vm: &'a VmFd,
    memory: &'a GuestMemory,
    /// The backends' log, merged into every `take`.
    pub backend: Option<BackendLog>,
}

impl<'a> DirtyLog<'a> {
    /// Turns dirty logging on; the first `take` then returns what was written since.
    pub fn start(vm: &'a VmFd, memory: &'a GuestMemory) -> Result<Self, DirtyLogError> {
        switch(vm, memory, true)?;
        Ok(Self {
            vm,
            memory,
            backend: None,
        })
    }

    /// The guest memory whose writes are logged.
    pub fn memory(&self) -> &'a GuestMemory {
        self.memory
    }

    /// The pages written since the last call (or `start`), and clears them.
    pub fn take(&self) -> Result<Bitmaps, DirtyLogError> {
        let mut bitmaps = self.take_kvm()?;
        if let Some(backend) = &self.backend {
            backend.take_into(self.memory, &mut bitmaps);
        }
        Ok(bitmaps)
    }

    fn take_kvm(&self) -> Result<Bitmaps, DirtyLogError> {
        self.memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                self.vm
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(|source| DirtyLogError::Read {
                        addr: region.start_addr().0,
                        source,
                    })
            })
            .collect()
    }
}

impl Drop for DirtyLog<'_> {
    fn drop(&mut self) {
        if let Err(e) = switch(self.vm, self.memory, false) {
            log::warn!("{}", crate::error_chain(&e));
        }
    }
}

fn switch(vm: &VmFd, memory: &GuestMemory, on: bool) -> Result<(), DirtyLogError> {
    for (slot, region) in memory.iter().enumerate() {
        let mapping = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the same slot, address range and mapping as registered at start (owned by
        // `memory`, alive as long as the VM); only the logging flag changes.
        unsafe { vm.set_user_memory_region(mapping) }.map_err(|source| DirtyLogError::Switch {
            on,
            addr: region.start_addr().0,
            source,
        })?;
    }
    Ok(())
}

/// `into |= from`, bitmap by bitmap.
pub fn merge(into: &mut Bitmaps, from: &Bitmaps) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= *y;
        }
    }
}

/// How many pages are set.
pub fn count(bitmaps: &Bitmaps) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// A digest of guest memory's content (the pages holding data, with their addresses), for
/// checking that a migrated VM's memory is the source's (`SPLITVISOR_MIGRATION_DIGEST`).
pub fn digest(memory: &GuestMemory) -> u64 {
    let regions = memory.iter().map(|r| (r.start_addr().0, r.len()));
    digest_pages(regions, |addr, page| {
        vm_memory::Bytes::read_slice(memory, page, vm_memory::GuestAddress(addr)).is_ok()
    })
}

/// The same digest of a snapshot memory file laid out as `layout` says (the destination's
/// staging copy, before it is restored).
pub fn digest_file(file: &std::fs::File, layout: &MemoryLayout) -> u64 {
    use std::os::unix::fs::FileExt;
    let regions = layout.regions.iter().map(|r| (r.guest_addr, r.size));
    digest_pages(regions, |addr, page| {
        layout
            .regions
            .iter()
            .find(|r| addr >= r.guest_addr && addr < r.guest_addr + r.size)
            .is_some_and(|r| {
                file.read_exact_at(page, r.file_offset + addr - r.guest_addr)
                    .is_ok()
            })
    })
}

/// Hashes every page that holds data with its guest address, region by region.
fn digest_pages(
    regions: impl Iterator<Item = (u64, u64)>,
    mut read: impl FnMut(u64, &mut [u8]) -> bool,
) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let zero = [0u8; PAGE_SIZE as usize];
    let mut page = [0u8; PAGE_SIZE as usize];
    for (base, len) in regions {
        for offset in (0..len).step_by(PAGE_SIZE as usize) {
            if !read(base + offset, &mut page) || page == zero {
                continue;
            }
            hasher.write_u64(base + offset);
            hasher.write(&page);
        }
    }
    hasher.finish()
}

/// With `SPLITVISOR_MIGRATION_DIGEST` set, prints a digest of guest memory as the VM
/// switches over (tests compare the source's with the destination's).
pub fn digest_hook(side: &str, digest: impl FnOnce() -> u64) {
    if std::env::var_os(DIGEST_ENV).is_some() {
        crate::eprintln_whole!("splitvisor: migration digest ({side}) {:016x}", digest());
    }
}

/// The environment variable that turns `digest_hook` on.
pub const DIGEST_ENV: &str = "SPLITVISOR_MIGRATION_DIGEST";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_merge_and_count() {
        let mut a: Bitmaps = vec![vec![0b1010, 0], vec![1]];
        merge(&mut a, &vec![vec![0b0110, 1 << 63], vec![0]]);
        assert_eq!(a, vec![vec![0b1110, 1 << 63], vec![1]]);
        assert_eq!(count(&a), 5);
    }
}
