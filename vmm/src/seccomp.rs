//! seccomp allow-lists of `splitvisor run`, one per thread kind (vCPU, event loop, API, signal
//! watcher, console reader, vhost-user deadline watchdog, and the main thread once set-up is
//! done). Each thread installs its own filter as it starts (`confine`); `--seccomp` picks the
//! mode once for the process (`set_mode`); without it (bench, ctl, launch, unit tests) nothing
//! is filtered.
//!
//! The lists come from `strace -f` of the end-to-end tests (per thread, by the names the
//! threads give themselves), not from guesses; `splitvisor_confine::BASE` holds what every
//! thread needs. Filters stack on the threads a confined thread starts, so a kind that starts
//! threads allows what they do too (the event loop's recovery threads, the API's connection
//! threads).

use std::sync::OnceLock;

use log::error;
use splitvisor_confine::{ConfineError, Ioctl, Policy, SeccompMode, SPAWN};

pub use splitvisor_confine::SELFTEST_ENV;

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// The kinds of VMM thread, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread, after the VM is built and every other thread started: waits for the
    /// end, stops and joins the threads, restores the terminal, prints the result.
    Main,
    Vcpu,
    /// The event loop, and the recovery and timing threads it starts.
    EventLoop,
    /// The API accept loop, and its connection threads (pause, resume, backend swaps).
    Api,
    Signals,
    Console,
    VhostDeadline,
}

impl ThreadKind {
    /// The name in the SIGSYS report and for `SPLITVISOR_SECCOMP_SELFTEST`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vcpu",
            Self::EventLoop => "event-loop",
            Self::Api => "api",
            Self::Signals => "signals",
            Self::Console => "console",
            Self::VhostDeadline => "vhost-deadline",
        }
    }

    /// The system calls this kind needs beyond `BASE`, and its ioctl requests.
    pub fn policy(self) -> Policy {
        let (syscalls, ioctls): (&'static [&'static [libc::c_long]], &'static [Ioctl]) = match self
        {
            Self::Main => (&[MAIN, ENDING], TERMINAL_IOCTLS),
            Self::Vcpu => (&[VHOST_MESSAGES, DISK_IO, ENDING], KVM_IOCTLS),
            Self::EventLoop => (&[EVENT_LOOP, VHOST_MESSAGES, VHOST_CONNECT, SPAWN], &[]),
            Self::Api => (
                &[
                    API,
                    VHOST_MESSAGES,
                    VHOST_CONNECT,
                    SPAWN,
                    SNAPSHOT_FILES,
                    MIGRATION,
                ],
                SNAPSHOT_IOCTLS,
            ),
            Self::Signals => (&[SIGNALS, ENDING], &[]),
            Self::Console => (&[CONSOLE, ENDING], &[]),
            Self::VhostDeadline => (&[VHOST_DEADLINE], &[]),
        };
        Policy {
            kind: self.name(),
            syscalls,
            ioctls,
        }
    }
}

/// vhost-user messages on a connected backend, with file descriptors (duplicated first): what a
/// guest's register write does on the vCPU thread when it activates or resets a device.
const VHOST_MESSAGES: &[libc::c_long] = &[
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_shutdown,
];

/// Connecting to a backend (recovery, swaps): the socket, its timeouts, the path check, and
/// watching the new connection on the event loop.
const VHOST_CONNECT: &[libc::c_long] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_poll,
    libc::SYS_eventfd2,
    libc::SYS_epoll_ctl,
    libc::SYS_setsockopt,
    libc::SYS_statx,
    libc::SYS_newfstatat,
];

/// Ending the VM (`EndSignal::end`, on whichever thread saw the reason: guest exit, signal,
/// console escape, API) runs its hooks, which shut down the sockets of vhost-user exchanges
/// still pending.
const ENDING: &[libc::c_long] = &[libc::SYS_shutdown];

/// KVM_RUN and the register and interrupt ioctls of exits: any KVM ioctl, nothing else (no
/// TIOCSTI on the terminal, no TUN or block device requests).
const KVM_IOCTLS: &[Ioctl] = &[Ioctl::Type(kvm_bindings::KVMIO as u8)];

/// Restoring the terminal (tcsetattr, isatty, tcgetpgrp) as the VM ends.
const TERMINAL_IOCTLS: &[Ioctl] = &[
    Ioctl::Request(libc::TCGETS),
    Ioctl::Request(libc::TCSETS),
    Ioctl::Request(libc::TCSETSW),
    Ioctl::Request(libc::TCSETSF),
    Ioctl::Request(libc::TIOCGPGRP),
];

/// The emulated ATA disk, served on the vCPU thread that touched its registers.
const DISK_IO: &[libc::c_long] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_lseek,
];

const EVENT_LOOP: &[libc::c_long] = &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait];

/// HTTP over the API socket (accept, request and response with timeouts).
const API: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_getsockopt,
];

/// `PUT /vm/snapshot` writes the snapshot directory from the API thread: the directory, the
/// sparse memory file, the manifest through a temporary file and a rename.
const SNAPSHOT_FILES: &[libc::c_long] = &[
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_ftruncate,
    libc::SYS_pwrite64,
    // Guest RAM is read from its memfd, skipping the holes (SEEK_DATA/SEEK_HOLE).
    libc::SYS_pread64,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
];

/// `PUT /vm/migrate` streams the VM from the API thread, to a Unix or TCP socket (the
/// connect, timeouts and reads are in the lists above).
const MIGRATION: &[libc::c_long] = &[
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_getsockname,
    // The backends' dirty log: a memfd the VMM maps too.
    libc::SYS_memfd_create,
    libc::SYS_mmap,
    libc::SYS_munmap,
];

/// `_IOC(dir, KVMIO, nr, size)` of a KVM request, as the kernel's ioctl.h builds it.
const fn kvm_request(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((kvm_bindings::KVMIO as u64) << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const IOC_READ_WRITE: u64 = 3;

/// The VM-wide state a snapshot captures on the API thread (`snapshot::irqchip::capture`):
/// KVM_GET_IRQCHIP, KVM_GET_PIT2, KVM_GET_CLOCK. The vCPUs capture themselves on their own
/// threads, which may make any KVM ioctl.
/// And FIONBIO: `PUT /vm/migrate`'s TCP connect with a deadline makes the socket non-blocking.
/// And pre-copy's KVM_SET_USER_MEMORY_REGION (dirty logging on and off) and KVM_GET_DIRTY_LOG.
const SNAPSHOT_IOCTLS: &[Ioctl] = &[
    Ioctl::Request(libc::FIONBIO),
    Ioctl::Request(kvm_request(
        IOC_WRITE,
        0x46,
        std::mem::size_of::<kvm_bindings::kvm_userspace_memory_region>(),
    )),
    Ioctl::Request(kvm_request(
        IOC_WRITE,
        0x42,
        std::mem::size_of::<kvm_bindings::kvm_dirty_log>(),
    )),
    Ioctl::Request(kvm_request(
        IOC_READ_WRITE,
        0x62,
        std::mem::size_of::<kvm_bindings::kvm_irqchip>(),
    )),
    Ioctl::Request(kvm_request(
        IOC_READ,
        0x9f,
        std::mem::size_of::<kvm_bindings::kvm_pit_state2>(),
    )),
    Ioctl::Request(kvm_request(
        IOC_READ,
        0x7c,
        std::mem::size_of::<kvm_bindings::kvm_clock_data>(),
    )),
];

const SIGNALS: &[libc::c_long] = &[libc::SYS_rt_sigtimedwait];

/// Reading stdin (or the console file) and waiting on it with the stop eventfd.
const CONSOLE: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_close,
    libc::SYS_fcntl,
];

/// Sleeping until the earliest deadline and shutting an overrun socket down.
const VHOST_DEADLINE: &[libc::c_long] = &[libc::SYS_shutdown];

/// After set-up: waking the API's accept with a connection of its own and removing its socket,
/// kicking and joining the vCPU threads, restoring the terminal, closing everything.
const MAIN: &[libc::c_long] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_unlink,
    // The VM's runtime entry (registry) is removed at exit.
    libc::SYS_rmdir,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_read,
    libc::SYS_statx,
    libc::SYS_newfstatat,
];

/// Sets the mode for the rest of the process (`splitvisor run --seccomp`); the first call wins.
pub fn set_mode(mode: SeccompMode) {
    let _ = MODE.set(mode);
}

/// Confines the calling thread as a `kind` thread, if `set_mode` asked for it. A thread that
/// cannot be confined ends the process: running unconfined when the user asked otherwise would
/// hide the failure.
pub fn confine(kind: ThreadKind) {
    let Some(&mode) = MODE.get() else {
        return;
    };
    if let Err(e) = try_confine(mode, kind) {
        error!("{}", crate::error_chain(&e));
        eprintln!(
            "splitvisor: {} (or run with --seccomp off)",
            crate::error_chain(&e)
        );
        std::process::exit(1);
    }
}

fn try_confine(mode: SeccompMode, kind: ThreadKind) -> Result<(), ConfineError> {
    splitvisor_confine::confine_thread(mode, &kind.policy())
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitvisor_confine::SeccompAction;

    const KINDS: [ThreadKind; 7] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::Api,
        ThreadKind::Signals,
        ThreadKind::Console,
        ThreadKind::VhostDeadline,
    ];

    #[test]
    fn every_kind_compiles_to_a_filter() {
        for kind in KINDS {
            splitvisor_confine::compile(&kind.policy(), SeccompAction::Trap)
                .unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
        }
    }

    #[test]
    fn only_the_kinds_that_start_threads_may_clone() {
        for kind in KINDS {
            let spawns = kind
                .policy()
                .syscalls
                .iter()
                .any(|list| list.contains(&libc::SYS_clone3));
            let expected = matches!(kind, ThreadKind::EventLoop | ThreadKind::Api);
            assert_eq!(spawns, expected, "{}", kind.name());
        }
    }
}
