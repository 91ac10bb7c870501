//! The backend daemons as supervised child processes: each in its own process group with its
//! output in a log file, started and waited for until its sockets exist, restarted on the same
//! sockets when it dies (see `restart`), and stopped with SIGTERM, then SIGKILL.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::restart::{RestartHistory, RestartPolicy, Verdict};
use super::signals::{signal_name, SignalWait, Wakeup};

/// How often a starting daemon's sockets are looked for.
const SOCKET_POLL: Duration = Duration::from_millis(10);
/// How long daemons get to exit after SIGTERM before SIGKILL.
pub const DAEMON_STOP_GRACE: Duration = Duration::from_secs(5);
/// Log lines shown when a daemon fails to start.
const LOG_TAIL_LINES: usize = 15;

/// One backend daemon: what to run and what it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonSpec {
    /// `disk0`, `net1`, `switch-lan`: names its log file and its lines on stderr.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The sockets it creates; it is up once all exist.
    pub sockets: Vec<PathBuf>,
    /// Its stdout and stderr (appended to across restarts).
    pub log: PathBuf,
}

impl DaemonSpec {
    /// The command line as a shell would show it (for messages; not for execution).
    pub fn command_line(&self) -> String {
        std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("interrupted by {} while the backends were starting", signal_name(*.0))]
    Interrupted(libc::c_int),
    #[error("cannot start the {name} backend {program} (log: {log})")]
    Spawn {
        name: String,
        program: PathBuf,
        log: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the {name} backend {ended} before creating {socket}; its log {log} ends with:\n{tail}"
    )]
    Exited {
        name: String,
        ended: String,
        socket: PathBuf,
        log: PathBuf,
        tail: String,
    },
    #[error("the {name} backend did not create {socket} within {secs} s (--socket-timeout); its log {log} ends with:\n{tail}")]
    Timeout {
        name: String,
        socket: PathBuf,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
}

/// Where one daemon is in its life.
#[derive(Debug)]
enum Phase {
    /// Spawned; waiting for its sockets.
    Starting { child: Child, spawned: Instant },
    /// Its sockets are up.
    Running { child: Child, spawned: Instant },
    /// Dead; restarting at `until`.
    Waiting { until: Instant },
    /// Given up on, or stopped.
    Done,
}

#[derive(Debug)]
struct Supervised {
    spec: DaemonSpec,
    phase: Phase,
    history: RestartHistory,
    /// When the daemon last died (for "back after N ms").
    died: Option<(Instant, u32)>,
}

/// All backend daemons of one launch.
#[derive(Debug)]
pub struct Supervisor {
    daemons: Vec<Supervised>,
    policy: RestartPolicy,
    socket_timeout: Duration,
    /// Some daemon died while the VM ran (its log is worth keeping).
    trouble: bool,
}

impl Supervisor {
    pub fn new(specs: Vec<DaemonSpec>, policy: RestartPolicy, socket_timeout: Duration) -> Self {
        let daemons = specs
            .into_iter()
            .map(|spec| Supervised {
                spec,
                phase: Phase::Done,
                history: RestartHistory::default(),
                died: None,
            })
            .collect();
        Supervisor {
            daemons,
            policy,
            socket_timeout,
            trouble: false,
        }
    }

    /// Starts every daemon and waits until all their sockets exist. On an error the daemons
    /// already started keep running: the caller stops them with `stop_all`.
    pub fn start_all(&mut self, signals: &SignalWait) -> Result<(), StartError> {
        for daemon in &mut self.daemons {
            let child = spawn(&daemon.spec, "start").map_err(|source| StartError::Spawn {
                name: daemon.spec.name.clone(),
                program: daemon.spec.program.clone(),
                log: daemon.spec.log.clone(),
                source,
            })?;
            splitvisor_vmm::eprintln_whole!(
                "launch: started the {} backend (pid {}): {}",
                daemon.spec.name,
                child.id(),
                daemon.spec.command_line()
            );
            daemon.phase = Phase::Starting {
                child,
                spawned: Instant::now(),
            };
        }
        loop {
            let mut all_up = true;
            for daemon in &mut self.daemons {
                daemon.check_start(self.socket_timeout)?;
                all_up &= matches!(daemon.phase, Phase::Running { .. });
            }
            if all_up {
                return Ok(());
            }
            if let Wakeup::Stop(signal) = signals.wait(SOCKET_POLL) {
                return Err(StartError::Interrupted(signal));
            }
        }
    }

    /// Deals with whatever happened since the last call: reaps dead daemons and schedules their
    /// restart (or gives up), starts those whose wait is over, notices sockets coming up.
    /// Returns when it wants to be called again at the latest.
    pub fn tend(&mut self) -> Option<Instant> {
        let (policy, timeout) = (self.policy, self.socket_timeout);
        let mut next: Option<Instant> = None;
        for daemon in &mut self.daemons {
            self.trouble |= daemon.tend(&policy, timeout);
            let wake = match daemon.phase {
                Phase::Starting { .. } => Some(Instant::now() + SOCKET_POLL),
                Phase::Waiting { until } => Some(until),
                Phase::Running { .. } | Phase::Done => None,
            };
            next = match (next, wake) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        next
    }

    /// The pids of the daemons running now.
    #[cfg(test)]
    pub fn pids(&self) -> Vec<u32> {
        self.daemons
            .iter()
            .filter_map(|d| match &d.phase {
                Phase::Starting { child, .. } | Phase::Running { child, .. } => Some(child.id()),
                _ => None,
            })
            .collect()
    }

    /// True if a daemon died while the VM ran.
    pub fn had_trouble(&self) -> bool {
        self.trouble
    }

    /// Stops every daemon: SIGTERM to each one's process group, SIGKILL to the groups still
    /// there after `DAEMON_STOP_GRACE`. No restarts after this.
    pub fn stop_all(&mut self) {
        let mut children: Vec<(String, Child)> = Vec::new();
        for daemon in &mut self.daemons {
            if let Phase::Starting { child, .. } | Phase::Running { child, .. } =
                std::mem::replace(&mut daemon.phase, Phase::Done)
            {
                signal_group(&child, libc::SIGTERM);
                children.push((daemon.spec.name.clone(), child));
            }
        }
        let deadline = Instant::now() + DAEMON_STOP_GRACE;
        for (name, mut child) in children {
            if let Err(unstopped) = wait_until(&mut child, deadline) {
                splitvisor_vmm::eprintln_whole!(
                    "launch: the {name} backend (pid {}) ignored SIGTERM for {} s; killing it ({unstopped})",
                    child.id(),
                    DAEMON_STOP_GRACE.as_secs()
                );
                self.trouble = true;
                signal_group(&child, libc::SIGKILL);
                let _ = child.wait();
            }
        }
    }
}

impl Supervised {
    /// During the first start: up, still starting, or an error.
    fn check_start(&mut self, socket_timeout: Duration) -> Result<(), StartError> {
        let Phase::Starting { child, spawned } = &mut self.phase else {
            return Ok(());
        };
        let spec = &self.spec;
        let missing = || first_missing(&spec.sockets).unwrap_or_default();
        if let Ok(Some(status)) = child.try_wait() {
            let socket = missing();
            self.phase = Phase::Done;
            return Err(StartError::Exited {
                name: spec.name.clone(),
                ended: describe_exit(status),
                socket,
                log: spec.log.clone(),
                tail: log_tail(&spec.log),
            });
        }
        if first_missing(&spec.sockets).is_none() {
            let (child, spawned) = match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::Starting { child, spawned } => (child, spawned),
                _ => unreachable!("matched above"),
            };
            self.phase = Phase::Running { child, spawned };
        } else if spawned.elapsed() > socket_timeout {
            let socket = missing();
            return Err(StartError::Timeout {
                name: spec.name.clone(),
                socket,
                secs: socket_timeout.as_secs(),
                log: spec.log.clone(),
                tail: log_tail(&spec.log),
            });
        }
        Ok(())
    }

    /// One step of supervision; true if the daemon died.
    fn tend(&mut self, policy: &RestartPolicy, socket_timeout: Duration) -> bool {
        let now = Instant::now();
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Running { mut child, spawned } => match child.try_wait() {
                Ok(Some(status)) => {
                    let healthy = now - spawned >= policy.healthy_after;
                    self.ended(
                        policy,
                        Some(child.id()),
                        &describe_exit(status),
                        now - spawned,
                        healthy,
                    );
                    return true;
                }
                _ => self.phase = Phase::Running { child, spawned },
            },
            Phase::Starting { mut child, spawned } => {
                if let Ok(Some(status)) = child.try_wait() {
                    let what = format!("{} before creating its socket", describe_exit(status));
                    self.ended(policy, Some(child.id()), &what, now - spawned, false);
                    return true;
                }
                if first_missing(&self.spec.sockets).is_none() {
                    self.announce_back(child.id());
                    self.phase = Phase::Running { child, spawned };
                } else if now - spawned > socket_timeout {
                    signal_group(&child, libc::SIGKILL);
                    let _ = child.wait();
                    let what = format!(
                        "did not create its socket within {} s and was killed",
                        socket_timeout.as_secs()
                    );
                    self.ended(policy, Some(child.id()), &what, now - spawned, false);
                    return true;
                } else {
                    self.phase = Phase::Starting { child, spawned };
                }
            }
            Phase::Waiting { until } if now >= until => self.restart(policy),
            other => self.phase = other,
        }
        false
    }

    /// Logs the end of a run and schedules what comes next.
    fn ended(
        &mut self,
        policy: &RestartPolicy,
        pid: Option<u32>,
        what: &str,
        lived: Duration,
        healthy: bool,
    ) {
        let now = Instant::now();
        let who = match pid {
            Some(pid) => format!("the {} backend (pid {pid})", self.spec.name),
            None => format!("the {} backend", self.spec.name),
        };
        match self.history.on_exit(policy, healthy, now) {
            Verdict::Restart { delay, number } => {
                splitvisor_vmm::eprintln_whole!(
                    "launch: {who} {what} after {}; restarting in {} (restart {number})",
                    human(lived),
                    human(delay)
                );
                if self.died.is_none() {
                    self.died = Some((now, pid.unwrap_or_default()));
                }
                self.phase = Phase::Waiting { until: now + delay };
            }
            Verdict::GiveUp { reason } => {
                splitvisor_vmm::eprintln_whole!(
                    "launch: {who} {what} after {}; giving up on it after {reason}; \
                     the VMM fails the device when its reconnect timeout ends (log: {})",
                    human(lived),
                    self.spec.log.display()
                );
                self.phase = Phase::Done;
            }
        }
    }

    fn restart(&mut self, policy: &RestartPolicy) {
        let note = format!("restart {}", self.history.restarts());
        match spawn(&self.spec, &note) {
            Ok(child) => {
                self.phase = Phase::Starting {
                    child,
                    spawned: Instant::now(),
                }
            }
            Err(e) => {
                let what = format!("could not be started again ({e})");
                self.ended(policy, None, &what, Duration::ZERO, false);
            }
        }
    }

    fn announce_back(&mut self, pid: u32) {
        if let Some((died, old_pid)) = self.died.take() {
            let sockets: Vec<String> = self
                .spec
                .sockets
                .iter()
                .map(|s| s.display().to_string())
                .collect();
            splitvisor_vmm::eprintln_whole!(
                "launch: the {} backend (pid {pid}) is serving {} again, {} after pid {old_pid} ended (restart {})",
                self.spec.name,
                sockets.join(", "),
                human(died.elapsed()),
                self.history.restarts()
            );
        }
    }
}

/// Removes stale sockets (a killed daemon leaves its socket file), opens the log, and spawns
/// the daemon in its own process group with its output in the log.
fn spawn(spec: &DaemonSpec, note: &str) -> io::Result<Child> {
    for socket in &spec.sockets {
        remove_stale_socket(socket)?;
    }
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)?;
    writeln!(log, "--- launch ({note}): {}", spec.command_line())?;
    let stderr = log.try_clone()?;
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        // A terminal's Ctrl-C goes to its foreground process group: not to the daemons, which
        // must outlive the VMM's shutdown.
        .process_group(0);
    prepare_child(&mut command);
    command.spawn()
}

/// Prepares a child of launch: it starts with no signal blocked (launch blocks SIGINT, SIGTERM
/// and SIGCHLD, and a blocked mask survives exec) and gets SIGTERM if launch dies without
/// stopping it (say, by SIGKILL).
pub fn prepare_child(command: &mut Command) {
    // SAFETY: getpid is async-signal-safe.
    let launch = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (sigemptyset, pthread_sigmask, prctl, getppid) on its own
    // stack variables; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(move || {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // launch died before prctl: it cannot supervise this child.
            if libc::getppid() != launch {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
}

/// Removes `path` if it is a socket; anything else there is the daemon's to complain about.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn first_missing(sockets: &[PathBuf]) -> Option<PathBuf> {
    sockets.iter().find(|s| !s.exists()).cloned()
}

/// Sends `signal` to the child's process group (the child leads it), unless it was reaped.
fn signal_group(child: &Child, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill() takes no pointers; the group is the child's own, and the child is not
        // reaped yet, so its id cannot have been reused.
        unsafe { libc::kill(-pid, signal) };
    }
}

/// Waits for the child until `deadline`; Err says how far it got.
pub fn wait_until(child: &mut Child, deadline: Instant) -> Result<ExitStatus, String> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() >= deadline => return Err("still running".to_string()),
            Ok(None) => std::thread::sleep(SOCKET_POLL),
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    }
}

/// "exited with status 1", "was killed by SIGKILL".
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by {}", signal_name(signal)),
        _ => format!("ended ({status})"),
    }
}

/// The last lines of a log, indented, for an error message.
fn log_tail(log: &Path) -> String {
    let text = match std::fs::read(log) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return format!("  (cannot read it: {e})"),
    };
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines[start..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// "50 ms", "1.5 s".
fn human(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
#[path = "supervisor_tests.rs"]
mod tests;
