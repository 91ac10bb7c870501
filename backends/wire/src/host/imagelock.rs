//! Disk image locking like QEMU's: an open file description (OFD) lock over the whole image,
//! shared for a reader and exclusive for a writer, so that a second writer (another daemon, a
//! VM's emulated disk, QEMU, which takes OFD locks too) is refused instead of corrupting the
//! image. The lock lives as long as the file stays open: it goes away with the process, so a
//! daemon restarted after a crash gets it back.
//!
//! Used by splitvisor-blk (`--image`) and the VMM's emulated ATA disk, so that both take the
//! same lock.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// How an image is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Readers, and writers that explicitly share the image: any number at once, no
    /// exclusive writer.
    Shared,
    /// The only user of the image.
    Exclusive,
}

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum ImageLockError {
    #[error("image {path} is in use by {holder}, which holds a {held} lock on it; {hint}")]
    InUse {
        path: PathBuf,
        holder: String,
        held: &'static str,
        hint: &'static str,
    },
    #[error("cannot lock image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn whole_file(l_type: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (start 0, length 0: whole file).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = l_type as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

/// Lock all of `file` (opened from `path`) in `mode`. `hint` ends the message of a refusal:
/// what the user can do about it.
pub fn lock_image(
    file: &File,
    path: &Path,
    mode: LockMode,
    hint: &'static str,
) -> Result<(), ImageLockError> {
    let l_type = match mode {
        LockMode::Shared => libc::F_RDLCK,
        LockMode::Exclusive => libc::F_WRLCK,
    };
    let mut lock = whole_file(l_type);
    // SAFETY: F_OFD_SETLK reads the flock we own; the fd is borrowed from `file`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut lock) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
        return Err(ImageLockError::Lock {
            path: path.to_owned(),
            source: err,
        });
    }
    let (holder, held) = holder(file, l_type);
    Err(ImageLockError::InUse {
        path: path.to_owned(),
        holder,
        held,
        hint,
    })
}

/// Who holds the lock that conflicts with `l_type`: OFD locks report no pid (-1), classic
/// POSIX locks do.
fn holder(file: &File, l_type: libc::c_int) -> (String, &'static str) {
    let mut probe = whole_file(l_type);
    // SAFETY: F_OFD_GETLK fills the flock we own; the fd is borrowed from `file`.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) };
    let held = match i32::from(probe.l_type) {
        libc::F_RDLCK => "shared",
        _ => "exclusive",
    };
    if rc == 0 && probe.l_pid > 0 {
        (format!("process {}", probe.l_pid), held)
    } else {
        ("another process".to_string(), held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> File {
        File::options().read(true).write(true).open(path).unwrap()
    }

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("img");
        File::create(&path).unwrap().set_len(4096).unwrap();
        // Separate opens are separate open file descriptions: their OFD locks conflict even
        // inside one process, as two daemons' would.
        let writer = open(&path);
        lock_image(&writer, &path, LockMode::Exclusive, "hint").unwrap();
        let second = open(&path);
        let err = lock_image(&second, &path, LockMode::Exclusive, "do this").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("another process"), "{msg}");
        assert!(msg.contains("exclusive lock"), "{msg}");
        assert!(msg.ends_with("do this"), "{msg}");
        assert!(lock_image(&second, &path, LockMode::Shared, "").is_err());
        drop(writer);
        lock_image(&second, &path, LockMode::Shared, "").unwrap();
        let third = open(&path);
        lock_image(&third, &path, LockMode::Shared, "").unwrap();
        let err = lock_image(&open(&path), &path, LockMode::Exclusive, "").unwrap_err();
        assert!(err.to_string().contains("shared lock"), "{err}");
    }
}
