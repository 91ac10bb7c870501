//! The vhost-user dirty page log (VHOST_USER_PROTOCOL_F_LOG_SHMFD, for a frontend's live
//! migration): a bitmap in shared memory the frontend gives with SET_LOG_BASE, one bit per
//! 4 KiB page of guest physical memory (bit `n % 8` of byte `n / 8` for page `n`). While the
//! frontend has negotiated VHOST_F_LOG_ALL, the server sets the bit of every page it writes:
//! the device-writable buffers of each chain it served and the used ring it published.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};

/// Guest memory per bit of the log (QEMU's VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("the log of {size} bytes at offset {offset} cannot be mapped")]
    Map {
        size: u64,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// The frontend's log, mapped shared.
pub struct DirtyLog {
    bytes: *const AtomicU8,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomic byte operations and lives until drop.
unsafe impl Send for DirtyLog {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Maps `size` bytes of `file` from `offset` (SET_LOG_BASE's region).
    pub fn map(file: &File, size: u64, offset: u64) -> Result<Self, DirtyLogError> {
        let error = |source| DirtyLogError::Map {
            size,
            offset,
            source,
        };
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| error(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: a fresh shared mapping of the frontend's file; the kernel checks the fd,
        // offset and length. It is unmapped only in `drop`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(error(std::io::Error::last_os_error()));
        }
        Ok(Self {
            bytes: ptr.cast(),
            len,
        })
    }

    /// Marks the pages of guest range `[addr, addr + len)` written; pages beyond the log are
    /// ignored (the frontend sized it for its memory).
    pub fn mark(&self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = addr / LOG_PAGE;
        let last = addr.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let Ok(byte) = usize::try_from(page / 8) else {
                return;
            };
            if byte >= self.len {
                return;
            }
            // SAFETY: `byte` is inside the mapping of `len` bytes.
            let cell = unsafe { &*self.bytes.add(byte) };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.bytes as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_ranges_set_their_pages_bits() {
        let file = tempfile_of(16);
        let log = DirtyLog::map(&file, 16, 0).unwrap();
        log.mark(0x1000, 1); // page 1
        log.mark(0x2fff, 2); // pages 2 and 3
        log.mark(0x7f000, 0x2000); // page 127, and 128 beyond the log
        let mut bytes = [0u8; 16];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0).unwrap();
        assert_eq!(bytes[0], 0b1110);
        assert_eq!(bytes[15], 0b1000_0000);
        assert!(bytes[1..15].iter().all(|&b| b == 0));
    }

    fn tempfile_of(len: u64) -> File {
        let path = std::env::temp_dir().join(format!("sv-dirty-log-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(len).unwrap();
        file
    }
}
