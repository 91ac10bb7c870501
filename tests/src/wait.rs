//! Bounded waits: poll a condition with a deadline instead of sleeping a fixed time.

use std::time::{Duration, Instant};

/// How long `wait_for` waits: generous for a loaded 2-core CI machine, short enough to fail a
/// hung test quickly.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Poll `f` every 10 ms until it yields a value; `Err` names what timed out.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Poll `f` until it yields a value; panics naming `what` after [`TIMEOUT`].
pub fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll_until(what, TIMEOUT, f).unwrap_or_else(|e| panic!("{e}"))
}

/// Poll `cond` until it holds; false if it still does not after `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll_until("a condition", timeout, || cond().then_some(())).is_ok()
}
