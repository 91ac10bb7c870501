//! The notification path of a virtio-mmio device, both ways, wired with KVM so that neither
//! direction stops a vCPU in the VMM:
//! - guest to backend: the guest writes a queue's index to `QueueNotify`; KVM matches the
//!   write (ioeventfd with the index as datamatch) and signals that queue's kick eventfd,
//!   which the vhost-user backend waits on;
//! - backend to guest: the backend signals the queue's call eventfd when it put buffers in the
//!   used ring; the VMM's event loop relays it to `Interrupt`, which sets `InterruptStatus`
//!   and signals the irqfd that raises the device's GSI.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use log::warn;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::{EventLoop, Next};
use crate::virtio::interrupt::Interrupt;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("creating an eventfd for device {0} failed")]
    EventFd(String, #[source] std::io::Error),
    #[error("registering device {0}'s queue notification with KVM (ioeventfd) failed")]
    IoEventFd(String, #[source] kvm_ioctls::Error),
    #[error("registering device {0}'s interrupt with KVM (irqfd) failed")]
    Irqfd(String, #[source] kvm_ioctls::Error),
    #[error("relaying device {0}'s interrupts failed")]
    Relay(String, #[source] std::io::Error),
}

/// One device's notifiers: what the transport hands the backend at `DRIVER_OK`.
pub struct Notifiers {
    pub interrupt: Arc<Interrupt>,
    /// Per queue: signalled by KVM on the guest's `QueueNotify` write.
    pub kicks: Vec<EventFd>,
    /// Per queue: signalled by the backend, relayed to `interrupt`.
    pub calls: Vec<EventFd>,
}

/// Where a device's notifications go: its virtio-mmio window and its GSI.
pub struct Wiring<'a> {
    pub vm: &'a VmFd,
    pub events: &'a EventLoop,
    /// The device id, for messages.
    pub id: &'a str,
    pub mmio_base: u64,
    pub gsi: u32,
    pub queues: usize,
}

impl Wiring<'_> {
    /// Registers the irqfd and one ioeventfd per queue with KVM, and the call relays with the
    /// event loop.
    pub fn wire(&self) -> Result<Notifiers, NotifyError> {
        let irqfd = self.eventfd()?;
        self.vm
            .register_irqfd(&irqfd, self.gsi)
            .map_err(|e| NotifyError::Irqfd(self.id.into(), e))?;
        let interrupt = Arc::new(Interrupt::new(irqfd));

        let notify = IoEventAddress::Mmio(self.mmio_base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
        let (mut kicks, mut calls) = (Vec::new(), Vec::new());
        for queue in 0..self.queues {
            let kick = self.eventfd()?;
            self.vm
                .register_ioevent(&kick, &notify, queue as u32)
                .map_err(|e| NotifyError::IoEventFd(self.id.into(), e))?;
            kicks.push(kick);
            let call = self.eventfd()?;
            self.relay_used_buffers(&call, interrupt.clone())?;
            calls.push(call);
        }
        Ok(Notifiers {
            interrupt,
            kicks,
            calls,
        })
    }

    fn eventfd(&self) -> Result<EventFd, NotifyError> {
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| NotifyError::EventFd(self.id.into(), e))
    }

    /// The backend signals `call`; the guest must see `InterruptStatus` set before the GSI.
    fn relay_used_buffers(
        &self,
        call: &EventFd,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), NotifyError> {
        let reader = call
            .try_clone()
            .map_err(|e| NotifyError::EventFd(self.id.into(), e))?;
        let name = self.id.to_string();
        self.events
            .add(call.as_raw_fd(), EventSet::IN, move |_| {
                match reader.read() {
                    Ok(_) => interrupt.signal_used_buffers(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => warn!("{name}: reading the used-buffer notification failed: {e}"),
                }
                Next::Keep
            })
            .map(|_| ())
            .map_err(|e| NotifyError::Relay(self.id.into(), e))
    }
}
