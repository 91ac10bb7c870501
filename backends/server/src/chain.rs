//! Reading the descriptor chain of a head index from a split ring's descriptor table.
//!
//! virtio-queue only builds chains while popping the avail ring; resubmitting what an earlier
//! backend left in flight needs the chain of an arbitrary head, so every chain is read here,
//! with each index, length and loop bounded by the ring (never trusting guest memory).

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const DESC_LEN: u64 = 16;

/// Why a chain could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor index {index} is outside the ring of {size}")]
    IndexOutOfRange { index: u16, size: u16 },
    #[error("descriptor at {0:#x} is outside guest memory")]
    Unreadable(u64),
    #[error("chain is longer than its table ({0} descriptors): it loops")]
    Loop(u32),
    #[error("indirect descriptor without VIRTIO_F_INDIRECT_DESC negotiated")]
    IndirectNotNegotiated,
    #[error("indirect descriptor inside an indirect table or chained with NEXT")]
    NestedIndirect,
    #[error("indirect table length {0} is not a non-zero multiple of 16")]
    IndirectLength(u32),
}

/// Where the chains of one ring live.
#[derive(Debug, Clone, Copy)]
pub struct DescriptorTable {
    pub addr: GuestAddress,
    pub size: u16,
    /// VIRTIO_RING_F_INDIRECT_DESC was negotiated.
    pub indirect: bool,
}

impl DescriptorTable {
    /// The descriptors of the chain starting at `head`, indirect tables flattened.
    pub fn chain<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        head: u16,
    ) -> Result<Vec<Descriptor>, ChainError> {
        let first = read_desc(mem, self.addr, head, u32::from(self.size))?;
        if first.refers_to_indirect_table() {
            if !self.indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if first.has_next() {
                return Err(ChainError::NestedIndirect);
            }
            let len = first.len();
            if len == 0 || u64::from(len) % DESC_LEN != 0 {
                return Err(ChainError::IndirectLength(len));
            }
            let count = u64::from(len) / DESC_LEN;
            // An indirect table holds at most as many entries as the ring (spec 2.7.5.3.1).
            if count > u64::from(self.size) {
                return Err(ChainError::IndirectLength(len));
            }
            return walk(mem, first.addr(), 0, count as u32, true);
        }
        walk(mem, self.addr, head, u32::from(self.size), false)
    }
}

fn read_desc<M: GuestMemory + ?Sized>(
    mem: &M,
    table: GuestAddress,
    index: u16,
    entries: u32,
) -> Result<Descriptor, ChainError> {
    if u32::from(index) >= entries {
        return Err(ChainError::IndexOutOfRange {
            index,
            size: u16::try_from(entries).unwrap_or(u16::MAX),
        });
    }
    let at = table
        .0
        .checked_add(u64::from(index) * DESC_LEN)
        .ok_or(ChainError::Unreadable(table.0))?;
    // Descriptor stores its fields little-endian, as the ring does.
    mem.read_obj(GuestAddress(at))
        .map_err(|_| ChainError::Unreadable(at))
}

/// Follow NEXT links from `first` in a table of `entries` descriptors.
fn walk<M: GuestMemory + ?Sized>(
    mem: &M,
    table: GuestAddress,
    first: u16,
    entries: u32,
    in_indirect: bool,
) -> Result<Vec<Descriptor>, ChainError> {
    let mut chain = Vec::new();
    let mut index = first;
    loop {
        let desc = read_desc(mem, table, index, entries)?;
        if desc.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
            // Only the head of a ring chain may be indirect, and that case is handled above.
            return Err(if in_indirect {
                ChainError::NestedIndirect
            } else {
                ChainError::IndirectNotNegotiated
            });
        }
        chain.push(desc);
        if chain.len() as u32 > entries {
            return Err(ChainError::Loop(entries));
        }
        if desc.flags() & VRING_DESC_F_NEXT as u16 == 0 {
            return Ok(chain);
        }
        index = desc.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const TABLE: u64 = 0x1000;
    const INDIRECT: u64 = 0x4000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + u64::from(i) * 16;
        mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }

    fn table(indirect: bool) -> DescriptorTable {
        DescriptorTable {
            addr: GuestAddress(TABLE),
            size: 8,
            indirect,
        }
    }

    #[test]
    fn direct_chain_follows_next_links() {
        let m = mem();
        put(&m, TABLE, 3, 0x100, 16, VRING_DESC_F_NEXT as u16, 6);
        put(&m, TABLE, 6, 0x200, 512, VRING_DESC_F_NEXT as u16, 1);
        put(&m, TABLE, 1, 0x300, 1, 2, 0);
        let chain = table(false).chain(&m, 3).unwrap();
        let addrs: Vec<u64> = chain.iter().map(|d| d.addr().0).collect();
        assert_eq!(addrs, [0x100, 0x200, 0x300]);
        assert!(chain[2].is_write_only());
    }

    #[test]
    fn loops_and_bad_indices_are_errors() {
        let m = mem();
        put(&m, TABLE, 0, 0x100, 16, VRING_DESC_F_NEXT as u16, 1);
        put(&m, TABLE, 1, 0x100, 16, VRING_DESC_F_NEXT as u16, 0);
        assert_eq!(table(false).chain(&m, 0).unwrap_err(), ChainError::Loop(8));
        put(&m, TABLE, 1, 0x100, 16, VRING_DESC_F_NEXT as u16, 9);
        assert!(matches!(
            table(false).chain(&m, 0),
            Err(ChainError::IndexOutOfRange { index: 9, size: 8 })
        ));
        assert!(matches!(
            table(false).chain(&m, 8),
            Err(ChainError::IndexOutOfRange { index: 8, .. })
        ));
        let far = DescriptorTable {
            addr: GuestAddress(u64::MAX - 8),
            size: 8,
            indirect: false,
        };
        assert!(matches!(far.chain(&m, 0), Err(ChainError::Unreadable(_))));
    }

    #[test]
    fn indirect_tables_are_flattened_and_checked() {
        let m = mem();
        put(&m, INDIRECT, 0, 0x100, 16, VRING_DESC_F_NEXT as u16, 1);
        put(&m, INDIRECT, 1, 0x300, 1, 2, 0);
        put(&m, TABLE, 2, INDIRECT, 32, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(table(true).chain(&m, 2).unwrap().len(), 2);
        assert_eq!(
            table(false).chain(&m, 2).unwrap_err(),
            ChainError::IndirectNotNegotiated
        );
        put(&m, TABLE, 2, INDIRECT, 24, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(
            table(true).chain(&m, 2).unwrap_err(),
            ChainError::IndirectLength(24)
        );
        put(&m, INDIRECT, 1, 0x300, 16, VRING_DESC_F_INDIRECT as u16, 0);
        put(&m, TABLE, 2, INDIRECT, 32, VRING_DESC_F_INDIRECT as u16, 0);
        assert_eq!(
            table(true).chain(&m, 2).unwrap_err(),
            ChainError::NestedIndirect
        );
        // A NEXT link out of the indirect table's bounds.
        put(&m, INDIRECT, 1, 0x300, 1, VRING_DESC_F_NEXT as u16, 5);
        assert!(matches!(
            table(true).chain(&m, 2),
            Err(ChainError::IndexOutOfRange { index: 5, size: 2 })
        ));
    }
}
