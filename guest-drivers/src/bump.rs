//! A bump allocator over the RAM right above the guest image, for memory that lives as long as
//! the guest (virtqueues, DMA buffers). Allocation never frees; any vCPU may allocate.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

pub struct Bump {
    next: AtomicU64,
    end: AtomicU64,
}

/// The guest's heap; empty until `init`.
pub static HEAP: Bump = Bump {
    next: AtomicU64::new(0),
    end: AtomicU64::new(0),
};

impl Bump {
    /// Hands `[start, end)` (guest-physical, identity mapped, unused) to the allocator.
    pub fn init(&self, start: u64, end: u64) {
        self.end.store(end, Ordering::Relaxed);
        self.next.store(start, Ordering::Release);
    }

    /// Allocates `size` zeroed bytes aligned to `align` (a power of two); `None` when full.
    /// The address is guest-physical as well as virtual, so it can go to a device as is.
    #[allow(dead_code)]
    pub fn alloc(&self, size: u64, align: u64) -> Option<NonNull<u8>> {
        debug_assert!(align.is_power_of_two());
        let end = self.end.load(Ordering::Relaxed);
        let mut next = self.next.load(Ordering::Acquire);
        let start = loop {
            let start = next.checked_add(align - 1)? & !(align - 1);
            let new_next = start.checked_add(size).filter(|&n| n <= end)?;
            match self.next.compare_exchange_weak(
                next,
                new_next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break start,
                Err(current) => next = current,
            }
        };
        let ptr = NonNull::new(start as *mut u8)?;
        // SAFETY: [start, start + size) is unused RAM inside the heap range given to `init`,
        // identity mapped and writable at CPL 3, and now owned by this allocation alone.
        unsafe { core::ptr::write_bytes(ptr.as_ptr(), 0, size as usize) };
        Some(ptr)
    }

    /// The first address not yet handed out: `[image start, this)` is in use.
    pub fn next_free(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }
}
