//! Turns away a second frontend while one is being served, so that it hears "busy" (the
//! connection closed before any answer) at once instead of waiting unanswered in the
//! listen backlog until its own deadline.
//!
//! A vhost-user backend serves one frontend per socket. A newcomer is turned away only while
//! the frontend being served is still there: once that peer has hung up (a VMM reconnecting
//! after a swap or a crash closes its old connection before it opens the new one), the
//! newcomer is left in the backlog for the serve loop, which accepts it as soon as the old
//! connection's queues are stopped.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;

use log::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::loglimit::{burst_note, LogLimit, INTERVAL};

/// The thread that watches the listener while a frontend is served.
pub struct Doorman {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl Doorman {
    /// Watch `listener` while `served` (a handle on the connection being served) is open.
    pub fn start(listener: BorrowedFd<'_>, served: &UnixStream) -> io::Result<Self> {
        let listener = UnixListener::from(listener.try_clone_to_owned()?);
        let served: OwnedFd = served.try_clone()?.into();
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_watch = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("doorman".into())
            .spawn(move || watch(&listener, &served, &stop_watch))?;
        Ok(Doorman { stop, thread })
    }

    /// Stop watching (the connection being served has ended).
    pub fn stop(self) {
        if let Err(e) = self.stop.write(1) {
            warn!("cannot stop the thread that turns away second frontends: {e}");
            return;
        }
        if self.thread.join().is_err() {
            warn!("the thread that turns away second frontends panicked");
        }
    }
}

/// `poll(2)` on `fds`, retried on EINTR; `timeout_ms` -1 waits for ever.
fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<()> {
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn pollfd(fd: BorrowedFd<'_>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// Whether the peer of `served` has hung up (or the socket failed).
fn peer_gone(served: &OwnedFd) -> io::Result<bool> {
    let mut fds = [pollfd(served.as_fd(), libc::POLLRDHUP)];
    poll(&mut fds, 0)?;
    Ok(fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}

fn watch(listener: &UnixListener, served: &OwnedFd, stop: &EventFd) {
    let mut log = LogLimit::default();
    // SAFETY: `stop` is borrowed for this whole function, so its descriptor stays open.
    let stop = unsafe { BorrowedFd::borrow_raw(stop.as_raw_fd()) };
    loop {
        let mut fds = [
            pollfd(listener.as_fd(), libc::POLLIN),
            pollfd(stop, libc::POLLIN),
        ];
        if let Err(e) = poll(&mut fds, -1) {
            warn!("cannot watch the socket for second frontends: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }
        // The newcomer is most likely the same frontend coming back: the serve loop takes it.
        if peer_gone(served).unwrap_or(true) {
            return;
        }
        match listener.accept() {
            // Closed unanswered: the frontend reads "disconnected" on its first message.
            Ok((stream, _)) => {
                drop(stream);
                let verdict = log.check();
                if verdict.suppressed > 0 {
                    warn!(
                        "{} more frontend(s) turned away in the last {}s",
                        verdict.suppressed,
                        INTERVAL.as_secs()
                    );
                }
                if verdict.log {
                    warn!(
                        "a second frontend connected while one is being served: turned away \
                         (one frontend per socket; start another daemon for another VM){}",
                        burst_note(&verdict)
                    );
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                warn!("cannot accept a second frontend to turn it away: {e}");
                return;
            }
        }
    }
}
