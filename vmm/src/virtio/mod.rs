//! Virtio devices as the VMM sees them: the `VirtioDevice` trait that a device model (here,
//! the vhost-user frontend) implements, and the transport that exposes it to the guest.

pub mod interrupt;
pub mod mmio;
pub mod notify;

use vmm_sys_util::eventfd::EventFd;

/// What the driver programmed for one virtqueue (guest-physical addresses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// Everything a device needs to start processing its queues after `DRIVER_OK`.
pub struct Activation<'a> {
    pub driver_features: u64,
    pub queues: &'a [QueueConfig],
    /// Signalled by KVM when the guest writes the queue's index to `QueueNotify`.
    pub kicks: &'a [EventFd],
    /// Signalled by the device when it put buffers in a used ring.
    pub calls: &'a [EventFd],
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ActivateError(pub String);

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// `VIRTIO_ID_*`.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set `DRIVER_OK`: start serving the queues.
    fn activate(&mut self, activation: Activation<'_>) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving the queues.
    fn reset(&mut self);
    /// Whether the device can serve a driver now (a vhost-user device needs its backend);
    /// decides whether a reset clears `DEVICE_NEEDS_RESET`.
    fn can_operate(&self) -> bool {
        true
    }
}
