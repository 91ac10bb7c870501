//! `launch --daemonize`: the foreground half starts the same launch again in a session of its
//! own (no terminal, stdin from /dev/null), relays what it prints until it moves its output to
//! `launch.log` in its runtime directory, and returns once the VM answers on its API - or
//! with the background launch's status and its log's last lines if it ends first. The
//! background half is an ordinary launch that sends its output to that log and writes the
//! pidfile.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::registry;
use splitvisor_vmm::api::types::{PingReport, API_PREFIX};

/// What the background launch prints (before moving its output) to say where its log is.
const LOG_LINE: &str = "launch: log ";
/// How often the foreground half looks for the VM.
const POLL: Duration = Duration::from_millis(50);
/// How long one ping may take.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Log lines shown when the background launch fails.
const LOG_TAIL: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start launch in the background ({})", .exe.display())]
    Spawn {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("VM {name:?} did not come up within {} s; the background launch (pid {pid}) was stopped{}", .waited.as_secs(), log_hint(.log))]
    NotReady {
        name: String,
        pid: u32,
        waited: Duration,
        log: Option<PathBuf>,
    },
    #[error("cannot send launch's output to {}", .0.display())]
    Redirect(PathBuf, #[source] io::Error),
    #[error("cannot write the pidfile {}", .0.display())]
    Pidfile(PathBuf, #[source] io::Error),
}

fn log_hint(log: &Option<PathBuf>) -> String {
    log.as_ref()
        .map(|l| format!("; its log: {}", l.display()))
        .unwrap_or_default()
}

/// The foreground half: starts the background launch of VM `name` and waits (up to `wait`)
/// until the VM answers. Returns the exit status: 0 when it runs, the background launch's
/// status when it ended first. `named`: the user gave --name (else `name` is added).
pub fn start(name: &str, named: bool, wait: Duration) -> Result<u8, DaemonError> {
    let mut child = spawn_background(name, named)?;
    let (log, relay) = relay_stderr(&mut child);
    splitvisor_vmm::eprintln_whole!(
        "launch: VM {name} starting in the background (launch pid {})",
        child.id()
    );
    let deadline = Instant::now() + wait;
    let mut log_path = None;
    loop {
        while let Ok(path) = log.try_recv() {
            log_path = Some(path);
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Whatever it said before moving its output (e.g. a refused flag) is shown whole.
            if let Some(relay) = relay {
                let _ = relay.join();
            }
            while let Ok(path) = log.try_recv() {
                log_path = Some(path);
            }
            show_tail(log_path.as_deref());
            return Ok(super::exit_status(status));
        }
        if answers(name, child.id()) {
            splitvisor_vmm::eprintln_whole!(
                "launch: VM {name} is running; `splitvisor ctl {name} shutdown` stops it{}",
                log_hint(&log_path)
            );
            return Ok(0);
        }
        if Instant::now() >= deadline {
            return Err(give_up(child, name, wait, log_path));
        }
        std::thread::sleep(POLL);
    }
}

/// This launch's command line again, plus `--daemon-child`, in a session of its own (no
/// terminal: the VM outlives the shell), with stdin and stdout on /dev/null.
fn spawn_background(name: &str, named: bool) -> Result<Child, DaemonError> {
    let exe = std::env::current_exe().map_err(|source| DaemonError::Spawn {
        exe: PathBuf::from("splitvisor"),
        source,
    })?;
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    args.push("--daemon-child".into());
    if !named {
        // The name generated here (from this process's pid) is the VM's.
        args.extend(["--name".into(), name.into()]);
    }
    let mut command = Command::new(&exe);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    command
        .spawn()
        .map_err(|source| DaemonError::Spawn { exe, source })
}

/// Stops a background launch whose VM did not come up in time (it stops what it started).
fn give_up(mut child: Child, name: &str, wait: Duration, log: Option<PathBuf>) -> DaemonError {
    let pid = child.id();
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill takes no pointers; the child is ours and not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let _ = child.wait();
    DaemonError::NotReady {
        name: name.to_string(),
        pid,
        waited: wait,
        log,
    }
}

/// Copies the background launch's stderr to ours on a thread until it moves its output;
/// sends the log's path once it is announced.
fn relay_stderr(child: &mut Child) -> (mpsc::Receiver<PathBuf>, Option<JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel();
    let relay = child.stderr.take().map(|stderr| {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                splitvisor_vmm::eprintln_whole!("{line}");
                if let Some(path) = line.strip_prefix(LOG_LINE) {
                    let _ = tx.send(PathBuf::from(path));
                }
            }
        })
    });
    (rx, relay)
}

/// Whether VM `name` is registered by a VMM of the background launch `launch` (not another
/// VM that took the name meanwhile) and answers `GET /api/v1/ping`.
fn answers(name: &str, launch: u32) -> bool {
    let Ok(entry) = registry::find(name) else {
        return false;
    };
    if parent_of(entry.pid) != Some(launch) {
        return false;
    }
    let path = format!("{API_PREFIX}/ping");
    crate::ctl::request_within::<PingReport>(&entry.api_socket, "GET", &path, None, PING_TIMEOUT)
        .is_ok_and(|p| p.ok && p.pid == entry.pid)
}

/// The parent pid of `pid` (field 4 of /proc/PID/stat).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields follow the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn show_tail(log: Option<&Path>) {
    let Some(log) = log else { return };
    let Ok(text) = std::fs::read_to_string(log) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    splitvisor_vmm::eprintln_whole!(
        "launch: the background launch ended; the last lines of {}:",
        log.display()
    );
    for line in &lines[lines.len().saturating_sub(LOG_TAIL)..] {
        splitvisor_vmm::eprintln_whole!("  {line}");
    }
}

/// The background half: says where the log is (the foreground half relays it), then sends
/// stdout and stderr there, for launch and everything it starts.
pub fn redirect_output(log: &Path) -> Result<(), DaemonError> {
    splitvisor_vmm::eprintln_whole!("{LOG_LINE}{}", log.display());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(|e| DaemonError::Redirect(log.to_path_buf(), e))?;
    let _ = io::stderr().flush();
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 takes two descriptors; `file` is open and stays owned by us (the
        // duplicate is independent of it).
        if unsafe { libc::dup2(file.as_raw_fd(), fd) } < 0 {
            return Err(DaemonError::Redirect(
                log.to_path_buf(),
                io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// The pidfile of the supervising launch; removed when dropped.
#[derive(Debug)]
pub struct Pidfile(PathBuf);

impl Pidfile {
    pub fn write(path: &Path) -> Result<Pidfile, DaemonError> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| DaemonError::Pidfile(path.to_path_buf(), e))?;
        Ok(Pidfile(path.to_path_buf()))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
