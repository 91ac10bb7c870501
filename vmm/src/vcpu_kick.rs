//! Kicking a vCPU thread out of `KVM_RUN`: a real-time signal with an empty handler makes the
//! ioctl return EINTR, so the thread looks at the VM's state (pause, end). Used by `vm` to stop
//! the vCPUs and by the control handle (`api::control`) to park them.

use std::os::unix::thread::JoinHandleExt;
use std::thread::JoinHandle;
use std::time::Duration;

/// Installs the (empty) handler of the kick signal; before it, a kick would kill the process.
pub fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
}

/// Interrupts `thread`'s `KVM_RUN` (it returns EINTR) so that it looks at the VM's state.
pub fn kick_vcpu_thread(thread: libc::pthread_t) {
    // SAFETY: callers pass threads that have not been joined, so the pthread_t is valid.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// Kicks a vCPU thread out of `KVM_RUN` until it notices the VM ended, then joins it. The kick
/// repeats because a signal that lands just before the thread re-enters `KVM_RUN` is lost.
pub fn stop_vcpu_thread(thread: JoinHandle<()>) {
    while !thread.is_finished() {
        kick_vcpu_thread(thread.as_pthread_t());
        std::thread::sleep(Duration::from_millis(2));
    }
    // The thread caught its own panics; joining cannot fail.
    let _ = thread.join();
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A signal whose only job is to interrupt `KVM_RUN` (EINTR) so a vCPU thread sees the VM end.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}
