//! The user's terminal in raw mode while the guest owns the console, and putting it back the
//! way it was on every way out: drop, error return, panic (a hook, for `panic = "abort"` too).
//!
//! Raw here means what QEMU's stdio console does: no echo, no line editing, no signals from
//! keys (Ctrl-C goes to the guest), no CR/NL translation or flow control on input, 8-bit
//! characters. Output processing (`OPOST`, `ONLCR`) is left as the user had it: the guest's
//! bytes are written as they are, and with the usual `ONLCR` a bare "\n" (the project's guest
//! ends lines so) still starts a new line at column 0, while a Linux guest's tty already sends
//! "\r\n", which the terminal shows the same way.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, Once, PoisonError};

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("--serial stdio: cannot read the settings of the terminal on stdin (redirect stdin, e.g. </dev/null, or use --serial file=PATH)")]
    GetAttributes(#[source] std::io::Error),
    #[error("--serial stdio: cannot put the terminal on stdin in raw mode (redirect stdin, e.g. </dev/null, or use --serial file=PATH)")]
    SetAttributes(#[source] std::io::Error),
    #[error("--serial stdio: cannot duplicate the descriptor of the terminal on stdin")]
    Duplicate(#[source] std::io::Error),
}

/// Whether a file descriptor is a terminal this process may put in raw mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TerminalKind {
    /// Not a terminal (a pipe, a file, /dev/null).
    NotATerminal,
    /// The foreground terminal of this process (or a terminal that is no one's controlling
    /// terminal, e.g. a pty handed to us): ours to use.
    Foreground,
    /// The controlling terminal, but this process runs in the background (`splitvisor ... &`):
    /// changing or reading it would stop the process with SIGTTOU/SIGTTIN.
    Background,
}

/// Tells what `fd` is.
pub fn kind(fd: BorrowedFd) -> TerminalKind {
    let raw = fd.as_raw_fd();
    // SAFETY: isatty only inspects the descriptor, which `fd` keeps open.
    if unsafe { libc::isatty(raw) } != 1 {
        return TerminalKind::NotATerminal;
    }
    // SAFETY: as above; tcgetpgrp fails with ENOTTY for a terminal that is not our controlling
    // terminal, which has no job control to worry about.
    let group = unsafe { libc::tcgetpgrp(raw) };
    // SAFETY: getpgrp cannot fail.
    if group >= 0 && group != unsafe { libc::getpgrp() } {
        TerminalKind::Background
    } else {
        TerminalKind::Foreground
    }
}

/// The terminal settings to restore if the process panics while a terminal is raw.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);
static PANIC_HOOK: Once = Once::new();

/// A terminal in raw mode; dropping it restores the settings it had.
pub struct RawTerminal {
    /// A descriptor of its own, so that the restore works whoever closed theirs.
    fd: OwnedFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts the terminal on `fd` in raw mode.
    pub fn enter(fd: BorrowedFd) -> Result<Self, TerminalError> {
        let owned = fd.try_clone_to_owned().map_err(TerminalError::Duplicate)?;
        let fd = owned.as_raw_fd();
        let saved = get_attributes(fd).map_err(TerminalError::GetAttributes)?;
        install_panic_hook();
        *SAVED.lock().unwrap_or_else(PoisonError::into_inner) = Some((fd, saved));
        if let Err(e) = set_attributes(fd, &raw_mode(&saved)) {
            SAVED.lock().unwrap_or_else(PoisonError::into_inner).take();
            return Err(TerminalError::SetAttributes(e));
        }
        Ok(Self { fd: owned, saved })
    }
}

impl RawTerminal {
    /// Its descriptor and the settings it restores.
    pub fn saved(&self) -> (RawFd, libc::termios) {
        (self.fd.as_raw_fd(), self.saved)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        SAVED.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Err(e) = set_attributes(self.fd.as_raw_fd(), &self.saved) {
            log::warn!("could not restore the terminal settings (try `stty sane`): {e}");
        }
    }
}

/// `saved` with the input side made raw and the output side left alone (see the module doc).
pub fn raw_mode(saved: &libc::termios) -> libc::termios {
    let mut raw = *saved;
    raw.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
    raw.c_cflag |= libc::CS8;
    // A read returns as soon as one byte is there (the reader polls before it reads anyway).
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    raw
}

/// True if `t` is in the raw mode `raw_mode` makes.
#[cfg(test)]
fn is_raw(t: &libc::termios) -> bool {
    t.c_lflag & (libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN) == 0
        && t.c_iflag & (libc::ICRNL | libc::IXON | libc::INLCR | libc::IGNCR) == 0
}

pub fn get_attributes(fd: RawFd) -> std::io::Result<libc::termios> {
    // SAFETY: termios is plain data; tcgetattr fills it in or fails.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is valid for writes; a bad `fd` only makes the call fail.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(t)
}

pub fn set_attributes(fd: RawFd, t: &libc::termios) -> std::io::Result<()> {
    // SAFETY: `t` is a valid termios; a bad `fd` only makes the call fail.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Restores the terminal before any panic message is printed, in whichever thread: a panic
/// means the VMM is failing, and with `panic = "abort"` no destructor would run. The hook
/// runs before unwinding, so `RawTerminal::drop` later finds nothing left to do but repeat
/// the (idempotent) restore.
fn install_panic_hook() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // try_lock: never wait in a panic hook (the panic may be inside `enter`).
            if let Ok(saved) = SAVED.try_lock() {
                if let Some((fd, t)) = saved.as_ref() {
                    let _ = set_attributes(*fd, t);
                }
            }
            previous(info);
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn raw_mode_keeps_output_processing_and_clears_input_processing() {
        // SAFETY: termios is plain data.
        let mut cooked: libc::termios = unsafe { std::mem::zeroed() };
        cooked.c_iflag = libc::ICRNL | libc::IXON | libc::BRKINT;
        cooked.c_oflag = libc::OPOST | libc::ONLCR;
        cooked.c_lflag = libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN | libc::ECHOE;
        cooked.c_cflag = libc::CS7 | libc::PARENB | libc::CREAD;
        assert!(!is_raw(&cooked));
        let raw = raw_mode(&cooked);
        assert!(is_raw(&raw));
        assert_eq!(raw.c_oflag, libc::OPOST | libc::ONLCR);
        assert_eq!(raw.c_iflag, 0);
        assert_eq!(raw.c_lflag, libc::ECHOE);
        assert_eq!(raw.c_cflag, libc::CS8 | libc::CREAD);
        assert_eq!(raw.c_cc[libc::VMIN], 1);
    }

    #[test]
    fn a_pipe_is_not_a_terminal() {
        let (read, _write) = std::io::pipe().unwrap();
        assert_eq!(kind(read.as_fd()), TerminalKind::NotATerminal);
    }

    /// The raw-terminal state is process-wide (one terminal): one pty test at a time.
    static PTY_TESTS: Mutex<()> = Mutex::new(());

    /// A new pseudo-terminal: (master, slave).
    fn openpty() -> (OwnedFd, OwnedFd) {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: the out-pointers are valid; the names/termios/winsize pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty just opened both; nothing else owns them.
        unsafe {
            use std::os::fd::FromRawFd;
            (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave))
        }
    }

    #[test]
    fn a_raw_pty_gets_its_settings_back() {
        let _one = PTY_TESTS.lock().unwrap_or_else(PoisonError::into_inner);
        let (_master, slave) = openpty();
        assert_eq!(kind(slave.as_fd()), TerminalKind::Foreground);
        let before = get_attributes(slave.as_raw_fd()).unwrap();
        assert!(!is_raw(&before), "a new pty is cooked");
        let raw = RawTerminal::enter(slave.as_fd()).unwrap();
        assert!(is_raw(&get_attributes(slave.as_raw_fd()).unwrap()));
        drop(raw);
        let after = get_attributes(slave.as_raw_fd()).unwrap();
        assert_eq!(
            (after.c_iflag, after.c_oflag, after.c_lflag, after.c_cflag),
            (
                before.c_iflag,
                before.c_oflag,
                before.c_lflag,
                before.c_cflag
            )
        );
    }

    #[test]
    fn a_panic_restores_the_terminal_before_anything_is_dropped() {
        let _one = PTY_TESTS.lock().unwrap_or_else(PoisonError::into_inner);
        let (_master, slave) = openpty();
        let raw = RawTerminal::enter(slave.as_fd()).unwrap();
        assert!(is_raw(&get_attributes(slave.as_raw_fd()).unwrap()));
        let panicked = std::panic::catch_unwind(|| panic!("test panic (expected)"));
        assert!(panicked.is_err());
        // The guard is still alive: only the hook can have restored the terminal.
        assert!(!is_raw(&get_attributes(slave.as_raw_fd()).unwrap()));
        drop(raw);
    }
}
