//! How a VM ends, and the exit status `splitvisor run` gives for each way.
//!
//! Guest statuses come from the debug-exit port and span 0-255, so the VMM's own failure
//! statuses are picked from a range the project's guest never uses and documented in `--help`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

/// The guest triple-faulted or asked KVM for a shutdown/reset.
pub const STATUS_SHUTDOWN: u8 = 121;
/// KVM could not run the guest (internal error, emulation failure, failed entry).
pub const STATUS_INTERNAL_ERROR: u8 = 122;
/// A vCPU thread failed (KVM_RUN error, unexpected exit, or a panic in the VMM).
pub const STATUS_VCPU_FAILED: u8 = 123;
/// Stopped by SIGINT/SIGTERM (the shell's 128 + SIGINT convention).
pub const STATUS_INTERRUPTED: u8 = 130;
/// The guest asked to reboot (`reboot`, or a Linux panic with `panic=N`): splitvisor does not
/// restart a VM by itself, it ends with this status so that a supervisor can start it again.
pub const STATUS_REBOOT: u8 = 120;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest wrote its status to the debug-exit port.
    Guest(u8),
    /// Triple fault or a shutdown/reset system event; `detail` holds the register dump.
    Shutdown {
        vcpu: u8,
        detail: String,
    },
    InternalError {
        vcpu: u8,
        detail: String,
    },
    VcpuFailed {
        vcpu: u8,
        detail: String,
    },
    Interrupted,
    /// `PUT /vm/shutdown` on the control API; reported like an interrupt.
    StopRequested,
    /// The guest powered itself off (ACPI sleep state S5, e.g. Linux `poweroff`): status 0.
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042 pulse, e.g. Linux `reboot`).
    Reboot {
        how: &'static str,
    },
    /// The user typed the console's quit keys (Ctrl-A x); reported like an interrupt.
    ConsoleQuit,
    /// A snapshot was written with `then: stop` (`ctl NAME snapshot DIR --then stop`): exit
    /// status 0, `run --restore DIR` continues the VM.
    Snapshotted {
        dir: String,
    },
    /// The VM was migrated (`ctl NAME migrate ADDR`) and runs in the destination VMM now:
    /// exit status 0.
    Migrated {
        to: String,
    },
}

impl VmEnd {
    pub fn exit_status(&self) -> u8 {
        match self {
            VmEnd::Guest(status) => *status,
            VmEnd::Shutdown { .. } => STATUS_SHUTDOWN,
            VmEnd::InternalError { .. } => STATUS_INTERNAL_ERROR,
            VmEnd::VcpuFailed { .. } => STATUS_VCPU_FAILED,
            VmEnd::Interrupted | VmEnd::StopRequested | VmEnd::ConsoleQuit => STATUS_INTERRUPTED,
            VmEnd::PowerOff | VmEnd::Snapshotted { .. } | VmEnd::Migrated { .. } => 0,
            VmEnd::Reboot { .. } => STATUS_REBOOT,
        }
    }

    /// What to tell the user, if anything beyond the guest's own output.
    pub fn describe(&self) -> Option<String> {
        match self {
            VmEnd::Guest(_) => None,
            VmEnd::Shutdown { vcpu, detail } => Some(format!(
                "the guest shut down unexpectedly (triple fault or reset) on vCPU {vcpu}\n{detail}"
            )),
            VmEnd::InternalError { vcpu, detail } => {
                Some(format!("KVM could not run vCPU {vcpu}: {detail}"))
            }
            VmEnd::VcpuFailed { vcpu, detail } => Some(format!("vCPU {vcpu} failed: {detail}")),
            VmEnd::Interrupted => Some("interrupted; the VM was stopped".to_string()),
            VmEnd::StopRequested => {
                Some("stopped through the control API (PUT /vm/shutdown)".to_string())
            }
            VmEnd::PowerOff => None,
            VmEnd::Reboot { how } => Some(format!(
                "the guest rebooted ({how}); splitvisor does not restart VMs, exit status {STATUS_REBOOT}"
            )),
            VmEnd::ConsoleQuit => Some("quit from the console (Ctrl-A x)".to_string()),
            VmEnd::Snapshotted { dir } => Some(format!(
                "stopped after a snapshot to {dir}; `splitvisor run --restore {dir}` continues the VM"
            )),
            VmEnd::Migrated { to } => Some(format!("the VM was migrated to {to} and runs there now")),
        }
    }
}

/// Runs when the VM ends, e.g. to cut short a thread blocked on a backend.
type EndHook = Box<dyn Fn() + Send + Sync>;

/// The first reason to end the VM wins; every vCPU thread watches `stopping`.
#[derive(Default)]
pub struct EndSignal {
    end: Mutex<Option<VmEnd>>,
    changed: Condvar,
    stopping: AtomicBool,
    hooks: Mutex<Vec<EndHook>>,
}

impl EndSignal {
    /// Records why the VM ends, unless a reason was recorded already.
    pub fn end(&self, why: VmEnd) {
        let mut end = self.end.lock().unwrap_or_else(PoisonError::into_inner);
        if end.is_none() {
            *end = Some(why);
            self.stopping.store(true, Ordering::SeqCst);
            self.changed.notify_all();
            drop(end);
            for hook in self
                .hooks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
            {
                hook();
            }
        }
    }

    /// Runs `hook` once the VM ends (at once if it has ended already).
    pub fn on_end(&self, hook: impl Fn() + Send + Sync + 'static) {
        let mut hooks = self.hooks.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_stopping() {
            drop(hooks);
            hook();
            return;
        }
        hooks.push(Box::new(hook));
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Blocks until some thread ends the VM.
    pub fn wait(&self) -> VmEnd {
        let mut end = self.end.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(why) = end.as_ref() {
                return why.clone();
            }
            end = self
                .changed
                .wait(end)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Blocks until the VM ends or `timeout` passes; used by halted vCPUs.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmEnd> {
        let end = self.end.lock().unwrap_or_else(PoisonError::into_inner);
        let (end, _) = self
            .changed
            .wait_timeout_while(end, timeout, |e| e.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        end.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_reason_wins() {
        let signal = Arc::new(EndSignal::default());
        let s = signal.clone();
        let t = std::thread::spawn(move || s.end(VmEnd::Guest(42)));
        assert_eq!(signal.wait(), VmEnd::Guest(42));
        t.join().unwrap();
        signal.end(VmEnd::Interrupted);
        assert_eq!(signal.wait().exit_status(), 42);
        assert!(signal.is_stopping());
    }

    #[test]
    fn hooks_run_once_when_the_vm_ends() {
        use std::sync::atomic::AtomicUsize;
        let signal = EndSignal::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        signal.on_end(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        signal.end(VmEnd::StopRequested);
        signal.end(VmEnd::Interrupted);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let r = runs.clone();
        signal.on_end(move || {
            r.fetch_add(10, Ordering::SeqCst);
        });
        assert_eq!(runs.load(Ordering::SeqCst), 11, "late hooks run at once");
    }

    #[test]
    fn vmm_statuses_are_distinct() {
        let statuses = [
            STATUS_SHUTDOWN,
            STATUS_INTERNAL_ERROR,
            STATUS_VCPU_FAILED,
            STATUS_INTERRUPTED,
            STATUS_REBOOT,
        ];
        for (i, a) in statuses.iter().enumerate() {
            assert!(statuses[i + 1..].iter().all(|b| a != b));
            assert!(![0, 1, 2, 3].contains(a), "guest statuses");
        }
    }
}
