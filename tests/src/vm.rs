//! Running the real `splitvisor` binary under real KVM for a test: find or build it, run it with
//! a deadline, and read the guest's `RESULT {json}` line and the exit status.

use std::ffi::OsStr;
use std::io::Read;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::workspace_bin;
use crate::wait::poll_until;
use crate::workdir::Workdir;

/// How long one VM may run in a test before it is killed and the test fails.
pub const VM_TIMEOUT: Duration = Duration::from_secs(120);

/// The `splitvisor` binary of this workspace (built on demand, see `workspace_bin`).
pub fn splitvisor() -> PathBuf {
    workspace_bin("splitvisor", "splitvisor").unwrap_or_else(|e| panic!("splitvisor binary: {e}"))
}

/// `splitvisor ctl --api-socket API ARGS...` to completion: (exit code, stdout, stderr).
pub fn ctl(api: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(splitvisor())
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run splitvisor ctl");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// True if KVM is usable. Without it the test is skipped - except under CI, where a missing
/// KVM is a broken runner and the test fails loudly.
pub fn require_kvm(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("{test}: /dev/kvm is not usable ({e}) but CI is set: KVM tests must run in CI")
        }
        Err(e) => {
            eprintln!("SKIP {test}: /dev/kvm is not usable ({e})");
            false
        }
    }
}

/// What a finished `splitvisor` run left behind.
#[derive(Debug)]
pub struct VmRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl VmRun {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The guest's `RESULT {json}` line, parsed; panics (with the output) if there is none.
    pub fn result(&self) -> serde_json::Value {
        let line = self
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .unwrap_or_else(|| panic!("no RESULT line in the guest output\n{self}"));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("RESULT is not JSON ({e})\n{self}"))
    }

    /// Asserts the run passed: exit status 0 and `"status":"pass"`.
    pub fn assert_passed(&self) -> serde_json::Value {
        let result = self.result();
        assert_eq!(result["status"], "pass", "guest failed\n{self}");
        assert_eq!(self.code(), Some(0), "exit status\n{self}");
        result
    }
}

impl std::fmt::Display for VmRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--- exit: {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// `splitvisor run --net NET --cmdline "serve,seconds=SECONDS ip=IP/24"` (the guest answers
/// pings and echoes UDP), waited for (at most `timeout`) until the guest has brought its NIC
/// up: it prints its address.
pub fn serving_guest(
    dir: &std::path::Path,
    name: &str,
    net: &str,
    ip: &str,
    seconds: u32,
    timeout: Duration,
) -> RunningVm {
    let task = format!("serve,seconds={seconds} ip={ip}/24");
    let vm = RunningVm::spawn(["run", "--net", net, "--cmdline", &task], dir, name);
    vm.wait_stdout(&format!("ip {ip}/"), timeout);
    vm
}

/// Runs `splitvisor <args>` to completion (killed after `timeout`).
pub fn run_splitvisor<I, S>(args: I, timeout: Duration) -> VmRun
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with_env(args, &[], timeout)
}

/// Like `run_splitvisor`, with extra environment variables.
pub fn run_with_env<I, S>(args: I, env: &[(&str, &str)], timeout: Duration) -> VmRun
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(splitvisor())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start splitvisor");
    // Drain both pipes on threads so a chatty guest cannot block on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for splitvisor") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait().expect("reap splitvisor");
            let run = VmRun {
                status,
                stdout: out_reader.join().unwrap_or_default(),
                stderr: err_reader.join().unwrap_or_default(),
            };
            panic!("splitvisor did not finish within {timeout:?}\n{run}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    VmRun {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// A `splitvisor` run in the background, its stdout and stderr going to files (the serial
/// console is line-buffered, so a test can poll the guest's progress while it runs).
#[derive(Debug)]
pub struct RunningVm {
    child: std::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl RunningVm {
    /// Starts `splitvisor <args>` with its output in `<dir>/<name>.stdout` and `.stderr`.
    pub fn spawn<I, S>(args: I, dir: &std::path::Path, name: &str) -> RunningVm
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let stdout = create(&dir.join(format!("{name}.stdout")));
        Self::spawn_with(args, dir, name, Stdio::null(), Stdio::from(stdout), &[])
    }

    /// Like [`RunningVm::spawn`], with the VMM's stdin and stdout given (a pipe, or a pty
    /// standing in for the user's terminal; `stdout_so_far` then reads nothing) and extra
    /// environment variables. Its stderr still goes to `<dir>/<name>.stderr`.
    pub fn spawn_with<I, S>(
        args: I,
        dir: &std::path::Path,
        name: &str,
        stdin: Stdio,
        stdout: Stdio,
        env: &[(&str, &str)],
    ) -> RunningVm
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let stderr = dir.join(format!("{name}.stderr"));
        let child = Command::new(splitvisor())
            .args(args)
            .envs(env.iter().copied())
            .stdin(stdin)
            .stdout(stdout)
            .stderr(create(&stderr))
            .spawn()
            .expect("cannot start splitvisor");
        RunningVm {
            child,
            stdout: dir.join(format!("{name}.stdout")),
            stderr,
        }
    }

    /// The VMM's process (to take a piped stdin or stdout).
    pub fn child(&mut self) -> &mut std::process::Child {
        &mut self.child
    }

    /// The VMM's process id (for /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guest's console output so far.
    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stdout).unwrap_or_default()).into_owned()
    }

    /// Waits (at most `timeout`) until the guest has printed `needle`; panics with the VMM's
    /// output if it does not.
    pub fn wait_stdout(&self, needle: &str, timeout: Duration) {
        let what = format!("the guest to print {needle:?}");
        poll_until(&what, timeout, || {
            self.stdout_so_far().contains(needle).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", self.stdout_so_far(), self.stderr_so_far()));
    }

    /// The VMM's stderr so far.
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the VMM; true if it was delivered.
    pub fn signal(&self, signal: libc::c_int) -> bool {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: plain syscall on the pid of our own child, which has not been reaped yet
        // (`wait` and `kill` consume the RunningVm).
        unsafe { libc::kill(pid, signal) == 0 }
    }

    /// True once the VMM has exited (not reaped yet by `wait`).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Kills the VMM with SIGKILL (as in a crash) and reaps it.
    pub fn kill(mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("reap splitvisor")
    }

    /// Waits for the VMM to exit; kills it and panics (with its output) after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> VmRun {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for splitvisor") {
                return self.finish(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let status = self.child.wait().expect("reap splitvisor");
                panic!(
                    "splitvisor did not finish within {timeout:?}\n{}",
                    self.finish(status)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(&self, status: ExitStatus) -> VmRun {
        let mut stderr = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr) {
            let _ = f.read_to_string(&mut stderr);
        }
        VmRun {
            status,
            stdout: self.stdout_so_far(),
            stderr,
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.has_exited() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Creates `path` for a child's output.
fn create(path: &std::path::Path) -> std::fs::File {
    std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `splitvisor run --api-socket DIR/NAME.sock ARGS` with `env`: its stdin piped (the guest's
/// serial input, returned), its stdout in `DIR/NAME.stdout`, its stderr shown if the test
/// fails.
pub fn spawn_run(
    dir: &Workdir,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (RunningVm, ChildStdin) {
    let api = dir.join(&format!("{name}.sock"));
    let stdout = std::fs::File::create(dir.join(&format!("{name}.stdout"))).expect("stdout file");
    let mut argv = vec!["run", "--api-socket", api.to_str().expect("utf-8 path")];
    argv.extend(args);
    let mut vm = RunningVm::spawn_with(
        argv,
        dir.path(),
        name,
        Stdio::piped(),
        Stdio::from(stdout),
        env,
    );
    dir.log(
        &format!("{name} stderr"),
        &dir.join(&format!("{name}.stderr")),
    );
    let stdin = vm.child().stdin.take().expect("piped stdin");
    (vm, stdin)
}

/// `splitvisor run --net socket=SOCKET --cmdline "ping=10.0.0.2,count=N ip=10.0.0.1/24"` to
/// its end (see `spawn_run`): every ping must be answered.
pub fn ping_server(dir: &Workdir, name: &str, socket: &std::path::Path, count: u32) {
    let net = format!("socket={}", socket.display());
    let task = format!("ping=10.0.0.2,count={count} ip=10.0.0.1/24");
    let (pinger, _stdin) = spawn_run(dir, name, &["--net", &net, "--cmdline", &task], &[]);
    let run = pinger.wait(VM_TIMEOUT);
    let result = run.assert_passed();
    assert_eq!(result["received"], count, "{run}");
}
