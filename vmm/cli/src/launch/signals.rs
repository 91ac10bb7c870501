//! launch's one wait: SIGINT, SIGTERM and SIGCHLD are blocked and taken synchronously with
//! `sigtimedwait`, so an interrupt, a child's death and a timer all wake the same loop without
//! signal handlers (splitvisor-wire's `host::signals`, as every splitvisor process). A blocked
//! mask survives exec: children unblock everything before it (`supervisor::prepare_child`).

use std::io;
use std::time::Duration;

use splitvisor_wire::host::signals::{self, Blocked};

/// What woke the wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// SIGINT or SIGTERM (the signal number).
    Stop(libc::c_int),
    /// SIGCHLD: some child changed state (several deaths may share one).
    Child,
    /// The timeout passed.
    Timeout,
}

/// The blocked signals; the previous mask comes back on drop.
pub struct SignalWait {
    blocked: Blocked,
}

impl SignalWait {
    /// Blocks SIGINT, SIGTERM and SIGCHLD in the calling thread. Call it before spawning any
    /// thread or child: launch runs on one thread, so process-directed signals then stay pending
    /// until `wait` takes them.
    pub fn install() -> io::Result<SignalWait> {
        let blocked = Blocked::block(&[signals::STOP[0], signals::STOP[1], libc::SIGCHLD])?;
        Ok(SignalWait { blocked })
    }

    /// Waits up to `timeout` for one of the signals.
    pub fn wait(&self, timeout: Duration) -> Wakeup {
        match self.blocked.wait_timeout(timeout) {
            Some(signal @ (libc::SIGINT | libc::SIGTERM)) => Wakeup::Stop(signal),
            Some(libc::SIGCHLD) => Wakeup::Child,
            // A timeout, or another signal interrupted the wait: look at the world again.
            _ => Wakeup::Timeout,
        }
    }
}

impl Drop for SignalWait {
    /// Takes what is still pending first: a SIGINT that arrived with the VMM's own exit would
    /// otherwise kill launch by its default action as soon as it is unblocked.
    fn drop(&mut self) {
        while self.wait(Duration::ZERO) != Wakeup::Timeout {}
        self.blocked.restore();
    }
}

/// "SIGKILL", "SIGSEGV", ... or "signal N".
pub use splitvisor_wire::host::signals::signal_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_signal_is_taken_and_a_quiet_wait_times_out() {
        let wait = SignalWait::install().unwrap();
        assert_eq!(wait.wait(Duration::from_millis(10)), Wakeup::Timeout);
        // SAFETY: raise a blocked signal at this thread; it stays pending until taken.
        unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGCHLD) };
        assert_eq!(wait.wait(Duration::from_secs(5)), Wakeup::Child);
        // A signal still pending when the wait ends is taken, not delivered.
        // SAFETY: as above; SIGINT's default action would end the test process if delivered.
        unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGINT) };
        drop(wait);
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
        assert_eq!(signal_name(77), "signal 77");
    }
}
