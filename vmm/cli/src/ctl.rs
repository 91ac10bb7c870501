//! `splitvisor ctl`: the control API's command-line client. Sends one request to the VMM's API
//! socket and prints the answer readably, or as JSON with `--json`.

use std::fmt::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::registry::{self, RegistryError};
use splitvisor_vmm::api::http;
use splitvisor_vmm::api::types::{
    AfterSnapshot, DeviceCounters, DeviceReport, ErrorReport, MetricsReport, SnapshotReport,
    SnapshotRequest, StateReport, SwapReport, SwapRequest, UpgradeReport, UpgradeRequest,
    VirtioCounters, VmReport, API_PREFIX,
};

// The migrate verb: request and progress display.
mod migrate;

#[derive(Debug, Args)]
#[command(subcommand_precedence_over_arg = true)]
pub struct CtlArgs {
    /// The VM's name (`run --name`, `launch --name`; `splitvisor list` shows them).
    #[arg(value_name = "NAME", required_unless_present = "api_socket")]
    pub name: Option<String>,
    /// The API socket the VM was started with (`run --api-socket PATH`), instead of its name.
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    pub api_socket: Option<PathBuf>,
    /// Print the API's JSON answer instead of a readable summary.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub verb: CtlVerb,
}

#[derive(Debug, Subcommand)]
pub enum CtlVerb {
    /// The VM's state, vCPUs, memory, and each device with its backend socket, connection
    /// state, swaps, recoveries and counters (GET /vm).
    Status,
    /// Stop running the vCPUs; backends finish what the guest already queued (PUT /vm/pause).
    Pause,
    /// Run the vCPUs again (PUT /vm/resume).
    Resume,
    /// Stop the VM; `run` then exits with status 130 (PUT /vm/shutdown).
    Shutdown,
    /// Move device ID to the vhost-user backend listening on SOCKET while the guest runs; on
    /// failure the device keeps its backend (PUT /devices/ID/backend).
    Swap {
        /// The device id, e.g. disk0 or net0 (see `status`).
        id: String,
        /// The new backend's Unix socket.
        socket: PathBuf,
    },
    /// Exits by kind and by device, per-device completed requests and interrupts (GET /metrics).
    Metrics,
    /// Pause the VM, write a snapshot of it (vCPUs, interrupt controllers, clock, devices,
    /// memory) into DIR, then resume it or, with `--then stop`, end it (`run` exits with
    /// status 0); `splitvisor run --restore DIR` continues it (PUT /vm/snapshot).
    Snapshot {
        /// The snapshot directory (created if needed; a snapshot already in it is replaced).
        dir: PathBuf,
        /// What the VM does once the snapshot is written: resume or stop.
        #[arg(long, value_name = "resume|stop", default_value = "resume", value_parser = parse_then)]
        then: AfterSnapshot,
    },
    /// Live upgrade: replace the VMM process by a (new) splitvisor binary while the guest
    /// keeps its state (PUT /vm/upgrade).
    ///
    /// The VMM pauses the VM, captures its vCPUs, interrupt controllers, clock and devices
    /// as a snapshot does, and re-executes itself in place: same pid, name, API socket,
    /// console and stdio. Guest memory is not copied (it stays in its memfd), so the pause
    /// does not grow with the VM's size; the backends see their frontend reconnect and resume
    /// the rings where they stopped. Prints the downtime and the new version.
    ///
    /// If anything fails before the new binary starts (it is missing, not executable, its
    /// `--version` is not splitvisor's, a capture fails, execve fails), the VM continues
    /// untouched and ctl exits 1 naming the cause. If the new binary starts but cannot take
    /// the VM over (e.g. an incompatible version), the GUEST IS LOST: the VMM prints why and
    /// exits 1 (ctl too). The project's own guest only: Linux guests cannot be snapshotted
    /// yet.
    Upgrade {
        /// The splitvisor binary to run; default: the one running now, by its path (so an
        /// upgrade installed over it is picked up).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Move the running VM to the destination waiting at ADDR (`splitvisor run --incoming
    /// ADDR`): unix:PATH or tcp:HOST:PORT. On success this VM's `run` exits with status 0 and
    /// the destination continues it; on failure it runs on here (PUT /vm/migrate).
    Migrate {
        /// unix:PATH or tcp:HOST:PORT.
        to: String,
    },
}

fn parse_then(value: &str) -> Result<AfterSnapshot, String> {
    match value {
        "resume" => Ok(AfterSnapshot::Resume),
        "stop" => Ok(AfterSnapshot::Stop),
        _ => Err(format!("'{value}': expected resume or stop")),
    }
}

/// A swap may wait for the new backend's socket (the VMM's --connect-timeout) and then move
/// the rings; everything else answers at once.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the VMM's API socket {}: {source}; is a VM running with --api-socket {}?", .path.display(), .path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the VMM on {} failed", .0.display())]
    Exchange(PathBuf, #[source] std::io::Error),
    #[error("the upgrade got no answer on {}: the new VMM process failed before it could take the VM over, and the guest is lost; its stderr says why", .0.display())]
    UpgradeLost(PathBuf, #[source] std::io::Error),
    #[error("--binary {}: `--version` printed {said:?}, not `splitvisor VERSION`: not a splitvisor binary; the VM was not touched", .binary.display())]
    NotSplitvisor { binary: PathBuf, said: String },
    #[error("the VMM's answer is not the JSON expected ({why}): {text}")]
    NotJson { why: String, text: String },
    #[error("{message} (HTTP {status})")]
    Refused { status: u16, message: String },
    #[error("name the VM (`splitvisor ctl NAME VERB`; `splitvisor list` shows them) or give --api-socket PATH")]
    NoTarget,
    #[error(transparent)]
    Lookup(#[from] RegistryError),
}

/// Runs one verb; returns what to print.
pub fn run(args: &CtlArgs) -> Result<String, CtlError> {
    let socket = match (&args.api_socket, &args.name) {
        (Some(path), _) => path.clone(),
        (None, Some(name)) => registry::find(name)?.api_socket,
        (None, None) => return Err(CtlError::NoTarget),
    };
    let v1 = |path: &str| format!("{API_PREFIX}{path}");
    let json = args.json;
    match &args.verb {
        CtlVerb::Status => {
            let vm: VmReport = request(&socket, "GET", &v1("/vm"), None)?;
            show(json, &vm, describe_vm)
        }
        CtlVerb::Metrics => {
            let m: MetricsReport = request(&socket, "GET", &v1("/metrics"), None)?;
            show(json, &m, describe_metrics)
        }
        CtlVerb::Pause | CtlVerb::Resume | CtlVerb::Shutdown => {
            let path = match args.verb {
                CtlVerb::Pause => "/vm/pause",
                CtlVerb::Resume => "/vm/resume",
                _ => "/vm/shutdown",
            };
            let report: StateReport = request(&socket, "PUT", &v1(path), None)?;
            show(json, &report, |r| format!("VM {}", r.state.as_str()))
        }
        CtlVerb::Snapshot { dir, then } => {
            let body = SnapshotRequest {
                dir: absolute(dir).display().to_string(),
                then: *then,
            };
            let path = v1("/vm/snapshot");
            let r: SnapshotReport = request(&socket, "PUT", &path, Some(&json!(body)))?;
            show(json, &r, |r| {
                format!(
                    "snapshot of {} MiB and {} vCPU(s) written to {} in {} ms; VM {}",
                    r.memory_bytes >> 20,
                    r.vcpus,
                    r.dir,
                    r.elapsed_ms,
                    r.state.as_str()
                )
            })
        }
        CtlVerb::Upgrade { binary } => {
            if let Some(binary) = binary {
                check_is_splitvisor(&absolute(binary))?;
            }
            let body = UpgradeRequest {
                binary: binary.as_deref().map(|b| absolute(b).display().to_string()),
            };
            let path = v1("/vm/upgrade");
            let r: UpgradeReport =
                request(&socket, "PUT", &path, Some(&json!(body))).map_err(|e| match e {
                    CtlError::Exchange(path, source) => CtlError::UpgradeLost(path, source),
                    other => other,
                })?;
            show(json, &r, |r| {
                format!(
                    "upgraded: splitvisor {} -> {} ({}), pid {}, downtime {:.3} ms (upgrade {}); VM {}",
                    r.previous_version,
                    r.version,
                    r.binary,
                    r.pid,
                    r.downtime_us as f64 / 1000.0,
                    r.upgrades,
                    r.state.as_str()
                )
            })
        }
        CtlVerb::Migrate { to } => migrate::ctl_migrate(&socket, to, json),
        CtlVerb::Swap { id, socket: target } => {
            let body = SwapRequest {
                socket: absolute(target).display().to_string(),
            };
            let path = v1(&format!("/devices/{id}/backend"));
            let report: SwapReport = request(&socket, "PUT", &path, Some(&json!(body)))?;
            show(json, &report, |r| {
                format!(
                    "{id}: now served by {} (was {}); rings stopped for {} us",
                    r.swap.to, r.swap.from, r.swap.stall_us
                )
            })
        }
    }
}

/// How long `BINARY --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// A binary that is not splitvisor would start in the VMM's place and lose the guest: when
/// `binary` runs at all, it must say it is splitvisor. What does not run (missing, not
/// executable) is left to the VMM, which refuses it naming the cause.
fn check_is_splitvisor(binary: &Path) -> Result<(), CtlError> {
    use std::process::{Command, Stdio};
    let deadline = std::time::Instant::now() + VERSION_TIMEOUT;
    let mut child = loop {
        let spawned = Command::new(binary)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => break child,
            // Just written and still open for writing somewhere (a process forked meanwhile).
            Err(e)
                if e.raw_os_error() == Some(libc::ETXTBSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => return Ok(()),
        }
    };
    while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let said = child
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if said.starts_with("splitvisor ") {
        return Ok(());
    }
    Err(CtlError::NotSplitvisor {
        binary: binary.to_path_buf(),
        said,
    })
}

/// The answer as JSON with `--json`, else readably.
pub fn show<T: Serialize>(
    json: bool,
    value: &T,
    describe: impl Fn(&T) -> String,
) -> Result<String, CtlError> {
    if json {
        serde_json::to_string(value).map_err(|e| CtlError::NotJson {
            why: e.to_string(),
            text: String::new(),
        })
    } else {
        Ok(describe(value))
    }
}

/// The VMM resolves the socket path itself, so a relative path must not depend on its cwd.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// One HTTP exchange; a non-2xx answer becomes `CtlError::Refused` with the VMM's message.
pub fn request<T: DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<T, CtlError> {
    request_within(socket, method, path, body, RESPONSE_TIMEOUT)
}

/// `request` with a deadline of its own for each read and write.
pub fn request_within<T: DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<T, CtlError> {
    let stream = UnixStream::connect(socket).map_err(|source| CtlError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let exchange_error = |e| CtlError::Exchange(socket.to_path_buf(), e);
    stream
        .set_read_timeout(Some(timeout))
        .map_err(exchange_error)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(exchange_error)?;
    let (status, raw) = http::exchange(&stream, method, path, body).map_err(exchange_error)?;
    let text = || String::from_utf8_lossy(&raw).into_owned();
    if !(200..300).contains(&status) {
        let message = match serde_json::from_slice::<ErrorReport>(&raw) {
            Ok(report) => report.error,
            Err(_) => text(),
        };
        return Err(CtlError::Refused { status, message });
    }
    serde_json::from_slice(&raw).map_err(|e| CtlError::NotJson {
        why: e.to_string(),
        text: text(),
    })
}

/// "2.5 s" from milliseconds.
pub fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// A device's state in one word: its backend's, or what keeps it from having one.
pub fn device_state(d: &DeviceReport) -> &'static str {
    if d.needs_reset {
        "needs-reset"
    } else if d.busy {
        // Talking to its backend (activation, swap, recovery); the rest is the last report.
        "busy"
    } else {
        match &d.backend {
            Some(b) => b.state.as_str(),
            None if d.transport == "ata-pio" => "emulated",
            None => "-",
        }
    }
}

fn describe_vm(vm: &VmReport) -> String {
    let mut out = format!(
        "VM {}: {} vCPU(s), {} MiB, up {}\n",
        vm.state.as_str(),
        vm.vcpus,
        vm.memory_bytes >> 20,
        seconds(vm.uptime_ms)
    );
    let _ = writeln!(out, "guest: {}, kernel {}", vm.guest.kind, vm.guest.kernel);
    let _ = writeln!(
        out,
        "{:<8} {:<6} {:<12} {:<13} {:>6} {:>10} {:>10}  BACKEND",
        "DEVICE", "KIND", "TRANSPORT", "STATE", "SWAPS", "RECOVERIES", "REQUESTS"
    );
    for d in &vm.devices {
        let backend = d.backend.as_ref();
        let state = match device_state(d) {
            "emulated" => "-",
            other => other,
        };
        let _ = writeln!(
            out,
            "{:<8} {:<6} {:<12} {:<13} {:>6} {:>10} {:>10}  {}",
            d.id,
            d.kind,
            d.transport,
            state,
            backend.map_or(0, |b| b.swaps),
            backend.map_or(0, |b| b.recoveries),
            d.counters.as_ref().map_or(0, DeviceCounters::requests),
            backend.map_or("(in the VMM)", |b| b.socket.as_str())
        );
        if let Some(last) = backend.and_then(|b| b.history.last()) {
            let _ = writeln!(
                out,
                "         last {} {} -> {}: rings stopped {} us{}",
                last.kind.as_str(),
                last.from,
                last.to,
                last.stall_us,
                last.outage_ms
                    .map(|ms| format!(", backend away {ms} ms"))
                    .unwrap_or_default()
            );
        }
    }
    out.trim_end().to_string()
}

fn describe_metrics(m: &MetricsReport) -> String {
    let exits = &m.exits;
    let mut out = format!(
        "exits: {} port I/O, {} MMIO, {} other\n",
        exits.pio, exits.mmio, exits.other
    );
    let _ = writeln!(
        out,
        "{:<8} {:>12} {:>12} {:>12} {:>12}",
        "DEVICE", "REQUESTS", "MMIO EXITS", "INTERRUPTS", "CONFIG IRQS"
    );
    for (id, d) in &m.devices {
        let n = |f: fn(&VirtioCounters) -> u64| d.as_ref().map_or(0, f);
        let _ = writeln!(
            out,
            "{:<8} {:>12} {:>12} {:>12} {:>12}",
            id,
            n(|c| c.completed_requests),
            n(|c| c.mmio_exits),
            n(|c| c.used_buffer_interrupts),
            n(|c| c.config_interrupts)
        );
    }
    out.push_str(&crate::ctl_backends::describe(&m.backend_stats));
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_a_readable_table() {
        let vm: VmReport = serde_json::from_value(json!({
            "state": "running", "guest": {"kind": "linux", "kernel": "/boot/vmlinuz"}, "vcpus": 2, "memory_bytes": 268435456u64, "uptime_ms": 1500,
            "devices": [{
                "id": "disk0", "kind": "block", "transport": "virtio-mmio", "needs_reset": false,
                "mmio_base": "0xd0000000", "gsi": 5, "driver_ok": true, "busy": false,
                "backend": {"socket": "/r/a.sock", "state": "connected", "swaps": 2, "recoveries": 1,
                            "since_ms": 3, "features": "0x1", "inflight_tracking": true,
                            "rings_running": true, "queues": 1,
                            "history": [{"kind": "swap", "from": "/r/b.sock", "to": "/r/a.sock", "stall_us": 812, "outage_ms": null,
                                         "first_completion_us": null, "inflight_region": true, "at_ms": 10}]},
                "counters": {"completed_requests": 42, "mmio_exits": 1, "used_buffer_interrupts": 2, "config_interrupts": 0}
            }]
        }))
        .unwrap();
        let text = describe_vm(&vm);
        assert!(
            text.starts_with(
                "VM running: 2 vCPU(s), 256 MiB, up 1.5 s\nguest: linux, kernel /boot/vmlinuz\n"
            ),
            "{text}"
        );
        assert!(text.contains("disk0"), "{text}");
        assert!(text.contains("/r/a.sock"), "{text}");
        assert!(
            text.contains("last swap /r/b.sock -> /r/a.sock: rings stopped 812 us"),
            "{text}"
        );
    }

    #[test]
    fn an_unreachable_socket_names_the_flag() {
        let err = request::<VmReport>(Path::new("/nonexistent/api.sock"), "GET", "/vm", None)
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/api.sock") && text.contains("--api-socket"),
            "{text}"
        );
    }
}
