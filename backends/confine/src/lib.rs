//! Confinement shared by the splitvisor VMM and its vhost-user daemons: a seccomp-bpf
//! allow-list per thread kind (built with `seccompiler`), and dropping Linux capabilities.
//!
//! Each confined thread installs its own filter when it starts (`confine_thread`); the daemons,
//! whose threads all do the same kind of work, confine the whole process once set-up is done
//! (`confine_process`). Filters are inherited by threads spawned later and stack, so a thread
//! that spawns others must allow what they need too (see the lists in each crate).

mod caps;
mod sigsys;

use std::collections::BTreeMap;

pub use seccompiler::SeccompAction;
use seccompiler::{
    BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

pub use caps::drop_all_capabilities;

/// Environment variable of the test hook: when it names a thread kind (or is `1`, any kind),
/// that thread makes a system call outside every allow-list right after its filter is in, so
/// tests can see `on` kill the process and `log` only log. The call (`personality` query) has
/// no effect when it is allowed through.
pub const SELFTEST_ENV: &str = "SPLITVISOR_SECCOMP_SELFTEST";

/// What a filter does with a system call outside the thread's allow-list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SeccompMode {
    /// Kill the process with SIGSYS (after printing which call and thread).
    #[default]
    On,
    /// No filter at all.
    Off,
    /// Allow the call but have the kernel log it (audit log / dmesg, `type=1326`).
    Log,
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::Off => "off",
            Self::Log => "log",
        })
    }
}

/// Why confinement failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot build the seccomp filter of the {kind} thread(s)")]
    BuildFilter {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of the {kind} thread(s) (run with --seccomp off on a kernel without seccomp)")]
    InstallFilter {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler that reports forbidden system calls")]
    InstallHandler(#[source] std::io::Error),
    #[error("cannot read this process's capabilities")]
    ReadCapabilities(#[source] std::io::Error),
    #[error("cannot drop capability {cap} from the bounding set")]
    DropBoundingSet {
        cap: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot clear the ambient capabilities")]
    ClearAmbient(#[source] std::io::Error),
    #[error("cannot drop this process's capabilities")]
    SetCapabilities(#[source] std::io::Error),
}

/// What every confined thread needs whatever it does: glibc's allocator (brk, mmap, madvise),
/// thread start and exit (rseq, set_robust_list, sigaltstack, exit), locks and condition
/// variables (futex), the logger and panic messages (write to stderr), sleeping, and the SIGSYS
/// report itself (rt_sigreturn, getpid/gettid/tgkill, which `raise` and `abort` use).
pub const BASE: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Threads that start threads: glibc tries clone3 first and falls back to clone; the new
/// thread names itself with prctl(PR_SET_NAME) under the inherited filter.
pub const SPAWN: &[libc::c_long] = &[libc::SYS_clone3, libc::SYS_clone, libc::SYS_prctl];

/// An ioctl request a thread may make. ioctl is never allowed outright: one on the wrong file
/// descriptor (TIOCSTI on the terminal, say) is as dangerous as many a system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ioctl {
    /// Every request of this ioctl type (`_IOC_TYPE`), e.g. KVMIO for all of KVM's.
    Type(u8),
    /// This one request.
    Request(u64),
}

/// What one kind of thread may do beyond `BASE`.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Named in error messages, the SIGSYS report and `SELFTEST_ENV`.
    pub kind: &'static str,
    pub syscalls: &'static [&'static [libc::c_long]],
    pub ioctls: &'static [Ioctl],
}

/// Confines the calling thread to `BASE` plus `policy`, as `mode` says.
pub fn confine_thread(mode: SeccompMode, policy: &Policy) -> Result<(), ConfineError> {
    install(mode, policy, false)
}

/// Confines every thread of the process (TSYNC) to `BASE` plus `policy`, as `mode` says; for
/// the daemons, once set-up is done.
pub fn confine_process(mode: SeccompMode, policy: &Policy) -> Result<(), ConfineError> {
    install(mode, policy, true)
}

fn install(mode: SeccompMode, policy: &Policy, all_threads: bool) -> Result<(), ConfineError> {
    let kind = policy.kind;
    let mismatch = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::On => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let program = compile(policy, mismatch)?;
    fix_arena_limit();
    if mode == SeccompMode::On {
        sigsys::install_handler().map_err(ConfineError::InstallHandler)?;
    }
    sigsys::set_thread_kind(kind);
    let applied = if all_threads {
        seccompiler::apply_filter_all_threads(&program)
    } else {
        seccompiler::apply_filter(&program)
    };
    applied.map_err(|source| ConfineError::InstallFilter { kind, source })?;
    log::debug!("seccomp {mode}: {kind} confined");
    selftest_if_requested(kind);
    Ok(())
}

/// glibc's malloc works out how many arenas it may create the first time a process has more
/// than eight, by reading /sys/devices/system/cpu/online - in whichever thread that is, under
/// its filter (seen on an API connection thread). Setting the limit up front, as glibc's own
/// default (8 per CPU), keeps openat out of every allow-list.
fn fix_arena_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let limit = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt takes two integers and only changes a malloc tunable.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, limit)
        };
    });
}

/// The BPF program allowing `BASE` and `policy`, doing `mismatch` for anything else.
// c_long is i64 on the 64-bit targets splitvisor runs on, but not everywhere.
#[allow(clippy::useless_conversion)]
pub fn compile(policy: &Policy, mismatch: SeccompAction) -> Result<BpfProgram, ConfineError> {
    let kind = policy.kind;
    let build = |source| ConfineError::BuildFilter { kind, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = std::iter::once(BASE)
        .chain(policy.syscalls.iter().copied())
        .flatten()
        .filter(|&&nr| nr != libc::SYS_ioctl)
        .map(|&nr| (i64::from(nr), Vec::new()))
        .collect();
    if !policy.ioctls.is_empty() {
        let ioctl_rules = policy
            .ioctls
            .iter()
            .map(|ioctl| ioctl_rule(*ioctl))
            .collect::<Result<_, _>>()
            .map_err(build)?;
        rules.insert(i64::from(libc::SYS_ioctl), ioctl_rules);
    }
    let filter =
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target_arch()).map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// The request is ioctl's second argument; its type is bits 8-15 (`_IOC_TYPESHIFT`).
fn ioctl_rule(ioctl: Ioctl) -> Result<SeccompRule, seccompiler::BackendError> {
    let (op, value) = match ioctl {
        Ioctl::Type(t) => (SeccompCmpOp::MaskedEq(0xff00), u64::from(t) << 8),
        Ioctl::Request(r) => (SeccompCmpOp::Eq, r),
    };
    let condition = SeccompCondition::new(1, SeccompCmpArgLen::Qword, op, value)?;
    SeccompRule::new(vec![condition])
}

fn target_arch() -> TargetArch {
    if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else if cfg!(target_arch = "riscv64") {
        TargetArch::riscv64
    } else {
        TargetArch::x86_64
    }
}

/// The test hook (see `SELFTEST_ENV`).
fn selftest_if_requested(kind: &str) {
    let Ok(wanted) = std::env::var(SELFTEST_ENV) else {
        return;
    };
    if wanted == "1" || wanted == kind {
        log::warn!("{SELFTEST_ENV}={wanted}: the {kind} thread makes a forbidden system call");
        // SAFETY: personality(0xffffffff) only queries the execution domain; it changes nothing.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) };
        log::warn!("{SELFTEST_ENV}: the {kind} thread is still alive after the forbidden call");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_compiles() {
        let policy = Policy {
            kind: "test",
            syscalls: &[SPAWN],
            ioctls: &[Ioctl::Type(0xAE), Ioctl::Request(0x5401)],
        };
        let program = compile(&policy, SeccompAction::Trap).unwrap();
        // One comparison per allowed number at least, plus the arch check and the verdicts.
        assert!(program.len() > BASE.len() + SPAWN.len());
    }

    #[cfg(feature = "clap")]
    #[test]
    fn mode_names_are_the_flag_values() {
        use clap::ValueEnum;
        for mode in SeccompMode::value_variants() {
            let name = mode.to_possible_value().unwrap();
            assert_eq!(name.get_name(), mode.to_string());
        }
    }

    /// Runs `call` in a forked child (so the filter does not confine the test harness) after
    /// confining it to `policy` in `mode`; returns the child's wait status.
    fn in_confined_child(mode: SeccompMode, policy: &Policy, call: fn()) -> libc::c_int {
        // SAFETY: the child only installs a filter, makes syscalls and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = confine_thread(mode, policy).is_ok();
            call();
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 7 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    fn killed_by_sigsys(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    fn exited_0(status: libc::c_int) -> bool {
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }

    #[test]
    fn a_forbidden_call_kills_and_log_mode_lets_it_through() {
        let policy = Policy {
            kind: "child",
            syscalls: &[],
            ioctls: &[],
        };
        // SAFETY: as in `selftest_if_requested`: a query with no effect.
        let call = || unsafe {
            libc::syscall(libc::SYS_personality, 0xffff_ffff_u64);
        };
        let on = in_confined_child(SeccompMode::On, &policy, call);
        assert!(killed_by_sigsys(on), "status {on:#x}");
        let log = in_confined_child(SeccompMode::Log, &policy, call);
        assert!(exited_0(log), "status {log:#x}");
    }

    #[test]
    fn only_the_listed_ioctl_requests_pass() {
        let policy = Policy {
            kind: "child",
            syscalls: &[],
            ioctls: &[Ioctl::Request(libc::TCGETS), Ioctl::Type(0xAE)],
        };
        // SAFETY: TCGETS on stdin writes a termios, or fails with ENOTTY; either is fine.
        let listed = || unsafe {
            let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
            libc::ioctl(0, libc::TCGETS, t.as_mut_ptr());
        };
        // SAFETY: KVM_GET_API_VERSION (type 0xAE) on a closed descriptor fails with EBADF.
        let of_type = || unsafe {
            libc::ioctl(-1, 0xAE00);
        };
        // SAFETY: FIONREAD on stdin writes an int, or fails; the filter stops it first.
        let other = || unsafe {
            let mut n: libc::c_int = 0;
            libc::ioctl(0, libc::FIONREAD, &mut n);
        };
        let status = in_confined_child(SeccompMode::On, &policy, listed);
        assert!(exited_0(status), "TCGETS: {status:#x}");
        let status = in_confined_child(SeccompMode::On, &policy, of_type);
        assert!(exited_0(status), "KVM type: {status:#x}");
        let status = in_confined_child(SeccompMode::On, &policy, other);
        assert!(killed_by_sigsys(status), "FIONREAD: {status:#x}");
    }
}
