//! Interoperability harness: boot a stock Linux kernel under QEMU (TCG software emulation, since
//! the hosts' PVM KVM cannot run Linux usefully) with an initramfs of busybox and virtio modules,
//! attach our vhost-user daemons to QEMU's own vhost-user frontends, and check what Linux's
//! drivers see.
//!
//! Building blocks:
//! - [`HostTools::require`]: find qemu-system-x86_64, a Debian kernel with its modules, and a
//!   static busybox; skip (or, with `CI` set, fail) when something is missing.
//! - [`initramfs::Initramfs`]: a deterministic cpio with `/init` that loads modules, runs a test
//!   script and powers off.
//! - [`qemu::Qemu`]: the QEMU command line, run with a timeout, serial console captured.
//! - [`daemon::Daemon`]: start a workspace binary (built on demand), wait for its socket.
//! - [`Workdir`]: a temporary directory whose registered logs are printed if the test fails.
//! - [`netns::Netns`]: a private network namespace for the host end of a TAP, removed on drop;
//!   [`netns::NetTools::require`] finds `ip` and `ping` and checks for root.
//!
//! Running: `cargo test -p splitvisor-tests` (or `--workspace`). The daemons are built on demand
//! with `cargo build -p <package>` into the test's own target directory and profile (a no-op when
//! up to date), so no separate build step is needed; set `SPLITVISOR_BIN_DIR` to use prebuilt
//! binaries instead. Host prerequisites come from `.ci/install-deps.sh`; without them the tests
//! print `SKIP ...` and pass, unless `CI` is set, in which case they fail naming what is missing.
//! Overrides: `SPLITVISOR_QEMU`, `SPLITVISOR_INTEROP_KERNEL` (+ `SPLITVISOR_INTEROP_MODULES`),
//! `SPLITVISOR_BUSYBOX`, `SPLITVISOR_INTEROP_TIMEOUT_S` (per guest, default 120),
//! `SPLITVISOR_KEEP_TMP` (keep work directories of passing tests).
//!
//! A new interop test: start the daemon with [`daemon::Daemon::start`], build an
//! [`initramfs::Initramfs`] with the modules and a script printing `SV:key=value` lines, attach
//! the device (e.g. [`qemu::Qemu::vhost_user_blk`]), call [`qemu::GuestRun::assert_passed`] and
//! compare the markers with host-side facts. A test that must talk to the running guest (the
//! network test) uses [`qemu::Qemu::spawn`] and [`qemu::RunningGuest::wait_marker`] instead of
//! [`qemu::Qemu::run`].

pub mod cpio;
pub mod daemon;
pub mod initramfs;
pub mod netns;
pub mod qemu;

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Environment variable overriding the QEMU binary.
pub const ENV_QEMU: &str = "SPLITVISOR_QEMU";
/// Environment variable naming the guest kernel image (its modules are looked up in
/// `/lib/modules/<version>` unless [`ENV_MODULES`] is set).
pub const ENV_KERNEL: &str = "SPLITVISOR_INTEROP_KERNEL";
/// Environment variable naming the module directory (`/lib/modules/<version>`).
pub const ENV_MODULES: &str = "SPLITVISOR_INTEROP_MODULES";
/// Environment variable overriding the static busybox binary.
pub const ENV_BUSYBOX: &str = "SPLITVISOR_BUSYBOX";
/// Set to keep the work directories of passing tests too.
pub const ENV_KEEP: &str = "SPLITVISOR_KEEP_TMP";

/// What to install when something is missing.
const INSTALL_HINT: &str =
    "run .ci/install-deps.sh (qemu-system-x86, linux-image-cloud-amd64, busybox-static)";

/// The host programs and files the interop tests need.
#[derive(Debug, Clone)]
pub struct HostTools {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub modules: PathBuf,
    pub busybox: PathBuf,
}

impl HostTools {
    /// Find everything, including the kernel modules `modules` (by name; built-in ones count).
    ///
    /// Returns `None` after printing a SKIP line when something is missing, unless the
    /// environment variable `CI` is set: then it panics with the list of what is missing.
    pub fn require(test: &str, modules: &[&str]) -> Option<HostTools> {
        match Self::find(modules) {
            Ok(tools) => Some(tools),
            Err(missing) => {
                skip_unless_ci(test, &missing, INSTALL_HINT);
                None
            }
        }
    }

    /// Find everything or return what is missing.
    pub fn find(modules: &[&str]) -> Result<HostTools, Vec<String>> {
        let mut missing = Vec::new();
        let qemu = env_file(ENV_QEMU).unwrap_or_else(|| find_in_path("qemu-system-x86_64"));
        if qemu.is_none() {
            missing.push("qemu-system-x86_64 not found in PATH".to_string());
        }
        let busybox = env_file(ENV_BUSYBOX)
            .unwrap_or_else(|| find_in_path("busybox"))
            .filter(|b| is_static_elf(b));
        if busybox.is_none() {
            missing.push("no statically linked busybox (package busybox-static)".to_string());
        }
        let kernel = find_kernel(modules);
        match &kernel {
            Ok(_) => {}
            Err(e) => missing.push(e.clone()),
        }
        match (qemu, busybox, kernel) {
            (Some(qemu), Some(busybox), Ok((kernel, modules))) => Ok(HostTools {
                qemu,
                kernel,
                modules,
                busybox,
            }),
            _ => Err(missing),
        }
    }
}

/// Report missing prerequisites: print a SKIP line, or panic when the environment variable `CI`
/// is set (a CI run must never pass by skipping). `hint` says how to install what is missing.
pub fn skip_unless_ci(test: &str, missing: &[String], hint: &str) {
    let list = missing.join("; ");
    if std::env::var_os("CI").is_some() {
        panic!("{test}: interop prerequisites missing (CI is set): {list}; {hint}");
    }
    // Straight to stderr: the test harness captures eprintln! of passing tests.
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {list}; {hint}");
}

/// A path from the environment; a set variable naming nothing counts as missing.
fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).map(PathBuf::from)
}

fn env_file(var: &str) -> Option<Option<PathBuf>> {
    env_path(var).map(|p| p.is_file().then_some(p))
}

/// `name` in `PATH`, or in /usr/sbin and /sbin (where iproute2 puts `ip`).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// An ELF file without a `PT_INTERP` program header runs without a dynamic loader.
fn is_static_elf(path: &Path) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    // 64-bit little-endian ELF only (x86_64).
    if data.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..usize::from(phnum)).all(|i| {
        let off = usize::try_from(phoff).unwrap_or(usize::MAX) + i * usize::from(phentsize);
        u32_at(off).is_some_and(|t| t != PT_INTERP)
    })
}

/// The kernel image and its module directory: from the environment, or the newest
/// `/boot/vmlinuz-*` whose `/lib/modules/<version>` provides every module in `needed`.
fn find_kernel(needed: &[&str]) -> Result<(PathBuf, PathBuf), String> {
    if let Some(kernel) = env_path(ENV_KERNEL) {
        if !kernel.is_file() {
            return Err(format!("{ENV_KERNEL}={} is not a file", kernel.display()));
        }
        let modules = match env_path(ENV_MODULES) {
            Some(m) => m,
            None => modules_dir_for(&kernel)?,
        };
        initramfs::ModuleSet::resolve(&modules, needed)?;
        return Ok((kernel, modules));
    }
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map_err(|e| format!("cannot list /boot: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let mut why = Vec::new();
    for kernel in kernels.into_iter().rev() {
        let found = modules_dir_for(&kernel).and_then(|m| {
            initramfs::ModuleSet::resolve(&m, needed)?;
            Ok(m)
        });
        match found {
            Ok(modules) => return Ok((kernel, modules)),
            Err(e) => why.push(format!("{}: {e}", kernel.display())),
        }
    }
    if why.is_empty() {
        return Err("no /boot/vmlinuz-* kernel (package linux-image-cloud-amd64)".to_string());
    }
    Err(format!("no usable kernel: {}", why.join(", ")))
}

fn modules_dir_for(kernel: &Path) -> Result<PathBuf, String> {
    let name = kernel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let version = name
        .strip_prefix("vmlinuz-")
        .ok_or_else(|| format!("cannot tell the version of {}", kernel.display()))?;
    let dir = Path::new("/lib/modules").join(version);
    if dir.join("modules.dep").is_file() {
        Ok(dir)
    } else {
        Err(format!("{}/modules.dep missing", dir.display()))
    }
}

/// Poll `f` every 10 ms until it yields a value; `Err` names what timed out.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

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

/// A value that differs between runs (time and pid), to seed test data.
pub fn nonce() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Deterministic pseudo-random bytes (xorshift64*) from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The bytes `yes LINE | head -c LEN` produces in the guest.
pub fn yes_pattern(line: &str, len: usize) -> Vec<u8> {
    let unit = format!("{line}\n");
    unit.bytes().cycle().take(len).collect()
}

/// CRC-32 (IEEE, as zlib and busybox `crc32` compute it).
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn yes_pattern_repeats_lines() {
        assert_eq!(yes_pattern("ab", 7), b"ab\nab\na");
    }

    #[test]
    fn pattern_is_seeded() {
        assert_eq!(pattern(7, 100), pattern(7, 100));
        assert_ne!(pattern(7, 100), pattern(8, 100));
        assert_eq!(pattern(7, 13).len(), 13);
    }
}
