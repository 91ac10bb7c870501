//! The daemon's vhost-user sockets and its SIGINT/SIGTERM/SIGUSR1 thread, as `daemon.rs`
//! uses them, over splitvisor-wire's host plumbing (the same as splitvisor-blk's and the
//! VMM's): a PATH.lock flock against a second daemon, stale socket replacement, mode 0600,
//! removal on exit.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use splitvisor_wire::host::signals;
use splitvisor_wire::host::socket::{self, SocketGuard};

pub use splitvisor_wire::host::socket::SocketError;

/// A bound socket and the guard that holds its lock and removes it.
pub struct BoundSocket {
    pub listener: UnixListener,
    pub path: PathBuf,
    /// Holds the PATH.lock flock for as long as the socket is served.
    pub lock: SocketGuard,
}

/// Takes PATH.lock, replaces a stale socket, binds with mode 0600.
pub fn bind(path: &Path) -> Result<BoundSocket, SocketError> {
    let (listener, lock) = socket::bind_locked(path, "--socket")?;
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        lock,
    })
}

/// Deletes every socket and lock file this process created.
pub fn cleanup() {
    socket::cleanup_all();
}

/// SIGUSR1 runs `print_stats` and goes on; SIGINT/SIGTERM run it, remove the sockets (the
/// stats socket too) and exit 0. Call before spawning any other thread.
pub fn handle_termination(print_stats: impl Fn() + Send + Sync + 'static) -> io::Result<()> {
    let print_stats = std::sync::Arc::new(print_stats);
    let on_stop = print_stats.clone();
    signals::spawn_daemon_signal_thread(move || print_stats(), move || on_stop())
}
