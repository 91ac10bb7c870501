//! Named VMs in a test: a private runtime directory (`XDG_RUNTIME_DIR`) per test, so that
//! `splitvisor list` sees only this test's VMs; `launch --daemonize --name NAME` with a pidfile,
//! `list`, `ctl NAME ...`, and on drop SIGTERM to every launch still running.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::daemon::workspace_bin;
use crate::vm::splitvisor;
use crate::wait::poll_until;
use crate::workdir::Workdir;

/// How long one command (a daemonized launch until its VM runs, list, ctl) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a launch told to stop may take (its VMM's grace, then its daemons').
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What a command printed and its exit code.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Outcome {
    fn from(out: Output) -> Self {
        Outcome {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A test's own host view: its runtime directory and the VMs it launched.
pub struct Host {
    pub dir: Workdir,
    xdg: PathBuf,
    pidfiles: Vec<PathBuf>,
}

impl Host {
    pub fn new(name: &str) -> Host {
        for (package, bin) in [
            ("splitvisor-blk", "splitvisor-blk"),
            ("splitvisor-net", "splitvisor-net"),
        ] {
            workspace_bin(package, bin).unwrap_or_else(|e| panic!("{bin} binary: {e}"));
        }
        let dir = Workdir::new(name);
        let xdg = dir.join("xdg");
        std::fs::create_dir(&xdg).expect("create the runtime directory");
        Host {
            dir,
            xdg,
            pidfiles: Vec::new(),
        }
    }

    /// `$XDG_RUNTIME_DIR/splitvisor`, where the VMs register.
    pub fn registry(&self) -> PathBuf {
        self.xdg.join("splitvisor")
    }

    /// `splitvisor ARGS` with this host's runtime directory, to its end (killed, and a panic,
    /// after `COMMAND_TIMEOUT`).
    pub fn run(&self, args: &[&str]) -> Outcome {
        let mut child = Command::new(splitvisor())
            .args(args)
            .env("XDG_RUNTIME_DIR", &self.xdg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run splitvisor");
        // Answers are short: the pipes cannot fill up before the command ends.
        let ended = poll_until("splitvisor to end", COMMAND_TIMEOUT, || {
            child.try_wait().ok().flatten()
        });
        if ended.is_err() {
            let _ = child.kill();
            let out: Outcome = child.wait_with_output().expect("collect output").into();
            panic!("splitvisor {args:?} did not end within {COMMAND_TIMEOUT:?}\n{out}");
        }
        child.wait_with_output().expect("collect output").into()
    }

    /// `launch --daemonize --name NAME --pidfile DIR/NAME.pid --runtime-dir DIR ARGS`.
    pub fn launch(&mut self, name: &str, args: &[&str]) -> Outcome {
        let pidfile = self.dir.join(&format!("{name}.pid"));
        let mut all = vec![
            "launch",
            "--daemonize",
            "--name",
            name,
            "--pidfile",
            pidfile.to_str().expect("UTF-8 path"),
            "--runtime-dir",
            self.dir.path().to_str().expect("UTF-8 path"),
            "--serial",
            "none",
        ];
        all.extend_from_slice(args);
        let outcome = self.run(&all);
        self.pidfiles.push(pidfile.clone());
        outcome
    }

    /// The pid in `NAME.pid`, if the file is there.
    pub fn launch_pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.join(&format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `list --json`, parsed.
    pub fn list_json(&self) -> Vec<Value> {
        let out = self.run(&["list", "--json"]);
        assert_eq!(out.code, Some(0), "list --json\n{out}");
        let value: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("list --json is not JSON ({e})\n{out}"));
        value.as_array().cloned().expect("list --json is an array")
    }

    /// The names `list --json` shows.
    pub fn names(&self) -> Vec<String> {
        self.list_json()
            .iter()
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect()
    }

    /// `ctl NAME ARGS`.
    pub fn ctl(&self, name: &str, args: &[&str]) -> Outcome {
        let mut all = vec!["ctl", name];
        all.extend_from_slice(args);
        self.run(&all)
    }
}

impl Drop for Host {
    /// Launches still running (a failed test, or one that ends with a shutdown under way) are
    /// stopped (launch stops its VMM and daemons) and waited for, so that the work directory
    /// is removed after them.
    fn drop(&mut self) {
        let mut launches = Vec::new();
        for pidfile in &self.pidfiles {
            let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // SAFETY: kill takes no pointers; the pid is a launch this test started (its
            // pidfile is removed when it exits).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            launches.push(pid as u32);
        }
        let ended = poll_until("the test's launches to end", STOP_TIMEOUT, || {
            (!launches.iter().any(|&pid| alive(pid))).then_some(())
        });
        if let Err(e) = ended {
            eprintln!("{e}: launches {launches:?} are left running");
        }
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// Whether `path` exists (a socket, a file or a directory).
pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
