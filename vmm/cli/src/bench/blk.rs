//! The block paths of `splitvisor bench`: the same guest block benchmark over the
//! paravirtualized path (a `splitvisor-blk` daemon over vhost-user) and the fully emulated ATA
//! path, one after the other on one image, with exits, kicks and interrupts per request next
//! to the throughput.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};
use splitvisor_vmm::api::stats::STATS_PREFIX;

use super::daemon::{last_stats_line, sibling, Backend};
use super::table::{cell, figure, round3};
use super::{BenchArgs, BenchError};

/// One benchmark path's outcome.
pub struct PathResult {
    path: &'static str,
    result: Value,
    vmm: Value,
    backend: Option<Value>,
}

/// The queue depths a block path runs at: the emulated ATA disk takes one request at a time,
/// so it runs once, at 1, whatever `--qd` lists.
pub fn depths(path: &str, qds: &[u32]) -> Vec<u32> {
    match path {
        "ata" => vec![1],
        _ => qds.to_vec(),
    }
}

/// Runs one block path (`virtio` or `ata`) on `image` at queue depth `qd`: its BENCH row.
pub fn run(
    args: &BenchArgs,
    path: &str,
    qd: u32,
    image: &Path,
    dir: &Path,
) -> Result<Value, BenchError> {
    eprintln!(
        "bench: {path}: {} bs={} qd={qd} for {} s ...",
        args.rw, args.bs, args.seconds
    );
    let started = Instant::now();
    let run = Run { args, qd };
    let outcome = match path {
        "virtio" => run_virtio(&run, image, dir)?,
        _ => run_ata(&run, image)?,
    };
    eprintln!(
        "bench: {path}: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(row(&outcome))
}

/// One run's flags: the command line's, at one queue depth of the sweep.
struct Run<'a> {
    args: &'a BenchArgs,
    qd: u32,
}

/// A sparse image on tmpfs when there is one, so the host disk is not what gets measured.
pub fn default_image(size: u64) -> Result<PathBuf, BenchError> {
    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("splitvisor-bench-{}.img", std::process::id()));
    let file = std::fs::File::create(&path).map_err(|e| BenchError::Image(path.clone(), e))?;
    file.set_len(size)
        .map_err(|e| BenchError::Image(path.clone(), e))?;
    Ok(path)
}

fn guest_cmdline(run: &Run, dev: &str) -> String {
    let args = run.args;
    format!(
        "bench=blk,dev={dev},rw={},bs={},qd={},queues={},size={},seconds={}",
        args.rw, args.bs, run.qd, args.queues, args.size, args.seconds
    )
}

fn run_virtio(run: &Run, image: &Path, dir: &Path) -> Result<PathResult, BenchError> {
    let args = run.args;
    let backend_bin = match &args.backend {
        Some(path) => path.clone(),
        None => sibling("splitvisor-blk"),
    };
    if !backend_bin.is_file() {
        return Err(BenchError::NoBackend(backend_bin));
    }
    let socket = dir.join("blk.sock");
    let log = dir.join("blk.log");
    let mut cmd = Command::new(&backend_bin);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(image)
        .args(["--queues", &args.queues.to_string()]);
    let mut backend = Backend::start(cmd, &log, &backend_bin)?;
    backend.wait_ready(|| socket.exists(), &socket)?;
    let disk = format!("socket={}", socket.display());
    let outcome = run_guest(run, "virtio", &["--disk", &disk]);
    // Stopped before its log is read: it prints its STATS line on the way out.
    backend.stop();
    let (result, vmm) = outcome?;
    Ok(PathResult {
        path: "virtio",
        result,
        vmm,
        backend: last_stats_line(&log),
    })
}

fn run_ata(run: &Run, image: &Path) -> Result<PathResult, BenchError> {
    let disk = format!("path={},emulated=ata", image.display());
    let (result, vmm) = run_guest(run, "ata", &["--disk", &disk])?;
    Ok(PathResult {
        path: "ata",
        result,
        vmm,
        backend: None,
    })
}

/// Runs `splitvisor run` for one path and returns the guest's RESULT and the VMM's stats.
fn run_guest(run: &Run, dev: &str, extra: &[&str]) -> Result<(Value, Value), BenchError> {
    let args = run.args;
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("splitvisor"));
    let mut child = Command::new(&exe)
        .args([
            "run",
            "--stats",
            "--prefault",
            "--memory",
            &args.memory.to_string(),
        ])
        .args(["--cmdline", &guest_cmdline(run, dev)])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            what: exe.display().to_string(),
            source,
        })?;
    let mut output = String::new();
    if let Some(stdout) = child.stdout.take() {
        // Show the guest's progress lines as they come.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !line.starts_with("RESULT ") && !line.starts_with(STATS_PREFIX) {
                eprintln!("  [{dev}] {line}");
            }
            output.push_str(&line);
            output.push('\n');
        }
    }
    let status = child
        .wait()
        .map(|s| s.to_string())
        .unwrap_or_else(|e| e.to_string());
    let find = |prefix: &str| {
        output
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|json| serde_json::from_str::<Value>(json).ok())
    };
    match (find("RESULT "), find(STATS_PREFIX)) {
        (Some(result), Some(vmm)) => Ok((result, vmm)),
        _ => Err(BenchError::NoResult {
            path: dev.to_string(),
            status,
            output,
        }),
    }
}

/// One run's BENCH row: the guest's figures (and its reason when it failed) with the VM
/// exits, kicks and interrupts per request.
fn row(r: &PathResult) -> Value {
    let requests = r.result["requests"].as_f64().unwrap_or(0.0).max(1.0);
    let device_exits = device_exits(r.path, &r.vmm);
    let (kicks, interrupts) = backend_totals(r.backend.as_ref());
    json!({
        "status": r.result["status"],
        "error": r.result["error"],
        "qd": r.result["qd"],
        "iops": r.result["iops"],
        "mb_per_s": r.result["mb_per_s"],
        "lat_p50_us": r.result["lat_p50_us"],
        "lat_p99_us": r.result["lat_p99_us"],
        "requests": r.result["requests"],
        "vmm_exits_per_request": round3(device_exits as f64 / requests),
        "kicks_per_request": kicks.map(|k| round3(k as f64 / requests)),
        "interrupts_per_request": interrupts.map(|i| round3(i as f64 / requests)),
        "guest_kicks": r.result["kicks"],
    })
}

/// VM exits the device itself caused: its MMIO window (virtio) or its ports (ATA). Kicks are
/// ioeventfds and never reach the VMM; they are counted by the backend.
fn device_exits(path: &str, vmm: &Value) -> u64 {
    let exits = &vmm["exits"];
    match path {
        "virtio" => exits["mmio"].as_u64().unwrap_or(0),
        _ => ["ata", "ata-control"]
            .iter()
            .filter_map(|d| exits["pio_by_device"][d].as_u64())
            .sum(),
    }
}

fn backend_totals(stats: Option<&Value>) -> (Option<u64>, Option<u64>) {
    let Some(queues) = stats.and_then(|s| s["queues"].as_array()) else {
        return (None, None);
    };
    let sum = |key: &str| queues.iter().filter_map(|q| q[key].as_u64()).sum::<u64>();
    (Some(sum("kicks")), Some(sum("interrupts")))
}

/// The block rows (every queue depth) as a table for people, and how the two paths compare.
pub fn print_table(summary: &Value) {
    let rows: Vec<&Value> = summary["results"]
        .as_array()
        .map(|r| r.iter().filter(|r| is_vm_blk(&cell(&r["path"]))).collect())
        .unwrap_or_default();
    if rows.is_empty() {
        return;
    }
    print_blk_table(&rows);
    let ratios = summary["ratios"].as_array().cloned().unwrap_or_default();
    let matched: Vec<&Value> = ratios.iter().filter(|r| r["ours"] == "virtio").collect();
    for r in &matched {
        if let Some(x) = r["mb_per_s"].as_f64() {
            let qd = cell(&r["qd"]);
            println!("vhost-user-blk throughput is {x}x the emulated ATA path's (both at QD {qd})");
        }
    }
    let both = ["virtio", "ata"]
        .iter()
        .all(|p| rows.iter().any(|r| r["path"] == *p));
    if both && matched.is_empty() {
        println!(
            "virtio and ATA not compared: ATA runs at QD 1 only; add 1 to --qd (e.g. --qd 1,32)"
        );
    }
}

/// A row of the in-guest block paths (not a network path, not a blk-host row).
fn is_vm_blk(path: &str) -> bool {
    !path.starts_with("net-") && !path.starts_with(super::blk_host::PATH)
}

fn print_blk_table(rows: &[&Value]) {
    for line in blk_lines(rows) {
        println!("{line}");
    }
}

/// The table's lines: a failed run's reason from the guest takes the place of its figures.
fn blk_lines(rows: &[&Value]) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<8} {:>4} {:>22} {:>18} {:>16} {:>16} {:>10} {:>10}",
        "path", "qd", "IOPS", "MB/s", "p50 us", "p99 us", "exits/req", "kicks/req"
    )];
    for p in rows {
        let (name, qd) = (cell(&p["path"]), cell(&p["qd"]));
        let failed = format!("failed: {}", cell(&p["error"]));
        if p["status"] != "pass" && p["iops"].is_null() {
            lines.push(format!("{name:<8} {qd:>4} {failed}"));
            continue;
        }
        lines.push(format!(
            "{name:<8} {qd:>4} {:>22} {:>18} {:>16} {:>16} {:>10} {:>10}",
            figure(p, "iops"),
            figure(p, "mb_per_s"),
            figure(p, "lat_p50_us"),
            figure(p, "lat_p99_us"),
            figure(p, "vmm_exits_per_request"),
            figure(p, "kicks_per_request")
        ));
        if p["status"] != "pass" {
            lines.push(format!("{:<13} {failed}", ""));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_shows_the_guests_reason() {
        let failed = json!({"path": "ata", "qd": 1, "status": "fail", "iops": null,
                            "error": "region smaller than bs, or bs too big"});
        let partly = json!({"path": "virtio", "qd": 4, "status": "fail", "iops": 10,
                            "error": "1 request(s) failed", "runs": 2,
                            "min": {"iops": 9}, "max": {"iops": 12}});
        let lines = blk_lines(&[&failed, &partly]);
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[1].ends_with("failed: region smaller than bs, or bs too big"));
        assert!(lines[2].contains("10 (9-12)"), "{}", lines[2]);
        assert!(lines[3].ends_with("failed: 1 request(s) failed"));
        assert!(blk_lines(&[]).len() == 1);
    }
}
