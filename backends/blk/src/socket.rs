//! The listening socket: a `PATH.lock` flock against a second daemon, stale socket
//! replacement, mode 0600, and removal on exit.

use std::ffi::OsString;
use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use log::{info, warn};

/// Errors setting up the listening socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "cannot create lock file {path} (does the socket's directory exist and is it writable?)"
    )]
    CreateLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another daemon is serving {socket} (it holds the lock on {lock}); stop it or choose another --socket")]
    InUse { socket: PathBuf, lock: PathBuf },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a process is accepting connections on {path}; refusing to replace a live socket")]
    Live { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to remove it")]
    NotASocket { path: PathBuf },
    #[error("cannot inspect {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set mode 0600 on socket {path}")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Owns the socket path and its lock; removes both once, on `cleanup()` or drop.
#[derive(Debug)]
pub struct SocketGuard {
    socket: PathBuf,
    /// Set once we bound the socket: only then is the path ours to remove.
    bound: AtomicBool,
    lock_path: PathBuf,
    _lock: File,
    cleaned: AtomicBool,
}

impl SocketGuard {
    pub fn path(&self) -> &Path {
        &self.socket
    }

    /// Remove the socket and the lock file (idempotent; safe from a signal thread).
    pub fn cleanup(&self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        let socket = Some(&self.socket).filter(|_| self.bound.load(Ordering::SeqCst));
        for p in socket.into_iter().chain([&self.lock_path]) {
            if let Err(e) = std::fs::remove_file(p) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!("cannot remove {}: {e}", p.display());
                }
            }
        }
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// `PATH.lock` next to the socket.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut s = OsString::from(socket.as_os_str());
    s.push(".lock");
    PathBuf::from(s)
}

/// Take the lock, clear a stale socket, and listen on `path` with mode 0600.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketGuard), SocketError> {
    let lock_path = lock_path(path);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|source| SocketError::CreateLock {
            path: lock_path.clone(),
            source,
        })?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(SocketError::InUse {
                socket: path.to_owned(),
                lock: lock_path,
            });
        }
        return Err(SocketError::Lock {
            path: lock_path,
            source,
        });
    }
    // From here on the guard removes the lock file (and socket) if anything fails.
    let guard = SocketGuard {
        socket: path.to_owned(),
        bound: AtomicBool::new(false),
        lock_path,
        _lock: lock,
        cleaned: AtomicBool::new(false),
    };
    remove_stale(path)?;
    let listener = bind_private(path)?;
    guard.bound.store(true, Ordering::SeqCst);
    Ok((listener, guard))
}

/// Remove `path` if it is a socket nobody accepts on; refuse anything else.
fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Stat {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::Live {
            path: path.to_owned(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            info!("replacing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(SocketError::Stat {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Bind with a umask that keeps the socket private from the start, then make sure of 0600.
fn bind_private(path: &Path) -> Result<UnixListener, SocketError> {
    // SAFETY: umask only changes the process's file mode creation mask; it is restored right
    // after bind. Other threads of this daemon do not create files at startup.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| SocketError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, Permissions::from_mode(0o600)).map_err(|source| {
        SocketError::Chmod {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn second_bind_fails_and_cleanup_removes_files() {
        let dir = TempDir::new().unwrap();
        let sock = dir.as_path().join("blk.sock");
        let (_l, guard) = bind(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind(&sock).unwrap_err();
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("blk.sock"));
        drop(guard);
        assert!(!sock.exists());
        assert!(!lock_path(&sock).exists());
    }

    #[test]
    fn stale_socket_is_replaced_but_files_are_not() {
        let dir = TempDir::new().unwrap();
        let sock = dir.as_path().join("stale.sock");
        drop(UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let (_l, _g) = bind(&sock).unwrap();
        drop(_g);
        std::fs::write(&sock, b"data").unwrap();
        assert!(matches!(bind(&sock), Err(SocketError::NotASocket { .. })));
        let live = dir.as_path().join("live.sock");
        let _listener = UnixListener::bind(&live).unwrap();
        assert!(matches!(bind(&live), Err(SocketError::Live { .. })));
        assert!(live.exists(), "a live socket must not be removed");
    }
}
