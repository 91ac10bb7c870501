//! Starting the workspace's daemons (`splitvisor-blk`, `splitvisor-net`) for a test: locate or
//! build the binary, spawn it with its log in the work directory, wait for its sockets (or its
//! "serving" line), stop it (SIGTERM, SIGKILL as a crash) and stop it when dropped.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::wait::poll_until;
use crate::workdir::{tail, Workdir};

/// Environment variable naming a directory with prebuilt daemon binaries; without it the
/// binaries are built (or found up to date) with `cargo build` in this test's target directory.
pub const ENV_BIN_DIR: &str = "SPLITVISOR_BIN_DIR";
/// How long a daemon may take to create its socket.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon may take to exit after SIGTERM.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long building a daemon may take (a cold build on a 2-core host).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// The path of binary `bin` of workspace package `package`, built with the same cargo profile
/// and target directory as the running test (a no-op when it is up to date), once per process.
pub fn workspace_bin(package: &str, bin: &str) -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(ENV_BIN_DIR) {
        return bin_in_dir(Path::new(&dir), bin, ENV_BIN_DIR);
    }
    built_bin(package, bin, None)
}

/// [`workspace_bin`] for a package whose binary has its name (`splitvisor-blk`,
/// `splitvisor-net`); panics if it cannot be built.
pub fn bin(package: &str) -> PathBuf {
    workspace_bin(package, package).unwrap_or_else(|e| panic!("{package} binary: {e}"))
}

/// Like [`workspace_bin`] but always in cargo profile `profile` (e.g. `release`, for binaries
/// that run under emulation, where a debug build is several times slower), in the same target
/// directory. `bin_dir_env` names an environment variable that, when set, names a directory
/// with prebuilt binaries to use instead.
pub fn workspace_bin_in_profile(
    package: &str,
    bin: &str,
    profile: &str,
    bin_dir_env: &str,
) -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(bin_dir_env) {
        return bin_in_dir(Path::new(&dir), bin, bin_dir_env);
    }
    built_bin(package, bin, Some(profile))
}

fn bin_in_dir(dir: &Path, bin: &str, var: &str) -> Result<PathBuf, String> {
    let path = dir.join(bin);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} missing ({var} is set)", path.display()))
    }
}

/// Build once per process and profile (`None`: the test's own).
fn built_bin(package: &str, bin: &str, profile: Option<&str>) -> Result<PathBuf, String> {
    type Cache = HashMap<(String, Option<String>), Result<PathBuf, String>>;
    static BUILT: OnceLock<Mutex<Cache>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    built
        .entry((bin.to_string(), profile.map(str::to_string)))
        .or_insert_with(|| cargo_build(package, bin, profile))
        .clone()
}

/// Where cargo put this test: `<target>[/<triple>]/<profile>/deps/<test>-<hash>`.
struct Layout {
    target_dir: PathBuf,
    triple: Option<String>,
    profile_dir: PathBuf,
}

fn layout() -> Result<Layout, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test path {}", exe.display()))?
        .to_path_buf();
    let parent = profile_dir
        .parent()
        .ok_or_else(|| format!("unexpected test path {}", exe.display()))?;
    // Cargo marks the root of a target directory with CACHEDIR.TAG.
    if parent.join("CACHEDIR.TAG").is_file() {
        return Ok(Layout {
            target_dir: parent.to_path_buf(),
            triple: None,
            profile_dir,
        });
    }
    let root = parent.parent().filter(|r| r.join("CACHEDIR.TAG").is_file());
    match root {
        Some(root) => Ok(Layout {
            target_dir: root.to_path_buf(),
            triple: parent.file_name().map(|t| t.to_string_lossy().into_owned()),
            profile_dir,
        }),
        None => Err(format!(
            "cannot find the cargo target directory above {}; set {ENV_BIN_DIR}",
            exe.display()
        )),
    }
}

fn cargo_build(package: &str, bin: &str, profile: Option<&str>) -> Result<PathBuf, String> {
    let layout = layout()?;
    let own = layout.profile_dir.file_name().and_then(|n| n.to_str());
    let profile = match profile.or(own) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    // Cargo puts profile `dev` in `debug/`, every other profile in a directory of its name.
    let out_dir = match (profile.as_str(), layout.profile_dir.parent()) {
        ("dev", Some(parent)) => parent.join("debug"),
        (other, Some(parent)) => parent.join(other),
        (_, None) => layout.profile_dir.clone(),
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", package, "--bin", bin, "--profile", &profile])
        .arg("--target-dir")
        .arg(&layout.target_dir);
    if let Some(triple) = &layout.triple {
        cmd.args(["--target", triple]);
    }
    let out = run_with_timeout(&mut cmd, BUILD_TIMEOUT)?;
    if !out.0.success() {
        return Err(format!("{cmd:?} failed with {}:\n{}", out.0, out.1));
    }
    let path = out_dir.join(bin);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{cmd:?} succeeded but {} is missing",
            path.display()
        ))
    }
}

/// Run `cmd` to completion with its stdout+stderr collected; kill it at `timeout`.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<(ExitStatus, String), String> {
    let log = std::env::temp_dir().join(format!(
        "splitvisor-build-{}-{}.log",
        std::process::id(),
        crate::pattern::nonce()
    ));
    let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let waited = poll_until(&format!("{cmd:?}"), timeout, || {
        child.try_wait().ok().flatten()
    });
    let text = tail(&log, 80);
    let _ = std::fs::remove_file(&log);
    match waited {
        Ok(status) => Ok((status, text)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{e}\n{text}"))
        }
    }
}

/// A running daemon, stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    name: String,
}

impl Daemon {
    /// Spawn `bin args...` with `env`, its stdout and stderr in `<dir>/<name>.log`, not waited
    /// for (see [`Daemon::wait_ready`]); `socket` is the one it is told to serve on.
    pub fn spawn(
        dir: &Path,
        name: &str,
        bin: &Path,
        args: &[&OsStr],
        env: &[(&str, &str)],
        socket: &Path,
    ) -> Result<Daemon, String> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        Ok(Daemon {
            child,
            socket: socket.to_path_buf(),
            log,
            name: name.to_string(),
        })
    }

    /// Wait (at most [`SOCKET_TIMEOUT`]) until `ready` holds; fails early, with the log, if
    /// the daemon exits first.
    pub fn wait_ready(
        &mut self,
        what: &str,
        mut ready: impl FnMut(&Daemon) -> bool,
    ) -> Result<(), String> {
        let mut exited = None;
        poll_until(&format!("{} {what}", self.name), SOCKET_TIMEOUT, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                exited = Some(status);
                return Some(());
            }
            ready(self).then_some(())
        })
        .map_err(|e| format!("{e}; its log:\n{}", self.log_text()))?;
        match exited {
            Some(status) => Err(format!(
                "{} exited early with {status}; its log:\n{}",
                self.name,
                self.log_text()
            )),
            None => Ok(()),
        }
    }

    /// Spawn `bin args...` with its output in `<dir>/<name>.log` and wait until every socket in
    /// `sockets` exists (the daemons bind and listen before announcing anything, so an existing
    /// socket accepts connections). `Daemon::socket` is the first.
    pub fn start_in(
        dir: &Path,
        name: &str,
        bin: &Path,
        args: &[&OsStr],
        sockets: &[&Path],
    ) -> Result<Daemon, String> {
        let first = sockets.first().ok_or("a daemon needs a socket")?;
        let mut daemon = Daemon::spawn(dir, name, bin, args, &[], first)?;
        daemon.wait_ready("to create its sockets", |_| {
            sockets.iter().all(|s| s.exists())
        })?;
        Ok(daemon)
    }

    /// [`Daemon::start_in`] a [`Workdir`], which shows the daemon's log if the test fails.
    pub fn start_all(
        workdir: &Workdir,
        name: &str,
        bin: &Path,
        args: &[&OsStr],
        sockets: &[&Path],
    ) -> Result<Daemon, String> {
        let daemon = Daemon::start_in(workdir.path(), name, bin, args, sockets)?;
        workdir.log(&format!("{name} daemon log"), &daemon.log);
        Ok(daemon)
    }

    /// `splitvisor-net --switch` with one port per socket (the workspace's binary), waited for
    /// until every socket is there; its log is shown if the test fails.
    pub fn switch(workdir: &Workdir, sockets: &[&Path]) -> Daemon {
        let mut args: Vec<&OsStr> = vec!["--switch".as_ref()];
        for socket in sockets {
            args.push("--socket".as_ref());
            args.push(socket.as_os_str());
        }
        Daemon::start_all(workdir, "switch", &bin("splitvisor-net"), &args, sockets)
            .unwrap_or_else(|e| panic!("start the splitvisor-net switch: {e}"))
    }

    /// [`Daemon::start_all`] with one socket.
    pub fn start(
        workdir: &Workdir,
        name: &str,
        bin: &Path,
        args: &[&OsStr],
        socket: &Path,
    ) -> Result<Daemon, String> {
        Daemon::start_all(workdir, name, bin, args, &[socket])
    }

    /// `splitvisor-blk --socket SOCKET --image IMAGE EXTRA...` (the workspace's binary), waited
    /// for.
    pub fn blk(dir: &Workdir, name: &str, socket: &Path, image: &Path, extra: &[&str]) -> Daemon {
        let mut args = blk_args(socket, image);
        args.extend(extra.iter().map(OsStr::new));
        Daemon::start(dir, name, &bin("splitvisor-blk"), &args, socket)
            .expect("start splitvisor-blk")
    }

    /// `splitvisor-blk --socket DIR/NAME.sock --image IMAGE --share`, waited for: the daemon the
    /// swap tests run two or more of on one image (hence `--share`).
    pub fn shared_blk(dir: &Workdir, name: &str, image: &Path) -> Daemon {
        let socket = dir.join(&format!("{name}.sock"));
        Daemon::blk(dir, name, &socket, image, &["--share"])
    }

    /// `BIN --socket DIR/blk.sock --image IMAGE EXTRA...` with `env` (a `splitvisor-blk` binary
    /// the caller names, e.g. its own crate's), logging to `DIR/NAME.log`, not waited for.
    pub fn spawn_blk(
        bin: &Path,
        dir: &Path,
        name: &str,
        image: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let socket = dir.join("blk.sock");
        let mut args = blk_args(&socket, image);
        args.extend(extra.iter().map(OsStr::new));
        Daemon::spawn(dir, name, bin, &args, env, &socket).expect("spawn splitvisor-blk")
    }

    /// Wait until the daemon logs that it is serving: its socket path may already exist,
    /// left behind by a killed daemon, so the socket's existence says nothing.
    pub fn wait_serving(mut self) -> Daemon {
        // The line is logged once the socket is bound and listening.
        self.wait_ready("to serve", |d| d.log_text().contains("serving "))
            .unwrap_or_else(|e| panic!("{e}"));
        self
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon has written to its log (stdout and stderr) so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True once the daemon has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Wait (at most [`EXIT_TIMEOUT`]) for the daemon to exit by itself.
    pub fn wait_exit(&mut self) -> Result<ExitStatus, String> {
        let child = &mut self.child;
        poll_until(&format!("{} to exit", self.name), EXIT_TIMEOUT, || {
            child.try_wait().ok().flatten()
        })
    }

    /// Kill the daemon with SIGKILL (no chance to clean up, as in a crash) and reap it.
    pub fn kill(&mut self) -> Result<ExitStatus, String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        self.child
            .kill()
            .map_err(|e| format!("cannot kill {}: {e}", self.name))?;
        self.child
            .wait()
            .map_err(|e| format!("cannot reap {}: {e}", self.name))
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus, String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).map_err(|e| e.to_string())?;
        // SAFETY: plain syscall on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.wait_exit()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.stop().is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `--socket SOCKET --image IMAGE`.
fn blk_args<'a>(socket: &'a Path, image: &'a Path) -> Vec<&'a OsStr> {
    vec![
        "--socket".as_ref(),
        socket.as_os_str(),
        "--image".as_ref(),
        image.as_os_str(),
    ]
}
