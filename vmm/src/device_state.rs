//! What each device saves in a snapshot: plain serde data, kept apart from the snapshot
//! writer (`snapshot/`) and depending on no other module of the crate, so that the devices,
//! the virtio-mmio transport and the vhost-user frontend can fill and read their own state
//! without a module cycle through `snapshot`. `snapshot::format` documents the file around it.

use serde::{Deserialize, Serialize};

/// A device's own state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceData {
    /// Nothing to save (the debug-exit port).
    #[default]
    Stateless,
    /// The 16550A's registers (vm-superio's `SerialState`).
    Serial(SerialRegisters),
    /// A virtio-mmio transport and the vhost-user device behind it.
    VirtioMmio(VirtioMmioState),
    /// The emulated ATA drive's registers and PIO data phase.
    Ata(AtaState),
}

/// The emulated ATA drive: its image and every register of the command block, with the PIO
/// transfer in progress (a sector half read or written by the guest).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtaState {
    /// The image (`--disk path=`), which `run --restore` opens unless --disk says otherwise.
    pub path: String,
    pub readonly: bool,
    /// The image's size in sectors; the restored one must have the same.
    pub sectors: u64,
    pub irq_pending: bool,
    /// Each command-block register as (current, previous) byte: features, sector count,
    /// LBA low, mid and high (the previous bytes are a 48-bit command's high-order ones).
    pub features: (u8, u8),
    pub count: (u8, u8),
    pub lba_low: (u8, u8),
    pub lba_mid: (u8, u8),
    pub lba_high: (u8, u8),
    pub device: u8,
    pub error: u8,
    pub status: u8,
    pub control: u8,
    pub transfer: AtaTransfer,
    /// The sector buffer of the data phase and the guest's position in it.
    pub buffer: Vec<u8>,
    pub position: usize,
}

/// The PIO data phase in progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AtaTransfer {
    #[default]
    Idle,
    /// The guest reads the buffer; `left` more sectors follow from `next` on.
    In { next: u64, left: u64 },
    /// The guest fills the buffer for sector `lba`; `left` sectors including this one.
    Out { lba: u64, left: u64 },
}

/// A virtio-mmio transport's registers as the driver left them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    /// Where the window is (the guest's driver found it there).
    pub mmio_base: u64,
    /// `Status` (`VIRTIO_CONFIG_S_*`).
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// The features the driver acknowledged (negotiated).
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueState>,
    /// `InterruptStatus` bits not yet acknowledged.
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub needs_reset: bool,
    /// The vhost-user device, when the transport has one.
    pub vhost_user: Option<VhostUserState>,
}

/// One virtqueue as the driver programmed it (guest-physical addresses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// A vhost-user device: its backend and where each ring stopped. At capture the rings are
/// stopped with GET_VRING_BASE and every request the backend fetched is awaited, so nothing is
/// in flight: the inflight region holds no request and is not saved; the restored backend
/// gets a fresh one, as after a swap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserState {
    /// The backend's socket, which `run --restore` connects to unless --disk/--net say
    /// otherwise for this id.
    pub socket: String,
    /// The features the driver was offered; the restored backend must offer all of them.
    pub offered_features: u64,
    /// The MAC the VMM presented (`--net mac=`), for a NIC.
    pub mac: Option<[u8; 6]>,
    /// Each ready queue's index and the position GET_VRING_BASE returned: where the restored
    /// backend starts (SET_VRING_BASE).
    pub vring_bases: Vec<(usize, u16)>,
}

/// vm-superio's `SerialState`, field for field (it has no serde of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialRegisters {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegisters> for vm_superio::serial::SerialState {
    fn from(s: &SerialRegisters) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}
