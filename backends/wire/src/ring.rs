//! Split-virtqueue layout (virtio 1.x, 2.7): the sizes and offsets of the descriptor table,
//! the available ring and the used ring, derived from virtio-bindings' `vring_*` structs so
//! that nobody counts bytes by hand. Offsets are `u64` (guest addresses are added to them);
//! `size` is the queue size in descriptors. Every ring is sized with its event-index word
//! (`used_event` / `avail_event`), which a driver lays out whether or not EVENT_IDX is used.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_ring::{vring_avail, vring_desc, vring_used, vring_used_elem};

/// Bytes of one descriptor.
pub const DESC_SIZE: u64 = size_of::<vring_desc>() as u64;
/// Bytes of the available ring's header (`flags`, `idx`).
pub const AVAIL_HEADER: u64 = offset_of!(vring_avail, ring) as u64;
/// Offset of the available ring's `idx`.
pub const AVAIL_IDX: u64 = offset_of!(vring_avail, idx) as u64;
/// Bytes of one available-ring entry (a descriptor head index).
pub const AVAIL_ELEM: u64 = size_of::<u16>() as u64;
/// Bytes of the used ring's header (`flags`, `idx`).
pub const USED_HEADER: u64 = offset_of!(vring_used, ring) as u64;
/// Offset of the used ring's `idx`.
pub const USED_IDX: u64 = offset_of!(vring_used, idx) as u64;
/// Bytes of one used-ring element (`id`, `len`).
pub const USED_ELEM: u64 = size_of::<vring_used_elem>() as u64;
/// Bytes of the event-index word after each ring.
pub const EVENT_SIZE: u64 = size_of::<u16>() as u64;

/// Bytes of a descriptor table of `size` entries.
pub const fn desc_table_len(size: u16) -> u64 {
    DESC_SIZE * size as u64
}

/// Offset of available-ring entry `slot` (taken modulo nothing: the caller wraps it).
pub const fn avail_entry(slot: u16) -> u64 {
    AVAIL_HEADER + AVAIL_ELEM * slot as u64
}

/// Offset of `used_event`, the word after the available ring's `size` entries.
pub const fn used_event(size: u16) -> u64 {
    avail_entry(size)
}

/// Bytes of an available ring of `size` entries, `used_event` included.
pub const fn avail_ring_len(size: u16) -> u64 {
    used_event(size) + EVENT_SIZE
}

/// Offset of used-ring element `slot`.
pub const fn used_elem(slot: u16) -> u64 {
    USED_HEADER + USED_ELEM * slot as u64
}

/// Offset of `avail_event`, the word after the used ring's `size` elements.
pub const fn avail_event(size: u16) -> u64 {
    used_elem(size)
}

/// Bytes of a used ring of `size` elements, `avail_event` included.
pub const fn used_ring_len(size: u16) -> u64 {
    avail_event(size) + EVENT_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec() {
        // virtio 1.1, 2.7.5-2.7.8: 16-byte descriptors, 2-byte avail entries after flags and
        // idx, 8-byte used elements, and one event word after each ring.
        assert_eq!(
            (DESC_SIZE, AVAIL_HEADER, AVAIL_IDX, AVAIL_ELEM),
            (16, 4, 2, 2)
        );
        assert_eq!((USED_HEADER, USED_IDX, USED_ELEM, EVENT_SIZE), (4, 2, 8, 2));
        assert_eq!(desc_table_len(256), 4096);
        assert_eq!(avail_entry(3), 10);
        assert_eq!((used_event(256), avail_ring_len(256)), (516, 518));
        assert_eq!(used_elem(1), 12);
        assert_eq!((avail_event(256), used_ring_len(256)), (2052, 2054));
        assert_eq!(desc_table_len(u16::MAX), 16 * 65535);
    }
}
