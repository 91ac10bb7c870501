//! The virtio-mmio transport (virtio 1.x, register layout version 2), generic over the device.
//!
//! Register accesses here are VM exits; `QueueNotify` is not: each queue's notification is a
//! KVM ioeventfd that goes straight to whoever serves the queue (a vhost-user backend), and
//! interrupts come back through an irqfd (see `interrupt`).

use std::sync::Arc;

use log::{debug, info, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::Interrupt;
use super::{ActivateError, Activation, QueueConfig, VirtioDevice};
use crate::bus::BusDevice;
use crate::device_state::{QueueState, VirtioMmioState};

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// QEMU's vendor ID, which drivers treat as "generic".
const VENDOR_ID: u32 = 0x554d_4551;

pub struct VirtioMmio<D: VirtioDevice> {
    name: String,
    device: D,
    interrupt: Arc<Interrupt>,
    queues: Vec<QueueConfig>,
    /// Per queue, a `QueueNum` the driver wrote that the queue cannot have (0, not a power of
    /// two, above `QueueNumMax`): kept to refuse the queue, never truncated into `size`.
    invalid_sizes: Vec<Option<u32>>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// `kicks[i]` must already be registered as queue `i`'s ioeventfd; `calls[i]` is what the
    /// device signals for queue `i` (the caller relays it to `interrupt`).
    pub fn new(
        name: &str,
        device: D,
        interrupt: Arc<Interrupt>,
        kicks: Vec<EventFd>,
        calls: Vec<EventFd>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|max_size| QueueConfig {
                max_size,
                size: max_size,
                ..Default::default()
            })
            .collect::<Vec<_>>();
        Self {
            name: name.to_string(),
            device,
            interrupt,
            invalid_sizes: vec![None; queues.len()],
            queues,
            kicks,
            calls,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device status the driver wrote (`VIRTIO_CONFIG_S_*`).
    pub fn driver_status(&self) -> u32 {
        self.status
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The registers and queues the driver programmed, for a snapshot (`mmio_base` and
    /// `vhost_user` are the caller's).
    pub fn save(&self) -> VirtioMmioState {
        VirtioMmioState {
            mmio_base: 0,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                })
                .collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            needs_reset: self.interrupt.needs_reset(),
            vhost_user: None,
        }
    }

    /// Puts a snapshot's registers and queues back and, if the driver had activated the
    /// device, has `resume` start it on them (instead of a fresh activation).
    pub fn restore(
        &mut self,
        state: &VirtioMmioState,
        resume: impl FnOnce(&mut D, Activation<'_>) -> Result<(), ActivateError>,
    ) -> Result<(), ActivateError> {
        if state.queues.len() != self.queues.len() {
            return Err(ActivateError(format!(
                "the snapshot's device has {} queue(s), this one {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        for (q, saved) in self.queues.iter_mut().zip(&state.queues) {
            if saved.size > q.max_size {
                return Err(ActivateError(format!(
                    "a saved queue has {} entries, more than the device's {}",
                    saved.size, q.max_size
                )));
            }
            q.size = saved.size;
            q.ready = saved.ready;
            q.desc_table = saved.desc_table;
            q.avail_ring = saved.avail_ring;
            q.used_ring = saved.used_ring;
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.interrupt.restore(
            state.interrupt_status,
            state.config_generation,
            state.needs_reset,
        );
        let active = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_FAILED == 0
            && !state.needs_reset;
        if !active {
            return Ok(());
        }
        let activation = Activation {
            driver_features: self.driver_features,
            queues: &self.queues,
            kicks: &self.kicks,
            calls: &self.calls,
        };
        resume(&mut self.device, activation)
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| q.max_size.into()),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| q.ready.into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => {
                let needs_reset = if self.interrupt.needs_reset() {
                    VIRTIO_CONFIG_S_NEEDS_RESET
                } else {
                    0
                };
                self.status | needs_reset
            }
            VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                debug!("{}: read of unknown register {offset:#x}", self.name);
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        let queue_writable = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM if queue_writable => self.write_queue_size(value),
            VIRTIO_MMIO_QUEUE_READY if queue_writable => self.write_queue_ready(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
                if queue_writable =>
            {
                if let Some(q) = self.selected_queue() {
                    set_queue_address(q, offset, value);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; forward any that reach us.
                if let Some(kick) = self.kicks.get(value as usize) {
                    let _ = kick.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            _ => warn!(
                "{}: guest wrote {value:#x} to register {offset:#x}, which is unknown or read-only in this state",
                self.name
            ),
        }
    }

    /// A split ring's size is a power of two from 1 to `QueueNumMax` (virtio 1.2, 2.7).
    fn write_queue_size(&mut self, value: u32) {
        let index = self.queue_sel as usize;
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        match u16::try_from(value) {
            Ok(size) if size.is_power_of_two() && size <= q.max_size => {
                q.size = size;
                self.invalid_sizes[index] = None;
            }
            _ => {
                warn!(
                    "{}: driver set queue {index}'s size to {value}, which is not a power of two from 1 to {}; the queue will be refused",
                    self.name, q.max_size
                );
                self.invalid_sizes[index] = Some(value);
            }
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let index = self.queue_sel as usize;
        let invalid = self.invalid_sizes.get(index).copied().flatten();
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        if value == 1 {
            if let Some(size) = invalid {
                warn!(
                    "{}: refusing to make queue {index} ready with size {size}; the device needs a reset",
                    self.name
                );
                q.ready = false;
                self.interrupt.set_needs_reset();
                return;
            }
        }
        q.ready = value == 1;
    }

    /// A ready queue whose size was set invalid after it was made ready.
    fn invalid_ready_queue(&self) -> Option<(usize, u32)> {
        self.queues
            .iter()
            .zip(&self.invalid_sizes)
            .enumerate()
            .find_map(|(i, (q, bad))| bad.filter(|_| q.ready).map(|size| (i, size)))
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            warn!(
                "{}: driver changed features after FEATURES_OK; ignored",
                self.name
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let accepted = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !accepted {
                warn!(
                    "{}: driver features {:#x} are not a VERSION_1 subset of {offered:#x}; refusing FEATURES_OK",
                    self.name, self.driver_features
                );
                self.status = value & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && value & VIRTIO_CONFIG_S_FAILED == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if let Some((index, size)) = self.invalid_ready_queue() {
            warn!(
                "{}: DRIVER_OK with queue {index} of size {size}; not activating, the device needs a reset",
                self.name
            );
            self.interrupt.set_needs_reset();
            return;
        }
        let activation = Activation {
            driver_features: self.driver_features,
            queues: &self.queues,
            kicks: &self.kicks,
            calls: &self.calls,
        };
        match self.device.activate(activation) {
            Ok(()) => info!(
                "{}: activated, features {:#x}, {} queue(s) ready",
                self.name,
                self.driver_features,
                self.queues.iter().filter(|q| q.ready).count()
            ),
            Err(e) => {
                warn!("{}: activation failed: {e}", self.name);
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn reset(&mut self) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.device.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.invalid_sizes.fill(None);
        for q in &mut self.queues {
            *q = QueueConfig {
                max_size: q.max_size,
                size: q.max_size,
                ..Default::default()
            };
        }
        self.interrupt.acknowledge(u32::MAX);
        if self.device.can_operate() {
            self.interrupt.clear_needs_reset();
        }
        debug!("{}: reset by the driver", self.name);
    }
}

fn set_queue_address(q: &mut QueueConfig, offset: u32, value: u32) {
    let (field, high) = match offset {
        VIRTIO_MMIO_QUEUE_DESC_LOW => (&mut q.desc_table, false),
        VIRTIO_MMIO_QUEUE_DESC_HIGH => (&mut q.desc_table, true),
        VIRTIO_MMIO_QUEUE_AVAIL_LOW => (&mut q.avail_ring, false),
        VIRTIO_MMIO_QUEUE_AVAIL_HIGH => (&mut q.avail_ring, true),
        VIRTIO_MMIO_QUEUE_USED_LOW => (&mut q.used_ring, false),
        _ => (&mut q.used_ring, true),
    };
    *field = if high {
        (*field & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (*field & !0xffff_ffff) | u64::from(value)
    };
}

impl<D: VirtioDevice> BusDevice for VirtioMmio<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 {
            warn!(
                "{}: {}-byte register read at {offset:#x}; registers are 32-bit",
                self.name,
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset as u32).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(
                "{}: {}-byte register write at {offset:#x}; registers are 32-bit",
                self.name,
                data.len()
            );
            return;
        };
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
