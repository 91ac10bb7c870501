//! Live upgrade of the VMM process (issue 15, part 3): `PUT /vm/upgrade` pauses the VM,
//! captures its vCPUs, interrupt controllers, clock and devices as a snapshot does (stopping
//! the vhost-user rings) but leaves guest memory in its memfd, and re-executes the VMM in place
//! with `execve`: same pid, same stdin/stdout/stderr, same registry entry and API socket.
//!
//! What crosses the `execve` (see `exec` for the old process, `resume` for the new one):
//! - a memfd holding `UpgradeState` as JSON, named by the hidden `splitvisor run` flag
//!   `--resume-upgrade FD` added to the original command line (`Relaunch`);
//! - the descriptors that state names, each with FD_CLOEXEC cleared: the guest-memory memfd
//!   (mapped again, zero copy), the API listener (clients queue in its backlog meanwhile) and
//!   the connection of the `PUT /vm/upgrade` request, which the new process answers once its
//!   vCPUs run again. Every other descriptor the VMM opened is closed by the `execve`.
//!
//! KVM ties a VM to the address space that created it, so the new process creates a new VM
//! and restores the captured state into it as `run --restore` does; the backends see their
//! connection close and the new process connect again, the rings restarting where they
//! stopped.

pub mod exec;
pub mod resume;

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::snapshot::take::TakeError;
use crate::snapshot::Manifest;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("--binary {}: {source}; give the path of a splitvisor binary", .path.display())]
    StatBinary {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--binary {}: not a regular file; give the path of a splitvisor binary", .path.display())]
    NotAFile { path: PathBuf },
    #[error("--binary {}: not executable (mode {mode:o}); chmod +x it", .path.display())]
    NotExecutable { path: PathBuf, mode: u32 },
    #[error("this VMM cannot upgrade: it was started with --live-upgrade off (or its upgrade thread is not running)")]
    NoUpgrader,
    #[error("capturing the VM's state failed")]
    Capture(#[source] TakeError),
    #[error("could not write the upgrade state for the new process")]
    WriteState(#[source] std::io::Error),
    #[error("could not hand descriptor {fd} to the new process")]
    HandOver {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("a command-line argument contains a NUL byte: {0:?}")]
    Argument(OsString),
    #[error("execve of {} failed", .path.display())]
    Exec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How to start the VMM again: its own command line without `argv[0]` (and without an earlier
/// resume flag), and the hidden flag that names the state descriptor. Given by the program
/// that parsed the command line (`splitvisor run`), which alone knows its flags.
#[derive(Clone, Debug)]
pub struct Relaunch {
    pub args: Vec<OsString>,
    pub resume_flag: &'static str,
}

impl Relaunch {
    /// The new process's argv: the binary, the original arguments, the resume flag.
    pub fn argv(&self, binary: &Path, state_fd: RawFd) -> Vec<OsString> {
        let mut argv = vec![binary.as_os_str().to_os_string()];
        argv.extend(self.args.iter().cloned());
        argv.push(self.resume_flag.into());
        argv.push(state_fd.to_string().into());
        argv
    }
}

/// What the old process leaves the new one, in the state memfd (JSON).
#[derive(Debug, Serialize, Deserialize)]
pub struct UpgradeState {
    /// vCPUs, interrupt controllers, clock and devices as a snapshot's manifest has them; its
    /// memory layout describes the memfd (there is no `memory.bin`).
    pub manifest: Manifest,
    /// The guest-memory memfd.
    pub memory_fd: RawFd,
    /// The API listener, if the VM serves the API.
    pub api_fd: Option<RawFd>,
    /// The `PUT /vm/upgrade` connection, answered by the new process.
    pub client_fd: RawFd,
    /// Descriptors the VMM inherited from whoever started it (kept open across every upgrade).
    pub keep_fds: Vec<RawFd>,
    /// CLOCK_MONOTONIC (system-wide, so it spans the execve) when the pause was asked for.
    pub paused_at_ns: u64,
    /// CLOCK_MONOTONIC when the VM started, in its first process (for its uptime).
    pub started_at_ns: u64,
    /// The VM was paused before the upgrade: it stays paused after.
    pub was_paused: bool,
    /// The version of the splitvisor that wrote this state.
    pub from_version: String,
    /// The binary executed.
    pub binary: PathBuf,
    /// How many upgrades this VM has gone through, this one included.
    pub upgrades: u64,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `Instant` reads, comparable across an execve.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// The `Instant` that was CLOCK_MONOTONIC `ns` (both read the same clock).
pub fn instant_of(ns: u64) -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_sub(std::time::Duration::from_nanos(
        monotonic_ns().saturating_sub(ns),
    ))
    .unwrap_or(now)
}

/// Checks that `path` is an executable regular file, before anything is paused.
pub fn check_binary(path: &Path) -> Result<(), UpgradeError> {
    let metadata = std::fs::metadata(path).map_err(|source| UpgradeError::StatBinary {
        path: path.to_path_buf(),
        source,
    })?;
    if !metadata.is_file() {
        return Err(UpgradeError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o111 == 0 {
        return Err(UpgradeError::NotExecutable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_are_checked_before_anything_pauses() {
        let dir = std::env::temp_dir().join(format!("sv-upgrade-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("plain");
        std::fs::write(&plain, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_binary(&plain).unwrap_err().to_string();
        assert!(err.contains("plain: not executable (mode 644)"), "{err}");
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_binary(&plain).unwrap();
        let err = check_binary(&dir.join("missing")).unwrap_err().to_string();
        assert!(
            err.starts_with("--binary ") && err.contains("missing"),
            "{err}"
        );
        let err = check_binary(&dir).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_new_argv_is_the_old_one_with_the_resume_flag() {
        let relaunch = Relaunch {
            args: vec!["run".into(), "--name".into(), "a".into()],
            resume_flag: "--resume-upgrade",
        };
        let argv = relaunch.argv(Path::new("/bin/sv"), 7);
        assert_eq!(
            argv,
            ["/bin/sv", "run", "--name", "a", "--resume-upgrade", "7"].map(OsString::from)
        );
    }
}
