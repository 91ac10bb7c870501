//! Application processors: every AP enters at the same 64-bit entry as the BSP, reaches CPL 3
//! with its own GDT/TSS/IDT and stacks, checks in here and parks. The BSP counts check-ins.

use crate::cpu;
use core::sync::atomic::{AtomicU32, Ordering};

/// APs that reached CPL 3.
static APS_ONLINE: AtomicU32 = AtomicU32::new(0);

/// An AP's life at CPL 3: check in, then stop for good.
pub fn ap_main() -> ! {
    APS_ONLINE.fetch_add(1, Ordering::AcqRel);
    cpu::park()
}

/// Spins (at CPL 3, natively fast) until `expected` APs checked in or `timeout_tsc` TSC ticks
/// passed; returns how many checked in.
pub fn wait_for_aps(expected: u32, timeout_tsc: u64) -> u32 {
    let start = cpu::rdtsc();
    loop {
        let online = APS_ONLINE.load(Ordering::Acquire);
        if online >= expected || cpu::rdtsc().wrapping_sub(start) > timeout_tsc {
            return online;
        }
        core::hint::spin_loop();
    }
}
