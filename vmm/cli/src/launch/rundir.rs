//! The private runtime directory of one launch: created with mode 0700 where the user's runtime
//! files belong, holding the backends' sockets and logs, removed at the end.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A Unix socket path must fit `sockaddr_un.sun_path` (108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Where launch puts its directory when not told: the system-wide runtime directory for
/// splitvisor, used when it exists or can be created (as root).
const SYSTEM_RUNTIME_DIR: &str = "/run/splitvisor";

/// How many names `splitvisor-launch-PID[-N]` to try before giving up (a stale directory of an
/// earlier launch with the same pid takes one).
const NAME_ATTEMPTS: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot create a runtime directory in {parent} (choose another with --runtime-dir)")]
    Create {
        parent: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("socket path {path} is {len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}: choose a shorter --runtime-dir")]
    SocketPathTooLong { path: PathBuf, len: usize },
}

/// The directory, removed when dropped unless `keep_logs` kept the logs.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
    removed: bool,
}

impl RuntimeDir {
    /// Creates `splitvisor-launch-PID` in `parent`, or else in the first usable of
    /// `$XDG_RUNTIME_DIR`, `/run/splitvisor` and `/tmp`.
    pub fn create(parent: Option<&Path>) -> Result<RuntimeDir, RunDirError> {
        if let Some(parent) = parent {
            return Self::create_in(parent);
        }
        let mut candidates = Vec::new();
        if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
            if xdg.is_absolute() && xdg.is_dir() {
                candidates.push(xdg);
            }
        }
        let system = PathBuf::from(SYSTEM_RUNTIME_DIR);
        if system.is_dir() || std::fs::create_dir(&system).is_ok() {
            candidates.push(system);
        }
        candidates.push(std::env::temp_dir());
        let mut last_error = None;
        for parent in &candidates {
            match Self::create_in(parent) {
                Ok(dir) => return Ok(dir),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("the candidate list always holds the temp dir"))
    }

    fn create_in(parent: &Path) -> Result<RuntimeDir, RunDirError> {
        let pid = std::process::id();
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        let mut last_error = io::Error::from(io::ErrorKind::AlreadyExists);
        for attempt in 0..NAME_ATTEMPTS {
            let name = match attempt {
                0 => format!("splitvisor-launch-{pid}"),
                n => format!("splitvisor-launch-{pid}-{n}"),
            };
            let path = parent.join(name);
            // mkdir fails on an existing name, symlinks included: the directory is ours.
            match builder.create(&path) {
                Ok(()) => {
                    let dir = RuntimeDir {
                        path,
                        removed: false,
                    };
                    // The umask can only have narrowed 0700; make sure of it anyway.
                    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700))
                        .map_err(|source| RunDirError::Create {
                            parent: parent.to_path_buf(),
                            source,
                        })?;
                    return Ok(dir);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = e,
                Err(source) => {
                    return Err(RunDirError::Create {
                        parent: parent.to_path_buf(),
                        source,
                    })
                }
            }
        }
        Err(RunDirError::Create {
            parent: parent.to_path_buf(),
            source: last_error,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `DIR/NAME.sock`, checked to fit a Unix socket address.
    pub fn socket(&self, name: &str) -> Result<PathBuf, RunDirError> {
        let path = self.path.join(format!("{name}.sock"));
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(RunDirError::SocketPathTooLong { path, len });
        }
        Ok(path)
    }

    /// `DIR/NAME.log`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.log"))
    }

    /// Removes the directory and everything in it (call once every process using it is gone).
    pub fn remove(mut self) -> io::Result<()> {
        self.removed = true;
        std::fs::remove_dir_all(&self.path)
    }

    /// Removes everything but the `*.log` files, and keeps the directory for them.
    pub fn keep_logs(mut self) -> io::Result<PathBuf> {
        self.removed = true;
        for entry in std::fs::read_dir(&self.path)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "log") {
                continue;
            }
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(self.path.clone())
    }
}

impl Drop for RuntimeDir {
    /// An error path that returned early still leaves nothing behind.
    fn drop(&mut self) {
        if !self.removed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("splitvisor-rundir-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn directory_is_private_and_unique_and_removed() {
        let parent = scratch("unique");
        let first = RuntimeDir::create(Some(&parent)).unwrap();
        let second = RuntimeDir::create(Some(&parent)).unwrap();
        assert_ne!(first.path(), second.path());
        let meta = std::fs::metadata(first.path()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        let path = first.path().to_path_buf();
        std::fs::write(first.log("disk0"), "log").unwrap();
        first.remove().unwrap();
        assert!(!path.exists());
        let path = second.path().to_path_buf();
        drop(second);
        assert!(!path.exists(), "dropped without remove() still cleans up");
        std::fs::remove_dir(&parent).unwrap();
    }

    #[test]
    fn keep_logs_removes_sockets_and_locks_only() {
        let parent = scratch("keep");
        let dir = RuntimeDir::create(Some(&parent)).unwrap();
        let socket = dir.socket("disk0").unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std::fs::write(dir.path().join("disk0.sock.lock"), "").unwrap();
        std::fs::write(dir.log("disk0"), "crashed").unwrap();
        let kept = dir.keep_logs().unwrap();
        let names: Vec<_> = std::fs::read_dir(&kept)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["disk0.log"]);
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn socket_paths_that_do_not_fit_are_refused() {
        let parent = scratch(&"deep".repeat(20));
        let dir = RuntimeDir::create(Some(&parent)).unwrap();
        let err = dir.socket("disk0").unwrap_err();
        assert!(err.to_string().contains("--runtime-dir"), "{err}");
        drop(dir);
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn an_unusable_parent_is_named() {
        let err = RuntimeDir::create(Some(Path::new("/proc/self/no-such-dir"))).unwrap_err();
        assert!(err.to_string().contains("/proc/self/no-such-dir"), "{err}");
    }
}
