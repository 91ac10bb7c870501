//! Address-range dispatch for the exits the VMM handles itself: one `Bus` for port I/O and one
//! for MMIO. The layout is fixed once the VM starts, so lookups take no lock; each device sits
//! behind its own mutex, and each range counts the exits it served.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A device on a bus; `offset` is relative to the start of the range it was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device '{new}' at {base:#x} (+{len:#x}) overlaps device '{existing}'")]
    Overlap {
        new: String,
        existing: String,
        base: u64,
        len: u64,
    },
    #[error("device '{0}' has an empty address range")]
    Empty(String),
}

struct Range {
    base: u64,
    len: u64,
    name: String,
    device: SharedDevice,
    exits: AtomicU64,
}

/// Exits served by one device, for `GET /metrics`-style reporting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceExits {
    pub name: String,
    pub exits: u64,
}

#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
    unhandled: AtomicU64,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        name: &str,
        device: SharedDevice,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(name.to_string()));
        }
        let end = base
            .checked_add(len)
            .ok_or_else(|| BusError::Empty(name.into()))?;
        if let Some(existing) = self
            .ranges
            .iter()
            .find(|r| base < r.base + r.len && r.base < end)
        {
            return Err(BusError::Overlap {
                new: name.to_string(),
                existing: existing.name.clone(),
                base,
                len,
            });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(
            at,
            Range {
                base,
                len,
                name: name.to_string(),
                device,
                exits: AtomicU64::new(0),
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<&Range> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let range = &self.ranges[idx];
        let end = addr.checked_add(size as u64)?;
        (end <= range.base + range.len).then_some(range)
    }

    /// Reads from the device at `addr`; returns false (and leaves `data` alone) if none is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some(range) => {
                range.exits.fetch_add(1, Ordering::Relaxed);
                lock(&range.device).read(addr - range.base, data);
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false if none is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some(range) => {
                range.exits.fetch_add(1, Ordering::Relaxed);
                lock(&range.device).write(addr - range.base, data);
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// A string instruction (`rep insw`): `data` holds `data.len() / width` reads of `width`
    /// bytes from the same address, all in one VM exit.
    pub fn read_repeated(&self, addr: u64, width: usize, data: &mut [u8]) -> bool {
        let Some(range) = self.find(addr, width) else {
            self.unhandled.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        range.exits.fetch_add(1, Ordering::Relaxed);
        let mut device = lock(&range.device);
        for item in data.chunks_mut(width.max(1)) {
            device.read(addr - range.base, item);
        }
        true
    }

    /// A string instruction (`rep outsw`): `data.len() / width` writes to the same address.
    pub fn write_repeated(&self, addr: u64, width: usize, data: &[u8]) -> bool {
        let Some(range) = self.find(addr, width) else {
            self.unhandled.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        range.exits.fetch_add(1, Ordering::Relaxed);
        let mut device = lock(&range.device);
        for item in data.chunks(width.max(1)) {
            device.write(addr - range.base, item);
        }
        true
    }

    /// Exits per device, in address order, then accesses that hit no device.
    pub fn exit_counts(&self) -> (Vec<DeviceExits>, u64) {
        let devices = self
            .ranges
            .iter()
            .map(|r| DeviceExits {
                name: r.name.clone(),
                exits: r.exits.load(Ordering::Relaxed),
            })
            .collect();
        (devices, self.unhandled.load(Ordering::Relaxed))
    }
}

/// A device that panicked while holding its lock left its state as it was; the VM is ending
/// anyway (the panic is reported by the vCPU), so later accesses just use that state.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn bus_with(devices: &[(u64, u64, &str)]) -> (Bus, Vec<Arc<Mutex<Probe>>>) {
        let mut bus = Bus::new();
        let mut probes = Vec::new();
        for (base, len, name) in devices {
            let probe = Arc::new(Mutex::new(Probe::default()));
            bus.insert(*base, *len, name, probe.clone()).unwrap();
            probes.push(probe);
        }
        (bus, probes)
    }

    #[test]
    fn accesses_reach_the_device_at_its_offset() {
        let (bus, probes) = bus_with(&[(0x3f8, 8, "serial"), (0xf4, 1, "debug-exit")]);
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0xf4, &[42]));
        assert_eq!(probes[1].lock().unwrap().last_write, Some((0, vec![42])));
        let (counts, unhandled) = bus.exit_counts();
        assert_eq!(
            counts.iter().map(|c| c.exits).collect::<Vec<_>>(),
            vec![1, 1]
        );
        assert_eq!(unhandled, 0);
    }

    #[test]
    fn accesses_outside_any_device_are_counted_not_served() {
        let (bus, _) = bus_with(&[(0x100, 0x10, "a")]);
        let mut data = [0xaa; 2];
        assert!(!bus.read(0xff, &mut data));
        assert!(
            !bus.read(0x10f, &mut data),
            "straddles the end of the range"
        );
        assert!(!bus.write(0x110, &[1]));
        assert_eq!(data, [0xaa; 2]);
        assert_eq!(bus.exit_counts().1, 3);
    }

    #[test]
    fn string_port_io_is_split_into_accesses_of_its_width() {
        let (bus, probes) = bus_with(&[(0x1f0, 8, "ata")]);
        let mut data = [0u8; 512];
        assert!(bus.read_repeated(0x1f0, 2, &mut data));
        assert!(data.iter().all(|b| *b == 0), "offset 0 each time");
        assert!(bus.write_repeated(0x1f0, 2, &[1, 2, 3, 4]));
        assert_eq!(probes[0].lock().unwrap().last_write, Some((0, vec![3, 4])));
        assert_eq!(bus.exit_counts().0[0].exits, 2, "one exit per instruction");
        assert!(!bus.read_repeated(0x1f7, 2, &mut data), "straddles the end");
    }

    #[test]
    fn overlapping_and_empty_ranges_are_rejected() {
        let (mut bus, _) = bus_with(&[(0x100, 0x10, "a")]);
        let dev = Arc::new(Mutex::new(Probe::default()));
        let err = bus.insert(0x10f, 4, "b", dev.clone()).unwrap_err();
        assert!(matches!(err, BusError::Overlap { ref existing, .. } if existing == "a"));
        assert_eq!(
            bus.insert(0x200, 0, "c", dev.clone()),
            Err(BusError::Empty("c".into()))
        );
        assert!(bus.insert(0x110, 4, "d", dev).is_ok(), "adjacent is fine");
    }
}
