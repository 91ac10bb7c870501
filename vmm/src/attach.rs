//! Puts the configured devices on a VM: a virtio-mmio window, GSI and notifiers (ioeventfds,
//! irqfd and interrupt relay: `virtio::notify`) per vhost-user device, and the emulated ATA
//! disk on the legacy IDE ports. Returns the words that announce them on the kernel command
//! line.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::VmFd;

use crate::bus::{Bus, BusError};
use crate::config::{DiskConfig, VmConfig};
use crate::devices::ata::{self, AtaDisk, AtaError};
use crate::event_loop::EventLoop;
use crate::layout;
use crate::memory::GuestMemory;
use crate::vhost_user::manager::BackendManager;
use crate::vhost_user::{DeviceKind, VhostUserDevice, VhostUserError};
use crate::virtio::interrupt::Interrupt;
use crate::virtio::mmio::VirtioMmio;
use crate::virtio::notify::{Notifiers, NotifyError, Wiring};
use crate::virtio::VirtioDevice;
use crate::vm_end::EndSignal;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("device {id}")]
    Backend {
        id: String,
        #[source]
        source: VhostUserError,
    },
    #[error(transparent)]
    Notify(#[from] NotifyError),
    #[error("too many virtio devices: at most {0}")]
    TooMany(usize),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("emulated disk {id}")]
    Ata {
        id: String,
        #[source]
        source: AtaError,
    },
}

/// A vhost-user device as attached, for status reporting.
pub struct AttachedDevice {
    pub id: String,
    pub kind: DeviceKind,
    pub mmio_base: u64,
    pub gsi: u32,
    pub device: Arc<Mutex<VirtioMmio<VhostUserDevice>>>,
    pub interrupt: Arc<Interrupt>,
    /// Watches the backend, recovers it, swaps it.
    pub manager: Arc<BackendManager>,
}

/// What attaching produced.
pub struct Attached {
    pub devices: Vec<AttachedDevice>,
    pub ata: Option<(String, AtaDisk)>,
    pub cmdline_words: Vec<String>,
}

/// The most virtio-mmio windows between their base and the top of the device hole.
const MAX_VIRTIO_DEVICES: usize = 64;

pub struct Attacher<'a> {
    pub vm: &'a VmFd,
    pub memory: &'a GuestMemory,
    pub mmio: &'a mut Bus,
    pub pio: &'a mut Bus,
    pub events: &'a Arc<EventLoop>,
    pub end: &'a Arc<EndSignal>,
}

impl Attacher<'_> {
    pub fn attach_all(&mut self, config: &VmConfig) -> Result<Attached, AttachError> {
        let mut attached = Attached {
            devices: Vec::new(),
            ata: None,
            cmdline_words: Vec::new(),
        };
        let wait = config.connect_timeout;
        // A vCPU or API thread blocked on a backend must not hold up the VM's end.
        self.end.on_end(crate::vhost_user::deadline::abort_all);
        for (disk, id) in config.disks.iter().zip(config.disk_ids()) {
            match disk {
                DiskConfig::VhostUser { socket, .. } => {
                    let device = self.connect(&id, DeviceKind::Block, socket, wait)?;
                    self.attach_virtio(&id, DeviceKind::Block, device, config, &mut attached)?;
                }
                DiskConfig::Ata { path, readonly, .. } => {
                    let disk =
                        AtaDisk::open(path, *readonly).map_err(|source| AttachError::Ata {
                            id: id.clone(),
                            source,
                        })?;
                    self.attach_ata(&disk)?;
                    attached.cmdline_words.push("ata=primary".to_string());
                    attached.ata = Some((id, disk));
                }
            }
        }
        for (net, id) in config.nets.iter().zip(config.net_ids()) {
            let mut device = self.connect(&id, DeviceKind::Net, &net.socket, wait)?;
            if let Some(mac) = net.mac {
                device.override_mac(mac);
            }
            self.attach_virtio(&id, DeviceKind::Net, device, config, &mut attached)?;
        }
        Ok(attached)
    }

    fn connect(
        &self,
        id: &str,
        kind: DeviceKind,
        socket: &std::path::Path,
        wait: Duration,
    ) -> Result<VhostUserDevice, AttachError> {
        VhostUserDevice::connect(id, kind, socket, self.memory.clone(), wait).map_err(|source| {
            AttachError::Backend {
                id: id.to_string(),
                source,
            }
        })
    }

    fn attach_virtio(
        &mut self,
        id: &str,
        kind: DeviceKind,
        device: VhostUserDevice,
        config: &VmConfig,
        attached: &mut Attached,
    ) -> Result<(), AttachError> {
        let slot = attached.devices.len();
        if slot >= MAX_VIRTIO_DEVICES {
            return Err(AttachError::TooMany(MAX_VIRTIO_DEVICES));
        }
        let base = layout::VIRTIO_MMIO_BASE + slot as u64 * layout::VIRTIO_MMIO_SIZE;
        let gsi = layout::VIRTIO_FIRST_GSI + slot as u32;
        let Notifiers {
            interrupt,
            kicks,
            calls,
        } = Wiring {
            vm: self.vm,
            events: self.events,
            id,
            mmio_base: base,
            gsi,
            queues: device.queue_max_sizes().len(),
        }
        .wire()?;
        let mmio = Arc::new(Mutex::new(VirtioMmio::new(
            id,
            device,
            interrupt.clone(),
            kicks,
            calls,
        )));
        let manager = BackendManager::new(
            id,
            mmio.clone(),
            interrupt.clone(),
            self.events.clone(),
            self.end.clone(),
            config.reconnect_timeout,
        );
        manager.watch().map_err(|source| AttachError::Backend {
            id: id.to_string(),
            source,
        })?;
        self.mmio
            .insert(base, layout::VIRTIO_MMIO_SIZE, id, mmio.clone())?;
        attached
            .cmdline_words
            .push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        attached.devices.push(AttachedDevice {
            id: id.to_string(),
            kind,
            mmio_base: base,
            gsi,
            device: mmio,
            interrupt,
            manager,
        });
        Ok(())
    }

    /// The legacy primary IDE ports; the guest polls (nIEN set), so no interrupt is wired.
    fn attach_ata(&mut self, disk: &AtaDisk) -> Result<(), AttachError> {
        self.pio.insert(
            ata::COMMAND_BLOCK_BASE,
            ata::COMMAND_BLOCK_LEN,
            "ata",
            disk.command_block(),
        )?;
        self.pio.insert(
            ata::CONTROL_BASE,
            ata::CONTROL_LEN,
            "ata-control",
            disk.control(),
        )?;
        Ok(())
    }
}
