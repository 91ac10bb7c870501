//! Test data and checksums: the guest's disk pattern and checksum (docs/boot-protocol.md),
//! recomputed on the host (what `blk-verify` leaves on a disk, and the FNV-1a 64 it reports over
//! a region); seeded pseudo-random bytes; busybox's `yes` output and CRC-32.

use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// The guest's default pattern seed ("splitvis" as a big-endian u64).
pub const DEFAULT_SEED: u64 = 0x7370_6c69_7476_6973;

/// The region `blk-verify` writes and verifies from sector 0 (its default for virtio).
pub const BLK_VERIFY_REGION: usize = 1 << 20;

const WORDS_PER_SECTOR: u64 = SECTOR / 8;

/// The splitmix64 finaliser of the boot protocol (one step from state `x`).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The bytes `blk-verify` with `seed` writes over `len` bytes from absolute sector `sector`:
/// word `k` of sector `s` is `splitmix64(seed ^ (s * 64 + k))`, little-endian.
pub fn sectors(seed: u64, sector: u64, len: usize) -> Vec<u8> {
    assert_eq!(len as u64 % SECTOR, 0, "the pattern covers whole sectors");
    let words = len as u64 / 8;
    let first = sector.wrapping_mul(WORDS_PER_SECTOR);
    (0..words)
        .flat_map(|i| splitmix64(seed ^ first.wrapping_add(i)).to_le_bytes())
        .collect()
}

/// FNV-1a 64 (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The checksum as the guest's RESULT line spells it: 16 lower-case hex digits.
pub fn fnv1a64_hex(data: &[u8]) -> String {
    format!("{:016x}", fnv1a64(data))
}

/// A value that differs between runs (time and pid), to seed test data.
pub fn nonce() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Deterministic pseudo-random bytes (xorshift64*) from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The bytes `yes LINE | head -c LEN` produces in the guest.
pub fn yes_pattern(line: &str, len: usize) -> Vec<u8> {
    let unit = format!("{line}\n");
    unit.bytes().cycle().take(len).collect()
}

/// CRC-32 (IEEE, as zlib and busybox `crc32` compute it).
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference() {
        // The first output of the reference splitmix64 generator seeded with 0 and 1234567.
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(1_234_567), 0x599e_d017_fb08_fc85);
    }

    #[test]
    fn fnv1a64_matches_the_reference() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // What the guest reported for 8 KiB and 4 KiB of zeros.
        assert_eq!(fnv1a64_hex(&[0; 8192]), "b9d103fd6854a325");
        assert_eq!(fnv1a64_hex(&[0; 4096]), "b93a0c83ce3b6325");
    }

    #[test]
    fn pattern_words_follow_the_formula() {
        let seed = 0x1234;
        let bytes = sectors(seed, 7, 1024);
        assert_eq!(bytes.len(), 1024);
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(word(0), splitmix64(seed ^ (7 * 64)));
        assert_eq!(word(63), splitmix64(seed ^ (7 * 64 + 63)));
        assert_eq!(word(64), splitmix64(seed ^ (8 * 64)));
        // A region is the concatenation of its sectors, wherever it starts.
        assert_eq!(&bytes[512..], &sectors(seed, 8, 512)[..]);
        assert_ne!(sectors(seed, 7, 512), sectors(seed + 1, 7, 512));
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn yes_pattern_repeats_lines() {
        assert_eq!(yes_pattern("ab", 7), b"ab\nab\na");
    }

    #[test]
    fn random_bytes_are_seeded() {
        assert_eq!(random_bytes(7, 100), random_bytes(7, 100));
        assert_ne!(random_bytes(7, 100), random_bytes(8, 100));
        assert_eq!(random_bytes(7, 13).len(), 13);
    }
}
