//! Running `splitvisor launch` in a test: start it in its own process group (as a shell starts
//! a foreground job, so a test can send it a terminal's Ctrl-C), find its runtime directory from
//! the line it prints, find its daemons and its VMM in /proc, kill daemons, and check that
//! nothing of it is left once it ends.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::workspace_bin;
use crate::vm::{splitvisor, VmRun};
use crate::wait::poll_until;
use crate::workdir::Workdir;

/// What launch prints first on stderr, followed by the directory's path.
pub const RUNTIME_DIR_LINE: &str = "launch: runtime directory ";

/// How long launch may take to print its runtime directory.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A process as /proc shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    /// Its arguments joined by spaces.
    pub cmdline: String,
}

/// Every process on the machine now (those that vanish while being read are skipped).
pub fn processes() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_proc)
        .collect()
}

fn read_proc(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields follow the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // state ppid pgrp ...; a zombie has been waited for by nobody yet but is not running.
    if fields.first() == Some(&"Z") {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(Proc {
        pid,
        ppid: fields.get(1)?.parse().ok()?,
        pgid: fields.get(2)?.parse().ok()?,
        cmdline: String::from_utf8_lossy(&cmdline)
            .split('\0')
            .filter(|a| !a.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// A `splitvisor launch` running in the background, stdout and stderr going to files.
#[derive(Debug)]
pub struct Launch {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    runtime_dir: PathBuf,
}

/// A finished launch.
#[derive(Debug)]
pub struct LaunchRun {
    pub run: VmRun,
    /// launch's pid, which is also its process group (the VMM's group too).
    pub pid: u32,
    /// The runtime directory it printed, if it got that far.
    pub runtime_dir: Option<PathBuf>,
}

impl std::fmt::Display for LaunchRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.run)
    }
}

impl LaunchRun {
    /// Processes of this launch still there: any in launch's process group, or any whose
    /// command line names its runtime directory (its daemons, each in a group of its own, and
    /// its VMM).
    pub fn leftovers(&self) -> Vec<Proc> {
        leftovers(self.pid, self.runtime_dir.as_deref())
    }

    /// Asserts that no process of this launch remains and its runtime directory is gone.
    pub fn assert_nothing_left(&self) {
        // Processes killed just now may take a moment to be reaped by init.
        let left = poll_until(
            "the launch's processes to go",
            Duration::from_secs(5),
            || {
                let left = self.leftovers();
                left.is_empty().then_some(())
            },
        );
        assert!(
            left.is_ok(),
            "processes left behind: {:?}\n{self}",
            self.leftovers()
        );
        if let Some(dir) = &self.runtime_dir {
            assert!(!dir.exists(), "{} was left behind\n{self}", dir.display());
        }
    }
}

fn leftovers(pid: u32, runtime_dir: Option<&Path>) -> Vec<Proc> {
    let dir = runtime_dir.map(|d| d.display().to_string());
    processes()
        .into_iter()
        .filter(|p| p.pgid == pid || dir.as_ref().is_some_and(|d| p.cmdline.contains(d.as_str())))
        .collect()
}

/// Builds what launch starts, next to the `splitvisor` binary (a no-op when up to date).
fn build_backends() {
    for (package, bin) in [
        ("splitvisor-blk", "splitvisor-blk"),
        ("splitvisor-net", "splitvisor-net"),
    ] {
        workspace_bin(package, bin).unwrap_or_else(|e| panic!("{bin} binary: {e}"));
    }
}

/// `splitvisor launch --runtime-dir WORKDIR <args>` in a process group of its own.
fn command<I, S>(args: I, workdir: &Workdir, name: &str) -> (Command, PathBuf, PathBuf)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    build_backends();
    let stdout = workdir.join(&format!("{name}.stdout"));
    let stderr = workdir.join(&format!("{name}.stderr"));
    workdir.log(&format!("{name} stderr"), &stderr);
    workdir.log(&format!("{name} stdout"), &stdout);
    let file =
        |p: &PathBuf| std::fs::File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut command = Command::new(splitvisor());
    command
        .arg("launch")
        .arg("--runtime-dir")
        .arg(workdir.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(file(&stdout))
        .stderr(file(&stderr))
        .process_group(0);
    (command, stdout, stderr)
}

impl Launch {
    /// Starts launch and waits until it has printed its runtime directory. Panics with its
    /// output if it ends before that.
    pub fn spawn<I, S>(args: I, workdir: &Workdir, name: &str) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (mut command, stdout, stderr) = command(args, workdir, name);
        let child = command.spawn().expect("cannot start splitvisor launch");
        let mut launch = Launch {
            child,
            stdout,
            stderr,
            runtime_dir: PathBuf::new(),
        };
        let dir = poll_until(
            "launch to print its runtime directory",
            START_TIMEOUT,
            || {
                if launch.has_exited() {
                    return Some(None);
                }
                runtime_dir_of(&launch.stderr_so_far()).map(Some)
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", launch.stderr_so_far()));
        match dir {
            Some(dir) => launch.runtime_dir = dir,
            None => panic!(
                "launch ended before printing its runtime directory\n{}",
                launch.finish()
            ),
        }
        launch
    }

    /// Runs launch to its end (killed and a panic after `timeout`).
    pub fn run<I, S>(args: I, workdir: &Workdir, name: &str, timeout: Duration) -> LaunchRun
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (mut command, stdout, stderr) = command(args, workdir, name);
        let child = command.spawn().expect("cannot start splitvisor launch");
        let launch = Launch {
            child,
            stdout,
            stderr,
            runtime_dir: PathBuf::new(),
        };
        launch.wait(timeout)
    }

    /// launch's pid and process group.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// `RUNDIR/ID.sock`.
    pub fn socket(&self, id: &str) -> PathBuf {
        self.runtime_dir.join(format!("{id}.sock"))
    }

    /// `RUNDIR/NAME.log`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.runtime_dir.join(format!("{name}.log"))
    }

    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stdout).unwrap_or_default()).into_owned()
    }

    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    /// Waits until launch's stderr holds `needle`; returns the stderr then.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> String {
        poll_until(&format!("launch to print {needle:?}"), timeout, || {
            let text = self.stderr_so_far();
            text.contains(needle).then_some(text)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.stderr_so_far()))
    }

    /// Waits until the guest's console holds `needle`.
    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) {
        poll_until(&format!("the guest to print {needle:?}"), timeout, || {
            self.stdout_so_far().contains(needle).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", self.stdout_so_far(), self.stderr_so_far()));
    }

    /// launch's child processes now: its daemons and its VMM.
    pub fn children(&self) -> Vec<Proc> {
        processes()
            .into_iter()
            .filter(|p| p.ppid == self.pid())
            .collect()
    }

    /// The daemons: children each leading a process group of its own.
    pub fn daemons(&self) -> Vec<Proc> {
        self.children()
            .into_iter()
            .filter(|p| p.pgid == p.pid)
            .collect()
    }

    /// The VMM: the child in launch's own process group.
    pub fn vmm(&self) -> Option<Proc> {
        self.children().into_iter().find(|p| p.pgid == self.pid())
    }

    /// The daemon serving device `id`'s socket, if one runs now.
    pub fn daemon_serving(&self, id: &str) -> Option<Proc> {
        let socket = self.socket(id).display().to_string();
        self.daemons()
            .into_iter()
            .find(|p| p.cmdline.split(' ').any(|arg| arg == socket))
    }

    /// Waits until a daemon other than `not` serves device `id` and its socket exists; returns
    /// its pid.
    pub fn wait_serving(&self, id: &str, not: Option<u32>, timeout: Duration) -> u32 {
        poll_until(&format!("a new backend on {id}'s socket"), timeout, || {
            let daemon = self.daemon_serving(id)?;
            (Some(daemon.pid) != not && self.socket(id).exists()).then_some(daemon.pid)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.stderr_so_far()))
    }

    /// SIGKILLs the daemon serving `id` (as in a crash); returns its pid.
    pub fn kill_daemon(&self, id: &str) -> u32 {
        let daemon = self
            .daemon_serving(id)
            .unwrap_or_else(|| panic!("no daemon serves {id}\n{}", self.stderr_so_far()));
        signal(daemon.pid as i32, libc::SIGKILL);
        daemon.pid
    }

    /// SIGINT to launch's whole process group: what a terminal's Ctrl-C does (the daemons,
    /// in groups of their own, do not get it).
    pub fn interrupt_group(&self) {
        signal(-(self.pid() as i32), libc::SIGINT);
    }

    /// SIGTERM to launch alone.
    pub fn terminate(&self) {
        signal(self.pid() as i32, libc::SIGTERM);
    }

    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for launch to end; kills its group and panics (with its output) after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> LaunchRun {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for launch") {
                return self.finished(status);
            }
            if Instant::now() >= deadline {
                signal(-(self.pid() as i32), libc::SIGKILL);
                let status = self.child.wait().expect("reap launch");
                panic!(
                    "launch did not finish within {timeout:?}\n{}",
                    self.finished(status)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(&mut self) -> LaunchRun {
        let status = self.child.wait().expect("reap launch");
        self.finished(status)
    }

    fn finished(&self, status: ExitStatus) -> LaunchRun {
        let mut stderr = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr) {
            let _ = f.read_to_string(&mut stderr);
        }
        LaunchRun {
            runtime_dir: runtime_dir_of(&stderr),
            run: VmRun {
                status,
                stdout: self.stdout_so_far(),
                stderr,
            },
            pid: self.pid(),
        }
    }
}

impl Drop for Launch {
    /// A failing test still leaves no launch, VMM or daemon behind.
    fn drop(&mut self) {
        if !self.has_exited() {
            let daemons = self.daemons();
            signal(-(self.pid() as i32), libc::SIGKILL);
            for daemon in daemons {
                signal(-(daemon.pid as i32), libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

/// The runtime directory from launch's stderr.
pub fn runtime_dir_of(stderr: &str) -> Option<PathBuf> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(RUNTIME_DIR_LINE))
        .map(PathBuf::from)
}

fn signal(target: i32, signal: libc::c_int) {
    // SAFETY: kill() takes no pointers; the targets are this test's own processes and groups.
    unsafe { libc::kill(target, signal) };
}
