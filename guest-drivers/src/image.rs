//! The guest image's extent (from linker-script symbols) and the heap placed right above it.

use crate::bootinfo::BootInfo;
use crate::bump::HEAP;

extern "C" {
    /// First byte of the image (link.ld: the load address, 1 MiB).
    static __image_start: u8;
    /// End of the image including .bss and the stacks, page aligned (link.ld).
    static __image_end: u8;
}

/// `[start, end)` of the loaded image.
pub fn extent() -> (u64, u64) {
    // Only the symbols' addresses are taken, never their contents, which needs no unsafe.
    (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    )
}

/// `[image start, end of what the heap has handed out)`: memory that must not be reused.
pub fn in_use() -> (u64, u64) {
    let (start, end) = extent();
    (start, end.max(HEAP.next_free()))
}

/// Gives the heap the rest of the RAM range the image sits in (within the identity map).
pub fn init_heap(boot: &BootInfo) {
    let (_, end) = extent();
    let limit = boot
        .memmap
        .iter()
        .find(|e| e.is_ram() && e.addr <= end && end < e.end())
        .map_or(end, |e| e.end().min(boot.mapped_end));
    HEAP.init(end, limit);
}
