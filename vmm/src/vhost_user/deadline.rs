//! A real deadline for every exchange with a vhost-user backend. The `vhost` crate's frontend
//! retries a read that timed out (`SO_RCVTIMEO` gives EAGAIN, which it treats as a transient
//! `SocketRetry`), so a silent backend would block the caller forever. Instead, a watchdog
//! thread shuts the socket down (`shutdown(2)`) when an exchange overruns its deadline: the
//! crate's read then sees end-of-file and returns, and the caller gets `TimedOut` naming the
//! message. A sequence of messages (a handshake, setting up or stopping the rings) is also
//! bounded as a whole (`sequence`), so that a backend answering each message just in time
//! cannot hold the caller for minutes. When the VM ends, every pending exchange is cut short the same way (`abort_all`),
//! so that no thread stays blocked on a backend while the VMM stops.

use std::cell::Cell;
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use log::error;
use vhost::vhost_user::Frontend;

/// How long a backend may take to answer one control message.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole sequence of messages may take (see `sequence`).
pub const SEQUENCE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{message} got no answer within {}s; the backend is unresponsive and was disconnected", .deadline.as_secs_f32())]
    TimedOut {
        message: &'static str,
        deadline: Duration,
    },
    #[error("{message} got no answer before the {}s that its whole sequence of messages may take ran out; the backend is too slow and was disconnected", .total.as_secs_f32())]
    SequenceTimedOut {
        message: &'static str,
        total: Duration,
    },
    #[error("{message} was abandoned: the VM is stopping")]
    Aborted { message: &'static str },
    #[error("{message} failed")]
    Failed {
        message: &'static str,
        #[source]
        source: vhost::Error,
    },
}

impl ExchangeError {
    /// The backend did not answer in time (its connection is now shut down).
    pub fn timed_out(&self) -> bool {
        matches!(
            self,
            ExchangeError::TimedOut { .. } | ExchangeError::SequenceTimedOut { .. }
        )
    }

    /// The backend closed the connection (or reset it) instead of answering.
    pub fn disconnected(&self) -> bool {
        use vhost::vhost_user::Error as Protocol;
        matches!(
            self,
            ExchangeError::Failed {
                source: vhost::Error::VhostUserProtocol(
                    Protocol::Disconnected | Protocol::PartialMessage | Protocol::SocketBroken(_)
                ),
                ..
            }
        )
    }
}

/// What happened to an armed exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Pending,
    TimedOut,
    Aborted,
}

struct Armed {
    id: u64,
    fd: RawFd,
    deadline: Instant,
    fate: Fate,
}

#[derive(Default)]
struct State {
    next_id: u64,
    armed: Vec<Armed>,
    /// Set by `abort`: every exchange from now on fails at once.
    aborted: bool,
    /// When the watchdog thread wakes up next by itself (`None`: only when notified). An
    /// exchange due later needs no wake-up: in a burst of messages only the first one wakes it.
    wake_at: Option<Instant>,
    thread_started: bool,
}

/// Shuts down the sockets of exchanges that overran their deadline.
#[derive(Default)]
pub struct Watchdog {
    state: Mutex<State>,
    changed: Condvar,
}

/// The process's watchdog; its thread starts with the first exchange.
pub fn global() -> &'static Watchdog {
    static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(Watchdog::default)
}

/// Cuts every pending and future exchange short: the VM is ending.
pub fn abort_all() {
    global().abort();
}

thread_local! {
    /// The end of the sequence this thread is in, and its length (see `sequence`).
    static SEQUENCE: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
}

/// While the returned guard lives, the exchanges of this thread together may take at most
/// `total` (or what is left of an enclosing sequence, if that ends sooner).
pub fn sequence(total: Duration) -> Sequence {
    let end = Instant::now() + total;
    let outer = SEQUENCE.get();
    if outer.is_none_or(|(outer_end, _)| end < outer_end) {
        SEQUENCE.set(Some((end, total)));
    }
    Sequence { outer }
}

/// Ends a `sequence` when dropped.
pub struct Sequence {
    outer: Option<(Instant, Duration)>,
}

impl Drop for Sequence {
    fn drop(&mut self) {
        SEQUENCE.set(self.outer);
    }
}

/// Runs `f`, one exchange with the backend on `frontend`, bounded by `MESSAGE_TIMEOUT` and by
/// what is left of the thread's `sequence`.
pub fn exchange<T>(
    frontend: &mut Frontend,
    message: &'static str,
    f: impl FnOnce(&mut Frontend) -> Result<T, vhost::Error>,
) -> Result<T, ExchangeError> {
    use std::os::fd::AsRawFd;
    let fd = frontend.as_raw_fd();
    let left = SEQUENCE
        .get()
        .map(|(end, total)| (end.saturating_duration_since(Instant::now()), total));
    match left {
        Some((left, total)) if left < MESSAGE_TIMEOUT => global()
            .run(fd, message, left, || f(frontend))
            .map_err(|e| match e {
                ExchangeError::TimedOut { message, .. } => {
                    ExchangeError::SequenceTimedOut { message, total }
                }
                other => other,
            }),
        _ => global().run(fd, message, MESSAGE_TIMEOUT, || f(frontend)),
    }
}

impl Watchdog {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f`, which talks over socket `fd`; if it takes longer than `timeout` (or the VM
    /// ends meanwhile), shuts the socket down so that `f` returns, and reports why.
    pub fn run<T>(
        &'static self,
        fd: RawFd,
        message: &'static str,
        timeout: Duration,
        f: impl FnOnce() -> Result<T, vhost::Error>,
    ) -> Result<T, ExchangeError> {
        let id = {
            let mut state = self.lock();
            if state.aborted {
                return Err(ExchangeError::Aborted { message });
            }
            if !state.thread_started {
                // The thread inherits a mask that blocks every signal (see `without_signals`).
                let spawned = without_signals(|| {
                    std::thread::Builder::new()
                        .name("vhost-deadline".into())
                        .spawn(move || self.watch())
                });
                match spawned {
                    Ok(_) => state.thread_started = true,
                    // Without the thread nothing is bounded: say so, and carry on unbounded.
                    Err(e) => error!("could not start the vhost-user deadline thread: {e}"),
                }
            }
            state.next_id += 1;
            let id = state.next_id;
            let deadline = Instant::now() + timeout;
            let earliest = state.wake_at.is_none_or(|at| deadline < at);
            state.armed.push(Armed {
                id,
                fd,
                deadline,
                fate: Fate::Pending,
            });
            if earliest {
                self.changed.notify_all();
            }
            id
        };
        let result = f();
        // Disarmed under the lock: once this returns, the watchdog never touches `fd` again,
        // so the caller may close it.
        let fate = {
            let mut state = self.lock();
            let at = state.armed.iter().position(|a| a.id == id);
            at.map_or(Fate::Pending, |at| state.armed.swap_remove(at).fate)
        };
        match (fate, result) {
            (Fate::TimedOut, _) => Err(ExchangeError::TimedOut {
                message,
                deadline: timeout,
            }),
            (Fate::Aborted, _) => Err(ExchangeError::Aborted { message }),
            (Fate::Pending, Ok(value)) => Ok(value),
            (Fate::Pending, Err(source)) => Err(ExchangeError::Failed { message, source }),
        }
    }

    /// Shuts down every pending exchange's socket and refuses new ones.
    pub fn abort(&self) {
        let mut state = self.lock();
        state.aborted = true;
        for armed in state.armed.iter_mut().filter(|a| a.fate == Fate::Pending) {
            armed.fate = Fate::Aborted;
            shut_down(armed.fd);
        }
    }

    /// The watchdog thread: sleeps until the earliest deadline, fires what overran.
    fn watch(&self) {
        crate::seccomp::confine(crate::seccomp::ThreadKind::VhostDeadline);
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            for armed in state
                .armed
                .iter_mut()
                .filter(|a| a.fate == Fate::Pending && a.deadline <= now)
            {
                armed.fate = Fate::TimedOut;
                shut_down(armed.fd);
            }
            let next = state
                .armed
                .iter()
                .filter(|a| a.fate == Fate::Pending)
                .map(|a| a.deadline)
                .min();
            state.wake_at = next;
            state = match next {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    self.changed
                        .wait_timeout(state, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

/// Runs `f` (which spawns a thread) with every signal blocked, so that the new thread never
/// takes a process-directed signal (SIGTERM, SIGINT): it may start before the VMM's signal
/// thread blocks them, and would otherwise take them with their default action - killing the
/// process - instead of the VMM's orderly stop.
fn without_signals<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: both sets are initialised (sigfillset, or by pthread_sigmask into `old`) before
    // they are read; the masks change only the calling thread, and the old one is restored.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        result
    }
}

/// Ends both directions of the connection: a blocked read returns end-of-file, a write fails.
fn shut_down(fd: RawFd) {
    // SAFETY: `fd` belongs to an exchange that is still armed, i.e. its owner is blocked in
    // `Watchdog::run` and has not closed it (it disarms, under the same lock, before it can).
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn leaked() -> &'static Watchdog {
        Box::leak(Box::default())
    }

    /// A read that would block forever returns once the deadline passes, as `TimedOut`.
    #[test]
    fn a_silent_peer_times_out() {
        let watchdog = leaked();
        let (mut ours, _silent) = UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd();
        let started = Instant::now();
        let result = watchdog.run(fd, "GET_FEATURES", Duration::from_millis(200), || {
            let mut buf = [0; 12];
            // EOF after the shutdown: what the vhost crate turns into an error.
            match ours.read(&mut buf) {
                Ok(0) => Err(vhost::Error::InvalidOperation),
                _ => Ok(()),
            }
        });
        let err = result.unwrap_err();
        assert!(err.timed_out(), "{err}");
        assert!(err.to_string().contains("GET_FEATURES"), "{err}");
        assert!(err.to_string().contains("0.2s"), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_prompt_answer_passes_and_disarms() {
        let watchdog = leaked();
        let (ours, peer) = UnixStream::pair().unwrap();
        let value = watchdog
            .run(
                ours.as_raw_fd(),
                "GET_QUEUE_NUM",
                Duration::from_millis(50),
                || Ok(7),
            )
            .unwrap();
        assert_eq!(value, 7);
        // Long after the deadline the socket still works: nothing fired on it.
        std::thread::sleep(Duration::from_millis(100));
        assert!(watchdog.lock().armed.is_empty());
        drop(peer);
        let err = watchdog
            .run(ours.as_raw_fd(), "SET_OWNER", MESSAGE_TIMEOUT, || {
                Err::<(), _>(vhost::Error::InvalidOperation)
            })
            .unwrap_err();
        assert!(matches!(err, ExchangeError::Failed { .. }), "{err}");
    }

    /// A sequence bounds its messages together; it ends with its guard.
    #[test]
    fn a_sequence_bounds_its_messages_together() {
        assert_eq!(SEQUENCE.get(), None);
        let outer = sequence(Duration::from_secs(60));
        let (end, total) = SEQUENCE.get().unwrap();
        assert_eq!(total, Duration::from_secs(60));
        {
            let _inner = sequence(Duration::from_millis(100));
            assert_eq!(SEQUENCE.get().unwrap().1, Duration::from_millis(100));
            let _longer = sequence(Duration::from_secs(600));
            assert_eq!(
                SEQUENCE.get().unwrap().1,
                Duration::from_millis(100),
                "an inner sequence cannot outlast its enclosing one"
            );
        }
        assert_eq!(SEQUENCE.get(), Some((end, total)));
        drop(outer);
        assert_eq!(SEQUENCE.get(), None);
    }

    /// Through the vhost crate's own frontend: a silent backend that would keep it retrying
    /// forever ends the sequence's time, and the error says which message went unanswered.
    #[test]
    fn the_vhost_frontend_returns_when_a_silent_backend_runs_out_of_time() {
        use vhost::VhostBackend;
        let (ours, _silent) = UnixStream::pair().unwrap();
        // What made the crate retry forever: a read timeout turns into EAGAIN.
        ours.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut frontend = Frontend::from_stream(ours, 1);
        let _sequence = sequence(Duration::from_millis(300));
        let started = Instant::now();
        let err = exchange(&mut frontend, "GET_FEATURES", |f| f.get_features()).unwrap_err();
        assert!(err.timed_out(), "{err}");
        assert!(
            matches!(
                err,
                ExchangeError::SequenceTimedOut {
                    message: "GET_FEATURES",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("0.3s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // The connection is shut down: the next message fails at once.
        let err = exchange(&mut frontend, "GET_FEATURES", |f| f.get_features()).unwrap_err();
        assert!(
            err.timed_out() || matches!(err, ExchangeError::Failed { .. }),
            "{err}"
        );
    }

    /// Aborting frees a blocked exchange at once and refuses the next one.
    #[test]
    fn abort_cuts_pending_exchanges_short() {
        let watchdog = leaked();
        let (mut ours, _silent) = UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd();
        let aborter = std::thread::spawn(move || {
            // Aborts once the exchange is armed (polled, bounded by the test's own deadline).
            let deadline = Instant::now() + Duration::from_secs(10);
            while watchdog.lock().armed.is_empty() && Instant::now() < deadline {
                std::thread::yield_now();
            }
            watchdog.abort();
        });
        let started = Instant::now();
        let err = watchdog
            .run(fd, "SET_MEM_TABLE", Duration::from_secs(60), || {
                let _ = ours.read(&mut [0; 12]);
                Err::<(), _>(vhost::Error::InvalidOperation)
            })
            .unwrap_err();
        aborter.join().unwrap();
        assert!(matches!(err, ExchangeError::Aborted { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let err = watchdog
            .run(fd, "GET_CONFIG", Duration::from_secs(60), || Ok(()))
            .unwrap_err();
        assert!(matches!(err, ExchangeError::Aborted { .. }), "{err}");
    }
}
