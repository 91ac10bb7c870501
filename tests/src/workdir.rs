//! A test's work directory: created fresh, its registered logs printed when the test fails,
//! removed when it passes (unless `SPLITVISOR_KEEP_TMP` is set).

use std::cell::RefCell;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::pattern::nonce;

/// Set to keep the work directories of passing tests too.
pub const ENV_KEEP: &str = "SPLITVISOR_KEEP_TMP";

/// A fresh temporary directory. Logs registered with [`Workdir::log`] are printed (their last
/// lines) when the test panics; the directory is then kept for inspection, otherwise removed.
#[derive(Debug)]
pub struct Workdir {
    path: PathBuf,
    logs: RefCell<Vec<(String, PathBuf)>>,
}

impl Workdir {
    /// A directory under the system temp dir; keep `name` short, Unix socket paths inside it
    /// must stay under 108 bytes.
    pub fn new(name: &str) -> Workdir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "sv-{name}-{}-{n}-{:08x}",
            std::process::id(),
            nonce() as u32
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Workdir {
            path,
            logs: RefCell::new(Vec::new()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Print the tail of `path` under `label` if the test fails.
    pub fn log(&self, label: &str, path: &Path) {
        self.logs
            .borrow_mut()
            .push((label.to_string(), path.to_path_buf()));
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (label, path) in self.logs.borrow().iter() {
                eprintln!(
                    "----- {label} ({}), last lines -----\n{}",
                    path.display(),
                    tail(path, 60)
                );
            }
            eprintln!("----- work directory kept: {}", self.path.display());
        } else if std::env::var_os(ENV_KEEP).is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The last `lines` lines of a text file (lossy UTF-8), or why it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(data) => {
            let text = String::from_utf8_lossy(&data);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}

/// The permission bits of `path` (sockets and directories a test checks are private).
pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}
