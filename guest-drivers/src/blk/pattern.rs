//! The deterministic disk pattern and the checksum the block tasks use (both documented in
//! docs/boot-protocol.md so host tests can recompute them).
//!
//! Pattern: the 512-byte sector `s` holds 64 little-endian u64 words; word `k` (0..64) is
//! `splitmix64(seed ^ (s * 64 + k))`, where splitmix64(x) is
//! `z = x + 0x9e3779b97f4a7c15; z = (z ^ z >> 30) * 0xbf58476d1ce4e5b9;
//! z = (z ^ z >> 27) * 0x94d049bb133111eb; z ^ z >> 31` (wrapping arithmetic).
//! Checksum: FNV-1a 64 over bytes (offset basis 0xcbf29ce484222325, prime 0x100000001b3).

use super::SECTOR;

/// The default pattern seed ("splitvis" as a big-endian u64).
pub const DEFAULT_SEED: u64 = 0x7370_6c69_7476_6973;

const WORDS_PER_SECTOR: u64 = SECTOR / 8;

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(seed: u64, sector: u64, k: u64) -> u64 {
    splitmix64(seed ^ sector.wrapping_mul(WORDS_PER_SECTOR).wrapping_add(k))
}

/// Views `len` bytes at `buf` as u64 words.
///
/// # Safety
/// `[buf, buf + len)` must be a valid, 8-byte aligned buffer owned by the caller.
unsafe fn words<'a>(buf: u64, len: u64) -> &'a mut [u64] {
    // SAFETY: the caller vouches for the buffer.
    unsafe { core::slice::from_raw_parts_mut(buf as *mut u64, (len / 8) as usize) }
}

/// Fills the buffer for sectors starting at `first_sector` with the pattern.
///
/// # Safety
/// As for `words`.
pub unsafe fn fill(buf: u64, len: u64, first_sector: u64, seed: u64) {
    // SAFETY: forwarded from the caller.
    let w = unsafe { words(buf, len) };
    for (i, slot) in w.iter_mut().enumerate() {
        let i = i as u64;
        *slot = word(
            seed,
            first_sector + i / WORDS_PER_SECTOR,
            i % WORDS_PER_SECTOR,
        );
    }
}

/// Checks the buffer against the pattern; returns the byte offset of the first mismatch
/// (within the buffer) and the number of mismatching sectors.
///
/// # Safety
/// As for `words`.
pub unsafe fn verify(buf: u64, len: u64, first_sector: u64, seed: u64) -> Option<(u64, u64)> {
    // SAFETY: forwarded from the caller.
    let w = unsafe { words(buf, len) };
    let mut first = None;
    let mut bad_sectors = 0;
    for (s, sector) in w.chunks(WORDS_PER_SECTOR as usize).enumerate() {
        let sector_no = first_sector + s as u64;
        let bad = sector
            .iter()
            .enumerate()
            .position(|(k, &v)| v != word(seed, sector_no, k as u64));
        if let Some(k) = bad {
            bad_sectors += 1;
            first.get_or_insert(s as u64 * SECTOR + k as u64 * 8);
        }
    }
    first.map(|f| (f, bad_sectors))
}

/// FNV-1a 64 running state.
pub struct Fnv1a(u64);

impl Fnv1a {
    pub fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    /// Hashes `len` bytes at `buf`.
    ///
    /// # Safety
    /// `[buf, buf + len)` must be readable.
    pub unsafe fn update(&mut self, buf: u64, len: u64) {
        // SAFETY: forwarded from the caller.
        let bytes = unsafe { core::slice::from_raw_parts(buf as *const u8, len as usize) };
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn value(&self) -> u64 {
        self.0
    }
}
