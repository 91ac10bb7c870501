//! The 256-word IDENTIFY DEVICE data block (ATA/ATAPI-6 section 8.15) and the drive's CHS
//! geometry, which the identify data reports for guests that do not use LBA.

use std::path::Path;

pub const MODEL: &str = "SPLITVISOR ATA DISK";
/// Heads and sectors per track of the translated CHS geometry (the usual 16/63).
pub const HEADS: u64 = 16;
pub const SECTORS_PER_TRACK: u64 = 63;
/// The most cylinders CHS addressing can report.
const MAX_CYLINDERS: u64 = 16383;
/// The most sectors 28-bit commands can address (IDENTIFY words 60-61 saturate here).
pub const LBA28_LIMIT: u64 = 0x0fff_ffff;

/// Cylinders of the translated geometry for a disk of `sectors`.
pub fn cylinders(sectors: u64) -> u64 {
    (sectors / (HEADS * SECTORS_PER_TRACK)).min(MAX_CYLINDERS)
}

/// Word 0: fixed, non-removable ATA device.
const GENERAL_CONFIG: u16 = 0x0040;
/// Word 49: LBA supported (no DMA: this drive is PIO only).
const CAP_LBA: u16 = 1 << 9;
/// Words 82/85: power management and write cache feature sets.
const CMDSET_POWER_MGMT: u16 = 1 << 3;
const CMDSET_WRITE_CACHE: u16 = 1 << 5;
/// Words 83/86: 48-bit address, FLUSH CACHE, FLUSH CACHE EXT.
const CMDSET_LBA48: u16 = 1 << 10;
const CMDSET_FLUSH: u16 = 1 << 12;
const CMDSET_FLUSH_EXT: u16 = 1 << 13;
/// Bit 14 of words 50, 83, 84, 87 "shall be set to one".
const VALID: u16 = 1 << 14;

/// Builds the identify block, little-endian words as they leave the data port.
pub fn identify_data(sectors: u64, path: &Path) -> [u8; 512] {
    let mut w = [0u16; 256];
    let cyls = cylinders(sectors) as u16;
    w[0] = GENERAL_CONFIG;
    w[1] = cyls;
    w[3] = HEADS as u16;
    w[6] = SECTORS_PER_TRACK as u16;
    put_string(&mut w[10..20], &serial(path));
    put_string(&mut w[23..27], env!("CARGO_PKG_VERSION"));
    put_string(&mut w[27..47], MODEL);
    w[47] = 0x8000; // READ/WRITE MULTIPLE not supported
    w[49] = CAP_LBA;
    w[50] = VALID;
    w[51] = 0x0200; // PIO mode 2 timing (obsolete word)
    w[53] = 0x0003; // words 54-58 and 64-70 are valid
    w[54] = cyls;
    w[55] = HEADS as u16;
    w[56] = SECTORS_PER_TRACK as u16;
    put_u32(&mut w[57..59], u64::from(cyls) * HEADS * SECTORS_PER_TRACK);
    put_u32(&mut w[60..62], sectors.min(LBA28_LIMIT));
    w[64] = 0x0003; // PIO modes 3 and 4
    w[65..69].fill(120); // cycle times in ns
    w[80] = 0x007e; // ATA-1 .. ATA/ATAPI-6
    w[82] = CMDSET_POWER_MGMT | CMDSET_WRITE_CACHE;
    w[83] = VALID | CMDSET_FLUSH_EXT | CMDSET_FLUSH | CMDSET_LBA48;
    w[84] = VALID;
    w[85] = w[82];
    w[86] = CMDSET_FLUSH_EXT | CMDSET_FLUSH | CMDSET_LBA48;
    w[87] = VALID;
    for (i, word) in w[100..104].iter_mut().enumerate() {
        *word = (sectors >> (16 * i)) as u16;
    }
    let mut bytes = [0u8; 512];
    for (chunk, word) in bytes.chunks_exact_mut(2).zip(w) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    seal(&mut bytes);
    bytes
}

/// ATA strings: space padded, two characters a word, the first in the high byte.
fn put_string(words: &mut [u16], text: &str) {
    let mut chars = text.bytes().chain(std::iter::repeat(b' '));
    for word in words {
        let hi = chars.next().unwrap_or(b' ');
        let lo = chars.next().unwrap_or(b' ');
        *word = u16::from_be_bytes([hi, lo]);
    }
}

/// A 32-bit value over two words, low word first.
fn put_u32(words: &mut [u16], value: u64) {
    let value = value.min(u64::from(u32::MAX));
    words[0] = value as u16;
    words[1] = (value >> 16) as u16;
}

/// A stable serial number derived from the image path (FNV-1a), so that a guest sees the same
/// disk across runs.
fn serial(path: &Path) -> String {
    let hash = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("SV{hash:016X}")
}

/// Word 255: signature 0xa5 and a checksum byte making all 512 bytes sum to zero.
fn seal(bytes: &mut [u8; 512]) {
    bytes[510] = 0xa5;
    let sum = bytes[..511].iter().fold(0u8, |s, b| s.wrapping_add(*b));
    bytes[511] = sum.wrapping_neg();
}
