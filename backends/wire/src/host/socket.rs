//! Listening Unix sockets, bound the same way by every splitvisor process: mode 0600 from the
//! start, a stale socket (a file nobody accepts on, left by a crash) replaced, a live one or
//! a non-socket refused. The daemons' vhost-user sockets also take a `PATH.lock` flock, so a
//! second daemon is refused even in the moment between a crash and the stale socket's
//! removal. Whatever is bound is removed again on `cleanup`/drop, or by `cleanup_all` from a
//! signal thread.

use std::ffi::OsString;
use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use log::{info, warn};

/// Every path bound (and lock file taken) by this process and not removed yet.
static BOUND: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Errors setting up a listening socket. `flag` is the command-line flag that named it.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "cannot create lock file {lock} (does the socket's directory exist and is it writable?)"
    )]
    CreateLock {
        lock: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{socket} is already served: another daemon is serving it (it holds the lock on {lock}); stop it or choose another {flag}")]
    AlreadyServed {
        socket: PathBuf,
        lock: PathBuf,
        flag: &'static str,
    },
    #[error("cannot lock {lock}")]
    Lock {
        lock: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another process already serves on {path}: it accepts connections there; refusing to replace a live socket (stop it or choose another {flag})")]
    Live { path: PathBuf, flag: &'static str },
    #[error("{flag} {path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf, flag: &'static str },
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
    #[error("cannot create the socket {path} ({flag})")]
    Bind {
        path: PathBuf,
        flag: &'static str,
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

/// Owns a bound socket's path (and its lock, if it has one); removes them once, on
/// `cleanup()` or drop.
#[derive(Debug)]
pub struct SocketGuard {
    socket: PathBuf,
    /// Set once we bound the socket: only then is the path ours to remove.
    bound: AtomicBool,
    lock_path: Option<PathBuf>,
    _lock: Option<File>,
    cleaned: AtomicBool,
}

impl SocketGuard {
    pub fn path(&self) -> &Path {
        &self.socket
    }

    /// Removes the socket and the lock file (idempotent; safe from a signal thread).
    pub fn cleanup(&self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        let socket = Some(&self.socket).filter(|_| self.bound.load(Ordering::SeqCst));
        for path in socket.into_iter().chain(&self.lock_path) {
            remove(path);
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

/// Takes `PATH.lock`, replaces a stale socket, and listens on `path` with mode 0600: a
/// daemon's vhost-user socket (`flag` names it in errors, e.g. "--socket").
pub fn bind_locked(
    path: &Path,
    flag: &'static str,
) -> Result<(UnixListener, SocketGuard), SocketError> {
    let lock_path = lock_path(path);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|source| SocketError::CreateLock {
            lock: lock_path.clone(),
            source,
        })?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(SocketError::AlreadyServed {
                socket: path.to_owned(),
                lock: lock_path,
                flag,
            });
        }
        return Err(SocketError::Lock {
            lock: lock_path,
            source,
        });
    }
    register(&lock_path);
    // From here on the guard removes the lock file (and socket) if anything fails.
    let guard = SocketGuard {
        socket: path.to_owned(),
        bound: AtomicBool::new(false),
        lock_path: Some(lock_path),
        _lock: Some(lock),
        cleaned: AtomicBool::new(false),
    };
    let listener = bind_replacing(path, flag)?;
    guard.bound.store(true, Ordering::SeqCst);
    Ok((listener, guard))
}

/// Replaces a stale socket and listens on `path` with mode 0600, without a lock file: the
/// API and stats sockets, which nothing else binds in a loop.
pub fn bind_replacing(path: &Path, flag: &'static str) -> Result<UnixListener, SocketError> {
    remove_stale(path, flag)?;
    let listener = bind_private(path, flag)?;
    register(path);
    Ok(listener)
}

/// A guard for a socket bound by `bind_replacing`: removes it on drop.
pub fn guard(path: &Path) -> SocketGuard {
    SocketGuard {
        socket: path.to_owned(),
        bound: AtomicBool::new(true),
        lock_path: None,
        _lock: None,
        cleaned: AtomicBool::new(false),
    }
}

/// A guard for a socket bound by the process this one replaced with execve (the VMM's live
/// upgrade), its listener inherited: it is this process's to remove now.
pub fn adopt(path: &Path) -> SocketGuard {
    register(path);
    guard(path)
}

/// Removes every socket and lock file this process bound and has not removed yet: for a
/// signal thread about to exit the process.
pub fn cleanup_all() {
    let paths = std::mem::take(&mut *BOUND.lock().unwrap_or_else(PoisonError::into_inner));
    for path in paths {
        remove_file(&path);
    }
}

fn register(path: &Path) {
    BOUND
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(path.to_path_buf());
}

/// Removes `path` and forgets it.
fn remove(path: &Path) {
    let mut bound = BOUND.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(at) = bound.iter().position(|p| p == path) else {
        return; // Removed already, by `cleanup_all`.
    };
    bound.swap_remove(at);
    remove_file(path);
}

fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Removes `path` if it is a socket nobody accepts on; refuses anything else.
fn remove_stale(path: &Path, flag: &'static str) -> Result<(), SocketError> {
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
            flag,
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::Live {
            path: path.to_owned(),
            flag,
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

/// Longest socket path `bind(2)` takes (`sun_path` holds 108 bytes with the final NUL).
const SUN_PATH_MAX: usize = 107;

/// Binds with a umask that keeps the socket private from the start, makes sure of 0600 (in
/// case the umask was looser), and only then gives it its name: it is bound and listening
/// under `PATH.new` and renamed to `PATH`, so whoever waits for `PATH` to appear (launch, a
/// script, a test) can connect at once instead of racing the bind-to-listen gap.
fn bind_private(path: &Path, flag: &'static str) -> Result<UnixListener, SocketError> {
    let mut staged = OsString::from(path.as_os_str());
    staged.push(".new");
    let staged = PathBuf::from(staged);
    // A path at the length limit has no room for the suffix: bound in place, as before.
    let at = if staged.as_os_str().len() <= SUN_PATH_MAX {
        let _ = std::fs::remove_file(&staged);
        staged.as_path()
    } else {
        path
    };
    let listener = bind_with_mode(at, path, flag)?;
    if at != path {
        std::fs::rename(at, path).map_err(|source| {
            let _ = std::fs::remove_file(at);
            SocketError::Bind {
                path: path.to_owned(),
                flag,
                source,
            }
        })?;
    }
    Ok(listener)
}

/// `bind` + `listen` on `at` with mode 0600; errors name `path`, the socket the user asked for.
fn bind_with_mode(at: &Path, path: &Path, flag: &'static str) -> Result<UnixListener, SocketError> {
    // SAFETY: umask only changes the process's file mode creation mask; it is restored right
    // after bind. Processes bind their sockets at startup, before other threads create files.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(at);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| SocketError::Bind {
        path: path.to_owned(),
        flag,
        source,
    })?;
    std::fs::set_permissions(at, Permissions::from_mode(0o600)).map_err(|source| {
        SocketError::Chmod {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Tests that bind through this module hold it: `cleanup_all` removes every bound path.
#[cfg(test)]
pub(crate) static TEST_SERIAL: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        TEST_SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[test]
    fn the_socket_appears_already_listening_and_no_staging_name_remains() {
        let _serial = serial();
        let dir = TempDir::new().unwrap();
        let sock = dir.as_path().join("api.sock");
        let listener = bind_replacing(&sock, "--api-socket").unwrap();
        let _guard = guard(&sock);
        UnixStream::connect(&sock).expect("listening under its name");
        assert!(listener.accept().is_ok());
        assert!(!dir.as_path().join("api.sock.new").exists());
    }

    #[test]
    fn second_bind_fails_and_cleanup_removes_files() {
        let _serial = serial();
        let dir = TempDir::new().unwrap();
        let sock = dir.as_path().join("blk.sock");
        let (_l, guard) = bind_locked(&sock, "--socket").unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind_locked(&sock, "--socket").unwrap_err();
        assert!(matches!(err, SocketError::AlreadyServed { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("blk.sock") && msg.contains("--socket"),
            "{msg}"
        );
        drop(guard);
        assert!(!sock.exists());
        assert!(!lock_path(&sock).exists());
    }

    #[test]
    fn stale_socket_is_replaced_but_files_are_not() {
        let _serial = serial();
        let dir = TempDir::new().unwrap();
        let sock = dir.as_path().join("stale.sock");
        drop(UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let (_l, guard) = bind_locked(&sock, "--socket").unwrap();
        drop(guard);
        std::fs::write(&sock, b"data").unwrap();
        let err = bind_replacing(&sock, "--api-socket").unwrap_err();
        assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
        assert!(err.to_string().starts_with("--api-socket "), "{err}");
        let live = dir.as_path().join("live.sock");
        let _listener = UnixListener::bind(&live).unwrap();
        assert!(matches!(
            bind_locked(&live, "--socket"),
            Err(SocketError::Live { .. })
        ));
        assert!(live.exists(), "a live socket must not be removed");
    }

    #[test]
    fn cleanup_all_removes_what_is_bound() {
        let _serial = serial();
        let dir = TempDir::new().unwrap();
        let sock = dir.as_path().join("api.sock");
        let _listener = bind_replacing(&sock, "--api-socket").unwrap();
        let guard = guard(&sock);
        cleanup_all();
        assert!(!sock.exists());
        // The guard finds it gone and does nothing more.
        drop(guard);
    }
}
