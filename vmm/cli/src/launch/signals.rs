//! launch's one wait: SIGINT, SIGTERM and SIGCHLD are blocked and taken synchronously with
//! `sigtimedwait`, so an interrupt, a child's death and a timer all wake the same loop without
//! signal handlers. A blocked mask survives exec: children unblock everything before it
//! (`supervisor::prepare_child`).

use std::io;
use std::time::Duration;

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
    set: libc::sigset_t,
    previous: libc::sigset_t,
}

impl SignalWait {
    /// Blocks SIGINT, SIGTERM and SIGCHLD in the calling thread. Call it before spawning any
    /// thread or child: launch runs on one thread, so process-directed signals then stay pending
    /// until `wait` takes them.
    pub fn install() -> io::Result<SignalWait> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGCHLD);
        }
        // SAFETY: both sets are valid; this changes only the calling thread's mask.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(SignalWait { set, previous })
    }

    /// Waits up to `timeout` for one of the signals.
    pub fn wait(&self, timeout: Duration) -> Wakeup {
        let spec = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `set` and `spec` are valid for the call; no siginfo is asked for.
        let signal = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &spec) };
        match signal {
            libc::SIGINT | libc::SIGTERM => Wakeup::Stop(signal),
            libc::SIGCHLD => Wakeup::Child,
            // EAGAIN (timeout) or EINTR (another signal): either way, look at the world again.
            _ => Wakeup::Timeout,
        }
    }
}

impl Drop for SignalWait {
    /// Takes what is still pending first: a SIGINT that arrived with the VMM's own exit would
    /// otherwise kill launch by its default action as soon as it is unblocked.
    fn drop(&mut self) {
        while self.wait(Duration::ZERO) != Wakeup::Timeout {}
        // SAFETY: restores the mask saved in `install` for this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) };
    }
}

/// "SIGKILL", "SIGSEGV", ... or "signal N".
pub fn signal_name(signal: libc::c_int) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

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
