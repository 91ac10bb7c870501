//! virtio-mmio transport (version 2 register layout): device probing, the status handshake,
//! feature negotiation, queue setup and notification. Every register access is an MMIO exit,
//! so drivers touch registers only at setup, for kicks and for the occasional status check.

pub mod blk;
pub mod net;
pub mod queue;

use crate::blk::BlkError;
use queue::SplitQueue;

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

const MAGIC: u32 = 0x7472_6976; // "virt"

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

pub const DEVICE_ID_BLOCK: u32 = 2;

/// One virtio-mmio register window.
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// A window at `base` (identity mapped, user-accessible per the boot contract).
    pub fn new(base: u64) -> Mmio {
        Mmio { base }
    }

    pub fn read(&self, off: u64) -> u32 {
        // SAFETY: the window is a device MMIO region announced on the command line, mapped
        // uncached-or-emulated by the VMM; a 32-bit aligned volatile read is a register read.
        unsafe { core::ptr::read_volatile((self.base + off) as *const u32) }
    }

    pub fn write(&self, off: u64, value: u32) {
        // SAFETY: as for `read`; a register write.
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u32, value) }
    }

    /// The device ID if this window holds a version-2 virtio-mmio device (0 = placeholder).
    pub fn probe(&self) -> Option<u32> {
        if self.read(MAGIC_VALUE) != MAGIC || self.read(VERSION) != 2 {
            return None;
        }
        Some(self.read(DEVICE_ID)).filter(|&id| id != 0)
    }

    pub fn status(&self) -> u32 {
        self.read(STATUS)
    }

    fn set_status(&self, bits: u32) {
        self.write(STATUS, self.status() | bits);
    }

    /// Marks the device failed (after a failed setup step).
    pub fn fail(&self) {
        self.set_status(STATUS_FAILED);
    }

    /// Resets the device and goes through ACKNOWLEDGE, DRIVER and feature negotiation: the
    /// driver takes `wanted & offered`; `required` bits missing on the device are an error.
    /// Returns the negotiated features (status FEATURES_OK confirmed).
    pub fn negotiate(&self, wanted: u64, required: u64) -> Result<u64, BlkError> {
        self.write(STATUS, 0);
        if self.status() != 0 {
            return Err(BlkError::Init("virtio reset did not complete"));
        }
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write(DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(DEVICE_FEATURES)) << (32 * sel);
        }
        if offered & required != required {
            self.fail();
            return Err(BlkError::Init(
                "device lacks VERSION_1 or another required feature",
            ));
        }
        let features = offered & (wanted | required);
        for sel in 0..2u32 {
            self.write(DRIVER_FEATURES_SEL, sel);
            self.write(DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        self.set_status(STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.fail();
            return Err(BlkError::Init(
                "device refused the features (FEATURES_OK clear)",
            ));
        }
        Ok(features)
    }

    /// The largest queue size the device allows for queue `index` (0 = unavailable).
    pub fn queue_max(&self, index: u16) -> u32 {
        self.write(QUEUE_SEL, u32::from(index));
        self.read(QUEUE_NUM_MAX)
    }

    /// Tells the device where queue `index` lives and enables it.
    pub fn setup_queue(&self, index: u16, q: &SplitQueue) -> Result<(), BlkError> {
        self.write(QUEUE_SEL, u32::from(index));
        if self.read(QUEUE_READY) != 0 {
            return Err(BlkError::Init("queue already ready after reset"));
        }
        self.write(QUEUE_NUM, u32::from(q.size()));
        let (desc, avail, used) = q.addresses();
        for (low, addr) in [
            (QUEUE_DESC_LOW, desc),
            (QUEUE_DRIVER_LOW, avail),
            (QUEUE_DEVICE_LOW, used),
        ] {
            self.write(low, addr as u32);
            self.write(low + 4, (addr >> 32) as u32);
        }
        const _: () = assert!(QUEUE_DESC_HIGH == QUEUE_DESC_LOW + 4);
        const _: () = assert!(QUEUE_DRIVER_HIGH == QUEUE_DRIVER_LOW + 4);
        const _: () = assert!(QUEUE_DEVICE_HIGH == QUEUE_DEVICE_LOW + 4);
        self.write(QUEUE_READY, 1);
        Ok(())
    }

    pub fn driver_ok(&self) {
        self.set_status(STATUS_DRIVER_OK);
    }

    /// Notifies queue `index` (a kick).
    pub fn notify(&self, index: u16) {
        self.write(QUEUE_NOTIFY, u32::from(index));
    }

    /// Reads `N` bytes of device config at `off`, retrying until the generation is stable.
    pub fn config<const N: usize>(&self, off: u64) -> [u8; N] {
        let mut out = [0u8; N];
        // Bounded: a device whose generation never settles gets its last read.
        for _ in 0..100 {
            let gen = self.read(CONFIG_GENERATION);
            for (i, b) in out.iter_mut().enumerate() {
                // SAFETY: byte reads of the device-specific config area of our window.
                *b = unsafe {
                    core::ptr::read_volatile((self.base + CONFIG + off + i as u64) as *const u8)
                };
            }
            if self.read(CONFIG_GENERATION) == gen {
                break;
            }
        }
        out
    }
}
