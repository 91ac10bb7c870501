//! KVM's dirty page log over guest RAM, for pre-copy: while it is on, `KVM_GET_DIRTY_LOG`
//! returns (and clears) the pages the vCPUs wrote since the last call. It sees vCPU writes
//! only: a vhost-user backend writes guest memory through its own mapping, which KVM does not
//! track (see `send::precopy_blockers`).

use std::hash::Hasher;

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
    #[error("KVM_GET_DIRTY_LOG for guest RAM at {addr:#x} failed")]
    Read {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Each region's dirty pages: one bit per page, in region order.
pub type Bitmaps = Vec<Vec<u64>>;

/// Dirty logging on every memslot of `memory` (slot = region index, as `vm::register_memory`
/// numbers them) until dropped.
pub struct DirtyLog<'a> {
    vm: &'a VmFd,
    memory: &'a GuestMemory,
}

impl<'a> DirtyLog<'a> {
    /// Turns dirty logging on; the first `take` then returns what was written since.
    pub fn start(vm: &'a VmFd, memory: &'a GuestMemory) -> Result<Self, DirtyLogError> {
        switch(vm, memory, true)?;
        Ok(Self { vm, memory })
    }

    /// The pages written since the last call (or `start`), and clears them.
    pub fn take(&self) -> Result<Bitmaps, DirtyLogError> {
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
