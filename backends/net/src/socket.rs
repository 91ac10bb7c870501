//! The listening socket's life cycle: a PATH.lock flock against a second daemon, replacing a
//! stale socket file, mode 0600, and removal of the files on exit or SIGINT/SIGTERM.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Paths to delete when the process is told to stop.
static CLEANUP: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("failed to open lock file {0}")]
    OpenLock(PathBuf, #[source] io::Error),
    #[error("{0} is already served by another splitvisor-net (lock {0}.lock is held)")]
    AlreadyServed(PathBuf),
    #[error("failed to lock {0}")]
    Lock(PathBuf, #[source] io::Error),
    #[error("{0} is in use: a process is accepting connections on it")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("failed to remove stale socket {0}")]
    RemoveStale(PathBuf, #[source] io::Error),
    #[error("failed to bind {0}")]
    Bind(PathBuf, #[source] io::Error),
    #[error("failed to set mode 0600 on {0}")]
    Chmod(PathBuf, #[source] io::Error),
}

/// A bound socket and the lock that keeps a second daemon off its path.
pub struct BoundSocket {
    pub listener: UnixListener,
    pub path: PathBuf,
    /// Held (flock) for as long as the socket is served.
    pub lock: File,
}

fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Take PATH.lock, replace a stale socket, bind with mode 0600.
pub fn bind(path: &Path) -> Result<BoundSocket, SocketError> {
    let lock_file = lock_path(path);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_file)
        .map_err(|e| SocketError::OpenLock(lock_file.clone(), e))?;
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => SocketError::AlreadyServed(path.to_path_buf()),
            _ => SocketError::Lock(path.to_path_buf(), err),
        });
    }
    remove_stale(path)?;
    // SAFETY: umask only changes this process's file-creation mask; restored right after bind
    // so the socket is never group/world accessible, not even briefly.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old_mask) };
    let listener = bound.map_err(|e| SocketError::Bind(path.to_path_buf(), e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| SocketError::Chmod(path.to_path_buf(), e))?;
    register_cleanup(path);
    register_cleanup(&lock_file);
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        lock,
    })
}

/// A socket file nobody accepts on (ECONNREFUSED) is left over from a crash: remove it.
fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_path_buf())),
        Err(_) => {
            log::info!("removing stale socket {}", path.display());
            fs::remove_file(path).map_err(|e| SocketError::RemoveStale(path.to_path_buf(), e))
        }
    }
}

fn register_cleanup(path: &Path) {
    CLEANUP
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(path.to_path_buf());
}

/// Delete every socket and lock file this process created.
pub fn cleanup() {
    let paths = std::mem::take(&mut *CLEANUP.lock().unwrap_or_else(PoisonError::into_inner));
    for path in paths {
        let _ = fs::remove_file(&path);
    }
}

/// Block SIGINT/SIGTERM/SIGUSR1 in every thread and handle them on a dedicated one: SIGUSR1
/// runs `print_stats` and goes on; the others run it, remove the sockets (the stats socket
/// too) and exit 0. Call before spawning any other thread.
pub fn handle_termination(print_stats: impl Fn() + Send + 'static) -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for these libc calls.
    let ret = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid for the call; sigwait only reads/writes them.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                if sig == libc::SIGUSR1 {
                    print_stats();
                    continue;
                }
                log::info!("signal {sig}: removing sockets and exiting");
                print_stats();
                cleanup();
                crate::stats_server::cleanup();
                std::process::exit(0);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("svnet-sock-{}-{name}", std::process::id()));
        let _ = fs::create_dir_all(&dir);
        dir.join("s.sock")
    }

    #[test]
    fn stale_socket_is_replaced_and_live_lock_is_refused() {
        let path = temp_path("stale");
        drop(UnixListener::bind(&path));
        assert!(path.exists());
        let bound = bind(&path).expect("stale socket replaced");
        let mode = fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o600));
        match bind(&path) {
            Err(SocketError::AlreadyServed(_)) => {}
            other => panic!("expected AlreadyServed, got {:?}", other.map(|_| ())),
        }
        drop(bound);
        let _ = fs::remove_dir_all(path.parent().unwrap_or(&path));
    }
}
