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
