//! Disk images for tests: created empty (sparse) or filled with seeded bytes, and compared with
//! what a test expects them to hold afterwards.

use std::path::{Path, PathBuf};

use crate::pattern::{random_bytes, SECTOR};

/// Creates (or truncates) `path` as a sparse image of `len` zero bytes; returns the path.
pub fn zeroed(path: impl Into<PathBuf>, len: u64) -> PathBuf {
    let path = path.into();
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("cannot create the image {}: {e}", path.display()));
    path
}

/// Writes `len` pseudo-random bytes (from `seed`) to `path` and returns them.
pub fn random(path: &Path, seed: u64, len: usize) -> Vec<u8> {
    write(path, random_bytes(seed, len))
}

/// Writes `bytes` to `path` and returns them.
pub fn write(path: &Path, bytes: Vec<u8>) -> Vec<u8> {
    std::fs::write(path, &bytes)
        .unwrap_or_else(|e| panic!("cannot write the image {}: {e}", path.display()));
    bytes
}

/// Panics at the first byte where the image file differs from `expected`, saying how many
/// bytes differ (not printing megabytes of both).
pub fn assert_image(path: &Path, expected: &[u8]) {
    let actual =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert_eq!(actual.len(), expected.len(), "image length changed");
    if let Some(i) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        let differing = actual.iter().zip(expected).filter(|(a, e)| a != e).count();
        panic!(
            "image differs from the expected bytes at offset {i} (sector {}): {differing} bytes differ",
            i as u64 / SECTOR
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workdir::Workdir;

    #[test]
    fn assert_image_finds_the_first_difference() {
        let dir = Workdir::new("image");
        let path = dir.join("d.img");
        let bytes = random(&path, 3, 4096);
        assert_image(&path, &bytes);
        let mut other = bytes.clone();
        other[1500] ^= 1;
        let err = std::panic::catch_unwind(|| assert_image(&path, &other)).unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("offset 1500 (sector 2): 1 bytes differ"),
            "{msg}"
        );
        let zero = zeroed(dir.join("z.img"), 1024);
        assert_image(&zero, &[0; 1024]);
    }
}
