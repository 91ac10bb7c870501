//! What the VMM counted while the VM ran - exits by kind and by device, interrupts per virtio
//! device - as one JSON object, printed by `run --stats` and read by `splitvisor bench`.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::attach::AttachedDevice;
use crate::bus::Bus;
use crate::vcpu::ExitCounters;

/// The line prefix `run --stats` prints before the JSON.
pub const STATS_PREFIX: &str = "VMM-STATS ";

pub fn snapshot(exits: &ExitCounters, pio: &Bus, mmio: &Bus, devices: &[AttachedDevice]) -> Value {
    let by_device = |bus: &Bus| {
        let (devices, unclaimed) = bus.exit_counts();
        let mut map = serde_json::Map::new();
        for d in devices {
            map.insert(d.name, json!(d.exits));
        }
        map.insert("unclaimed".into(), json!(unclaimed));
        Value::Object(map)
    };
    let virtio: Vec<Value> = devices
        .iter()
        .map(|d| {
            json!({
                "id": d.id,
                "used_buffer_interrupts": d.interrupt.used_buffer_interrupts.load(Ordering::Relaxed),
                "config_interrupts": d.interrupt.config_interrupts.load(Ordering::Relaxed),
                "needs_reset": d.interrupt.needs_reset(),
            })
        })
        .collect();
    json!({
        "exits": {
            "pio": exits.pio.load(Ordering::Relaxed),
            "mmio": exits.mmio.load(Ordering::Relaxed),
            "other": exits.other.load(Ordering::Relaxed),
            "pio_by_device": by_device(pio),
            "mmio_by_device": by_device(mmio),
        },
        "virtio": virtio,
    })
}
