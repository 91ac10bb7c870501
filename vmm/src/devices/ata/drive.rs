//! The drive itself: the ATA register file (with the two-deep "HOB" FIFOs of 48-bit
//! addressing), the command state machine and the PIO sector buffer. Commands complete within
//! the exit that issues them, so BSY is only ever seen during a soft reset; a READ loads one
//! sector at a time as the guest drains the previous one, a WRITE stores each sector when its
//! last byte arrives.

#[path = "drive_state.rs"]
mod state;
pub use state::DriveStateError;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use log::{trace, warn};
use vmm_sys_util::eventfd::EventFd;

use super::identify::{self, HEADS, LBA28_LIMIT, SECTORS_PER_TRACK};
use super::{AtaStats, SECTOR_SIZE};

// Status register bits.
const BSY: u8 = 0x80;
const DRDY: u8 = 0x40;
const DF: u8 = 0x20;
const DSC: u8 = 0x10;
const DRQ: u8 = 0x08;
const ERR: u8 = 0x01;
/// Status of an idle drive that is ready for a command.
const READY: u8 = DRDY | DSC;

// Error register bits.
const UNC: u8 = 0x40;
const IDNF: u8 = 0x10;
const ABRT: u8 = 0x04;
/// Diagnostic code after reset / EXECUTE DEVICE DIAGNOSTIC: device 0 passed, no device 1.
const DIAG_PASSED: u8 = 0x01;

// Device register bits.
const LBA_MODE: u8 = 0x40;
const DEV: u8 = 0x10;

// Device control register bits.
const HOB: u8 = 0x80;
const SRST: u8 = 0x04;
const NIEN: u8 = 0x02;

// Command block register offsets.
const REG_ERROR: u64 = 1;
const REG_COUNT: u64 = 2;
const REG_LBA_LOW: u64 = 3;
const REG_LBA_MID: u64 = 4;
const REG_LBA_HIGH: u64 = 5;
const REG_DEVICE: u64 = 6;
const REG_STATUS: u64 = 7;

// Commands.
const CMD_READ_SECTORS: u8 = 0x20;
const CMD_READ_SECTORS_NORETRY: u8 = 0x21;
const CMD_READ_SECTORS_EXT: u8 = 0x24;
const CMD_WRITE_SECTORS: u8 = 0x30;
const CMD_WRITE_SECTORS_NORETRY: u8 = 0x31;
const CMD_WRITE_SECTORS_EXT: u8 = 0x34;
const CMD_EXECUTE_DIAGNOSTIC: u8 = 0x90;
const CMD_INITIALIZE_PARAMETERS: u8 = 0x91;
const CMD_STANDBY_IMMEDIATE: u8 = 0xe0;
const CMD_IDLE_IMMEDIATE: u8 = 0xe1;
const CMD_CHECK_POWER_MODE: u8 = 0xe5;
const CMD_FLUSH_CACHE: u8 = 0xe7;
const CMD_FLUSH_CACHE_EXT: u8 = 0xea;
const CMD_IDENTIFY: u8 = 0xec;
const CMD_SET_FEATURES: u8 = 0xef;

/// Sector count of CHECK POWER MODE: active or idle.
const POWER_ACTIVE: u8 = 0xff;

const SECTOR: usize = SECTOR_SIZE as usize;

/// One register of the command block with its previous content, which a read with HOB set in
/// the device control register returns (the high-order bytes of a 48-bit command).
#[derive(Clone, Copy, Default)]
struct Fifo {
    current: u8,
    previous: u8,
}

impl Fifo {
    fn push(&mut self, value: u8) {
        self.previous = self.current;
        self.current = value;
    }

    fn set(value: u8) -> Self {
        Self {
            current: value,
            previous: 0,
        }
    }

    fn read(self, hob: bool) -> u8 {
        if hob {
            self.previous
        } else {
            self.current
        }
    }

    /// The 16-bit value of a 48-bit command: previous byte high, current byte low.
    fn wide(self) -> u64 {
        u64::from(self.previous) << 8 | u64::from(self.current)
    }
}

/// The PIO data phase in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transfer {
    Idle,
    /// The guest is reading the buffer; `left` more sectors follow from `next` on.
    In {
        next: u64,
        left: u64,
    },
    /// The guest is filling the buffer for sector `lba`; `left` sectors including this one.
    Out {
        lba: u64,
        left: u64,
    },
}

/// Why a command ends with ERR: the error register's bits.
type Failure = u8;

pub struct Drive {
    image: File,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
    irq: Option<EventFd>,
    irq_pending: bool,
    features: Fifo,
    count: Fifo,
    lba_low: Fifo,
    lba_mid: Fifo,
    lba_high: Fifo,
    device: u8,
    error: u8,
    status: u8,
    control: u8,
    transfer: Transfer,
    buf: Box<[u8; SECTOR]>,
    pos: usize,
    stats: AtaStats,
}

impl Drive {
    /// A drive in its power-on state: reset signature loaded, ready for a command.
    pub fn new(image: File, path: &Path, sectors: u64, readonly: bool) -> Self {
        let mut drive = Self {
            image,
            path: path.to_owned(),
            sectors,
            readonly,
            irq: None,
            irq_pending: false,
            features: Fifo::default(),
            count: Fifo::default(),
            lba_low: Fifo::default(),
            lba_mid: Fifo::default(),
            lba_high: Fifo::default(),
            device: 0,
            error: 0,
            status: READY,
            control: 0,
            transfer: Transfer::Idle,
            buf: Box::new([0; SECTOR]),
            pos: 0,
            stats: AtaStats::default(),
        };
        drive.load_signature();
        drive
    }

    pub fn set_interrupt(&mut self, irq: EventFd) {
        self.irq = Some(irq);
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn stats(&self) -> AtaStats {
        self.stats
    }

    /// Device 1 is selected: there is none, so it reads as absent.
    fn slave_selected(&self) -> bool {
        self.device & DEV != 0
    }

    /// Reads one register of the command block (offsets 1-7).
    pub fn read_register(&mut self, reg: u64) -> u8 {
        if self.slave_selected() && reg != REG_DEVICE {
            return 0;
        }
        let hob = self.control & HOB != 0;
        match reg {
            REG_ERROR => self.error,
            REG_COUNT => self.count.read(hob),
            REG_LBA_LOW => self.lba_low.read(hob),
            REG_LBA_MID => self.lba_mid.read(hob),
            REG_LBA_HIGH => self.lba_high.read(hob),
            REG_DEVICE => self.device,
            REG_STATUS => {
                // Reading the status register acknowledges the interrupt.
                self.irq_pending = false;
                self.status
            }
            _ => 0xff,
        }
    }

    /// Writes one register of the command block (offsets 1-7).
    pub fn write_register(&mut self, reg: u64, value: u8) {
        // Any command block write clears HOB (ATA/ATAPI-6 7.9.6).
        self.control &= !HOB;
        match reg {
            REG_ERROR => self.features.push(value),
            REG_COUNT => self.count.push(value),
            REG_LBA_LOW => self.lba_low.push(value),
            REG_LBA_MID => self.lba_mid.push(value),
            REG_LBA_HIGH => self.lba_high.push(value),
            REG_DEVICE => self.device = value,
            REG_STATUS => self.command(value),
            _ => {}
        }
    }

    pub fn alternate_status(&self) -> u8 {
        if self.slave_selected() {
            0
        } else {
            self.status
        }
    }

    /// Device control: SRST (soft reset while set, completing when cleared), nIEN, HOB.
    pub fn write_control(&mut self, value: u8) {
        let old = self.control;
        self.control = value;
        if value & SRST != 0 {
            if old & SRST == 0 {
                self.transfer = Transfer::Idle;
                self.irq_pending = false;
                self.status = BSY;
            }
        } else if old & SRST != 0 {
            self.load_signature();
            self.status = READY;
        }
        if old & NIEN != 0 && value & NIEN == 0 && self.irq_pending {
            self.trigger_irq();
        }
    }

    /// The diagnostic results and ATA device signature left by a reset.
    fn load_signature(&mut self) {
        self.error = DIAG_PASSED;
        self.count = Fifo::set(1);
        self.lba_low = Fifo::set(1);
        self.lba_mid = Fifo::set(0);
        self.lba_high = Fifo::set(0);
        self.device = 0;
    }

    fn raise_irq(&mut self) {
        self.irq_pending = true;
        if self.control & NIEN == 0 {
            self.trigger_irq();
        }
    }

    fn trigger_irq(&self) {
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.write(1) {
                warn!("ata: cannot raise IRQ 14: {e}");
            }
        }
    }

    fn command(&mut self, cmd: u8) {
        if self.slave_selected() || self.status & BSY != 0 {
            return;
        }
        trace!("ata: command {cmd:#04x}");
        self.stats.commands += 1;
        // A new command abandons any data phase in progress.
        self.transfer = Transfer::Idle;
        self.irq_pending = false;
        self.error = 0;
        self.status = READY;
        if let Err(failure) = self.execute(cmd) {
            self.fail(failure);
        }
    }

    fn execute(&mut self, cmd: u8) -> Result<(), Failure> {
        match cmd {
            CMD_IDENTIFY => {
                *self.buf = identify::identify_data(self.sectors, &self.path);
                self.start_data_in(0, 0);
                Ok(())
            }
            CMD_READ_SECTORS | CMD_READ_SECTORS_NORETRY => self.read_sectors(false),
            CMD_READ_SECTORS_EXT => self.read_sectors(true),
            CMD_WRITE_SECTORS | CMD_WRITE_SECTORS_NORETRY => self.write_sectors(false),
            CMD_WRITE_SECTORS_EXT => self.write_sectors(true),
            CMD_FLUSH_CACHE | CMD_FLUSH_CACHE_EXT => self.flush(),
            CMD_EXECUTE_DIAGNOSTIC => {
                self.load_signature();
                self.raise_irq();
                Ok(())
            }
            CMD_INITIALIZE_PARAMETERS => self.initialize_parameters(),
            CMD_CHECK_POWER_MODE => {
                self.count.push(POWER_ACTIVE);
                self.complete()
            }
            CMD_SET_FEATURES | CMD_IDLE_IMMEDIATE | CMD_STANDBY_IMMEDIATE => self.complete(),
            _ => {
                warn!("ata: unsupported command {cmd:#04x} aborted");
                Err(ABRT)
            }
        }
    }

    /// Ends a non-data command successfully.
    fn complete(&mut self) -> Result<(), Failure> {
        self.raise_irq();
        Ok(())
    }

    /// Ends the command with ERR and `failure` in the error register.
    fn fail(&mut self, failure: Failure) {
        self.transfer = Transfer::Idle;
        self.error = failure;
        self.status = READY | ERR;
        self.stats.errors += 1;
        self.raise_irq();
    }

    /// The drive only knows the geometry it reports; any other is refused.
    fn initialize_parameters(&mut self) -> Result<(), Failure> {
        let heads = u64::from(self.device & 0x0f) + 1;
        if heads != HEADS || u64::from(self.count.current) != SECTORS_PER_TRACK {
            return Err(ABRT);
        }
        self.complete()
    }

    /// The first sector and sector count of a read or write, checked against the capacity.
    fn extent(&self, ext: bool) -> Result<(u64, u64), Failure> {
        let (lba, count, limit) = if ext {
            let count = match self.count.wide() {
                0 => 65536,
                n => n,
            };
            (self.lba48(), count, self.sectors)
        } else {
            let count = match self.count.current {
                0 => 256,
                n => u64::from(n),
            };
            (self.lba28()?, count, self.sectors.min(LBA28_LIMIT))
        };
        match lba.checked_add(count) {
            Some(end) if end <= limit => Ok((lba, count)),
            _ => Err(IDNF),
        }
    }

    /// The address of a 48-bit command: bits 47-24 are the registers' previous contents.
    fn lba48(&self) -> u64 {
        let [low, mid, high] = [self.lba_low, self.lba_mid, self.lba_high];
        [
            high.previous,
            mid.previous,
            low.previous,
            high.current,
            mid.current,
            low.current,
        ]
        .iter()
        .fold(0, |lba, byte| lba << 8 | u64::from(*byte))
    }

    /// The address of a 28-bit command: LBA, or cylinder/head/sector when the LBA bit is clear.
    fn lba28(&self) -> Result<u64, Failure> {
        let low = u64::from(self.lba_low.current);
        let mid = u64::from(self.lba_mid.current);
        let high = u64::from(self.lba_high.current);
        let top = u64::from(self.device & 0x0f);
        if self.device & LBA_MODE != 0 {
            return Ok(top << 24 | high << 16 | mid << 8 | low);
        }
        let (cylinder, head, sector) = (high << 8 | mid, top, low);
        if sector == 0
            || sector > SECTORS_PER_TRACK
            || cylinder >= identify::cylinders(self.sectors)
        {
            return Err(IDNF);
        }
        Ok((cylinder * HEADS + head) * SECTORS_PER_TRACK + sector - 1)
    }

    fn read_sectors(&mut self, ext: bool) -> Result<(), Failure> {
        let (lba, count) = self.extent(ext)?;
        self.load_sector(lba)?;
        self.start_data_in(lba + 1, count - 1);
        Ok(())
    }

    fn write_sectors(&mut self, ext: bool) -> Result<(), Failure> {
        if self.readonly {
            return Err(ABRT);
        }
        let (lba, count) = self.extent(ext)?;
        self.transfer = Transfer::Out { lba, left: count };
        self.pos = 0;
        // The first DRQ block of a PIO data-out command raises no interrupt.
        self.status = READY | DRQ;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Failure> {
        self.stats.flushes += 1;
        if !self.readonly {
            if let Err(e) = self.image.sync_data() {
                warn!("ata: cannot flush {}: {e}", self.path.display());
                return Err(ABRT);
            }
        }
        self.complete()
    }

    /// The buffer holds data for the guest: DRQ and an interrupt for the block.
    fn start_data_in(&mut self, next: u64, left: u64) {
        self.transfer = Transfer::In { next, left };
        self.pos = 0;
        self.status = READY | DRQ;
        self.raise_irq();
    }

    /// Reads sector `lba` of the image into the buffer.
    fn load_sector(&mut self, lba: u64) -> Result<(), Failure> {
        if let Err(e) = self
            .image
            .read_exact_at(&mut self.buf[..], lba * SECTOR_SIZE)
        {
            warn!(
                "ata: cannot read sector {lba} of {}: {e}",
                self.path.display()
            );
            self.report_address(lba);
            return Err(UNC);
        }
        self.stats.sectors_read += 1;
        Ok(())
    }

    /// Leaves the address of a failed sector in the LBA registers, as drives do.
    fn report_address(&mut self, lba: u64) {
        self.lba_low = Fifo {
            current: lba as u8,
            previous: (lba >> 24) as u8,
        };
        self.lba_mid = Fifo {
            current: (lba >> 8) as u8,
            previous: (lba >> 32) as u8,
        };
        self.lba_high = Fifo {
            current: (lba >> 16) as u8,
            previous: (lba >> 40) as u8,
        };
    }

    /// The data register, read: the next bytes of the sector buffer (zeros without DRQ).
    pub fn read_data(&mut self, data: &mut [u8]) {
        for byte in data {
            *byte = self.data_in_byte();
        }
    }

    fn data_in_byte(&mut self) -> u8 {
        if self.slave_selected() {
            return 0;
        }
        let Transfer::In { next, left } = self.transfer else {
            return 0;
        };
        let byte = self.buf.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        if self.pos >= SECTOR {
            self.pos = 0;
            if left == 0 {
                self.transfer = Transfer::Idle;
                self.status = READY;
            } else {
                match self.load_sector(next) {
                    Ok(()) => self.start_data_in(next + 1, left - 1),
                    Err(failure) => self.fail(failure),
                }
            }
        }
        byte
    }

    /// The data register, written: bytes into the sector buffer, stored at each full sector.
    pub fn write_data(&mut self, data: &[u8]) {
        for byte in data {
            self.data_out_byte(*byte);
        }
    }

    fn data_out_byte(&mut self, byte: u8) {
        if self.slave_selected() {
            return;
        }
        let Transfer::Out { lba, left } = self.transfer else {
            return;
        };
        if let Some(slot) = self.buf.get_mut(self.pos) {
            *slot = byte;
        }
        self.pos += 1;
        if self.pos >= SECTOR {
            self.pos = 0;
            self.store_sector(lba, left);
        }
    }

    /// The buffer is full: writes it to sector `lba`, then asks for the next or completes.
    fn store_sector(&mut self, lba: u64, left: u64) {
        if let Err(e) = self.image.write_all_at(&self.buf[..], lba * SECTOR_SIZE) {
            warn!(
                "ata: cannot write sector {lba} of {}: {e}",
                self.path.display()
            );
            self.report_address(lba);
            self.fail(ABRT);
            self.status |= DF;
            return;
        }
        self.stats.sectors_written += 1;
        if left > 1 {
            self.transfer = Transfer::Out {
                lba: lba + 1,
                left: left - 1,
            };
            self.status = READY | DRQ;
        } else {
            self.transfer = Transfer::Idle;
            self.status = READY;
        }
        self.raise_irq();
    }
}
