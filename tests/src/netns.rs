//! The host end of a network test: a private network namespace (so the test's TAP, addresses and
//! traffic never touch the host's own network), removed when the guard is dropped, and a way to
//! open sockets inside it from the test process itself.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::interop::{find_in_path, skip_unless_ci};

/// What to install when a network tool is missing.
const NET_HINT: &str = "run .ci/install-deps.sh as root (iproute2, iputils-ping)";

/// The host programs a network test runs (from iproute2 and iputils-ping).
#[derive(Debug, Clone)]
pub struct NetTools {
    pub ip: PathBuf,
    pub ping: PathBuf,
}

impl NetTools {
    /// Find `ip` and `ping` and check that we may create network namespaces (root).
    ///
    /// Returns `None` after printing a SKIP line when something is missing, unless the
    /// environment variable `CI` is set: then it panics with the list of what is missing.
    pub fn require(test: &str) -> Option<NetTools> {
        match Self::find() {
            Ok(tools) => Some(tools),
            Err(missing) => {
                skip_unless_ci(test, &missing, NET_HINT);
                None
            }
        }
    }

    /// Find everything or return what is missing.
    pub fn find() -> Result<NetTools, Vec<String>> {
        let mut missing = Vec::new();
        let ip = find_in_path("ip");
        if ip.is_none() {
            missing.push("ip not found (package iproute2)".to_string());
        }
        let ping = find_in_path("ping");
        if ping.is_none() {
            missing.push("ping not found (package iputils-ping)".to_string());
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            missing.push("not root: creating a network namespace and a TAP needs root".into());
        }
        match (ip, ping) {
            (Some(ip), Some(ping)) if missing.is_empty() => Ok(NetTools { ip, ping }),
            _ => Err(missing),
        }
    }
}

/// A named network namespace (`ip netns add`), deleted when dropped.
///
/// Deleting only removes the name: the namespace itself (and a TAP in it) lives on while a
/// process inside still runs, so drop the daemons started in it first (declare the guard before
/// them: locals drop in reverse order, on panics too).
#[derive(Debug)]
pub struct Netns {
    name: String,
    ip: PathBuf,
}

impl Netns {
    /// Create namespace `name` with its loopback up.
    pub fn add(tools: &NetTools, name: &str) -> Result<Netns, String> {
        run_ok(Command::new(&tools.ip).args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.to_string(),
            ip: tools.ip.clone(),
        };
        let ip = tools.ip.to_string_lossy();
        ns.run(&[&ip, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `ip` binary that runs programs inside the namespace (see [`Netns::exec_args`]).
    pub fn ip(&self) -> &Path {
        &self.ip
    }

    /// The arguments of `ip` that run `program` inside the namespace (`ip netns exec NAME
    /// PROGRAM`); the program replaces `ip` (no fork), so the spawned pid is the program's and
    /// signals sent to it reach the program.
    pub fn exec_args<'a>(&'a self, program: &'a Path) -> Vec<&'a OsStr> {
        vec![
            "netns".as_ref(),
            "exec".as_ref(),
            self.name.as_ref(),
            program.as_os_str(),
        ]
    }

    /// `argv` as a command run inside the namespace.
    fn command(&self, argv: &[&str]) -> Result<Command, String> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| "empty command".to_string())?;
        let mut cmd = Command::new(&self.ip);
        cmd.args(self.exec_args(Path::new(program))).args(args);
        Ok(cmd)
    }

    /// Run `argv` inside the namespace to completion; its output, whatever its exit status.
    pub fn output(&self, argv: &[&str]) -> Result<Output, String> {
        let mut cmd = self.command(argv)?;
        cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))
    }

    /// Run `argv` inside the namespace; its stdout, or an error with its stderr if it fails.
    pub fn run(&self, argv: &[&str]) -> Result<String, String> {
        run_ok(&mut self.command(argv)?)
    }

    /// Run `f` on a thread that has entered the namespace. Sockets stay in the namespace they
    /// were created in, so `f` may create sockets (bind, connect) and return them for use on
    /// any thread.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        let path = Path::new("/run/netns").join(&self.name);
        let file = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on a valid namespace fd only changes this thread's network
                    // namespace; the thread ends when `f` returns.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        let e = std::io::Error::last_os_error();
                        return Err(format!("setns({}): {e}", path.display()));
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| format!("the thread inside netns {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new(&self.ip)
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Run `cmd` to completion; its stdout, or an error naming it with its stderr.
fn run_ok(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
