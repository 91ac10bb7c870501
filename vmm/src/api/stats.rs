//! What the VMM counted while the VM ran - exits by kind and by device, interrupts per virtio
//! device - as one JSON object, printed by `run --stats` and read by `splitvisor bench`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::api::types::{ExitCounts, VirtioInterrupts, VmmCounters};
use crate::attach::AttachedDevice;
use crate::bus::Bus;
use crate::vcpu::ExitCounters;

/// The line prefix `run --stats` prints before the JSON.
pub const STATS_PREFIX: &str = "VMM-STATS ";

/// The counters as `run --stats` prints them.
pub fn snapshot(exits: &ExitCounters, pio: &Bus, mmio: &Bus, devices: &[AttachedDevice]) -> Value {
    json!(counters(exits, pio, mmio, devices))
}

/// Exits by kind and by device (with the accesses no device claimed as `unclaimed`), and each
/// virtio device's interrupts.
pub fn counters(
    exits: &ExitCounters,
    pio: &Bus,
    mmio: &Bus,
    devices: &[AttachedDevice],
) -> VmmCounters {
    let by_device = |bus: &Bus| {
        let (devices, unclaimed) = bus.exit_counts();
        let mut map: BTreeMap<String, u64> = devices
            .into_iter()
            .map(|d| (d.name.to_string(), d.exits))
            .collect();
        map.insert("unclaimed".into(), unclaimed);
        map
    };
    let virtio = devices
        .iter()
        .map(|d| VirtioInterrupts {
            id: d.id.clone(),
            used_buffer_interrupts: d.interrupt.used_buffer_interrupts.load(Ordering::Relaxed),
            config_interrupts: d.interrupt.config_interrupts.load(Ordering::Relaxed),
            needs_reset: d.interrupt.needs_reset(),
        })
        .collect();
    VmmCounters {
        exits: ExitCounts {
            pio: exits.pio.load(Ordering::Relaxed),
            mmio: exits.mmio.load(Ordering::Relaxed),
            other: exits.other.load(Ordering::Relaxed),
            pio_by_device: by_device(pio),
            mmio_by_device: by_device(mmio),
        },
        virtio,
    }
}
