//! Named VMs on this host: each running VMM registers itself in a directory of its own under
//! the runtime directory (`$XDG_RUNTIME_DIR/splitvisor/NAME/`, else `/run/splitvisor/NAME/`),
//! holding `vm.json` (its pid and API socket) and, unless `--api-socket` put it elsewhere, the
//! API socket `api.sock`. `splitvisor list` and `splitvisor ctl NAME` read these entries; an
//! entry whose process is gone (a VMM killed with SIGKILL) is removed when next seen.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A Unix socket path must fit `sockaddr_un.sun_path` (108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The root when `$XDG_RUNTIME_DIR` is not set.
const SYSTEM_ROOT: &str = "/run/splitvisor";
/// The entry's description, written whole (via a rename) right after its directory.
const ENTRY_FILE: &str = "vm.json";
/// The API socket's name in the entry's directory.
const SOCKET_FILE: &str = "api.sock";
/// The longest VM name (it is a directory name and part of the socket path).
const MAX_NAME_LEN: usize = 48;
/// `splitvisor ctl`'s verbs: `ctl NAME VERB` could not tell a VM of that name from the verb.
const RESERVED_NAMES: [&str; 9] = [
    "status", "pause", "resume", "shutdown", "swap", "metrics", "snapshot", "upgrade", "help",
];

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("VM name {0:?} must be 1 to {MAX_NAME_LEN} letters, digits, '.', '-' or '_', starting with a letter or digit")]
    CheckName(String),
    #[error("VM name {0:?} is a verb of `splitvisor ctl`; choose another --name")]
    ReservedName(String),
    #[error("cannot create the runtime directory {} (set XDG_RUNTIME_DIR to a directory of yours, or give --api-socket PATH)", .path.display())]
    CreateRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a VM named {name:?} is already running (pid {pid}); choose another --name, or stop it with `splitvisor ctl {name} shutdown`")]
    NameTaken { name: String, pid: u32 },
    #[error("{} exists and is not a splitvisor VM's entry; choose another --name", .0.display())]
    NotAnEntry(PathBuf),
    #[error("cannot register VM {name:?} in {}", .dir.display())]
    Register {
        name: String,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the API socket path {} is {len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}: use a shorter --name or XDG_RUNTIME_DIR", .path.display())]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("no running VM is named {name:?}; {}", running_list(.running))]
    NoSuchVm { name: String, running: Vec<String> },
}

fn running_list(names: &[String]) -> String {
    if names.is_empty() {
        "no VM is running (`splitvisor list` shows them)".to_string()
    } else {
        format!("running: {}", names.join(", "))
    }
}

/// A registered VM as its entry describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    /// The VMM's pid.
    pub pid: u32,
    /// The VMM's start time in clock ticks since boot (/proc/PID/stat), so that a reused pid
    /// is not taken for the VMM.
    pub start_ticks: u64,
    pub api_socket: PathBuf,
}

impl Entry {
    /// Whether the VMM that wrote this entry still runs.
    pub fn is_alive(&self) -> bool {
        start_ticks(self.pid).is_some_and(|t| t == self.start_ticks)
    }
}

/// The directory holding every VM's entry.
pub fn root() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(xdg) if xdg.is_absolute() => xdg.join("splitvisor"),
        _ => PathBuf::from(SYSTEM_ROOT),
    }
}

/// The name a VM gets without `--name`: unique among running processes.
pub fn generated_name() -> String {
    format!("vm-{}", std::process::id())
}

/// Names become directory names: letters, digits, '.', '-', '_', not starting with '.' or '-'.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    let ok = (1..=MAX_NAME_LEN).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !ok {
        return Err(RegistryError::CheckName(name.to_string()));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(RegistryError::ReservedName(name.to_string()));
    }
    Ok(())
}

/// This VMM's entry; dropping it removes the entry's directory (and the socket in it).
#[derive(Debug)]
pub struct Registration {
    dir: PathBuf,
    entry: Entry,
}

impl Registration {
    /// Where the VMM serves its API: `--api-socket`, else `api.sock` in the entry.
    pub fn api_socket(&self) -> &Path {
        &self.entry.api_socket
    }
}

impl Drop for Registration {
    /// Removes the entry by its known files and then the directory: plain unlink and rmdir,
    /// which the confined main thread may call (a directory walk would need openat and
    /// getdents64, which its seccomp filter does not allow).
    fn drop(&mut self) {
        for file in [ENTRY_FILE, SOCKET_FILE] {
            let _ = std::fs::remove_file(self.dir.join(file));
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            log::warn!(
                "could not remove the VM's runtime entry {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// Registers this process as VM `name`, its API on `api_socket` or else in the entry.
pub fn register(name: &str, api_socket: Option<&Path>) -> Result<Registration, RegistryError> {
    check_name(name)?;
    let root = root();
    create_private_dir(&root, true).map_err(|source| RegistryError::CreateRoot {
        path: root.clone(),
        source,
    })?;
    let dir = root.join(name);
    let socket = match api_socket {
        // Absolute, so that `ctl NAME` finds it from any directory.
        Some(path) => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        None => dir.join(SOCKET_FILE),
    };
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(RegistryError::SocketPathTooLong { path: socket, len });
    }
    let register_error = |source| RegistryError::Register {
        name: name.to_string(),
        dir: dir.clone(),
        source,
    };
    // mkdir is the claim on the name: of two VMMs taking it, one fails here.
    if let Err(e) = create_private_dir(&dir, false) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(register_error(e));
        }
        match read_entry(&dir) {
            // This very process, before a live upgrade's execve: the entry is ours still.
            Some(old) if old.pid == std::process::id() && old.is_alive() => {}
            Some(old) if old.is_alive() => {
                return Err(RegistryError::NameTaken {
                    name: name.to_string(),
                    pid: old.pid,
                })
            }
            Some(_) => {
                // A VMM that died without cleaning up (SIGKILL): its name is free again.
                std::fs::remove_dir_all(&dir).map_err(register_error)?;
                create_private_dir(&dir, false).map_err(register_error)?;
            }
            None => return Err(RegistryError::NotAnEntry(dir.clone())),
        }
    }
    let pid = std::process::id();
    let entry = Entry {
        name: name.to_string(),
        pid,
        start_ticks: start_ticks(pid).unwrap_or(0),
        api_socket: socket,
    };
    if let Err(e) = write_entry(&dir, &entry) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(register_error(e));
    }
    let registration = Registration { dir, entry };
    Ok(registration)
}

/// Creates `path` with mode 0700; an existing one is fine when `existing_ok`.
fn create_private_dir(path: &Path, existing_ok: bool) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700).recursive(existing_ok);
    builder.create(path)?;
    // The umask can only have narrowed 0700; a directory of ours that is wider is tightened.
    let meta = std::fs::metadata(path)?;
    // SAFETY: geteuid takes no arguments and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if std::os::unix::fs::MetadataExt::uid(&meta) == uid && meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn write_entry(dir: &Path, entry: &Entry) -> io::Result<()> {
    let tmp = dir.join(format!("{ENTRY_FILE}.tmp"));
    let text = serde_json::to_string(entry).map_err(io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(ENTRY_FILE))
}

fn read_entry(dir: &Path) -> Option<Entry> {
    let text = std::fs::read(dir.join(ENTRY_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The start time of process `pid` (field 22 of /proc/PID/stat); None if it is gone or a
/// zombie.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields follow the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Every VM running on this host, by name. Entries of VMMs that are gone are removed;
/// directories without an entry (launch's runtime directories, a VM registering right now)
/// are left alone.
pub fn running() -> Vec<Entry> {
    let root = root();
    let Ok(dirs) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut entries: Vec<Entry> = dirs
        .filter_map(|d| d.ok())
        .filter_map(|d| {
            let dir = d.path();
            let entry = read_entry(&dir)?;
            if entry.is_alive() {
                Some(entry)
            } else {
                log::info!(
                    "removing the entry of VM {:?} (pid {} is gone)",
                    entry.name,
                    entry.pid
                );
                let _ = std::fs::remove_dir_all(&dir);
                None
            }
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    entries
}

/// The running VM named `name`.
pub fn find(name: &str) -> Result<Entry, RegistryError> {
    let all = running();
    match all.iter().find(|e| e.name == name) {
        Some(entry) => Ok(entry.clone()),
        None => Err(RegistryError::NoSuchVm {
            name: name.to_string(),
            running: all.into_iter().map(|e| e.name).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "vm-12", "web.1", "A_b"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "-a", "a/b", "a b", &"x".repeat(49)] {
            let err = check_name(bad).unwrap_err();
            assert!(err.to_string().contains("letters, digits"), "{err}");
        }
        let err = check_name("status").unwrap_err();
        assert!(
            err.to_string().contains("a verb of `splitvisor ctl`"),
            "{err}"
        );
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let ticks = start_ticks(pid).unwrap();
        let entry = Entry {
            name: "x".into(),
            pid,
            start_ticks: ticks,
            api_socket: PathBuf::from("/x"),
        };
        assert!(entry.is_alive());
        assert!(!Entry {
            start_ticks: ticks + 1,
            ..entry.clone()
        }
        .is_alive());
        assert!(!Entry {
            pid: u32::MAX,
            ..entry
        }
        .is_alive());
    }

    #[test]
    fn the_error_for_an_unknown_name_lists_the_running_ones() {
        let err = RegistryError::NoSuchVm {
            name: "c".into(),
            running: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            err.to_string(),
            "no running VM is named \"c\"; running: a, b"
        );
    }
}
