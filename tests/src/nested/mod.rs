//! Nested-SVM harness: run splitvisor on a real (non-PVM) KVM. QEMU's TCG emulates AMD SVM
//! with nested paging, so an L1 Linux under `qemu-system-x86_64 -accel tcg,thread=multi
//! -cpu max -smp 2` loads `kvm-amd`, and splitvisor runs inside L1 booting L2 guests (the
//! project's own guest, or a stock Linux kernel). Correctness only: TCG timings mean nothing.
//!
//! One run ([`NestedHost::run`]):
//! 1. the release binaries `splitvisor`, `splitvisor-blk`, `splitvisor-net` (built on demand,
//!    or from [`ENV_BIN_DIR`]), busybox, the test's files and script go into a read-only ext4
//!    image ([`rootfs`]);
//! 2. L1 boots the host's Debian kernel with an interop initramfs (busybox, `kvm-amd`,
//!    virtio-blk) whose script ([`l1`]) checks `/dev/kvm`, mounts the image as `/dev/vda`,
//!    chroots into it (with /dev, /proc, /sys bound, tmpfs /tmp and /run) and runs the test's
//!    script from `/tmp` with `PATH=/bin`, its files in `/files`, and a time bound;
//! 3. the script's output comes back line by line on L1's console, then its exit status; L1
//!    syncs and powers off. [`run::NestedRun`] has the lines, `SV:key=value` markers, the exit
//!    status and L1's measured boot and script times.
//!
//! Writable disks ([`NestedOptions::disk`]) are `/dev/vdb`, `/dev/vdc`, ... in L1 (serial =
//! the name given). Further L1 modules ([`NestedOptions::module`], e.g. `tun`) and host programs
//! ([`NestedOptions::program`], e.g. `ip`; call them as `/bin/ip`, since busybox's sh prefers
//! its own applets) can be added. A run costs ~1 s for the image and ~4 s for L1's boot and
//! power-off on an idle host, on top of the script. L1 boots are serialized per test binary: two TCG L1s on a 2-core host
//! would double each other's time. Host prerequisites: `.ci/install-deps.sh` (QEMU, the cloud
//! kernel, busybox-static, e2fsprogs); without them [`NestedHost::require`] skips, or fails
//! when `CI` is set. Overrides: [`ENV_BIN_DIR`], [`run::ENV_TIMEOUT`], and those of
//! [`crate::interop`] for QEMU, kernel and busybox.
//!
//! Helpers for tests running several L2 guests per L1 boot: [`cases`] (each guest's output
//! under a `<case>| ` prefix, a collector of failed checks) and [`ext4`] (ext4 images made on
//! the host for writable disks, checked afterwards with `e2fsck` and `debugfs`).

pub mod cases;
pub mod ext4;
pub mod l1;
pub mod rootfs;
pub mod run;
pub mod vmlinux;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::daemon::workspace_bin_in_profile;
use crate::interop::initramfs::Initramfs;
use crate::interop::qemu::{GuestRun, Qemu};
use crate::interop::{find_in_path, skip_unless_ci, HostTools};
use crate::workdir::Workdir;
use rootfs::RootFs;
pub use run::{ExtraDisk, NestedFile, NestedOptions, NestedRun};

/// Environment variable naming a directory with prebuilt `splitvisor`, `splitvisor-blk` and
/// `splitvisor-net` to use in L1 instead of building the release binaries.
pub const ENV_BIN_DIR: &str = "SPLITVISOR_NESTED_BIN_DIR";
/// The workspace binaries installed in L1's `/bin`: (package, binary).
pub const BINARIES: &[(&str, &str)] = &[
    ("splitvisor", "splitvisor"),
    ("splitvisor-blk", "splitvisor-blk"),
    ("splitvisor-net", "splitvisor-net"),
];
/// Modules an L2 Linux guest needs for splitvisor's devices (virtio-mmio transport).
pub const L2_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_net"];

const INSTALL_HINT: &str = "run .ci/install-deps.sh (qemu-system-x86, linux-image-cloud-amd64, \
                            busybox-static, e2fsprogs)";

/// Serializes L1 boots within a test binary.
static L1_LOCK: Mutex<()> = Mutex::new(());

/// The host tools a nested run needs.
#[derive(Debug, Clone)]
pub struct NestedHost {
    /// QEMU, the kernel (L1's and L2's), its modules, busybox.
    pub tools: HostTools,
    /// `mkfs.ext4` (e2fsprogs).
    pub mkfs: PathBuf,
}

impl NestedHost {
    /// Find everything; print SKIP and return `None` when something is missing, or panic
    /// naming it when `CI` is set.
    pub fn require(test: &str) -> Option<NestedHost> {
        let mut needed: Vec<&str> = l1::L1_MODULES.to_vec();
        needed.extend_from_slice(L2_MODULES);
        let tools = HostTools::find(&needed);
        let mkfs = find_in_path("mkfs.ext4");
        match (tools, mkfs) {
            (Ok(tools), Some(mkfs)) => Some(NestedHost { tools, mkfs }),
            (tools, mkfs) => {
                let mut missing = tools.err().unwrap_or_default();
                if mkfs.is_none() {
                    missing.push("mkfs.ext4 not found (package e2fsprogs)".to_string());
                }
                skip_unless_ci(test, &missing, INSTALL_HINT);
                None
            }
        }
    }

    /// The kernel image (also usable as an L2 kernel).
    pub fn kernel(&self) -> &Path {
        &self.tools.kernel
    }

    /// Write an initramfs for an L2 Linux guest to `out`: the interop builder's busybox `/init`
    /// loading `modules` (with dependencies; e.g. [`L2_MODULES`]) and running `script`, with
    /// `SV:init=ready` before and `SV:exit=<status>` after it, then `poweroff -f`.
    pub fn l2_initramfs(&self, script: &str, modules: &[&str], out: &Path) -> Result<(), String> {
        Initramfs::new(script)
            .modules(modules)
            .build(&self.tools, out)
    }

    /// Boot L1, run `script` (busybox `sh`) in its chroot with `files` in `/files`, and return
    /// what it printed and its exit status. Panics - with L1's console tail - when the harness
    /// itself fails: binaries, image or QEMU cannot be made or started, L1 times out, or L1
    /// never runs the script (no `/dev/kvm`, files disk missing).
    pub fn run(&self, script: &str, files: &[NestedFile], options: &NestedOptions) -> NestedRun {
        let started = Instant::now();
        let workdir = Workdir::new("nested");
        let image = workdir.join("files.ext4");
        self.files_image(&workdir, script, files, options, &image)
            .unwrap_or_else(|e| panic!("nested: cannot make the files image: {e}"));
        let timeout = options.effective_timeout();
        let bound = timeout.saturating_sub(run::BOOT_MARGIN).max(timeout / 2);
        let qemu = self
            .l1_qemu(&workdir, &image, options, timeout, bound)
            .unwrap_or_else(|e| panic!("nested: cannot build the L1 initramfs: {e}"));
        let prepared = started.elapsed();
        let run_l1 = |name: &str| {
            let _serial = L1_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            qemu.run(&workdir, name)
                .unwrap_or_else(|e| panic!("nested: cannot start L1: {e}"))
        };
        let mut guest = run_l1("l1");
        if let Some(why) = environment_failure(&guest) {
            // The nested environment (QEMU TCG's emulated SVM) failed before what the script
            // tests could run. Once more, on a fresh files image, and said loudly; a second
            // failure is judged by the test as any other run.
            eprintln!(
                "nested: {why}; running the case once more. Console tail:\n{}",
                run::console_tail(&guest.serial, 30)
            );
            self.files_image(&workdir, script, files, options, &image)
                .unwrap_or_else(|e| panic!("nested: cannot make the files image: {e}"));
            guest = run_l1("l1-again");
        }
        eprintln!(
            "nested: image and initramfs {prepared:?}, L1 (QEMU) {:?}",
            guest.elapsed
        );
        let (parsed, exit) = script_outcome(&guest, timeout);
        NestedRun {
            lines: parsed.lines,
            exit,
            elapsed: started.elapsed(),
            boot: parsed.start,
            script: parsed
                .end
                .zip(parsed.start)
                .map(|(e, s)| e.saturating_sub(s)),
            console: guest.serial,
            bound,
            workdir,
        }
    }

    /// L1's initramfs (in `workdir`) and QEMU command line, the files disk being `image`.
    fn l1_qemu(
        &self,
        workdir: &Workdir,
        image: &Path,
        options: &NestedOptions,
        timeout: Duration,
        bound: Duration,
    ) -> Result<Qemu, String> {
        let initrd = workdir.join("l1-initrd.cpio");
        let mut modules: Vec<&str> = l1::L1_MODULES.to_vec();
        modules.extend(options.modules.iter().map(String::as_str));
        Initramfs::new(&l1::l1_script(bound))
            .modules(&modules)
            .build(&self.tools, &initrd)?;
        let disks = disk_args(image, &options.disks);
        let disks: Vec<&str> = disks.iter().map(String::as_str).collect();
        Ok(Qemu::new(&self.tools, &initrd)
            .nested_svm()
            .memory_mib(options.memory_mib)
            .timeout(timeout)
            .args(&disks))
    }

    /// Stage the binaries, busybox, files and script and make the ext4 image.
    fn files_image(
        &self,
        workdir: &Workdir,
        script: &str,
        files: &[NestedFile],
        options: &NestedOptions,
        out: &Path,
    ) -> Result<(), String> {
        let mut fs = RootFs::new(&workdir.join("root"), &self.tools.busybox)?;
        for (package, bin) in BINARIES {
            let path = workspace_bin_in_profile(package, bin, "release", ENV_BIN_DIR)?;
            fs.program(&path, bin)?;
        }
        for program in &options.programs {
            let name = program
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("bad program path {}", program.display()))?;
            fs.program(program, name)?;
        }
        for file in files {
            match &file.source {
                run::Source::Host(path) => fs.file(path, &file.name)?,
                run::Source::Bytes(data, mode) => fs.bytes(&file.name, data, *mode)?,
            }
        }
        fs.script(&format!(
            "export PATH=/bin FILES={}\n{script}",
            rootfs::FILES_DIR
        ))?;
        fs.build_image(&self.mkfs, out)?;
        // The staged copies are in the image now.
        let _ = std::fs::remove_dir_all(workdir.join("root"));
        Ok(())
    }
}

/// Why the run says nothing about splitvisor, if it does not: L1's kernel panicked before the
/// script printed its exit status, or an L2 Linux triple-faulted before its init ran (before
/// it touched any splitvisor device: the virtio drivers are modules its init loads).
fn environment_failure(guest: &GuestRun) -> Option<&'static str> {
    let parsed = run::parse_console(&guest.serial);
    if parsed.exit.is_none() && guest.serial.contains("Kernel panic - not syncing") {
        return Some("L1's kernel panicked before the script ended");
    }
    if l2_crashed_before_init(&parsed.lines) {
        return Some("an L2 kernel triple-faulted during early boot, before its init ran");
    }
    None
}

/// Whether a VMM reported a triple fault while fewer L2 guests reached their init
/// (`SV:init=ready`) than VMs were started (distinct names in `splitvisor: VM NAME, ...`; a
/// script may show a VMM's log twice).
fn l2_crashed_before_init(lines: &[String]) -> bool {
    let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    let vms: std::collections::HashSet<&str> = lines
        .iter()
        .filter_map(|l| l.split_once("splitvisor: VM ")?.1.split(',').next())
        .collect();
    count("the guest shut down unexpectedly (triple fault") > 0
        && count("SV:init=ready") < vms.len()
}

/// The script's output and exit status from L1's console; panics with the console's tail when
/// L1 timed out, failed to set up, or never ran the script.
fn script_outcome(guest: &GuestRun, timeout: Duration) -> (run::Parsed, i32) {
    let parsed = run::parse_console(&guest.serial);
    let tail = || run::console_tail(&guest.serial, 60);
    if guest.timed_out {
        panic!(
            "nested: L1 killed after {timeout:?} ({} to change); console tail:\n{}",
            run::ENV_TIMEOUT,
            tail()
        );
    }
    if let Some(error) = &parsed.error {
        panic!(
            "nested: L1 setup failed: {error}; console tail:\n{}",
            tail()
        );
    }
    let Some(exit) = parsed.exit else {
        panic!(
            "nested: L1 ended ({:?}) without running the script; console tail:\n{}",
            guest.status,
            tail()
        );
    };
    (parsed, exit)
}

/// QEMU arguments for the files disk (read-only, `/dev/vda`) and the writable extra disks, in
/// PCI slot order so that L1 names them in this order.
fn disk_args(image: &Path, disks: &[ExtraDisk]) -> Vec<String> {
    let mut args = vec![
        "-drive".to_string(),
        format!(
            "if=none,id=files,format=raw,readonly=on,file={}",
            image.display()
        ),
        "-device".to_string(),
        "virtio-blk-pci,drive=files,serial=nested-files".to_string(),
    ];
    for (i, disk) in disks.iter().enumerate() {
        args.extend([
            "-drive".to_string(),
            format!("if=none,id=disk{i},format=raw,file={}", disk.path.display()),
            "-device".to_string(),
            format!("virtio-blk-pci,drive=disk{i},serial={}", disk.name),
        ]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::l2_crashed_before_init;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn only_a_triple_fault_before_init_is_the_environments() {
        let started = "a| splitvisor: VM vm-1, API socket /run/x (`...`)\na| SV:init=ready\n\
                       b| splitvisor: VM vm-2, API socket /run/y (`...`)\n";
        let crash =
            "b| splitvisor: the guest shut down unexpectedly (triple fault or reset) on vCPU 0\n";
        assert!(l2_crashed_before_init(&lines(&format!("{started}{crash}"))));
        // A VMM's log shown twice names its VM twice; it is still one VM.
        let twice = format!("{started}{crash}b-err| splitvisor: VM vm-2, API socket /run/y\n");
        assert!(l2_crashed_before_init(&lines(&twice)));
        let twice_late = format!("{twice}b| SV:init=ready\n");
        assert!(!l2_crashed_before_init(&lines(&twice_late)));
        // The crashed guest had reached its init: a failure of what the test checks.
        let late = format!("{started}b| SV:init=ready\n{crash}");
        assert!(!l2_crashed_before_init(&lines(&late)));
        // No crash: a guest still booting when the script ended is not rerun.
        assert!(!l2_crashed_before_init(&lines(started)));
    }
}
