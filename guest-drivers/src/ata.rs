//! ATA PIO driver for the primary IDE channel (ports 0x1f0-0x1f7, control 0x3f6), polled with
//! nIEN set: IDENTIFY, READ/WRITE SECTORS (LBA28) and their EXT forms (LBA48), FLUSH CACHE.
//! Every register access is a VM exit; data moves with `rep insw`/`rep outsw`, one sector per
//! instruction. Requests run synchronously in `submit`; `poll` hands back the completion.

use crate::blk::{BlkError, BlockDevice, Completion, IoStatus, Op, Request, SECTOR};
use crate::time;

const DATA: u16 = 0x1f0;
const SECTOR_COUNT: u16 = 0x1f2;
const LBA_LOW: u16 = 0x1f3;
const LBA_MID: u16 = 0x1f4;
const LBA_HIGH: u16 = 0x1f5;
const DRIVE: u16 = 0x1f6;
const STATUS_COMMAND: u16 = 0x1f7;
const CONTROL: u16 = 0x3f6;

const ST_ERR: u8 = 1 << 0;
const ST_DRQ: u8 = 1 << 3;
const ST_DF: u8 = 1 << 5;
const ST_BSY: u8 = 1 << 7;
const CTL_NIEN: u8 = 1 << 1;

const CMD_READ: u8 = 0x20;
const CMD_READ_EXT: u8 = 0x24;
const CMD_WRITE: u8 = 0x30;
const CMD_WRITE_EXT: u8 = 0x34;
const CMD_FLUSH: u8 = 0xe7;
const CMD_FLUSH_EXT: u8 = 0xea;
const CMD_IDENTIFY: u8 = 0xec;

/// LBA28 covers sectors below this; beyond it the EXT commands are needed.
const LBA28_LIMIT: u64 = 1 << 28;
/// Sectors per command: 256 (count 0) for LBA28, here also for LBA48 to keep requests short.
const MAX_SECTORS: u64 = 256;
/// BSY/DRQ wait bound.
const TIMEOUT_MS: u64 = 5000;

pub struct Ata {
    sectors: u64,
    lba48: bool,
    done: Option<Completion>,
    completed: u64,
}

fn inb(port: u16) -> u8 {
    crate::port::inb(port)
}
fn outb(port: u16, v: u8) {
    crate::port::outb(port, v)
}

/// Waits until BSY clears; returns the status then.
fn wait_not_busy() -> Result<u8, BlkError> {
    let deadline = time::now() + time::ms_to_ticks(TIMEOUT_MS);
    loop {
        let st = inb(STATUS_COMMAND);
        if st & ST_BSY == 0 {
            return Ok(st);
        }
        if time::now() > deadline {
            return Err(BlkError::Timeout("ata"));
        }
    }
}

/// Waits for DRQ (data ready) or an error; `Ok(false)` on ERR/DF.
fn wait_drq() -> Result<bool, BlkError> {
    let deadline = time::now() + time::ms_to_ticks(TIMEOUT_MS);
    loop {
        let st = inb(STATUS_COMMAND);
        if st & ST_BSY == 0 {
            if st & (ST_ERR | ST_DF) != 0 {
                return Ok(false);
            }
            if st & ST_DRQ != 0 {
                return Ok(true);
            }
        }
        if time::now() > deadline {
            return Err(BlkError::Timeout("ata"));
        }
    }
}

/// Reads 256 words (one sector) from the data port into `buf`.
///
/// # Safety
/// `buf` must be valid for 512 bytes of writes.
unsafe fn read_sector(buf: u64) {
    // SAFETY: the caller vouches for the buffer; DF is clear (ABI); the port is ours.
    unsafe {
        core::arch::asm!("rep insw", inout("rcx") 256usize => _, inout("rdi") buf => _,
            in("dx") DATA, options(nostack, preserves_flags))
    };
}

/// Writes one sector from `buf` to the data port.
///
/// # Safety
/// `buf` must be valid for 512 bytes of reads.
unsafe fn write_sector(buf: u64) {
    // SAFETY: the caller vouches for the buffer; DF is clear (ABI); the port is ours.
    unsafe {
        core::arch::asm!("rep outsw", inout("rcx") 256usize => _, inout("rsi") buf => _,
            in("dx") DATA, options(nostack, preserves_flags, readonly))
    };
}

/// Loads the task file registers for a transfer and issues `cmd`.
fn issue(lba: u64, count: u64, ext: bool, cmd: u8) {
    if ext {
        outb(DRIVE, 0x40);
        outb(SECTOR_COUNT, (count >> 8) as u8);
        outb(LBA_LOW, (lba >> 24) as u8);
        outb(LBA_MID, (lba >> 32) as u8);
        outb(LBA_HIGH, (lba >> 40) as u8);
    } else {
        outb(DRIVE, 0xe0 | ((lba >> 24) & 0x0f) as u8);
    }
    outb(SECTOR_COUNT, count as u8);
    outb(LBA_LOW, lba as u8);
    outb(LBA_MID, (lba >> 8) as u8);
    outb(LBA_HIGH, (lba >> 16) as u8);
    outb(STATUS_COMMAND, cmd);
}

impl Ata {
    /// Probes the primary master with IDENTIFY.
    pub fn open() -> Result<Ata, BlkError> {
        outb(CONTROL, CTL_NIEN);
        outb(DRIVE, 0xa0);
        if inb(STATUS_COMMAND) == 0xff {
            return Err(BlkError::NoDevice("ata (floating bus)"));
        }
        wait_not_busy()?;
        outb(SECTOR_COUNT, 0);
        outb(LBA_LOW, 0);
        outb(LBA_MID, 0);
        outb(LBA_HIGH, 0);
        outb(STATUS_COMMAND, CMD_IDENTIFY);
        if inb(STATUS_COMMAND) == 0 {
            return Err(BlkError::NoDevice("ata (no drive)"));
        }
        if !wait_drq()? {
            return Err(BlkError::Init("ata IDENTIFY failed (ATAPI or no drive)"));
        }
        let mut id = [0u16; 256];
        // SAFETY: `id` is 512 bytes of our stack.
        unsafe { read_sector(id.as_mut_ptr() as u64) };
        let lba28 = u64::from(id[60]) | u64::from(id[61]) << 16;
        let lba48 = id[83] & (1 << 10) != 0;
        let sectors48 = (0..4).fold(0u64, |acc, i| acc | u64::from(id[100 + i]) << (16 * i));
        let sectors = if lba48 && sectors48 != 0 {
            sectors48
        } else {
            lba28
        };
        Ok(Ata {
            sectors,
            lba48,
            done: None,
            completed: 0,
        })
    }

    /// Moves `count` sectors at `lba` (count <= MAX_SECTORS).
    fn pio(&self, op: Op, lba: u64, count: u64, buf: u64) -> Result<IoStatus, BlkError> {
        let ext = lba + count > LBA28_LIMIT;
        if ext && !self.lba48 || lba + count > 1 << 48 {
            return Ok(IoStatus::IoErr);
        }
        wait_not_busy()?;
        let cmd = match (op, ext) {
            (Op::Read, false) => CMD_READ,
            (Op::Read, true) => CMD_READ_EXT,
            (_, false) => CMD_WRITE,
            (_, true) => CMD_WRITE_EXT,
        };
        issue(lba, count, ext, cmd);
        for i in 0..count {
            if !wait_drq()? {
                return Ok(IoStatus::IoErr);
            }
            let at = buf + i * SECTOR;
            // SAFETY: the request's buffer covers count sectors (checked by `submit`'s caller
            // contract: buf is valid for len bytes).
            unsafe {
                if op == Op::Read {
                    read_sector(at)
                } else {
                    write_sector(at)
                }
            };
        }
        let st = wait_not_busy()?;
        Ok(if st & (ST_ERR | ST_DF) != 0 {
            IoStatus::IoErr
        } else {
            IoStatus::Ok
        })
    }

    fn flush(&self) -> Result<IoStatus, BlkError> {
        wait_not_busy()?;
        outb(DRIVE, 0xe0);
        outb(
            STATUS_COMMAND,
            if self.lba48 { CMD_FLUSH_EXT } else { CMD_FLUSH },
        );
        let st = wait_not_busy()?;
        Ok(if st & (ST_ERR | ST_DF) != 0 {
            IoStatus::IoErr
        } else {
            IoStatus::Ok
        })
    }

    fn execute(&self, req: &Request) -> Result<IoStatus, BlkError> {
        if req.op == Op::Flush {
            return self.flush();
        }
        let total = u64::from(req.len) / SECTOR;
        let mut done = 0;
        while done < total {
            let n = MAX_SECTORS.min(total - done);
            let st = self.pio(req.op, req.sector + done, n, req.buf + done * SECTOR)?;
            if st != IoStatus::Ok {
                return Ok(st);
            }
            done += n;
        }
        Ok(IoStatus::Ok)
    }
}

impl BlockDevice for Ata {
    fn kind(&self) -> &'static str {
        "ata"
    }
    fn capacity(&self) -> u64 {
        self.sectors
    }
    fn read_only(&self) -> bool {
        false
    }
    fn queue_depth(&self) -> usize {
        1
    }
    fn max_request_bytes(&self) -> u32 {
        1 << 20
    }
    fn queues(&self) -> usize {
        1
    }

    fn submit(&mut self, req: &Request) -> Result<(), BlkError> {
        if self.done.is_some() {
            return Err(BlkError::QueueFull);
        }
        if u64::from(req.len) % SECTOR != 0 || req.len > self.max_request_bytes() {
            return Err(BlkError::BadRequest);
        }
        let status = self.execute(req)?;
        self.done = Some(Completion {
            tag: req.tag,
            status,
        });
        Ok(())
    }

    fn kick(&mut self) {}

    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, BlkError> {
        match (self.done, out.first_mut()) {
            (Some(c), Some(slot)) => {
                *slot = c;
                self.done = None;
                self.completed += 1;
                Ok(1)
            }
            _ => Ok(0),
        }
    }

    fn kicks(&self) -> u64 {
        0
    }

    fn queue_counts(&self, out: &mut [u64]) -> usize {
        match out.first_mut() {
            Some(slot) => {
                *slot = self.completed;
                1
            }
            None => 0,
        }
    }
}
