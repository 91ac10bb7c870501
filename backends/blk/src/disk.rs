//! The `Disk` trait the request executor works against: a raw image file and an in-memory disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use log::warn;

use crate::iovec::{transfer_all, Direction, IoVecs};
use splitvisor_wire::host::imagelock::{lock_image, ImageLockError, LockMode};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

/// Byte alignment O_DIRECT transfers are attempted with (buffer address, offset and length).
pub const DIRECT_ALIGN: usize = 512;

/// Block storage behind the device. Offsets and lengths are in bytes and already range-checked
/// by the caller against `len()`.
pub trait Disk: Send + Sync {
    /// Size of the disk in bytes.
    fn len(&self) -> u64;
    /// True when the disk has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Fill the buffers of `iov`, in order, from `offset` (zero-copy into guest memory).
    fn read_vectored_at(&self, iov: &IoVecs, offset: u64) -> io::Result<()> {
        let mut pos = offset;
        iov.for_each(|ptr, len| {
            // SAFETY: `IoVecs::push`'s contract: valid, unaliased memory of `len` bytes.
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            self.read_at(buf, pos)?;
            pos += len as u64;
            Ok(())
        })
    }
    /// Write the buffers of `iov`, in order, at `offset` (zero-copy from guest memory).
    fn write_vectored_at(&self, iov: &IoVecs, offset: u64) -> io::Result<()> {
        let mut pos = offset;
        iov.for_each(|ptr, len| {
            // SAFETY: `IoVecs::push`'s contract: valid, unaliased memory of `len` bytes.
            let buf = unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) };
            self.write_at(buf, pos)?;
            pos += len as u64;
            Ok(())
        })
    }
    /// The alignment of buffers, offsets and lengths the disk needs for direct I/O, if it
    /// does direct I/O: vectored transfers of misaligned guest buffers go through an aligned
    /// bounce buffer instead.
    fn direct_alignment(&self) -> Option<usize> {
        None
    }
    /// Make completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Tell the storage a range is no longer needed (its contents become unspecified).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Make a range read back as zeroes; `unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

/// Errors opening an image file.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open image {path} (check that it exists and is {mode}; use --readonly for a read-only image)")]
    Open {
        path: PathBuf,
        mode: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot open image {path} with O_DIRECT (the filesystem may not support it; drop --direct)"
    )]
    OpenDirect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the size of image {path}")]
    Metadata {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("image {path} is smaller than one 512-byte sector")]
    TooSmall { path: PathBuf },
    #[error("image {path} is {len} bytes, not a whole number of 512-byte sectors: it does not look like a disk image; use --readonly to serve it anyway (the last {tail} bytes stay invisible) or resize it to whole sectors")]
    PartialSector { path: PathBuf, len: u64, tail: u64 },
    #[error(transparent)]
    Locked(#[from] ImageLockError),
}

/// What a refused image lock tells splitvisor-blk's user to do.
const LOCK_HINT: &str = "stop the other user, or serve it with --readonly if all users only \
    read; two splitvisor-blk daemons that take turns on one image (planned swaps) must both \
    be started with --share";

/// A raw image file, optionally opened a second time with O_DIRECT for the data path.
pub struct FileDisk {
    file: File,
    direct: Option<File>,
    direct_fallback_warned: AtomicBool,
    len: u64,
}

impl FileDisk {
    /// Open and lock `path` (see splitvisor_wire::host::imagelock). A writable image must be a whole number of
    /// 512-byte sectors; a read-only one is rounded down.
    pub fn open(
        path: &Path,
        readonly: bool,
        direct: bool,
        lock: LockMode,
    ) -> Result<Self, DiskError> {
        refuse_non_disk(path)?;
        let mut opts = OpenOptions::new();
        opts.read(true).write(!readonly);
        let file = opts.open(path).map_err(|source| DiskError::Open {
            path: path.to_owned(),
            mode: if readonly {
                "readable"
            } else {
                "readable and writable"
            },
            source,
        })?;
        let raw_len = raw_len(path, &file)?;
        let len = raw_len - raw_len % 512;
        if len == 0 {
            return Err(DiskError::TooSmall {
                path: path.to_owned(),
            });
        }
        if len != raw_len && !readonly {
            return Err(DiskError::PartialSector {
                path: path.to_owned(),
                len: raw_len,
                tail: raw_len - len,
            });
        }
        lock_image(&file, path, lock, LOCK_HINT)?;
        if len != raw_len {
            warn!(
                "image {} is {raw_len} bytes, not a multiple of 512: the last {} bytes are not visible to the guest",
                path.display(),
                raw_len - len
            );
        }
        let direct = if direct {
            let f = opts
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .map_err(|source| DiskError::OpenDirect {
                    path: path.to_owned(),
                    source,
                })?;
            Some(f)
        } else {
            None
        };
        Ok(FileDisk {
            file,
            direct,
            direct_fallback_warned: AtomicBool::new(false),
            len,
        })
    }

    /// The O_DIRECT file when this transfer meets its alignment rules.
    fn direct_for(&self, ptr: *const u8, len: usize, offset: u64) -> Option<&File> {
        let aligned = (ptr as usize).is_multiple_of(DIRECT_ALIGN)
            && len.is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64);
        self.direct.as_ref().filter(|_| aligned)
    }

    /// A vectored transfer: through the O_DIRECT file when every buffer is aligned for it.
    fn vectored(&self, dir: Direction, iov: &IoVecs, offset: u64) -> io::Result<()> {
        let direct = self
            .direct
            .as_ref()
            .filter(|_| iov.aligned(DIRECT_ALIGN) && offset.is_multiple_of(DIRECT_ALIGN as u64));
        if let Some(f) = direct {
            match transfer_all(f.as_raw_fd(), dir, iov, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.warn_fallback(&e),
                other => return other,
            }
        }
        transfer_all(self.file.as_raw_fd(), dir, iov, offset)
    }

    fn warn_fallback(&self, err: &io::Error) {
        if !self.direct_fallback_warned.swap(true, Ordering::Relaxed) {
            warn!("O_DIRECT transfer failed ({err}); using buffered I/O for such transfers");
        }
    }
}

impl FileDisk {
    /// `Ok(false)` when the filesystem does not support `mode`.
    fn try_fallocate(&self, mode: FallocateMode, offset: u64, len: u64) -> io::Result<bool> {
        match fallocate(&self.file, mode, true, offset, len) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == libc::EOPNOTSUPP => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// Look before opening: opening a FIFO or a device other than a disk can have effects.
fn refuse_non_disk(path: &Path) -> Result<(), DiskError> {
    if let Ok(meta) = std::fs::metadata(path) {
        let kind = meta.file_type();
        if !kind.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&kind) {
            return Err(DiskError::NotAFile {
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}

/// The size of the opened image: a regular file's length or a block device's size.
fn raw_len(path: &Path, file: &File) -> Result<u64, DiskError> {
    let meta = file.metadata().map_err(|source| DiskError::Metadata {
        path: path.to_owned(),
        source,
    })?;
    if meta.file_type().is_file() {
        Ok(meta.len())
    } else if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        seek_end(file).map_err(|source| DiskError::Metadata {
            path: path.to_owned(),
            source,
        })
    } else {
        Err(DiskError::NotAFile {
            path: path.to_owned(),
        })
    }
}

fn seek_end(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    f.seek(io::SeekFrom::End(0))
}

impl Disk for FileDisk {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(f) = self.direct_for(buf.as_ptr(), buf.len(), offset) {
            match f.read_exact_at(buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.warn_fallback(&e),
                other => return other,
            }
        }
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(f) = self.direct_for(buf.as_ptr(), buf.len(), offset) {
            match f.write_all_at(buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.warn_fallback(&e),
                other => return other,
            }
        }
        self.file.write_all_at(buf, offset)
    }

    fn read_vectored_at(&self, iov: &IoVecs, offset: u64) -> io::Result<()> {
        self.vectored(Direction::Read, iov, offset)
    }

    fn write_vectored_at(&self, iov: &IoVecs, offset: u64) -> io::Result<()> {
        self.vectored(Direction::Write, iov, offset)
    }

    fn direct_alignment(&self) -> Option<usize> {
        self.direct.as_ref().map(|_| DIRECT_ALIGN)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(&self.file, FallocateMode::PunchHole, true, offset, len) {
            // Discard is a hint: a filesystem without hole punching just keeps the data.
            Err(e) if e.errno() == libc::EOPNOTSUPP => Ok(()),
            other => other.map_err(io::Error::from),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        // A punched hole reads back as zeroes; fall back to zeroing, then to writing zeroes.
        if unmap && self.try_fallocate(FallocateMode::PunchHole, offset, len)? {
            return Ok(());
        }
        if self.try_fallocate(FallocateMode::ZeroRange, offset, len)? {
            return Ok(());
        }
        write_zero_chunks(|buf, off| self.file.write_all_at(buf, off), offset, len)
    }
}

/// Write zeroes through a small buffer (fallback when fallocate is not supported).
fn write_zero_chunks(
    mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    const CHUNK: u64 = 64 * 1024;
    let zeroes = vec![0u8; CHUNK as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        // n <= CHUNK, which fits in usize.
        write(&zeroes[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// An in-memory disk for tests; counts flushes and discards.
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
}

impl MemDisk {
    pub fn new(len: usize) -> Self {
        MemDisk {
            data: Mutex::new(vec![0; len]),
            flushes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
        }
    }

    /// A copy of the disk contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the Vec invalid.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        if end as u64 > self.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(start..end)
    }
}

impl Disk for MemDisk {
    fn len(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.lock()[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        self.lock()[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.range(offset, len)?;
        self.discards.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let r = self.range(offset, len)?;
        self.lock()[r].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    #[test]
    fn file_disk_rounds_down_and_round_trips() {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().set_len(4096 + 100).unwrap();
        // Not whole sectors: only read-only, rounded down.
        let err = FileDisk::open(tmp.as_path(), false, false, LockMode::Exclusive)
            .err()
            .unwrap();
        assert!(matches!(
            err,
            DiskError::PartialSector {
                len: 4196,
                tail: 100,
                ..
            }
        ));
        let disk = FileDisk::open(tmp.as_path(), true, false, LockMode::Shared).unwrap();
        assert_eq!(disk.len(), 4096);
        drop(disk);
        tmp.as_file().set_len(4096).unwrap();
        let disk = FileDisk::open(tmp.as_path(), false, false, LockMode::Exclusive).unwrap();
        assert_eq!(disk.len(), 4096);
        disk.write_at(&[7u8; 512], 512).unwrap();
        let mut buf = [0u8; 512];
        disk.read_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [7u8; 512]);
        disk.write_zeroes(512, 512, true).unwrap();
        disk.read_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [0u8; 512]);
        disk.discard(0, 4096).unwrap();
        disk.flush().unwrap();
    }

    #[test]
    fn file_disk_errors_name_the_path() {
        let err = FileDisk::open(
            Path::new("/nonexistent/img"),
            false,
            false,
            LockMode::Exclusive,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("/nonexistent/img"));
        let tmp = TempFile::new().unwrap();
        let err = FileDisk::open(tmp.as_path(), true, false, LockMode::Shared)
            .err()
            .unwrap();
        assert!(matches!(err, DiskError::TooSmall { .. }));
        let err = FileDisk::open(Path::new("/dev/null"), false, false, LockMode::Exclusive)
            .err()
            .unwrap();
        assert!(matches!(err, DiskError::NotAFile { .. }), "{err}");
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let err = FileDisk::open(dir.as_path(), true, false, LockMode::Shared)
            .err()
            .unwrap();
        assert!(matches!(err, DiskError::NotAFile { .. }), "{err}");
    }

    #[test]
    fn direct_disk_handles_aligned_and_unaligned_buffers() {
        let tmp = TempFile::new_in(Path::new("/var/tmp")).unwrap();
        tmp.as_file().set_len(8192).unwrap();
        let Ok(disk) = FileDisk::open(tmp.as_path(), false, true, LockMode::Exclusive) else {
            eprintln!("O_DIRECT not supported here; skipping");
            return;
        };
        // 4 KiB-aligned buffer: the O_DIRECT path.
        let mut raw = vec![0u8; 3 * 4096];
        let start = (4096 - raw.as_ptr() as usize % 4096) % 4096;
        raw[start..start + 4096].fill(9);
        disk.write_at(&raw[start..start + 4096], 4096).unwrap();
        // Misaligned buffer: the buffered path.
        let mut back = vec![0u8; 4096];
        disk.read_at(&mut raw[start + 1..start + 4097], 4096)
            .unwrap();
        back.copy_from_slice(&raw[start + 1..start + 4097]);
        assert_eq!(back, vec![9u8; 4096]);
    }

    #[test]
    fn mem_disk_bounds() {
        let d = MemDisk::new(1024);
        assert!(d.write_at(&[1; 512], 768).is_err());
        d.write_zeroes(0, 1024, false).unwrap();
        assert_eq!(d.contents(), vec![0; 1024]);
    }
}
