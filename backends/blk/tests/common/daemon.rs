//! A `splitvisor-blk` child process on a socket in a temporary directory, and waiting helpers.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

pub const IMAGE_SIZE: u64 = 4 << 20;
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Poll `f` until it yields a value or the deadline passes.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(dir: &Path, name: &str, image: &Path, extra: &[&str]) -> Child {
        Self::spawn_with_env(dir, name, image, extra, &[])
    }

    /// Start `splitvisor-blk` on `dir/blk.sock`, its stderr in `dir/NAME.log`.
    pub fn spawn_with_env(
        dir: &Path,
        name: &str,
        image: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Child {
        let log = File::create(dir.join(format!("{name}.log"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_splitvisor-blk"))
            .arg("--socket")
            .arg(dir.join("blk.sock"))
            .arg("--image")
            .arg(image)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap()
    }

    /// Start the daemon and wait until its socket accepts connections.
    pub fn start(dir: &Path, image: &Path, extra: &[&str]) -> Daemon {
        Self::start_with(dir, "daemon", image, extra, &[])
    }

    /// Start a daemon logging to `dir/NAME.log` and wait until it says it is serving (the
    /// socket path may already exist, left behind by a killed daemon).
    pub fn start_with(
        dir: &Path,
        name: &str,
        image: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut child = Self::spawn_with_env(dir, name, image, extra, env);
        let log = dir.join(format!("{name}.log"));
        wait_for("the daemon to serve", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "daemon exited early with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            // The line is logged once the socket is bound and listening.
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("serving ").then_some(())
        });
        Daemon {
            child,
            socket: dir.join("blk.sock"),
            log,
        }
    }

    /// SIGKILL the daemon: no cleanup, no STATS line, a stale socket left behind.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn terminate(mut self) -> ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        wait_exit(&mut self.child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_exit(child: &mut Child) -> ExitStatus {
    wait_for("the daemon to exit", || child.try_wait().unwrap())
}

pub fn make_image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    File::create(&path).unwrap().set_len(IMAGE_SIZE).unwrap();
    path
}

/// Wait until `call` is signalled.
pub fn wait_call(call: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, TIMEOUT.as_millis() as i32) };
    assert_eq!(n, 1, "no interrupt from the backend within {TIMEOUT:?}");
    call.read().unwrap();
}
