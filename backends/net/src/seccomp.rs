//! Confinement of splitvisor-net once its TAP is open (or, as a switch, its sockets bound):
//! every capability dropped (CAP_NET_ADMIN was only needed to attach the TAP), and one seccomp
//! allow-list for the whole process (TSYNC, so the signal thread started earlier is covered,
//! and the port, relay and queue threads inherit it).
//!
//! The list comes from `strace -f` of the daemon's own tests and of the VMM's end-to-end
//! network tests (TAP, switch, backend restarts), after the point `confine` is called.

use std::sync::OnceLock;

use splitvisor_confine::{ConfineError, Ioctl, Policy, SeccompMode, SPAWN};

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// The vhost-user protocol (the shared server: accepting frontends, the relay in front of
/// vhost's parser, queue threads waiting on their eventfds).
const VHOST_BACKEND: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_poll,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_eventfd2,
    // The inflight region (GET_INFLIGHT_FD) and the server's relay socketpair.
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_socketpair,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_unlink,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    // The server's fd checks: an eventfd is recognised by its /proc/self/fd link.
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    // The stats API (`--api-socket`): requests and answers on its connections.
    libc::SYS_recvfrom,
    libc::SYS_sendto,
];

/// Frames to and from the TAP (read, writev), kicks and calls (eventfd read/write).
const FRAMES: &[libc::c_long] = &[libc::SYS_read, libc::SYS_readv];

/// The offload settings the guest negotiates (TUNSETOFFLOAD, which needs no capability).
const NET_IOCTLS: &[Ioctl] = &[Ioctl::Request(libc::TUNSETOFFLOAD)];

/// The SIGINT/SIGTERM thread: wait, print the counters, remove the sockets, exit.
const SIGNALS: &[libc::c_long] = &[libc::SYS_rt_sigtimedwait, libc::SYS_rt_sigaction];

/// Sets the mode for the process (`--seccomp`); the first call wins, unset means `on`.
pub fn set_mode(mode: SeccompMode) {
    let _ = MODE.set(mode);
}

/// Drops every capability and confines the process; call once the TAP is open.
pub fn confine() -> Result<(), ConfineError> {
    let mode = MODE.get().copied().unwrap_or_default();
    splitvisor_confine::drop_all_capabilities()?;
    splitvisor_confine::confine_process(mode, &POLICY)
}

const POLICY: Policy = Policy {
    kind: "splitvisor-net",
    syscalls: ALLOWED,
    ioctls: NET_IOCTLS,
};

const ALLOWED: &[&[libc::c_long]] = &[VHOST_BACKEND, FRAMES, SIGNALS, SPAWN];

#[cfg(test)]
mod tests {
    #[test]
    fn the_allow_list_compiles() {
        let action = splitvisor_confine::SeccompAction::Trap;
        splitvisor_confine::compile(&super::POLICY, action).unwrap();
    }
}
