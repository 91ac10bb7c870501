//! A virtio-mmio device's interrupt: the `InterruptStatus` bits the guest reads, the irqfd that
//! raises the GSI, and the `DEVICE_NEEDS_RESET` flag a device sets when its backend is lost.
//!
//! Backends signal "used buffers" on a call eventfd that the VMM relays here (see
//! `notify`) instead of handing them the irqfd: virtio-mmio drivers read
//! `InterruptStatus` to learn why the interrupt fired, so the bit must be set first - and the
//! relay is where used-ring interrupts get counted.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use log::warn;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::EventFd;

pub struct Interrupt {
    irqfd: EventFd,
    status: AtomicU32,
    needs_reset: AtomicBool,
    config_generation: AtomicU32,
    pub used_buffer_interrupts: AtomicU64,
    pub config_interrupts: AtomicU64,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            irqfd,
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
            used_buffer_interrupts: AtomicU64::new(0),
            config_interrupts: AtomicU64::new(0),
        }
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_buffers(&self) {
        self.used_buffer_interrupts.fetch_add(1, Ordering::Relaxed);
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// The device's configuration changed (or it needs a reset).
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.config_interrupts.fetch_add(1, Ordering::Relaxed);
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// The device can no longer operate (its backend is gone): the driver sees
    /// `DEVICE_NEEDS_RESET` in the status register and gets a configuration-change interrupt.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// A driver reset clears the condition (the device decides later whether it still holds).
    pub fn clear_needs_reset(&self) {
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Puts back the status bits, config generation and needs-reset flag of a snapshot; the
    /// interrupt itself is pending in the restored interrupt controller, not raised again.
    pub fn restore(&self, status: u32, config_generation: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            warn!("raising a virtio interrupt failed: {e}");
        }
    }
}
