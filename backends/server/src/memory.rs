//! The guest memory the frontend shares (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) and the
//! translation of the frontend's own addresses, in which it names the rings, to guest addresses.

use std::fs::File;
use std::sync::Arc;

use super::fdcheck::{check_mappable, FdCheckError};
use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserSingleMemoryRegion};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};

/// Regions the backend accepts (GET_MAX_MEM_SLOTS), the number QEMU's vhost-user uses.
pub const MAX_MEM_SLOTS: u64 = 509;

/// Why a memory update was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map the region at guest address {gpa:#x} ({size} bytes)")]
    Map {
        gpa: u64,
        size: u64,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("refusing the file of the region at guest address {gpa:#x} ({size} bytes)")]
    Unmappable {
        gpa: u64,
        size: u64,
        #[source]
        source: FdCheckError,
    },
    #[error("region at guest address {gpa:#x} ({size} bytes) is empty or wraps around")]
    Invalid { gpa: u64, size: u64 },
    #[error("regions overlap or exceed the slot limit")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    #[error("no region at guest address {gpa:#x} with {size} bytes to remove")]
    NoSuchRegion { gpa: u64, size: u64 },
    #[error("already {MAX_MEM_SLOTS} regions")]
    TooManyRegions,
    #[error("frontend address {0:#x} is in no memory region")]
    Unmapped(u64),
}

/// One region as the frontend sees it.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    frontend_addr: u64,
    gpa: u64,
    size: u64,
}

/// The current guest memory, shared with the queue workers through `GuestMemoryAtomic`.
pub struct MemoryTable {
    atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    mappings: Vec<Mapping>,
}

impl Default for MemoryTable {
    fn default() -> Self {
        MemoryTable {
            atomic: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            mappings: Vec::new(),
        }
    }
}

/// Map one region of `file` after checking it stays backed (see fdcheck.rs: a region past the
/// end of its file, or a memfd the frontend may shrink, would kill the daemon with SIGBUS).
fn map_region(region: &VhostUserMemoryRegion, file: File) -> Result<GuestRegionMmap, MemoryError> {
    let (gpa, size) = (region.guest_phys_addr, region.memory_size);
    if size == 0 || gpa.checked_add(size).is_none() {
        return Err(MemoryError::Invalid { gpa, size });
    }
    check_mappable(&file, region.mmap_offset, size).map_err(|source| MemoryError::Unmappable {
        gpa,
        size,
        source,
    })?;
    let map = region
        .mmap_region(file)
        .map_err(|source| MemoryError::Map { gpa, size, source })?;
    GuestRegionMmap::new(map, GuestAddress(gpa)).ok_or(MemoryError::Invalid { gpa, size })
}

impl MemoryTable {
    /// The handle workers read guest memory through; it follows every update.
    pub fn atomic(&self) -> GuestMemoryAtomic<GuestMemoryMmap> {
        self.atomic.clone()
    }

    fn publish(&self, mem: GuestMemoryMmap) {
        // A poisoned lock only means a worker panicked while holding it; the map is still whole.
        match self.atomic.lock() {
            Ok(guard) => guard.replace(mem),
            Err(poisoned) => poisoned.into_inner().replace(mem),
        }
    }

    /// Replace the whole table (SET_MEM_TABLE).
    pub fn set(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        let mut mapped = Vec::with_capacity(regions.len());
        let mut mappings = Vec::with_capacity(regions.len());
        for (region, file) in regions.iter().zip(files) {
            let (gpa, size) = (region.guest_phys_addr, region.memory_size);
            mapped.push(map_region(region, file)?);
            mappings.push(Mapping {
                frontend_addr: region.user_addr,
                gpa,
                size,
            });
        }
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(MemoryError::Layout)?;
        self.publish(mem);
        self.mappings = mappings;
        Ok(())
    }

    /// Add one region (ADD_MEM_REG).
    pub fn add(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
    ) -> Result<(), MemoryError> {
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions);
        }
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        let mapped = map_region(region, file)?;
        let mem = self
            .atomic
            .memory()
            .insert_region(Arc::new(mapped))
            .map_err(MemoryError::Layout)?;
        self.publish(mem);
        self.mappings.push(Mapping {
            frontend_addr: region.user_addr,
            gpa,
            size,
        });
        Ok(())
    }

    /// Remove one region (REM_MEM_REG).
    pub fn remove(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<(), MemoryError> {
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        let (mem, _) = self
            .atomic
            .memory()
            .remove_region(GuestAddress(gpa), size)
            .map_err(|_| MemoryError::NoSuchRegion { gpa, size })?;
        self.publish(mem);
        self.mappings.retain(|m| m.gpa != gpa);
        Ok(())
    }

    /// The guest address of frontend address `addr` (how SET_VRING_ADDR names the rings).
    pub fn to_guest(&self, addr: u64) -> Result<GuestAddress, MemoryError> {
        self.mappings
            .iter()
            .find(|m| addr >= m.frontend_addr && addr - m.frontend_addr < m.size)
            .map(|m| GuestAddress(m.gpa + (addr - m.frontend_addr)))
            .ok_or(MemoryError::Unmapped(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddressSpace};

    /// A region longer than its file used to be mapped, and the first access to its tail
    /// killed the daemon with SIGBUS (found by the vhost_user_messages fuzz target).
    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        let file = tempfile_of(0x2000);
        let region = |size, offset| VhostUserMemoryRegion::new(0, size, 0x7f00_0000_0000, offset);
        let mut table = MemoryTable::default();
        for (size, offset) in [(0x3000, 0), (0x2000, 0x1000), (u64::MAX, 0x1000)] {
            let err = table
                .set(&[region(size, offset)], vec![file.try_clone().unwrap()])
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    MemoryError::Unmappable {
                        source: FdCheckError::BeyondEnd {
                            file_len: 0x2000,
                            ..
                        },
                        ..
                    }
                ),
                "{err}"
            );
        }
        table
            .set(&[region(0x1000, 0x1000)], vec![file.try_clone().unwrap()])
            .unwrap();
        let single = VhostUserSingleMemoryRegion::new(0x10000, 0x2000, 0x7f00_1000_0000, 0x1000);
        let err = table.add(&single, file.try_clone().unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                MemoryError::Unmappable {
                    source: FdCheckError::BeyondEnd { .. },
                    ..
                }
            ),
            "{err}"
        );
        // The accepted region is all readable.
        let mut byte = [0u8; 1];
        table
            .atomic()
            .memory()
            .read_slice(&mut byte, GuestAddress(0xfff))
            .unwrap();
    }

    /// A memfd of `len` bytes, sealed against shrinking and growing as a frontend's must be.
    fn tempfile_of(len: u64) -> File {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked below.
        let fd = unsafe { libc::memfd_create(c"memory-test".as_ptr(), flags) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len).unwrap();
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: fcntl on a descriptor this test owns, with an integer argument.
        let sealed = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(sealed, 0);
        file
    }
}
