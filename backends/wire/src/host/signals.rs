//! Signals taken synchronously: the signals a process handles are blocked (in the calling
//! thread, and so in every thread it starts later) and waited for with sigwait(2) on a
//! thread of their own, or with sigtimedwait(2) by a single-threaded supervisor. No signal
//! handlers, so the reaction can do anything: print counters, remove sockets, stop a VM.

use std::io;
use std::time::Duration;

/// SIGINT and SIGTERM: the signals that stop every splitvisor process.
pub const STOP: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// A set of blocked signals; `restore` puts back the mask it replaced.
#[derive(Clone, Copy)]
pub struct Blocked {
    set: libc::sigset_t,
    previous: libc::sigset_t,
}

impl Blocked {
    /// Blocks `signals` in the calling thread. Call it before starting any thread that must
    /// not receive them: threads inherit the mask of the thread that starts them.
    pub fn block(signals: &[libc::c_int]) -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; pthread_sigmask fills it.
        let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame.
        unsafe { libc::sigemptyset(&mut set) };
        for &signal in signals {
            // SAFETY: as above.
            if unsafe { libc::sigaddset(&mut set, signal) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: both sets are valid; this changes only the calling thread's mask.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Self { set, previous })
    }

    /// Waits for one of the signals; returns its number.
    pub fn wait(&self) -> io::Result<libc::c_int> {
        let mut signal = 0;
        // SAFETY: `set` and `signal` are valid for the call; sigwait only writes `signal`.
        match unsafe { libc::sigwait(&self.set, &mut signal) } {
            0 => Ok(signal),
            rc => Err(io::Error::from_raw_os_error(rc)),
        }
    }

    /// Waits up to `timeout` for one of the signals; `None` if none came (or another,
    /// unblocked signal interrupted the wait).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<libc::c_int> {
        let spec = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `set` and `spec` are valid for the call; no siginfo is asked for.
        let signal = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &spec) };
        (signal > 0).then_some(signal)
    }

    /// Restores, in the calling thread, the mask `block` replaced.
    pub fn restore(&self) {
        // SAFETY: `previous` was filled by pthread_sigmask in `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) };
    }
}

/// Blocks `signals` and starts the thread "signals" that takes them one after another:
/// `on_start` runs first on it (say, to confine it), then `on_signal` for each signal. Call
/// it before starting any other thread.
pub fn spawn_signal_thread(
    signals: &[libc::c_int],
    on_start: impl FnOnce() + Send + 'static,
    mut on_signal: impl FnMut(libc::c_int) + Send + 'static,
) -> io::Result<()> {
    let blocked = Blocked::block(signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            on_start();
            loop {
                match blocked.wait() {
                    Ok(signal) => on_signal(signal),
                    Err(e) => {
                        log::error!("sigwait failed: {e}");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

/// The daemons' signal thread: SIGUSR1 runs `report` (print the STATS line) and goes on;
/// SIGINT/SIGTERM run `stop` (flush, report), remove every socket and lock file this process
/// bound (the stats socket included), and exit 0. Call before starting any other thread.
pub fn spawn_daemon_signal_thread(
    report: impl Fn() + Send + 'static,
    stop: impl Fn() + Send + 'static,
) -> io::Result<()> {
    let wanted = [STOP[0], STOP[1], libc::SIGUSR1];
    spawn_signal_thread(
        &wanted,
        || {},
        move |signal| {
            if signal == libc::SIGUSR1 {
                report();
                return;
            }
            log::info!("{}: removing the sockets and exiting", signal_name(signal));
            super::socket::cleanup_all();
            super::stats_server::cleanup();
            stop();
            std::process::exit(0);
        },
    )
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
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_is_taken_not_delivered() {
        // On a thread of its own, so the test harness's other threads keep their masks.
        std::thread::spawn(|| {
            let blocked = Blocked::block(&[libc::SIGUSR2]).unwrap();
            assert_eq!(blocked.wait_timeout(Duration::from_millis(10)), None);
            // SAFETY: raise a blocked signal at this thread; it stays pending until taken.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2) };
            assert_eq!(
                blocked.wait_timeout(Duration::from_secs(5)),
                Some(libc::SIGUSR2)
            );
            // SAFETY: as above; taken by `wait`, not by SIGUSR2's default action.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2) };
            assert_eq!(blocked.wait().unwrap(), libc::SIGUSR2);
            blocked.restore();
        })
        .join()
        .unwrap();
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(77), "signal 77");
    }
}
