//! QEMU as an independent vhost-user frontend: a Linux guest under TCG with shared (memfd)
//! memory, vhost-user devices on the PCI bus, serial console captured to a file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::HostTools;
use crate::wait::poll_until;
use crate::workdir::Workdir;

/// Environment variable overriding [`DEFAULT_TIMEOUT`] (seconds).
pub const ENV_TIMEOUT: &str = "SPLITVISOR_INTEROP_TIMEOUT_S";
/// How long a guest may run: the boot takes ~3-5 s under TCG on an idle host, much more on a
/// host busy compiling.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// A QEMU command line under construction.
#[derive(Debug, Clone)]
pub struct Qemu {
    tools: HostTools,
    initrd: PathBuf,
    mem_mib: u32,
    smp: u32,
    accel: String,
    cpu: Option<String>,
    shared_memory: bool,
    append: Vec<String>,
    device_args: Vec<String>,
    devices: u32,
    timeout: Duration,
}

impl Qemu {
    pub fn new(tools: &HostTools, initrd: &Path) -> Qemu {
        let timeout = std::env::var(ENV_TIMEOUT)
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
        Qemu {
            tools: tools.clone(),
            initrd: initrd.to_path_buf(),
            mem_mib: 512,
            smp: 1,
            accel: "tcg".to_string(),
            cpu: None,
            shared_memory: true,
            append: ["console=ttyS0", "panic=-1", "quiet"]
                .map(String::from)
                .to_vec(),
            device_args: Vec::new(),
            devices: 0,
            timeout,
        }
    }

    /// A vhost-user-blk PCI device served on `socket`.
    pub fn vhost_user_blk(mut self, socket: &Path, queues: u32) -> Qemu {
        let id = self.next_id("blk");
        self.chardev(&id, socket);
        self.device_args.extend([
            "-device".to_string(),
            format!("vhost-user-blk-pci,chardev={id},num-queues={queues}"),
        ]);
        self
    }

    /// A vhost-user-blk PCI device served on `socket` with QEMU's default queue count (one
    /// per vCPU).
    pub fn vhost_user_blk_default_queues(mut self, socket: &Path) -> Qemu {
        let id = self.next_id("blk");
        self.chardev(&id, socket);
        self.device_args.extend([
            "-device".to_string(),
            format!("vhost-user-blk-pci,chardev={id}"),
        ]);
        self
    }

    /// `vcpus` vCPUs (default 1).
    pub fn smp(mut self, vcpus: u32) -> Qemu {
        self.smp = vcpus;
        self
    }

    /// A virtio-net PCI device whose backend is the vhost-user daemon on `socket`.
    ///
    /// `vectors=0` gives the device no MSI-X table, so Linux falls back to the legacy INTx line:
    /// QEMU 7.2 under TCG aborts in `vhost_net_start` when a vhost-user net device uses MSI-X
    /// (it tries to set up irqfds, which need KVM).
    pub fn vhost_user_net(mut self, socket: &Path, mac: &str) -> Qemu {
        let id = self.next_id("net");
        self.chardev(&id, socket);
        self.device_args.extend([
            "-netdev".to_string(),
            format!("vhost-user,chardev={id},id={id}n"),
            "-device".to_string(),
            format!("virtio-net-pci,netdev={id}n,mac={mac},vectors=0"),
        ]);
        self
    }

    /// Another kernel command line argument.
    pub fn append(mut self, arg: &str) -> Qemu {
        self.append.push(arg.to_string());
        self
    }

    /// Extra QEMU arguments, placed after the devices.
    pub fn args(mut self, extra: &[&str]) -> Qemu {
        self.device_args.extend(extra.iter().map(|a| a.to_string()));
        self
    }

    /// Guest memory in MiB (default 512).
    pub fn memory_mib(mut self, mib: u32) -> Qemu {
        self.mem_mib = mib;
        self
    }

    /// A guest that runs KVM itself: QEMU's TCG emulates AMD SVM with nested paging with
    /// `-cpu max`; two vCPUs on host threads of their own (`thread=multi`). Its memory is
    /// private (no vhost-user device of the host's attaches to such a guest).
    pub fn nested_svm(mut self) -> Qemu {
        self.smp = 2;
        self.accel = "tcg,thread=multi".to_string();
        self.cpu = Some("max".to_string());
        self.shared_memory = false;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Qemu {
        self.timeout = timeout;
        self
    }

    fn next_id(&mut self, kind: &str) -> String {
        self.devices += 1;
        format!("{kind}{}", self.devices)
    }

    fn chardev(&mut self, id: &str, socket: &Path) {
        self.device_args.extend([
            "-chardev".to_string(),
            format!("socket,id={id},path={}", socket.display()),
        ]);
    }

    /// The full command, serial console written to `serial`.
    pub fn command(&self, serial: &Path) -> Command {
        let mem = self.mem_mib;
        let mut cmd = Command::new(&self.tools.qemu);
        cmd.arg("-accel")
            .arg(&self.accel)
            .arg("-smp")
            .arg(self.smp.to_string())
            .arg("-m")
            .arg(format!("{mem}M"));
        if let Some(cpu) = &self.cpu {
            cmd.arg("-cpu").arg(cpu);
        }
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-no-reboot")
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(&self.tools.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(self.append.join(" "));
        if self.shared_memory {
            // vhost-user backends map guest memory: it must be a shareable fd.
            cmd.arg("-object")
                .arg(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"))
                .args(["-machine", "memory-backend=mem"]);
        }
        cmd.args(&self.device_args);
        cmd
    }

    /// Boot, wait for QEMU to exit (the guest powers off) or kill it at the timeout.
    /// The serial log and QEMU's own output are registered with `workdir` for failure reports.
    pub fn run(&self, workdir: &Workdir, name: &str) -> Result<GuestRun, String> {
        Ok(self.spawn(workdir, name)?.wait())
    }

    /// Boot in the background, for tests that talk to the guest while it runs. The guest has
    /// until the timeout (counted from now) to power off; dropping the handle kills QEMU.
    pub fn spawn(&self, workdir: &Workdir, name: &str) -> Result<RunningGuest, String> {
        let serial = workdir.join(&format!("{name}.serial.log"));
        let log = workdir.join(&format!("{name}.qemu.log"));
        workdir.log(&format!("{name} serial console"), &serial);
        workdir.log(&format!("{name} QEMU stdout/stderr"), &log);
        let out = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = self.command(&serial);
        std::fs::write(
            workdir.join(&format!("{name}.cmdline")),
            format!("{cmd:?}\n"),
        )
        .map_err(|e| e.to_string())?;
        let start = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.tools.qemu.display()))?;
        Ok(RunningGuest {
            child,
            serial,
            start,
            timeout: self.timeout,
        })
    }
}

/// A QEMU process still running; killed (and reaped) when dropped, so a failing test leaves
/// no QEMU behind.
#[derive(Debug)]
pub struct RunningGuest {
    child: Child,
    serial: PathBuf,
    start: Instant,
    timeout: Duration,
}

impl RunningGuest {
    /// Everything the guest printed on ttyS0 so far.
    pub fn serial_so_far(&self) -> String {
        read_lossy(&self.serial)
    }

    /// Wait up to `timeout` for the guest to print marker `SV:key=...` and return its value.
    /// Fails at once if QEMU exits first; the error includes the console so far.
    pub fn wait_marker(&mut self, key: &str, timeout: Duration) -> Result<String, String> {
        let serial = &self.serial;
        let child = &mut self.child;
        let found = poll_until(&format!("marker SV:{key}="), timeout, || {
            if let Some(value) = last_marker(&read_lossy(serial), key) {
                return Some(Ok(value.to_string()));
            }
            child.try_wait().ok().flatten().map(Err)
        });
        match found {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(status)) => Err(format!(
                "QEMU exited with {status} before the guest printed SV:{key}=; console:\n{}",
                self.serial_so_far()
            )),
            Err(e) => Err(format!("{e}; console so far:\n{}", self.serial_so_far())),
        }
    }

    /// Wait for QEMU to exit (the guest powers off), killing it when the timeout given to
    /// [`Qemu`] has passed since the start.
    pub fn wait(mut self) -> GuestRun {
        let left = self.timeout.saturating_sub(self.start.elapsed());
        let child = &mut self.child;
        let waited = poll_until("QEMU to exit", left, || child.try_wait().ok().flatten());
        let (status, timed_out) = match waited {
            Ok(status) => (Some(status), false),
            Err(_) => {
                let _ = self.child.kill();
                (self.child.wait().ok(), true)
            }
        };
        GuestRun {
            status,
            timed_out,
            elapsed: self.start.elapsed(),
            serial: self.serial_so_far(),
            timeout: self.timeout,
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A text file's contents so far, lossy UTF-8 (empty if it does not exist yet).
fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|d| String::from_utf8_lossy(&d).into_owned())
        .unwrap_or_default()
}

/// The value of the last `SV:key=value` marker in `serial`.
fn last_marker<'a>(serial: &'a str, key: &str) -> Option<&'a str> {
    markers_in(serial)
        .into_iter()
        .rev()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// All `SV:key=value` markers, in order (a marker may follow kernel output on a line).
fn markers_in(serial: &str) -> Vec<(&str, &str)> {
    serial
        .lines()
        .filter_map(|line| line.split_once("SV:").map(|(_, m)| m))
        .map(|m| {
            let m = m.trim_end_matches('\r');
            m.split_once('=').unwrap_or((m, ""))
        })
        .collect()
}

/// What a guest run left behind.
#[derive(Debug, Clone)]
pub struct GuestRun {
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub elapsed: Duration,
    /// Everything the guest printed on ttyS0.
    pub serial: String,
    timeout: Duration,
}

impl GuestRun {
    /// All `SV:key=value` markers, in order (a marker may follow kernel output on a line).
    pub fn markers(&self) -> Vec<(&str, &str)> {
        markers_in(&self.serial)
    }

    /// The value of the last marker `key`.
    pub fn marker(&self, key: &str) -> Option<&str> {
        last_marker(&self.serial, key)
    }

    /// The value of marker `key`; panics (the work directory prints the logs) if absent.
    pub fn expect(&self, key: &str) -> &str {
        self.marker(key)
            .unwrap_or_else(|| panic!("the guest printed no SV:{key}= marker"))
    }

    /// Panic unless QEMU exited by itself with status 0 and the script reported exit 0, with
    /// no module failing to load.
    pub fn assert_passed(&self) {
        assert!(
            !self.timed_out,
            "QEMU killed after {:?} (the guest did not power off)",
            self.timeout
        );
        let ok = self.status.is_some_and(|s| s.success());
        assert!(ok, "QEMU exited with {:?}", self.status);
        if let Some(m) = self.marker("insmod-failed") {
            panic!("the guest could not load module {m}");
        }
        assert_eq!(
            self.marker("init"),
            Some("ready"),
            "guest /init never got ready"
        );
        if let Some(e) = self.marker("error") {
            panic!("the guest script reported error {e}");
        }
        assert_eq!(self.expect("exit"), "0", "the guest script failed");
    }
}
