//! Checks on a file the frontend asks the daemon to map (a guest memory region, the inflight
//! region) before it is mapped: touching a mapped page past the end of its file kills the whole
//! daemon with SIGBUS, so the range must lie inside the file and the file must not be able to
//! shrink under the mapping later.
//!
//! Policy: a memfd (what QEMU's `memory-backend-memfd` and the splitvisor VMM send) must carry
//! `F_SEAL_SHRINK`; both seal theirs by default. A named file (tmpfs under /dev/shm, hugetlbfs,
//! an ordinary file: QEMU's `memory-backend-file`) cannot be sealed at all, so it is accepted
//! after the size check alone; whoever can truncate that file can still crash the daemon.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// Why a file was refused for mapping.
#[derive(Debug, thiserror::Error)]
pub enum FdCheckError {
    #[error("cannot inspect the file (fstat)")]
    Stat(#[source] io::Error),
    #[error(
        "the file is not a regular file (file type {0:?}); only memfds and files can be mapped"
    )]
    NotRegular(std::fs::FileType),
    #[error("offset {offset} + size {size} lies beyond the end of the {file_len}-byte file")]
    BeyondEnd {
        offset: u64,
        size: u64,
        file_len: u64,
    },
    #[error("the memfd is not sealed against shrinking (F_SEAL_SHRINK), so the frontend could truncate it under the mapping; create it with MFD_ALLOW_SEALING and add F_SEAL_SHRINK")]
    NotSealed,
    #[error("cannot read the memfd's seals (F_GET_SEALS)")]
    Seals(#[source] io::Error),
}

/// Check that `size` bytes at `offset` of `file` can be mapped and stay backed.
pub fn check_mappable(file: &File, offset: u64, size: u64) -> Result<(), FdCheckError> {
    let meta = file.metadata().map_err(FdCheckError::Stat)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(FdCheckError::NotRegular(kind));
    }
    let file_len = meta.size();
    if offset.checked_add(size).is_none_or(|end| end > file_len) {
        return Err(FdCheckError::BeyondEnd {
            offset,
            size,
            file_len,
        });
    }
    // SAFETY: F_GET_SEALS only reads the seals of an open descriptor we borrow.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        let err = io::Error::last_os_error();
        // EINVAL: a filesystem without seals (ext4, xfs...): a named file, size check only.
        return match err.raw_os_error() {
            Some(libc::EINVAL) => Ok(()),
            _ => Err(FdCheckError::Seals(err)),
        };
    }
    if seals & libc::F_SEAL_SHRINK != 0 || !is_memfd(file) {
        return Ok(());
    }
    Err(FdCheckError::NotSealed)
}

/// Whether `file` is a memfd: /proc names its target `/memfd:NAME (deleted)`.
fn is_memfd(file: &File) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(|target| target.to_string_lossy().starts_with("/memfd:"))
        // Without /proc we cannot tell: treat it as a memfd, which must be sealed.
        .unwrap_or(true)
}

/// Whether `file` is an eventfd (/proc names its target `anon_inode:[eventfd]`). A kick fd
/// that is not one breaks the worker: a pipe at EOF is always readable (a busy loop), a
/// regular file never wakes it, a full pipe as call fd blocks it.
pub fn is_eventfd(file: &File) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

/// Seal a memfd the daemon created itself against resizing (`MFD_ALLOW_SEALING` needed).
pub fn seal_size(file: &File) -> io::Result<()> {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(len: u64, flags: libc::c_uint) -> File {
        // SAFETY: a valid NUL-terminated name; the fd is checked before it is owned.
        let fd = unsafe { libc::memfd_create(c"fdcheck-test".as_ptr(), libc::MFD_CLOEXEC | flags) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn sealed_memfd_inside_its_size_is_accepted() {
        let file = memfd(8192, libc::MFD_ALLOW_SEALING);
        seal_size(&file).unwrap();
        check_mappable(&file, 4096, 4096).unwrap();
        check_mappable(&file, 0, 8192).unwrap();
    }

    #[test]
    fn ranges_past_the_end_are_refused() {
        let file = memfd(8192, libc::MFD_ALLOW_SEALING);
        seal_size(&file).unwrap();
        for (offset, size) in [(0, 8193), (8192, 1), (4096, 8192), (u64::MAX, 2)] {
            assert!(
                matches!(
                    check_mappable(&file, offset, size),
                    Err(FdCheckError::BeyondEnd { .. })
                ),
                "{offset}+{size}"
            );
        }
    }

    #[test]
    fn unsealed_memfds_are_refused() {
        for flags in [0, libc::MFD_ALLOW_SEALING] {
            let file = memfd(4096, flags);
            assert!(matches!(
                check_mappable(&file, 0, 4096),
                Err(FdCheckError::NotSealed)
            ));
        }
    }

    #[test]
    fn only_eventfds_are_eventfds() {
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        // SAFETY: a duplicate of the eventfd that this File alone owns.
        let file = unsafe { File::from_raw_fd(libc::dup(efd.as_raw_fd())) };
        assert!(is_eventfd(&file));
        assert!(!is_eventfd(&memfd(0, 0)));
        let (rx, _tx) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!is_eventfd(&File::from(std::os::fd::OwnedFd::from(rx))));
    }

    #[test]
    fn named_files_need_only_the_size_check() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("ram");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(4096).unwrap();
        check_mappable(&file, 0, 4096).unwrap();
        assert!(check_mappable(&file, 0, 4097).is_err());
        let dir_file = File::open(dir.as_path()).unwrap();
        assert!(matches!(
            check_mappable(&dir_file, 0, 0),
            Err(FdCheckError::NotRegular(_))
        ));
    }
}
