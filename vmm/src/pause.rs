//! Pausing the vCPUs: the control API asks, each vCPU thread parks between two `KVM_RUN`s, and
//! the request returns once every vCPU is parked - so "paused" means no guest instruction runs.
//! Backends keep serving what the guest already queued; only the guest stops.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::vm_end::EndSignal;

#[derive(Default)]
struct State {
    /// The pause the control API asked for.
    requested: bool,
    /// How many vCPU threads are parked right now.
    parked: usize,
}

#[derive(Default)]
pub struct PauseGate {
    state: Mutex<State>,
    changed: Condvar,
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_paused(&self) -> bool {
        self.lock().requested
    }

    /// Asks the vCPUs to park. The caller must then kick them out of `KVM_RUN` and wait with
    /// `wait_parked`.
    pub fn request_pause(&self) {
        self.lock().requested = true;
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.lock().requested = false;
        self.changed.notify_all();
    }

    /// Waits until `vcpus` threads are parked; false if that took longer than `timeout`.
    pub fn wait_parked(&self, vcpus: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while state.requested && state.parked < vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left.min(Duration::from_millis(20)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.requested
    }

    /// Wakes the parked vCPUs so that they run their `while_parked` work (a snapshot's
    /// capture) without being released.
    pub fn wake_parked(&self) {
        let _state = self.lock();
        self.changed.notify_all();
    }

    /// Called by a vCPU thread between two `KVM_RUN`s: blocks while a pause is requested,
    /// unless the VM is ending. While parked it runs `while_parked` at every wake-up, without
    /// the lock: work that must be done on the vCPU's own thread while it is out of `KVM_RUN`.
    pub fn park_if_requested(&self, end: &EndSignal, mut while_parked: impl FnMut()) {
        let mut state = self.lock();
        if !state.requested {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.requested && !end.is_stopping() {
            drop(state);
            while_parked();
            state = self.lock();
            if !state.requested || end.is_stopping() {
                break;
            }
            // The timeout lets a parked vCPU notice the VM ending without another wake-up path
            // (and covers a `wake_parked` that came while `while_parked` ran).
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.parked -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        let gate = Arc::new(PauseGate::default());
        let end = Arc::new(EndSignal::default());
        gate.request_pause();
        assert!(
            !gate.wait_parked(2, Duration::from_millis(30)),
            "nobody parked yet"
        );
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (gate, end) = (gate.clone(), end.clone());
                std::thread::spawn(move || gate.park_if_requested(&end, || {}))
            })
            .collect();
        assert!(gate.wait_parked(2, Duration::from_secs(5)));
        assert!(gate.is_paused());
        gate.resume();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!gate.is_paused());
    }

    #[test]
    fn a_parked_vcpu_leaves_when_the_vm_ends() {
        let gate = Arc::new(PauseGate::default());
        let end = Arc::new(EndSignal::default());
        gate.request_pause();
        let t = {
            let (gate, end) = (gate.clone(), end.clone());
            std::thread::spawn(move || gate.park_if_requested(&end, || {}))
        };
        assert!(gate.wait_parked(1, Duration::from_secs(5)));
        end.end(crate::vm_end::VmEnd::Interrupted);
        t.join().unwrap();
    }
}
