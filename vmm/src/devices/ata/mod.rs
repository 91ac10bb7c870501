//! The fully emulated legacy disk: an ATA (ATA/ATAPI-6 style) PIO hard disk, master drive of the
//! primary channel, backed by a raw image file. Every register access is a VM exit, so each
//! 512-byte sector costs 256 data-port exits plus status polls: the slow path that the
//! vhost-user-blk device is measured against.
//!
//! The drive's state lives behind one mutex shared by two thin bus views, one per port range:
//! [`AtaDisk::command_block`] at [`COMMAND_BLOCK_BASE`] and [`AtaDisk::control`] at
//! [`CONTROL_BASE`].
//!
//! Wiring: `pio.insert(COMMAND_BLOCK_BASE, COMMAND_BLOCK_LEN, "ata", disk.command_block())`,
//! `pio.insert(CONTROL_BASE, CONTROL_LEN, "ata-control", disk.control())`, and optionally
//! `disk.set_interrupt(fd)` with `fd` registered as the irqfd of GSI [`IRQ`]. A guest that polls
//! with nIEN set needs no interrupt. Only the master of the primary channel exists; device 1
//! reads as absent (status and the other registers read 0).

mod drive;
mod identify;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusDevice, SharedDevice};
use drive::Drive;
pub use drive::DriveStateError;
// The same image lock as splitvisor-blk takes.
use splitvisor_wire::host::imagelock::{lock_image, ImageLockError, LockMode};

/// First port of the primary channel's command block (data, error/features, ... status/command).
pub const COMMAND_BLOCK_BASE: u64 = 0x1f0;
/// The command block spans 0x1f0..=0x1f7.
pub const COMMAND_BLOCK_LEN: u64 = 8;
/// The primary channel's alternate status (read) / device control (write) register.
pub const CONTROL_BASE: u64 = 0x3f6;
pub const CONTROL_LEN: u64 = 1;
/// The ISA interrupt line of the primary channel.
pub const IRQ: u32 = 14;
/// Bytes per logical sector.
pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum AtaError {
    #[error("disk image {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot open disk image {path} for writing (add readonly=on to use it read-only)")]
    OpenWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("disk image {path} is smaller than one 512-byte sector")]
    TooSmall { path: PathBuf },
    #[error("disk image {path} is {len} bytes, not a whole number of 512-byte sectors: it does not look like a disk image; add readonly to use it anyway (the last {tail} bytes stay invisible) or resize it to whole sectors")]
    PartialSector { path: PathBuf, len: u64, tail: u64 },
    #[error(transparent)]
    Locked(#[from] ImageLockError),
}

/// What a refused image lock tells the user to do.
const LOCK_HINT: &str = "stop the other user (another VM, or a splitvisor-blk daemon on this \
    image), or add readonly if all users only read";

/// A snapshot of the drive's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AtaStats {
    /// Commands written to the command register (with the drive selected).
    pub commands: u64,
    pub sectors_read: u64,
    pub sectors_written: u64,
    pub flushes: u64,
    /// Commands that ended with ERR set.
    pub errors: u64,
}

/// The emulated drive; cheap handles to it are its two bus views.
pub struct AtaDisk {
    drive: Arc<Mutex<Drive>>,
}

impl AtaDisk {
    /// Opens and locks the raw image at `path` (a regular file or block device) as
    /// splitvisor-blk does: shared when `readonly`, exclusive otherwise. A writable image must
    /// be a whole number of 512-byte sectors; a read-only one is rounded down (with a
    /// warning). An image below one sector is an error.
    pub fn open(path: &Path, readonly: bool) -> Result<Self, AtaError> {
        // Look before opening: opening a FIFO or a device other than a disk can have effects.
        if let Ok(meta) = std::fs::metadata(path) {
            if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
                return Err(AtaError::NotAFile {
                    path: path.to_owned(),
                });
            }
        }
        let file = open_image(path, readonly)?;
        let raw_len = image_len(path, &file)?;
        let len = raw_len - raw_len % SECTOR_SIZE;
        if len == 0 {
            return Err(AtaError::TooSmall {
                path: path.to_owned(),
            });
        }
        if len != raw_len && !readonly {
            return Err(AtaError::PartialSector {
                path: path.to_owned(),
                len: raw_len,
                tail: raw_len - len,
            });
        }
        let mode = match readonly {
            true => LockMode::Shared,
            false => LockMode::Exclusive,
        };
        lock_image(&file, path, mode, LOCK_HINT)?;
        if len != raw_len {
            warn!(
                "disk image {} is {raw_len} bytes, not a multiple of 512: the last {} bytes are not visible to the guest",
                path.display(),
                raw_len - len
            );
        }
        let drive = Drive::new(file, path, len / SECTOR_SIZE, readonly);
        Ok(Self {
            drive: Arc::new(Mutex::new(drive)),
        })
    }

    /// Sets the eventfd written (value 1) whenever the drive asserts INTRQ with nIEN clear;
    /// register it as the irqfd of [`IRQ`].
    /// The drive's registers and data phase, for a snapshot.
    pub fn save(&self) -> crate::device_state::AtaState {
        lock(&self.drive).save()
    }

    /// Puts a snapshot's registers and data phase back.
    pub fn restore(&self, state: &crate::device_state::AtaState) -> Result<(), DriveStateError> {
        lock(&self.drive).restore(state)
    }

    pub fn set_interrupt(&self, irq: EventFd) {
        lock(&self.drive).set_interrupt(irq);
    }

    /// The view to insert at [`COMMAND_BLOCK_BASE`] (length [`COMMAND_BLOCK_LEN`]).
    pub fn command_block(&self) -> SharedDevice {
        Arc::new(Mutex::new(CommandBlock(self.drive.clone())))
    }

    /// The view to insert at [`CONTROL_BASE`] (length [`CONTROL_LEN`]).
    pub fn control(&self) -> SharedDevice {
        Arc::new(Mutex::new(Control(self.drive.clone())))
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        lock(&self.drive).sectors()
    }

    pub fn stats(&self) -> AtaStats {
        lock(&self.drive).stats()
    }

    pub fn commands(&self) -> u64 {
        self.stats().commands
    }

    pub fn sectors_read(&self) -> u64 {
        self.stats().sectors_read
    }

    pub fn sectors_written(&self) -> u64 {
        self.stats().sectors_written
    }

    pub fn errors(&self) -> u64 {
        self.stats().errors
    }
}

fn open_image(path: &Path, readonly: bool) -> Result<File, AtaError> {
    OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => AtaError::Missing {
                path: path.to_owned(),
            },
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem if !readonly => {
                AtaError::OpenWritable {
                    path: path.to_owned(),
                    source,
                }
            }
            _ => AtaError::Open {
                path: path.to_owned(),
                source,
            },
        })
}

/// The image's size in bytes: a regular file's length or a block device's size.
fn image_len(path: &Path, file: &File) -> Result<u64, AtaError> {
    let size_err = |source| AtaError::Size {
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(size_err)?;
    let kind = meta.file_type();
    if kind.is_file() {
        Ok(meta.len())
    } else if kind.is_block_device() {
        let mut handle = file;
        handle.seek(SeekFrom::End(0)).map_err(size_err)
    } else {
        Err(AtaError::NotAFile {
            path: path.to_owned(),
        })
    }
}

/// A panic while the lock was held cannot leave the drive worse than a guest could; go on.
fn lock(drive: &Mutex<Drive>) -> MutexGuard<'_, Drive> {
    drive.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ports 0x1f0-0x1f7. Offset 0 is the data register: an access of any width there moves that
/// many bytes of the sector buffer (8-bit, 16-bit and 32-bit PIO). Elsewhere a wide access is
/// split into byte accesses of consecutive registers, as the ISA bus does for an 8-bit device.
struct CommandBlock(Arc<Mutex<Drive>>);

impl BusDevice for CommandBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut drive = lock(&self.0);
        if offset == 0 {
            drive.read_data(data);
            return;
        }
        for (reg, byte) in (offset..).zip(data.iter_mut()) {
            *byte = drive.read_register(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut drive = lock(&self.0);
        if offset == 0 {
            drive.write_data(data);
            return;
        }
        for (reg, byte) in (offset..).zip(data.iter()) {
            drive.write_register(reg, *byte);
        }
    }
}

/// Port 0x3f6: alternate status on read (no interrupt acknowledge), device control on write.
struct Control(Arc<Mutex<Drive>>);

impl BusDevice for Control {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let status = lock(&self.0).alternate_status();
        data.fill(status);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(value) = data.first() {
            lock(&self.0).write_control(*value);
        }
    }
}
