//! TSC frequency (for timeouts and latency reports) and TSC-based deadlines.
//!
//! The frequency comes from, in order: the `tsc_khz=` command-line option; the hypervisor
//! timing leaf CPUID 0x4000_0010 (EAX = TSC kHz; KVM/VMware convention, when the hypervisor's
//! leaf 0x4000_0000 reports it); CPUID 0x15 (crystal Hz x EBX / EAX); CPUID 0x16 (base MHz).
//! Without any of them the guest assumes 3 GHz and says so (`tsc_source` = `"assumed"`):
//! timeouts then last longer than nominal on a slower TSC, never shorter.

use crate::cpu::rdtsc;
use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicU64, Ordering};

const ASSUMED_HZ: u64 = 3_000_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static SOURCE: AtomicU64 = AtomicU64::new(0);

const SOURCES: [&str; 6] = [
    "assumed",
    "cmdline",
    "cpuid_0x40000010",
    "cpuid_0x15",
    "cpuid_0x16",
    "assumed",
];

/// Decides the TSC frequency once; `cmdline_khz` is the `tsc_khz=` option if given.
pub fn init(cmdline_khz: Option<u64>) {
    let (hz, source) = match cmdline_khz.filter(|&k| k > 0) {
        Some(khz) => (khz.saturating_mul(1000), 1),
        None => match detect() {
            Some((hz, source)) => (hz, source),
            None => (ASSUMED_HZ, 5),
        },
    };
    TSC_HZ.store(hz, Ordering::Relaxed);
    SOURCE.store(source, Ordering::Relaxed);
}

fn detect() -> Option<(u64, u64)> {
    let max_basic = __cpuid(0).eax;
    let hv = __cpuid(1).ecx & (1 << 31) != 0;
    if hv {
        let max_hv = __cpuid(0x4000_0000).eax;
        if (0x4000_0010..0x4000_0100).contains(&max_hv) {
            let khz = u64::from(__cpuid(0x4000_0010).eax);
            if khz > 0 {
                return Some((khz * 1000, 2));
            }
        }
    }
    if max_basic >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return Some((u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax), 3));
        }
    }
    if max_basic >= 0x16 {
        let mhz = u64::from(__cpuid(0x16).eax & 0xffff);
        if mhz > 0 {
            return Some((mhz * 1_000_000, 4));
        }
    }
    None
}

/// TSC ticks per second (after `init`; the assumed value before).
pub fn tsc_hz() -> u64 {
    match TSC_HZ.load(Ordering::Relaxed) {
        0 => ASSUMED_HZ,
        hz => hz,
    }
}

/// Where the frequency came from, for reports.
pub fn source() -> &'static str {
    SOURCES[SOURCE.load(Ordering::Relaxed) as usize % SOURCES.len()]
}

/// TSC ticks in `ms` milliseconds.
pub fn ms_to_ticks(ms: u64) -> u64 {
    tsc_hz() / 1000 * ms
}

/// Converts TSC ticks to microseconds.
pub fn ticks_to_us(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(tsc_hz())) as u64
}

/// Current TSC value.
pub fn now() -> u64 {
    rdtsc()
}
