//! Confinement of splitvisor-blk once its image is open and its socket bound: every capability
//! dropped, and one seccomp allow-list for the whole process (TSYNC, so the signal thread
//! started earlier is covered and the per-connection queue threads inherit it). The daemon's
//! threads all serve the same device, so a list per thread kind would differ by a few calls.
//!
//! The list comes from `strace -f` of the daemon's own tests and of the VMM's end-to-end tests
//! (disk, recovery, hostile frontends, launch), after the point `confine` is called.

use std::sync::OnceLock;

use splitvisor_confine::{ConfineError, Policy, SeccompMode, SPAWN};

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// The vhost-user protocol: accepting a frontend, messages with file descriptors, the
/// inflight-I/O region (memfd), and the queue threads' epoll on kick eventfds.
const VHOST_BACKEND: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_listen,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_poll,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_eventfd2,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_read,
    // The message relay in front of vhost's parser (a socketpair per frontend) and the fd
    // checks (an eventfd is recognised by its /proc/self/fd link).
    libc::SYS_socketpair,
    libc::SYS_setsockopt,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    // The stats API (`--api-socket`): requests and answers on its connections.
    libc::SYS_recvfrom,
    libc::SYS_sendto,
];

/// Requests on the image: reads, writes, flushes, discard and write-zeroes (fallocate).
const DISK_IO: &[libc::c_long] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_lseek,
];

/// The SIGINT/SIGTERM thread: wait, flush, remove the socket and lock file, exit.
const SIGNALS: &[libc::c_long] = &[
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigaction,
    libc::SYS_unlink,
];

/// Sets the mode for the process (`--seccomp`); the first call wins, unset means `on`.
pub fn set_mode(mode: SeccompMode) {
    let _ = MODE.set(mode);
}

/// Drops every capability and confines the process; call once set-up is done.
pub fn confine() -> Result<(), ConfineError> {
    let mode = MODE.get().copied().unwrap_or_default();
    splitvisor_confine::drop_all_capabilities()?;
    splitvisor_confine::confine_process(mode, &POLICY)
}

const POLICY: Policy = Policy {
    kind: "splitvisor-blk",
    syscalls: ALLOWED,
    ioctls: &[],
};

const ALLOWED: &[&[libc::c_long]] = &[VHOST_BACKEND, DISK_IO, SIGNALS, SPAWN];

#[cfg(test)]
mod tests {
    #[test]
    fn the_allow_list_compiles() {
        let action = splitvisor_confine::SeccompAction::Trap;
        splitvisor_confine::compile(&super::POLICY, action).unwrap();
    }
}
