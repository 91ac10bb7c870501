//! The restart policy for backend daemons: how long to wait before a restart, when a crash loop
//! is given up on, and from that the longest a device may have to wait for its backend.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When and how often a dead daemon is restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Wait before restarting a daemon whose last run was healthy.
    pub first_backoff: Duration,
    /// The wait doubles after each failed run, up to this.
    pub max_backoff: Duration,
    /// A run is healthy when its sockets came up and it lived at least this long. A run that
    /// ends sooner is a failed run: a daemon that cannot start, not one killed under load.
    pub healthy_after: Duration,
    /// Give up after this many failed runs in a row.
    pub max_failed_runs: u32,
    /// Give up after this many restarts within `window`, healthy or not: a daemon that keeps
    /// dying a while after it starts (say, at each connection) is not restarted forever.
    pub max_restarts_per_window: u32,
    pub window: Duration,
}

impl RestartPolicy {
    pub const DEFAULT: RestartPolicy = RestartPolicy {
        first_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(2),
        healthy_after: Duration::from_millis(300),
        max_failed_runs: 5,
        max_restarts_per_window: 60,
        window: Duration::from_secs(60),
    };

    /// The wait before the next start, after `failed_runs` failed runs in a row.
    pub fn backoff(&self, failed_runs: u32) -> Duration {
        let factor = 1u32.checked_shl(failed_runs).unwrap_or(u32::MAX);
        self.first_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }

    /// The longest time from a daemon's death until launch either has it serving again or
    /// gives up on it: a wait before each of `max_failed_runs` tries, each try lasting at most
    /// `socket_timeout` to come up plus `healthy_after` to count as failed.
    pub fn longest_outage(&self, socket_timeout: Duration) -> Duration {
        (0..self.max_failed_runs)
            .map(|tries| self.backoff(tries) + socket_timeout + self.healthy_after)
            .sum()
    }

    /// The VMM's `--reconnect-timeout` in whole seconds: `longest_outage` rounded up, plus a
    /// second so launch's own give-up message comes before the device fails.
    pub fn reconnect_timeout_secs(&self, socket_timeout: Duration) -> u64 {
        let outage = self.longest_outage(socket_timeout);
        outage.as_secs() + u64::from(outage.subsec_nanos() > 0) + 1
    }
}

/// What to do about a daemon that just ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Start it again after `delay`; this is its `number`th restart.
    Restart { delay: Duration, number: u32 },
    /// Stop trying, for the reason given.
    GiveUp { reason: String },
}

/// One daemon's restart record.
#[derive(Debug, Default)]
pub struct RestartHistory {
    failed_runs: u32,
    restarts: u32,
    recent: VecDeque<Instant>,
}

impl RestartHistory {
    /// Records a run that ended at `now` and decides what comes next.
    pub fn on_exit(&mut self, policy: &RestartPolicy, healthy: bool, now: Instant) -> Verdict {
        self.failed_runs = if healthy { 0 } else { self.failed_runs + 1 };
        if self.failed_runs >= policy.max_failed_runs {
            return Verdict::GiveUp {
                reason: format!(
                    "{} failed runs in a row (each ended before its socket was up or within {} ms)",
                    self.failed_runs,
                    policy.healthy_after.as_millis()
                ),
            };
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= policy.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= policy.max_restarts_per_window as usize {
            return Verdict::GiveUp {
                reason: format!(
                    "{} restarts within {} s",
                    self.recent.len(),
                    policy.window.as_secs()
                ),
            };
        }
        self.recent.push_back(now);
        self.restarts += 1;
        Verdict::Restart {
            delay: policy.backoff(self.failed_runs),
            number: self.restarts,
        }
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RestartPolicy = RestartPolicy::DEFAULT;

    #[test]
    fn backoff_doubles_from_50_ms_up_to_2_s() {
        let waits: Vec<u128> = (0..8).map(|n| POLICY.backoff(n).as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(POLICY.backoff(200), POLICY.max_backoff);
    }

    #[test]
    fn twenty_kills_half_a_second_apart_are_all_restarted_quickly() {
        let mut history = RestartHistory::default();
        let start = Instant::now();
        for kill in 1..=20u32 {
            let now = start + Duration::from_millis(500) * kill;
            assert_eq!(
                history.on_exit(&POLICY, true, now),
                Verdict::Restart {
                    delay: Duration::from_millis(50),
                    number: kill
                }
            );
        }
        assert_eq!(history.restarts(), 20);
    }

    #[test]
    fn a_crash_loop_is_given_up_after_five_failed_runs() {
        let mut history = RestartHistory::default();
        let now = Instant::now();
        let mut delays = Vec::new();
        let verdict = loop {
            match history.on_exit(&POLICY, delays.is_empty(), now) {
                Verdict::Restart { delay, .. } => delays.push(delay.as_millis()),
                give_up => break give_up,
            }
        };
        // The healthy run's death, then four failed runs, each waiting twice as long.
        assert_eq!(delays, [50, 100, 200, 400, 800]);
        let Verdict::GiveUp { reason } = verdict else {
            unreachable!()
        };
        assert!(reason.starts_with("5 failed runs in a row"), "{reason}");
    }

    #[test]
    fn a_healthy_run_resets_the_streak() {
        let mut history = RestartHistory::default();
        let now = Instant::now();
        for _ in 0..3 {
            for _ in 0..POLICY.max_failed_runs - 1 {
                assert!(matches!(
                    history.on_exit(&POLICY, false, now),
                    Verdict::Restart { .. }
                ));
            }
            history.on_exit(&POLICY, true, now);
        }
    }

    #[test]
    fn too_many_restarts_in_a_minute_are_given_up_on() {
        let mut history = RestartHistory::default();
        let start = Instant::now();
        let at = |n: u32| start + Duration::from_millis(250) * n;
        for n in 0..60 {
            assert!(matches!(
                history.on_exit(&POLICY, true, at(n)),
                Verdict::Restart { .. }
            ));
        }
        let verdict = history.on_exit(&POLICY, true, at(60));
        assert!(
            matches!(&verdict, Verdict::GiveUp { reason } if reason == "60 restarts within 60 s"),
            "{verdict:?}"
        );
        // A minute later the window has emptied again.
        let mut history = RestartHistory::default();
        for n in 0..200 {
            let now = start + Duration::from_secs(2) * n;
            assert!(matches!(
                history.on_exit(&POLICY, true, now),
                Verdict::Restart { .. }
            ));
        }
    }

    #[test]
    fn the_vmm_waits_as_long_as_launch_keeps_trying() {
        let socket_timeout = Duration::from_secs(10);
        // 50+100+200+400+800 ms of waits and 5 tries of 10.3 s.
        assert_eq!(
            POLICY.longest_outage(socket_timeout),
            Duration::from_millis(1550 + 5 * 10_300)
        );
        assert_eq!(POLICY.reconnect_timeout_secs(socket_timeout), 55);
        assert_eq!(POLICY.reconnect_timeout_secs(Duration::from_secs(1)), 10);
    }
}
