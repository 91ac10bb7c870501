//! `splitvisor ctl`: the control API's command-line client. Sends one request to the VMM's API
//! socket and prints the answer readably, or as JSON with `--json`.

use std::fmt::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::http;
use crate::cli::{CtlArgs, CtlVerb};

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
    #[error("the VMM's answer is not JSON: {0}")]
    NotJson(String),
    #[error("{message} (HTTP {status})")]
    Refused { status: u16, message: String },
}

/// Runs one verb; returns what to print.
pub fn run(args: &CtlArgs) -> Result<String, CtlError> {
    let (method, path, body) = match &args.verb {
        CtlVerb::Status => ("GET", "/vm".to_string(), None),
        CtlVerb::Metrics => ("GET", "/metrics".to_string(), None),
        CtlVerb::Pause => ("PUT", "/vm/pause".to_string(), None),
        CtlVerb::Resume => ("PUT", "/vm/resume".to_string(), None),
        CtlVerb::Shutdown => ("PUT", "/vm/shutdown".to_string(), None),
        CtlVerb::Swap { id, socket } => (
            "PUT",
            format!("/devices/{id}/backend"),
            Some(json!({ "socket": absolute(socket) })),
        ),
    };
    let answer = request(&args.api_socket, method, &path, body.as_ref())?;
    if args.json {
        return Ok(answer.to_string());
    }
    Ok(match &args.verb {
        CtlVerb::Status => describe_vm(&answer),
        CtlVerb::Metrics => describe_metrics(&answer),
        CtlVerb::Pause | CtlVerb::Resume | CtlVerb::Shutdown => {
            format!("VM {}", answer["state"].as_str().unwrap_or("?"))
        }
        CtlVerb::Swap { id, .. } => {
            let swap = &answer["swap"];
            format!(
                "{id}: now served by {} (was {}); rings stopped for {} us",
                swap["to"].as_str().unwrap_or("?"),
                swap["from"].as_str().unwrap_or("?"),
                swap["stall_us"]
            )
        }
    })
}

/// The VMM resolves the socket path itself, so a relative path must not depend on its cwd.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// One HTTP exchange; a non-2xx answer becomes `CtlError::Refused` with the VMM's message.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, CtlError> {
    let stream = UnixStream::connect(socket).map_err(|source| CtlError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let exchange_error = |e| CtlError::Exchange(socket.to_path_buf(), e);
    stream
        .set_read_timeout(Some(RESPONSE_TIMEOUT))
        .map_err(exchange_error)?;
    stream
        .set_write_timeout(Some(RESPONSE_TIMEOUT))
        .map_err(exchange_error)?;
    let (status, raw) = http::exchange(&stream, method, path, body).map_err(exchange_error)?;
    let value: Value = serde_json::from_slice(&raw)
        .map_err(|_| CtlError::NotJson(String::from_utf8_lossy(&raw).into_owned()))?;
    if !(200..300).contains(&status) {
        return Err(CtlError::Refused {
            status,
            message: value["error"]
                .as_str()
                .map_or_else(|| value.to_string(), str::to_string),
        });
    }
    Ok(value)
}

fn describe_vm(vm: &Value) -> String {
    let mut out = format!(
        "VM {}: {} vCPU(s), {} MiB, up {:.1} s\n",
        vm["state"].as_str().unwrap_or("?"),
        vm["vcpus"],
        vm["memory_bytes"].as_u64().unwrap_or(0) >> 20,
        vm["uptime_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
    );
    if let (Some(kind), Some(kernel)) =
        (vm["guest"]["kind"].as_str(), vm["guest"]["kernel"].as_str())
    {
        let _ = writeln!(out, "guest: {kind}, kernel {kernel}");
    }
    let _ = writeln!(
        out,
        "{:<8} {:<6} {:<12} {:<13} {:>6} {:>10} {:>10}  BACKEND",
        "DEVICE", "KIND", "TRANSPORT", "STATE", "SWAPS", "RECOVERIES", "REQUESTS"
    );
    for d in vm["devices"].as_array().into_iter().flatten() {
        let backend = &d["backend"];
        let state = if d["needs_reset"] == true {
            "needs-reset"
        } else if d["busy"] == true {
            // Talking to its backend (activation, swap, recovery); the rest is the last report.
            "busy"
        } else {
            backend["state"].as_str().unwrap_or("-")
        };
        let requests = d["counters"]["completed_requests"]
            .as_u64()
            .or(d["counters"]["commands"].as_u64())
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<8} {:<6} {:<12} {:<13} {:>6} {:>10} {:>10}  {}",
            d["id"].as_str().unwrap_or("?"),
            d["kind"].as_str().unwrap_or("?"),
            d["transport"].as_str().unwrap_or("?"),
            state,
            backend["swaps"].as_u64().unwrap_or(0),
            backend["recoveries"].as_u64().unwrap_or(0),
            requests,
            backend["socket"].as_str().unwrap_or("(in the VMM)")
        );
        if let Some(last) = backend["history"].as_array().and_then(|h| h.last()) {
            let _ = writeln!(
                out,
                "         last {} {} -> {}: rings stopped {} us{}",
                last["kind"].as_str().unwrap_or("?"),
                last["from"].as_str().unwrap_or("?"),
                last["to"].as_str().unwrap_or("?"),
                last["stall_us"],
                last["outage_ms"]
                    .as_u64()
                    .map(|ms| format!(", backend away {ms} ms"))
                    .unwrap_or_default()
            );
        }
    }
    out.trim_end().to_string()
}

fn describe_metrics(m: &Value) -> String {
    let exits = &m["exits"];
    let mut out = format!(
        "exits: {} port I/O, {} MMIO, {} other\n",
        exits["pio"], exits["mmio"], exits["other"]
    );
    let _ = writeln!(
        out,
        "{:<8} {:>12} {:>12} {:>12} {:>12}",
        "DEVICE", "REQUESTS", "MMIO EXITS", "INTERRUPTS", "CONFIG IRQS"
    );
    for (id, d) in m["devices"].as_object().into_iter().flatten() {
        let n = |key: &str| d[key].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<8} {:>12} {:>12} {:>12} {:>12}",
            id,
            n("completed_requests"),
            n("mmio_exits"),
            n("used_buffer_interrupts"),
            n("config_interrupts")
        );
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_a_readable_table() {
        let vm = json!({
            "state": "running", "guest": {"kind": "linux", "kernel": "/boot/vmlinuz"}, "vcpus": 2, "memory_bytes": 268435456u64, "uptime_ms": 1500,
            "devices": [{
                "id": "disk0", "kind": "block", "transport": "virtio-mmio", "needs_reset": false,
                "backend": {"socket": "/r/a.sock", "state": "connected", "swaps": 2, "recoveries": 1,
                            "history": [{"kind": "swap", "from": "/r/b.sock", "to": "/r/a.sock", "stall_us": 812, "outage_ms": null}]},
                "counters": {"completed_requests": 42}
            }]
        });
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
        let err = request(Path::new("/nonexistent/api.sock"), "GET", "/vm", None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/api.sock") && text.contains("--api-socket"),
            "{text}"
        );
    }
}
