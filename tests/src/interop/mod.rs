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
//! - [`crate::daemon::Daemon`]: start a workspace binary (built on demand), wait for its socket.
//! - [`crate::workdir::Workdir`]: a temporary directory whose registered logs are printed if the
//!   test fails.
//! - [`crate::netns::Netns`]: a private network namespace for the host end of a TAP, removed on
//!   drop; [`crate::netns::NetTools::require`] finds `ip` and `ping` and checks for root.
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
//! A new interop test: start the daemon with [`crate::daemon::Daemon::start`], build an
//! [`initramfs::Initramfs`] with the modules and a script printing `SV:key=value` lines, attach
//! the device (e.g. [`qemu::Qemu::vhost_user_blk`]), call [`qemu::GuestRun::assert_passed`] and
//! compare the markers with host-side facts. A test that must talk to the running guest (the
//! network test) uses [`qemu::Qemu::spawn`] and [`qemu::RunningGuest::wait_marker`] instead of
//! [`qemu::Qemu::run`].

pub mod cpio;
pub mod initramfs;
pub mod qemu;

use std::io::Write;
use std::path::{Path, PathBuf};

/// Environment variable overriding the QEMU binary.
pub const ENV_QEMU: &str = "SPLITVISOR_QEMU";
/// Environment variable naming the guest kernel image (its modules are looked up in
/// `/lib/modules/<version>` unless [`ENV_MODULES`] is set).
pub const ENV_KERNEL: &str = "SPLITVISOR_INTEROP_KERNEL";
/// Environment variable naming the module directory (`/lib/modules/<version>`).
pub const ENV_MODULES: &str = "SPLITVISOR_INTEROP_MODULES";
/// Environment variable overriding the static busybox binary.
pub const ENV_BUSYBOX: &str = "SPLITVISOR_BUSYBOX";

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
