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
use super::table::{cell, round3};
use super::{BenchArgs, BenchError};

/// One benchmark path's outcome.
pub struct PathResult {
    path: &'static str,
    result: Value,
    vmm: Value,
    backend: Option<Value>,
}

/// Runs one block path (`virtio` or `ata`) on `image`.
pub fn run(
    args: &BenchArgs,
    path: &str,
    image: &Path,
    dir: &Path,
) -> Result<PathResult, BenchError> {
    eprintln!(
        "bench: {path}: {} bs={} qd={} for {} s ...",
        args.rw, args.bs, args.qd, args.seconds
    );
    let started = Instant::now();
    let outcome = match path {
        "virtio" => run_virtio(args, image, dir)?,
        _ => run_ata(args, image)?,
    };
    eprintln!(
        "bench: {path}: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(outcome)
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

fn guest_cmdline(args: &BenchArgs, dev: &str) -> String {
    format!(
        "bench=blk,dev={dev},rw={},bs={},qd={},queues={},size={},seconds={}",
        args.rw, args.bs, args.qd, args.queues, args.size, args.seconds
    )
}

fn run_virtio(args: &BenchArgs, image: &Path, dir: &Path) -> Result<PathResult, BenchError> {
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
    let outcome = run_guest(args, "virtio", &["--disk", &disk]);
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

fn run_ata(args: &BenchArgs, image: &Path) -> Result<PathResult, BenchError> {
    let disk = format!("path={},emulated=ata", image.display());
    let (result, vmm) = run_guest(args, "ata", &["--disk", &disk])?;
    Ok(PathResult {
        path: "ata",
        result,
        vmm,
        backend: None,
    })
}

/// Runs `splitvisor run` for one path and returns the guest's RESULT and the VMM's stats.
fn run_guest(args: &BenchArgs, dev: &str, extra: &[&str]) -> Result<(Value, Value), BenchError> {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("splitvisor"));
    let mut child = Command::new(&exe)
        .args([
            "run",
            "--stats",
            "--prefault",
            "--memory",
            &args.memory.to_string(),
        ])
        .args(["--cmdline", &guest_cmdline(args, dev)])
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

pub fn summarize(args: &BenchArgs, results: &[PathResult]) -> Value {
    let mut paths = serde_json::Map::new();
    for r in results {
        let requests = r.result["requests"].as_f64().unwrap_or(0.0).max(1.0);
        let device_exits = device_exits(r.path, &r.vmm);
        let (kicks, interrupts) = backend_totals(r.backend.as_ref());
        paths.insert(
            r.path.to_string(),
            json!({
                "status": r.result["status"],
                "iops": r.result["iops"],
                "mb_per_s": r.result["mb_per_s"],
                "lat_p50_us": r.result["lat_p50_us"],
                "lat_p99_us": r.result["lat_p99_us"],
                "requests": r.result["requests"],
                "vmm_exits_per_request": round3(device_exits as f64 / requests),
                "kicks_per_request": kicks.map(|k| round3(k as f64 / requests)),
                "interrupts_per_request": interrupts.map(|i| round3(i as f64 / requests)),
                "guest_kicks": r.result["kicks"],
            }),
        );
    }
    if paths.is_empty() {
        return json!({ "seconds": args.seconds, "net_sizes": args.net_sizes, "paths": paths });
    }
    let speedup = match (paths.get("virtio"), paths.get("ata")) {
        (Some(v), Some(a)) => match (v["mb_per_s"].as_f64(), a["mb_per_s"].as_f64()) {
            (Some(v), Some(a)) if a > 0.0 => Some(round3(v / a)),
            _ => None,
        },
        _ => None,
    };
    json!({
        "rw": args.rw, "bs": args.bs, "qd": args.qd, "queues": args.queues, "seconds": args.seconds,
        "paths": paths,
        "virtio_over_ata_throughput": speedup,
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

/// The block rows as a table for people, and how the two paths compare.
pub fn print_table(summary: &Value) {
    let Some(paths) = summary["paths"].as_object() else {
        return;
    };
    if paths.keys().any(|k| is_vm_blk(k)) {
        print_blk_table(paths);
    }
    if let Some(x) = summary["virtio_over_ata_throughput"].as_f64() {
        println!("vhost-user-blk throughput is {x}x the emulated ATA path's");
    }
}

/// A row of the in-guest block paths (not a network path, not a blk-host row).
fn is_vm_blk(path: &str) -> bool {
    !path.starts_with("net-") && !path.starts_with(super::blk_host::PATH)
}

fn print_blk_table(paths: &serde_json::Map<String, Value>) {
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "path", "IOPS", "MB/s", "p50 us", "p99 us", "exits/req", "kicks/req"
    );
    for (name, p) in paths.iter().filter(|(k, _)| is_vm_blk(k)) {
        println!(
            "{:<8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
            name,
            cell(&p["iops"]),
            cell(&p["mb_per_s"]),
            cell(&p["lat_p50_us"]),
            cell(&p["lat_p99_us"]),
            cell(&p["vmm_exits_per_request"]),
            cell(&p["kicks_per_request"])
        );
    }
}
