//! `selftest`: checks that every vCPU reached CPL 3 and that all RAM outside the guest's own
//! image holds what is written to it.

use super::{no_params, Context, Outcome, Task};
use crate::bootinfo::MIB;
use crate::json::Report;
use crate::{image, println, smp};

/// How long the BSP waits for the APs: 5e9 TSC ticks is 1.5-5 s on any TSC of 1-3.5 GHz.
const AP_TIMEOUT_TSC: u64 = 5_000_000_000;
/// Mixed into the address-derived pattern so that a word holding its own address (a stuck
/// or aliased line that happens to read back the address) does not pass.
const PATTERN_SEED: u64 = 0xa5a5_5a5a_c3c3_3c3c;

pub fn run(task: &Task, ctx: &Context, report: &mut Report) -> Outcome {
    if let Err(outcome) = no_params(task, report) {
        return outcome;
    }
    let vcpus = ctx.boot.vcpus;
    let aps_ok = check_aps(vcpus, report);
    let mem_ok = check_memory(ctx, report);
    if aps_ok && mem_ok {
        Outcome::Pass
    } else {
        Outcome::Fail
    }
}

fn check_aps(vcpus: u32, report: &mut Report) -> bool {
    let expected = vcpus.saturating_sub(1);
    println!("selftest: waiting for {expected} application processor(s)");
    let online = smp::wait_for_aps(expected, AP_TIMEOUT_TSC);
    report.u64("vcpus_online", u64::from(online) + 1);
    println!("selftest: {} of {vcpus} vCPU(s) reached CPL 3", online + 1);
    if online < expected {
        report.str(
            "error",
            format_args!(
                "only {} of {vcpus} vCPUs checked in (AP timeout)",
                online + 1
            ),
        );
        return false;
    }
    true
}

/// The first mismatching word, and how many there were.
struct Mismatch {
    addr: u64,
    expected: u64,
    found: u64,
    count: u64,
}

fn check_memory(ctx: &Context, report: &mut Report) -> bool {
    // Leave alone: the VMM's boot tables below 1 MiB, and our image, stacks and heap.
    let (image_start, in_use_end) = image::in_use();
    let mut tested = 0u64;
    let mut mismatch: Option<Mismatch> = None;
    for entry in ctx.boot.memmap.iter().filter(|e| e.is_ram()) {
        let start = entry.addr.max(MIB);
        let end = entry.end().min(ctx.boot.mapped_end);
        for (from, to) in [(start, end.min(image_start)), (start.max(in_use_end), end)] {
            let (from, to) = ((from + 7) & !7, to & !7);
            if from >= to {
                continue;
            }
            println!("selftest: testing memory [{from:#x}, {to:#x})");
            tested += to - from;
            // SAFETY: [from, to) is e820 RAM, identity mapped and writable at CPL 3, and
            // outside everything the guest or the VMM's boot structures use.
            let result = unsafe { test_range(from, to) };
            match (&mut mismatch, result) {
                (Some(first), Some(m)) => first.count += m.count,
                (None, Some(m)) => mismatch = Some(m),
                (_, None) => {}
            }
        }
    }
    report.u64("memory_tested_mib", tested / MIB);
    println!("selftest: tested {} MiB of RAM", tested / MIB);
    if ctx.boot.mapped_end != u64::MAX {
        report.bool(
            "memory_above_4g_skipped",
            ctx.boot
                .memmap
                .iter()
                .any(|e| e.is_ram() && e.end() > ctx.boot.mapped_end),
        );
    }
    match mismatch {
        None => true,
        Some(m) => {
            report.u64("memory_mismatches", m.count);
            report.str(
                "error",
                format_args!(
                    "memory mismatch at {:#x}: wrote {:#x}, read {:#x} ({} bad words)",
                    m.addr, m.expected, m.found, m.count
                ),
            );
            false
        }
    }
}

/// Fills `[from, to)` (8-byte aligned) with address-derived words, then reads them back.
///
/// # Safety
/// The range must be mapped, writable, and not used by anything else.
unsafe fn test_range(from: u64, to: u64) -> Option<Mismatch> {
    let words = ((to - from) / 8) as usize;
    let base = from as *mut u64;
    for i in 0..words {
        let addr = from + 8 * i as u64;
        // SAFETY: i < words keeps the write inside [from, to), which the caller vouches for.
        // Volatile, so the compiler can neither drop the writes nor fold the reads below.
        unsafe { base.add(i).write_volatile(addr ^ PATTERN_SEED) };
    }
    let mut mismatch: Option<Mismatch> = None;
    for i in 0..words {
        let addr = from + 8 * i as u64;
        let expected = addr ^ PATTERN_SEED;
        // SAFETY: as above.
        let found = unsafe { base.add(i).read_volatile() };
        if found != expected {
            match &mut mismatch {
                Some(m) => m.count += 1,
                None => {
                    mismatch = Some(Mismatch {
                        addr,
                        expected,
                        found,
                        count: 1,
                    })
                }
            }
        }
    }
    mismatch
}
