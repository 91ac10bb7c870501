//! Rate limiting of log lines a guest can cause (one per bad request or frame): the first
//! `BURST` of an interval are logged, the rest only counted, and the count is reported in one
//! summary line when the next such event comes after the interval. Keep one per queue, so a
//! flood on one queue does not hide the first errors of another.
//!
//! Used by both daemons.

use std::time::{Duration, Instant};

/// Lines logged per interval before the rest are only counted.
pub const BURST: u32 = 10;
/// Length of one rate-limiting interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// What to do about one event.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Log this event.
    pub log: bool,
    /// This is the last event logged in this interval: say that more will be counted only.
    pub last_of_burst: bool,
    /// Events that were counted, not logged, in the interval that just ended: report them now.
    pub suppressed: u64,
}

/// The rate limiter of one kind of event on one queue.
#[derive(Debug, Default)]
pub struct LogLimit {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    /// Account for one event now.
    pub fn check(&mut self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// Account for one event at `now` (tests drive the clock).
    pub fn check_at(&mut self, now: Instant) -> Verdict {
        let mut ended = 0;
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= INTERVAL);
        if expired {
            ended = std::mem::take(&mut self.suppressed);
            self.window_start = Some(now);
            self.logged = 0;
        }
        if self.logged < BURST {
            self.logged += 1;
            return Verdict {
                log: true,
                last_of_burst: self.logged == BURST,
                suppressed: ended,
            };
        }
        self.suppressed += 1;
        Verdict {
            log: false,
            last_of_burst: false,
            suppressed: ended,
        }
    }
}

/// The note appended to the last line of a burst.
pub fn burst_note(verdict: &Verdict) -> String {
    if verdict.last_of_burst {
        format!(
            " (more in the next {}s are only counted)",
            INTERVAL.as_secs()
        )
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_counting_then_one_summary() {
        let mut limit = LogLimit::default();
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..1000).map(|_| limit.check_at(t0)).collect();
        assert_eq!(verdicts.iter().filter(|v| v.log).count(), BURST as usize);
        assert!(verdicts[BURST as usize - 1].last_of_burst);
        assert!(verdicts.iter().all(|v| v.suppressed == 0));
        // Still inside the interval: counted.
        assert!(!limit.check_at(t0 + INTERVAL / 2).log);
        // The next interval reports what the last one suppressed, once, and logs again.
        let next = limit.check_at(t0 + INTERVAL);
        assert_eq!(
            next,
            Verdict {
                log: true,
                last_of_burst: false,
                suppressed: 1000 - u64::from(BURST) + 1,
            }
        );
        assert_eq!(limit.check_at(t0 + INTERVAL).suppressed, 0);
    }
}
