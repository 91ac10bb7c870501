//! The old process's side of a live upgrade: the upgrader thread, which writes the state,
//! hands the descriptors over and calls `execve`.
//!
//! It is the one VMM thread without a seccomp filter, on purpose: a filter survives `execve`
//! and would confine the whole new process (its vCPU threads included) to this thread's
//! allow-list, and filters cannot be removed. So it is started by the main thread before
//! that confines itself, and does nothing but wait for a request from the API (a socket of
//! mode 0600) and then exec. The signal mask it inherits (SIGINT/SIGTERM blocked) survives
//! the `execve` too: a stop signal arriving meanwhile stays pending for the new process's
//! signal thread instead of killing the VM.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};

use super::{Relaunch, UpgradeError, UpgradeState};
use crate::devices::serial::SerialConsole;
use crate::snapshot::Manifest;

/// What the API asks of the upgrader: run `binary` with the captured state.
pub struct ExecRequest {
    pub binary: PathBuf,
    pub manifest: Manifest,
    pub was_paused: bool,
    pub paused_at_ns: u64,
    /// CLOCK_MONOTONIC when the VM started (its first process).
    pub started_at_ns: u64,
    /// The connection of the request, which the new process answers.
    pub client: RawFd,
}

/// What the upgrader needs of the running VMM besides a request.
pub struct ExecContext {
    /// The guest-memory memfd.
    pub memory: File,
    /// The API listener's descriptor (owned by the API thread, open while the VM runs).
    pub api: Option<RawFd>,
    pub relaunch: Relaunch,
    /// Descriptors inherited from the VMM's parent: left open across the execve.
    pub keep_fds: Vec<RawFd>,
    /// A raw terminal's descriptor and its settings before: restored for the execve (the new
    /// process makes it raw again, saving the same settings).
    pub terminal: Option<(RawFd, libc::termios)>,
    pub serial: Arc<Mutex<SerialConsole>>,
    /// Upgrades before this process.
    pub upgrades: u64,
}

struct Job {
    request: ExecRequest,
    reply: Sender<UpgradeError>,
}

/// The handle of the upgrader thread.
pub struct Upgrader {
    jobs: Mutex<Sender<Job>>,
}

impl Upgrader {
    /// Starts the upgrader thread; call it before the calling thread confines itself.
    pub fn spawn(context: ExecContext) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("upgrader".into())
            .spawn(move || serve(&context, &queue))?;
        Ok(Self {
            jobs: Mutex::new(jobs),
        })
    }

    /// Replaces the process with `request.binary`; returns only if that failed, and why
    /// (nothing of the running VM has been changed then, but for the terminal's mode, which is
    /// put back).
    pub fn exec(&self, request: ExecRequest) -> UpgradeError {
        let (reply, answer) = mpsc::channel();
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Job { request, reply });
        if sent.is_err() {
            return UpgradeError::NoUpgrader;
        }
        answer.recv().unwrap_or(UpgradeError::NoUpgrader)
    }
}

fn serve(context: &ExecContext, queue: &Receiver<Job>) {
    for job in queue {
        let error = match context.exec(job.request) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        log::warn!("upgrade: {}", crate::error_chain(&error));
        let _ = job.reply.send(error);
    }
}

impl ExecContext {
    fn exec(&self, request: ExecRequest) -> Result<Infallible, UpgradeError> {
        let memory = inheritable(self.memory.as_fd())?;
        let api = match self.api {
            // SAFETY: the API thread owns the listener until the VM ends, and the API
            // request being served here keeps the VM from ending.
            Some(fd) => Some(inheritable(unsafe { BorrowedFd::borrow_raw(fd) })?),
            None => None,
        };
        // SAFETY: the API thread that sent the request waits for the answer with the
        // connection open.
        let client = inheritable(unsafe { BorrowedFd::borrow_raw(request.client) })?;
        let state = UpgradeState {
            manifest: request.manifest,
            memory_fd: memory.as_raw_fd(),
            api_fd: api.as_ref().map(AsRawFd::as_raw_fd),
            client_fd: client.as_raw_fd(),
            keep_fds: self.keep_fds.clone(),
            paused_at_ns: request.paused_at_ns,
            started_at_ns: request.started_at_ns,
            was_paused: request.was_paused,
            from_version: env!("CARGO_PKG_VERSION").to_string(),
            binary: request.binary.clone(),
            upgrades: self.upgrades + 1,
        };
        let state_fd = write_state(&state)?;
        let paused_at_ns = state.paused_at_ns;
        let argv = self
            .relaunch
            .argv(&request.binary, state_fd.as_raw_fd())
            .into_iter()
            .map(|a| CString::new(a.as_bytes()).map_err(|_| UpgradeError::Argument(a)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut keep = self.keep_fds.clone();
        keep.extend([memory.as_raw_fd(), client.as_raw_fd(), state_fd.as_raw_fd()]);
        keep.extend(api.as_ref().map(AsRawFd::as_raw_fd));
        close_on_exec_except(&keep);
        self.quiet_console();
        log::info!(
            "upgrade: executing {} {} us after the pause",
            request.binary.display(),
            super::monotonic_ns().saturating_sub(paused_at_ns) / 1000
        );
        let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        pointers.push(std::ptr::null());
        // SAFETY: argv[0] (the binary) and every pointer are NUL-terminated strings kept alive
        // by `argv`, the array ends with a null pointer; execv returns only on failure.
        unsafe { libc::execv(argv[0].as_ptr(), pointers.as_ptr()) };
        let source = std::io::Error::last_os_error();
        self.raw_terminal_again();
        Err(UpgradeError::Exec {
            path: request.binary,
            source,
        })
    }

    /// Writes out what the guest printed and gives the terminal its settings back.
    fn quiet_console(&self) {
        self.serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush();
        let _ = std::io::stdout().flush();
        if let Some((fd, saved)) = &self.terminal {
            crate::terminal::set_attributes(*fd, saved).ok();
        }
    }

    fn raw_terminal_again(&self) {
        if let Some((fd, saved)) = &self.terminal {
            let _ = crate::terminal::set_attributes(*fd, &crate::terminal::raw_mode(saved));
        }
    }
}

/// A duplicate of `fd` without FD_CLOEXEC: it survives the execve (and is closed if the
/// execve fails, when the duplicate is dropped).
fn inheritable(fd: BorrowedFd) -> Result<OwnedFd, UpgradeError> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_DUPFD on a descriptor that is open (borrowed) returns a new descriptor,
    // owned below; the lowest number >= 3 keeps stdin/stdout/stderr untouched.
    let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD, 3) };
    if dup < 0 {
        return Err(UpgradeError::HandOver {
            fd: raw,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `dup` was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// The state as JSON in a memfd that survives the execve: nothing is left in the file system.
fn write_state(state: &UpgradeState) -> Result<OwnedFd, UpgradeError> {
    let text = serde_json::to_vec(state).map_err(|e| UpgradeError::WriteState(e.into()))?;
    // SAFETY: a constant NUL-terminated name; no MFD_CLOEXEC, so the execve keeps it.
    let fd = unsafe { libc::memfd_create(c"splitvisor-upgrade-state".as_ptr(), 0) };
    if fd < 0 {
        return Err(UpgradeError::WriteState(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = File::from(owned);
    file.write_all(&text).map_err(UpgradeError::WriteState)?;
    Ok(file.into())
}

/// Sets FD_CLOEXEC on every open descriptor above stderr but `keep`: some of the VMM's own
/// (eventfds) are made without it, and the new process must not inherit them.
fn close_on_exec_except(keep: &[RawFd]) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        log::warn!("upgrade: cannot list /proc/self/fd; descriptors may leak into the new process");
        return;
    };
    let fds: Vec<RawFd> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: F_SETFD only changes the flag of this descriptor number; one that was
            // the directory listing's own (closed by now) just fails with EBADF.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// The descriptors open now above stderr: what the VMM inherited, when called before it
/// opens anything of its own.
pub fn open_descriptors() -> Vec<RawFd> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let listing: Vec<RawFd> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The listing's own descriptor is closed by now.
    listing
        .into_iter()
        // SAFETY: F_GETFD only reads the flags of a descriptor number.
        .filter(|&fd| fd > 2 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .collect()
}
