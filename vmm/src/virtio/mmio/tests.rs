//! Register-level tests of the virtio-mmio transport against a recording device.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use vmm_sys_util::eventfd::EventFd;

use super::VirtioMmio;
use crate::bus::BusDevice;
use crate::virtio::interrupt::Interrupt;
use crate::virtio::{ActivateError, Activation, QueueConfig, VirtioDevice};

#[derive(Default)]
struct Recorded {
    activations: Vec<(u64, Vec<QueueConfig>)>,
    resets: usize,
}

struct FakeDevice {
    recorded: Arc<Mutex<Recorded>>,
    fail_activation: bool,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 128]
    }
    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << 9
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8 + 0x10);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, a: Activation<'_>) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError("backend refused".into()));
        }
        self.recorded
            .lock()
            .unwrap()
            .activations
            .push((a.driver_features, a.queues.to_vec()));
        Ok(())
    }
    fn reset(&mut self) {
        self.recorded.lock().unwrap().resets += 1;
    }
}

struct Harness {
    mmio: VirtioMmio<FakeDevice>,
    recorded: Arc<Mutex<Recorded>>,
    interrupt: Arc<Interrupt>,
}

fn harness(fail_activation: bool) -> Harness {
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let fds = || {
        (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect()
    };
    let device = FakeDevice {
        recorded: recorded.clone(),
        fail_activation,
    };
    Harness {
        mmio: VirtioMmio::new("test", device, interrupt.clone(), fds(), fds()),
        recorded,
        interrupt,
    }
}

impl Harness {
    fn read(&mut self, reg: u32) -> u32 {
        let mut data = [0u8; 4];
        self.mmio.read(reg.into(), &mut data);
        u32::from_le_bytes(data)
    }
    fn write(&mut self, reg: u32, value: u32) {
        self.mmio.write(reg.into(), &value.to_le_bytes());
    }
    /// The driver side of initialisation, up to but not including DRIVER_OK.
    fn negotiate(&mut self, features: u64) -> u32 {
        self.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        let status =
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write(VIRTIO_MMIO_STATUS, status);
        self.read(VIRTIO_MMIO_STATUS)
    }
    fn setup_queue(&mut self, index: u32, size: u32, base: u64) {
        self.write(VIRTIO_MMIO_QUEUE_SEL, index);
        self.write(VIRTIO_MMIO_QUEUE_NUM, size);
        for (low, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, base),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000),
            (VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000),
        ] {
            self.write(low, addr as u32);
            self.write(low + 4, (addr >> 32) as u32);
        }
        self.write(VIRTIO_MMIO_QUEUE_READY, 1);
    }
}

#[test]
fn identification_registers() {
    let mut h = harness(false);
    assert_eq!(h.read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(h.read(VIRTIO_MMIO_VERSION), 2);
    assert_eq!(h.read(VIRTIO_MMIO_DEVICE_ID), 2);
    h.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        h.read(VIRTIO_MMIO_DEVICE_FEATURES),
        1,
        "VERSION_1 is bit 32"
    );
    h.write(VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(h.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 128);
    h.write(VIRTIO_MMIO_QUEUE_SEL, 7);
    assert_eq!(h.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no such queue");
}

#[test]
fn driver_ok_activates_with_the_programmed_queues() {
    let mut h = harness(false);
    let features = 1 << VIRTIO_F_VERSION_1 | 1 << 9;
    assert_ne!(h.negotiate(features) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    h.setup_queue(0, 64, 0x1_0000_0000);
    h.write(VIRTIO_MMIO_STATUS, 0xf);
    let recorded = h.recorded.lock().unwrap();
    let (driver_features, queues) = &recorded.activations[0];
    assert_eq!(*driver_features, features);
    assert_eq!(
        queues[0],
        QueueConfig {
            max_size: 256,
            size: 64,
            ready: true,
            desc_table: 0x1_0000_0000,
            avail_ring: 0x1_0000_1000,
            used_ring: 0x1_0000_2000,
        }
    );
    assert!(!queues[1].ready);
}

#[test]
fn features_outside_the_offer_or_without_version_1_are_refused() {
    let mut h = harness(false);
    assert_eq!(
        h.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << 5) & VIRTIO_CONFIG_S_FEATURES_OK,
        0
    );
    let mut h = harness(false);
    assert_eq!(h.negotiate(1 << 9) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
}

#[test]
fn reset_stops_the_device_and_clears_queues() {
    let mut h = harness(false);
    h.negotiate(1 << VIRTIO_F_VERSION_1);
    h.setup_queue(0, 64, 0x10000);
    h.write(VIRTIO_MMIO_STATUS, 0xf);
    h.write(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(h.recorded.lock().unwrap().resets, 1);
    assert_eq!(h.read(VIRTIO_MMIO_STATUS), 0);
    h.write(VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(h.read(VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn failed_activation_and_lost_backend_show_needs_reset() {
    let mut h = harness(true);
    h.negotiate(1 << VIRTIO_F_VERSION_1);
    h.write(VIRTIO_MMIO_STATUS, 0xf);
    assert_ne!(h.read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_ne!(
        h.read(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0
    );
    let generation = h.read(VIRTIO_MMIO_CONFIG_GENERATION);
    h.interrupt.set_needs_reset();
    assert_ne!(h.read(VIRTIO_MMIO_CONFIG_GENERATION), generation);
    h.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn queue_registers_are_frozen_after_driver_ok() {
    let mut h = harness(false);
    h.negotiate(1 << VIRTIO_F_VERSION_1);
    h.setup_queue(0, 64, 0x10000);
    h.write(VIRTIO_MMIO_STATUS, 0xf);
    h.write(VIRTIO_MMIO_QUEUE_NUM, 8);
    h.write(VIRTIO_MMIO_STATUS, 0);
    // After the reset the size is back to the maximum, not the ignored 8.
    h.write(VIRTIO_MMIO_QUEUE_SEL, 0);
    h.negotiate(1 << VIRTIO_F_VERSION_1);
    h.write(VIRTIO_MMIO_QUEUE_READY, 1);
    h.write(VIRTIO_MMIO_STATUS, 0xf);
    assert_eq!(h.recorded.lock().unwrap().activations[1].1[0].size, 256);
}

#[test]
fn config_space_reads_reach_the_device() {
    let mut h = harness(false);
    let mut data = [0u8; 2];
    h.mmio.read(u64::from(VIRTIO_MMIO_CONFIG) + 4, &mut data);
    assert_eq!(data, [0x14, 0x14]);
}

/// A guest-written `QueueNum` the queue cannot have is never truncated into the ring size: the
/// queue is refused at `QueueReady` (or at `DRIVER_OK` if set after it) with DEVICE_NEEDS_RESET.
#[test]
fn invalid_queue_sizes_are_refused_not_truncated() {
    for bad in [0, 3, 100, 512, 0x1_0040] {
        let mut h = harness(false);
        h.negotiate(1 << VIRTIO_F_VERSION_1);
        h.setup_queue(0, bad, 0x10000);
        assert_eq!(h.read(VIRTIO_MMIO_QUEUE_READY), 0, "size {bad}: not ready");
        assert_ne!(
            h.read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0,
            "size {bad}: needs reset"
        );
    }
    // Made ready with a good size, then given a bad one: DRIVER_OK does not activate.
    let mut h = harness(false);
    h.negotiate(1 << VIRTIO_F_VERSION_1);
    h.setup_queue(0, 64, 0x10000);
    h.write(VIRTIO_MMIO_QUEUE_NUM, 96);
    h.write(VIRTIO_MMIO_STATUS, 0xf);
    assert!(h.recorded.lock().unwrap().activations.is_empty());
    assert_ne!(h.read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    // A reset clears it; a power of two up to the maximum works.
    h.write(VIRTIO_MMIO_STATUS, 0);
    h.negotiate(1 << VIRTIO_F_VERSION_1);
    h.setup_queue(0, 1, 0x10000);
    h.write(VIRTIO_MMIO_STATUS, 0xf);
    assert_eq!(h.recorded.lock().unwrap().activations[0].1[0].size, 1);
}

#[test]
fn a_saved_transport_is_restored_and_resumed_not_activated_afresh() {
    let mut h = harness(false);
    let features = 1 << VIRTIO_F_VERSION_1 | 1 << 9;
    h.negotiate(features);
    h.setup_queue(0, 64, 0x1_0000_0000);
    h.write(VIRTIO_MMIO_STATUS, 0xf);
    h.interrupt.signal_used_buffers();
    let saved = h.mmio.save();
    assert_eq!((saved.status, saved.driver_features), (0xf, features));
    assert_eq!(saved.interrupt_status, VIRTIO_MMIO_INT_VRING);

    let mut fresh = harness(false);
    let mut resumed = Vec::new();
    fresh
        .mmio
        .restore(&saved, |_, activation| {
            resumed.push((activation.driver_features, activation.queues.to_vec()));
            Ok(())
        })
        .unwrap();
    assert!(fresh.recorded.lock().unwrap().activations.is_empty());
    assert_eq!(resumed.len(), 1, "the device is resumed once");
    assert_eq!(resumed[0].0, features);
    assert_eq!(
        (resumed[0].1[0].size, resumed[0].1[0].used_ring),
        (64, 0x1_0000_2000)
    );
    assert_eq!(fresh.read(VIRTIO_MMIO_STATUS), 0xf);
    assert_eq!(
        fresh.read(VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
    assert_eq!(fresh.mmio.save(), saved);

    // Another device layout is refused, and an inactive transport is not resumed.
    let mut other = saved.clone();
    other.queues.pop();
    assert!(harness(false).mmio.restore(&other, |_, _| Ok(())).is_err());
    let idle = harness(false).mmio.save();
    harness(false)
        .mmio
        .restore(&idle, |_, _| panic!("an idle transport was resumed"))
        .unwrap();
}
