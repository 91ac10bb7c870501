//! The backend daemons a benchmark starts (splitvisor-blk, splitvisor-net): where their
//! binaries are, starting one with its stderr in a log, waiting for it, stopping it so that it
//! prints its `STATS` line, and reading that line back.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::BenchError;

/// A backend daemon process with its stderr in a log file; stopped (SIGTERM, so it prints
/// its STATS) when asked or dropped.
pub struct Backend {
    child: Option<Child>,
    log: PathBuf,
}

impl Backend {
    pub fn start(mut cmd: Command, log: &Path, what: &Path) -> Result<Backend, BenchError> {
        let file = std::fs::File::create(log).map_err(BenchError::RunDir)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|source| BenchError::Spawn {
                what: what.display().to_string(),
                source,
            })?;
        Ok(Backend {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Polls `ready` for up to 10 s; fails if the daemon exits first.
    pub fn wait_ready(
        &mut self,
        ready: impl Fn() -> bool,
        socket: &Path,
    ) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready() {
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                self.stop();
                return Err(BenchError::BackendNotReady {
                    socket: socket.to_path_buf(),
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

pub fn stop(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The backend's counters: the last `STATS {json}` line in its log.
pub fn last_stats_line(log: &Path) -> Option<Value> {
    let mut text = String::new();
    std::fs::File::open(log)
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.find("STATS {").map(|at| &l[at + 6..]))
        .and_then(|json| serde_json::from_str(json).ok())
}
