//! Unit tests of the emulated ATA disk, driven only through port accesses on a `Bus`, as a
//! guest's PIO driver would.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::bus::Bus;

const DATA: u16 = 0x1f0;
const ERROR: u16 = 0x1f1;
const COUNT: u16 = 0x1f2;
const LBA_LOW: u16 = 0x1f3;
const LBA_MID: u16 = 0x1f4;
const LBA_HIGH: u16 = 0x1f5;
const DEVICE: u16 = 0x1f6;
const STATUS: u16 = 0x1f7;
const ALT_STATUS: u16 = 0x3f6;

const BSY: u8 = 0x80;
const DRDY: u8 = 0x40;
const DRQ: u8 = 0x08;
const ERR: u8 = 0x01;
const IDNF: u8 = 0x10;
const ABRT: u8 = 0x04;
const NIEN: u8 = 0x02;

/// A temporary image file, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(len: u64) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ata-test-{}-{n}.img", std::process::id()));
        File::create(&path).unwrap().set_len(len).unwrap();
        Self(path)
    }

    fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        File::open(&self.0)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A guest's view: the disk's two ranges on a port bus.
struct Guest {
    bus: Bus,
    disk: AtaDisk,
}

impl Guest {
    fn new(image: &TempImage, readonly: bool) -> Self {
        let disk = AtaDisk::open(&image.0, readonly).unwrap();
        let mut bus = Bus::new();
        bus.insert(
            COMMAND_BLOCK_BASE,
            COMMAND_BLOCK_LEN,
            "ata",
            disk.command_block(),
        )
        .unwrap();
        bus.insert(CONTROL_BASE, CONTROL_LEN, "ata-ctl", disk.control())
            .unwrap();
        Self { bus, disk }
    }

    fn inb(&self, port: u16) -> u8 {
        let mut b = [0u8; 1];
        assert!(self.bus.read(port.into(), &mut b));
        b[0]
    }

    fn outb(&self, port: u16, value: u8) {
        assert!(self.bus.write(port.into(), &[value]));
    }

    fn inw(&self, port: u16) -> u16 {
        let mut b = [0u8; 2];
        assert!(self.bus.read(port.into(), &mut b));
        u16::from_le_bytes(b)
    }

    fn outw(&self, port: u16, value: u16) {
        assert!(self.bus.write(port.into(), &value.to_le_bytes()));
    }

    /// Issues a 28-bit LBA command.
    fn command28(&self, cmd: u8, lba: u32, count: u8) {
        self.outb(DEVICE, 0xe0 | (lba >> 24) as u8 & 0x0f);
        self.outb(COUNT, count);
        self.outb(LBA_LOW, lba as u8);
        self.outb(LBA_MID, (lba >> 8) as u8);
        self.outb(LBA_HIGH, (lba >> 16) as u8);
        self.outb(STATUS, cmd);
    }

    /// Issues a 48-bit command: high-order bytes first into each register FIFO.
    fn command48(&self, cmd: u8, lba: u64, count: u16) {
        self.outb(DEVICE, 0x40);
        for (port, shift) in [(COUNT, 0), (LBA_LOW, 0), (LBA_MID, 8), (LBA_HIGH, 16)] {
            let (hi, lo) = if port == COUNT {
                ((count >> 8) as u8, count as u8)
            } else {
                ((lba >> (24 + shift)) as u8, (lba >> shift) as u8)
            };
            self.outb(port, hi);
            self.outb(port, lo);
        }
        self.outb(STATUS, cmd);
    }

    /// Reads one sector of a data-in command after polling for DRQ, word by word.
    fn read_sector(&self) -> Vec<u8> {
        let status = self.inb(STATUS);
        assert_eq!(status & (BSY | DRQ | ERR), DRQ, "status {status:#x}");
        (0..256)
            .flat_map(|_| self.inw(DATA).to_le_bytes())
            .collect()
    }

    fn write_sector(&self, data: &[u8]) {
        let status = self.inb(STATUS);
        assert_eq!(status & (BSY | DRQ | ERR), DRQ, "status {status:#x}");
        for word in data.chunks_exact(2) {
            self.outw(DATA, u16::from_le_bytes([word[0], word[1]]));
        }
    }

    fn lba_registers(&self) -> [u8; 4] {
        [COUNT, LBA_LOW, LBA_MID, LBA_HIGH].map(|p| self.inb(p))
    }
}

fn ata_string(bytes: &[u8]) -> String {
    let swapped: Vec<u8> = bytes.chunks_exact(2).flat_map(|w| [w[1], w[0]]).collect();
    String::from_utf8(swapped).unwrap().trim_end().to_string()
}

fn word(id: &[u8], n: usize) -> u64 {
    u64::from(u16::from_le_bytes([id[2 * n], id[2 * n + 1]]))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn identify_reports_model_capacity_and_features() {
    // Partial sectors are only allowed read-only; IDENTIFY does not depend on it.
    let image = TempImage::new(1000 * 512 + 100);
    let guest = Guest::new(&image, true);
    assert_eq!(guest.inb(STATUS), DRDY | 0x10);
    guest.outb(DEVICE, 0xa0);
    guest.outb(STATUS, 0xec);
    let id = guest.read_sector();
    assert_eq!(
        guest.inb(STATUS) & (DRQ | ERR),
        0,
        "DRQ drops after 256 words"
    );
    assert_eq!(ata_string(&id[54..94]), "SPLITVISOR ATA DISK");
    assert!(ata_string(&id[20..40]).starts_with("SV"));
    assert_eq!(word(&id, 60) | word(&id, 61) << 16, 1000, "rounded down");
    let lba48 = (0..4).fold(0, |acc, i| acc | word(&id, 100 + i) << (16 * i));
    assert_eq!(lba48, 1000);
    assert_ne!(word(&id, 49) & (1 << 9), 0, "LBA");
    assert_eq!(word(&id, 83) & 0x3400, 0x3400, "48-bit, FLUSH, FLUSH EXT");
    assert_eq!(
        id.iter().fold(0u8, |s, b| s.wrapping_add(*b)),
        0,
        "checksum"
    );
    assert_eq!(guest.disk.sectors(), 1000);
}

#[test]
fn written_sectors_read_back_and_land_at_their_offset() {
    let image = TempImage::new(64 * 512);
    let guest = Guest::new(&image, false);
    let data = pattern(1024, 7);
    guest.command28(0x30, 10, 2);
    guest.write_sector(&data[..512]);
    guest.write_sector(&data[512..]);
    assert_eq!(guest.inb(STATUS) & (DRQ | ERR), 0);
    guest.command28(0xe7, 0, 0);
    assert_eq!(guest.inb(STATUS) & ERR, 0, "flush");
    assert_eq!(image.read_at(10 * 512, 1024), data);
    assert_eq!(image.read_at(9 * 512, 512), vec![0; 512]);

    guest.command28(0x20, 10, 2);
    let mut back = guest.read_sector();
    back.extend(guest.read_sector());
    assert_eq!(back, data);
    assert_eq!(guest.inb(STATUS) & (DRQ | ERR), 0);
    let stats = guest.disk.stats();
    assert_eq!((stats.sectors_read, stats.sectors_written), (2, 2));
    assert_eq!((stats.commands, stats.flushes, stats.errors), (3, 1, 0));
}

#[test]
fn byte_and_dword_data_accesses_move_that_many_bytes() {
    let image = TempImage::new(8 * 512);
    let data = pattern(512, 3);
    OpenOptions::new()
        .write(true)
        .open(&image.0)
        .unwrap()
        .write_all_at(&data, 512)
        .unwrap();
    let guest = Guest::new(&image, false);
    guest.command28(0x20, 1, 1);
    let mut back = Vec::new();
    for _ in 0..128 {
        let mut dword = [0u8; 4];
        assert!(guest.bus.read(DATA.into(), &mut dword));
        back.extend(dword);
    }
    assert_eq!(back, data);
    guest.command28(0x20, 1, 1);
    let bytes: Vec<u8> = (0..512).map(|_| guest.inb(DATA)).collect();
    assert_eq!(bytes, data);
    assert_eq!(guest.inb(STATUS) & DRQ, 0);
}

#[test]
fn lba48_reaches_beyond_the_28_bit_limit() {
    let image = TempImage::new(200 << 30);
    let guest = Guest::new(&image, false);
    let lba = (1u64 << 28) + 12345;
    let data = pattern(512, 99);
    guest.command48(0x34, lba, 1);
    guest.write_sector(&data);
    assert_eq!(guest.inb(STATUS) & (DRQ | ERR), 0);
    guest.command48(0xea, 0, 0);
    assert_eq!(guest.inb(STATUS) & ERR, 0);
    assert_eq!(image.read_at(lba * 512, 512), data);

    guest.command48(0x24, lba, 1);
    assert_eq!(guest.read_sector(), data);
    // HOB reads back the high-order bytes written first.
    guest.outb(ALT_STATUS, 0x80 | NIEN);
    assert_eq!(guest.lba_registers(), [0, (lba >> 24) as u8, 0, 0]);
    guest.outb(ALT_STATUS, NIEN);
    assert_eq!(
        guest.lba_registers()[1..],
        [lba as u8, (lba >> 8) as u8, (lba >> 16) as u8]
    );
}

#[test]
fn out_of_range_addresses_fail_with_idnf() {
    let image = TempImage::new(200 << 30);
    let guest = Guest::new(&image, false);
    let sectors = guest.disk.sectors();
    guest.command48(0x24, sectors - 1, 2);
    assert_eq!(guest.inb(STATUS) & (ERR | DRQ), ERR);
    assert_eq!(guest.inb(ERROR), IDNF);
    guest.command48(0x24, sectors - 1, 1);
    assert_eq!(guest.read_sector(), vec![0; 512], "the last sector is fine");

    let small = TempImage::new(16 * 512);
    let guest = Guest::new(&small, false);
    guest.command28(0x30, 16, 1);
    assert_eq!(guest.inb(STATUS) & (ERR | DRQ), ERR);
    assert_eq!(guest.inb(ERROR), IDNF);
    guest.command28(0x20, 15, 0);
    assert_eq!(guest.inb(ERROR), IDNF, "count 0 means 256 sectors");
    assert_eq!(guest.disk.errors(), 2);
}

#[test]
fn a_read_only_image_refuses_writes() {
    let image = TempImage::new(16 * 512);
    let guest = Guest::new(&image, true);
    guest.command28(0x30, 0, 1);
    assert_eq!(guest.inb(STATUS) & (ERR | DRQ), ERR);
    assert_eq!(guest.inb(ERROR), ABRT);
    guest.command48(0x34, 0, 1);
    assert_eq!(guest.inb(ERROR), ABRT);
    guest.command28(0x20, 0, 1);
    assert_eq!(guest.read_sector(), vec![0; 512], "reads still work");
}

#[test]
fn unknown_commands_abort() {
    let image = TempImage::new(16 * 512);
    let guest = Guest::new(&image, false);
    guest.outb(DEVICE, 0xe0);
    guest.outb(STATUS, 0xc8); // READ DMA: this drive is PIO only
    assert_eq!(guest.inb(STATUS) & (ERR | DRQ | DRDY), ERR | DRDY);
    assert_eq!(guest.inb(ERROR), ABRT);
    guest.outb(STATUS, 0xef);
    assert_eq!(guest.inb(STATUS) & ERR, 0, "SET FEATURES is accepted");
}

#[test]
fn soft_reset_leaves_the_ata_signature() {
    let image = TempImage::new(16 * 512);
    let guest = Guest::new(&image, false);
    guest.command28(0x20, 3, 4);
    guest.outb(ALT_STATUS, 0x04 | NIEN);
    assert_eq!(guest.inb(ALT_STATUS) & BSY, BSY, "busy while SRST is set");
    guest.outb(ALT_STATUS, NIEN);
    assert_eq!(guest.inb(ALT_STATUS) & (BSY | DRQ | DRDY), DRDY);
    assert_eq!(guest.lba_registers(), [1, 1, 0, 0]);
    assert_eq!(guest.inb(DEVICE) & 0x10, 0);
    assert_eq!(guest.inb(ERROR), 0x01, "diagnostics passed");
    assert_eq!(guest.inw(DATA), 0, "the interrupted read is gone");
}

#[test]
fn the_absent_slave_reads_as_no_device() {
    let image = TempImage::new(16 * 512);
    let guest = Guest::new(&image, false);
    guest.outb(DEVICE, 0xb0);
    guest.outb(COUNT, 0x55);
    guest.outb(LBA_LOW, 0xaa);
    assert_eq!(guest.inb(STATUS), 0);
    assert_eq!(guest.inb(ALT_STATUS), 0);
    assert_eq!(guest.lba_registers(), [0; 4]);
    guest.outb(STATUS, 0xec);
    assert_eq!(guest.inb(STATUS), 0, "commands to device 1 go nowhere");
    assert_eq!(guest.disk.commands(), 0);
    guest.outb(DEVICE, 0xa0);
    assert_eq!(guest.inb(STATUS), DRDY | 0x10);
}

#[test]
fn interrupts_follow_each_sector_unless_masked() {
    let image = TempImage::new(16 * 512);
    let guest = Guest::new(&image, false);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    guest.disk.set_interrupt(irq.try_clone().unwrap());
    guest.outb(ALT_STATUS, 0);
    guest.command28(0x20, 0, 2);
    guest.read_sector();
    guest.read_sector();
    assert_eq!(irq.read().unwrap(), 2, "one per data-in block");
    guest.command28(0x30, 0, 2);
    guest.write_sector(&[1; 512]);
    guest.write_sector(&[2; 512]);
    assert_eq!(irq.read().unwrap(), 2, "after each data-out block");

    guest.outb(ALT_STATUS, NIEN);
    guest.command28(0x20, 0, 1);
    guest.read_sector();
    assert!(irq.read().is_err(), "masked by nIEN");
    guest.outb(STATUS, 0xe7);
    guest.outb(ALT_STATUS, 0);
    assert_eq!(
        irq.read().unwrap(),
        1,
        "a pending interrupt fires on unmask"
    );
}

#[test]
fn open_errors_name_the_image() {
    let missing = std::env::temp_dir().join(format!("ata-missing-{}.img", std::process::id()));
    let err = AtaDisk::open(&missing, false).err().unwrap();
    assert!(matches!(err, AtaError::Missing { .. }));
    assert!(err.to_string().contains(&missing.display().to_string()));
    let tiny = TempImage::new(100);
    let err = AtaDisk::open(&tiny.0, true).err().unwrap();
    assert!(matches!(err, AtaError::TooSmall { .. }));
    let dir = AtaDisk::open(&std::env::temp_dir(), true).err().unwrap();
    assert!(matches!(dir, AtaError::NotAFile { .. }));
}

#[test]
fn only_disk_like_files_open_and_a_second_writer_is_refused() {
    // Not a regular file or block device: refused before it is even opened.
    let err = AtaDisk::open(Path::new("/dev/null"), false).err().unwrap();
    assert!(matches!(err, AtaError::NotAFile { .. }), "{err}");
    // A file that is not whole sectors (like /etc/passwd) only read-only.
    let odd = TempImage::new(4096 + 100);
    let err = AtaDisk::open(&odd.0, false).err().unwrap();
    assert!(
        matches!(
            err,
            AtaError::PartialSector {
                len: 4196,
                tail: 100,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("readonly"), "{err}");
    assert_eq!(AtaDisk::open(&odd.0, true).unwrap().sectors(), 8);

    let image = TempImage::new(8 * 512);
    let writer = AtaDisk::open(&image.0, false).unwrap();
    for readonly in [false, true] {
        let err = AtaDisk::open(&image.0, readonly).err().unwrap();
        assert!(matches!(err, AtaError::Locked(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&image.0.display().to_string()), "{msg}");
        assert!(msg.contains("in use by another process"), "{msg}");
    }
    drop(writer);
    let reader = AtaDisk::open(&image.0, true).unwrap();
    let other_reader = AtaDisk::open(&image.0, true).unwrap();
    assert!(
        AtaDisk::open(&image.0, false).is_err(),
        "a writer beside readers"
    );
    drop((reader, other_reader));
    AtaDisk::open(&image.0, false).unwrap();
}

/// xorshift64: deterministic noise for the access sequence.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn random_register_traffic_never_panics() {
    // Read-only, the size may end in a partial sector (rounded down).
    for (len, readonly) in [(64 * 512, false), (64 * 512 + 17, true)] {
        let image = TempImage::new(len);
        let guest = Guest::new(&image, readonly);
        let commands = [
            0x20, 0x24, 0x30, 0x34, 0xec, 0xe7, 0xea, 0xef, 0x90, 0x91, 0x00,
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            let r = next(&mut state);
            let port = [
                0x1f0, 0x1f0, 0x1f0, 0x1f1, 0x1f2, 0x1f3, 0x1f4, 0x1f5, 0x1f6, 0x1f7, 0x3f6,
            ][(r % 11) as usize];
            let max = if port == 0x3f6 { 1 } else { 8 - (port - 0x1f0) };
            let width = [1u64, 2, 4][(r >> 8) as usize % 3].min(max);
            let mut data = vec![(r >> 16) as u8; width as usize];
            if port == 0x1f7 && r & (1 << 40) != 0 {
                data[0] = commands[(r >> 24) as usize % commands.len()];
            }
            if r & (1 << 41) != 0 {
                guest.bus.read(port, &mut data);
            } else {
                guest.bus.write(port, &data);
            }
        }
        let stats = guest.disk.stats();
        assert!(stats.commands > 0 && stats.errors > 0);
    }
}

#[test]
fn a_write_interrupted_mid_sector_finishes_on_the_restored_drive() {
    let image = TempImage::new(64 * 512);
    let data = pattern(1024, 9);
    let saved = {
        let guest = Guest::new(&image, false);
        guest.command28(0x30, 4, 2);
        guest.write_sector(&data[..512]);
        // Half of the second sector is in the drive's buffer when the snapshot is taken.
        for word in data[512..768].chunks_exact(2) {
            guest.outw(DATA, u16::from_le_bytes([word[0], word[1]]));
        }
        guest.disk.save()
    };
    assert_eq!(image.read_at(5 * 512, 512), vec![0; 512], "not written yet");
    let guest = Guest::new(&image, false);
    guest.disk.restore(&saved).unwrap();
    for word in data[768..].chunks_exact(2) {
        guest.outw(DATA, u16::from_le_bytes([word[0], word[1]]));
    }
    assert_eq!(guest.inb(STATUS) & (DRQ | ERR), 0);
    assert_eq!(image.read_at(4 * 512, 1024), data);
    assert_eq!(
        guest.disk.save().transfer,
        crate::device_state::AtaTransfer::Idle
    );

    let other = TempImage::new(32 * 512);
    let err = Guest::new(&other, false).disk.restore(&saved).unwrap_err();
    assert!(err.to_string().contains("64 sectors"), "{err}");
}
