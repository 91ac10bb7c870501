//! `splitvisor bench`: the same guest block benchmark over the paravirtualized path (a
//! `splitvisor-blk` daemon over vhost-user) and the fully emulated ATA path, one after the
//! other on one image, with exits, kicks and interrupts per request next to the throughput.
//! The network paths (`net-switch`, `net-tap`) live in `bench::net`.

mod net;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};
use splitvisor_vmm::config::ByteSize;

use splitvisor_vmm::api::stats::STATS_PREFIX;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which paths to measure, in order. Block: virtio, ata. Network: net-switch (two VMs on a
    /// `splitvisor-net --switch`, one sending a UDP stream, one receiving), net-tap (one VM
    /// sending to a TAP owned by `splitvisor-net --tap` in a private network namespace that is
    /// deleted afterwards; needs root; also pings the guest from the namespace with
    /// `ping -c 20 -i 0.01`).
    #[arg(long, value_delimiter = ',', default_value = "virtio,ata", value_parser = ["virtio", "ata", "net-switch", "net-tap"])]
    pub paths: Vec<String>,
    /// Access pattern: read, write, randread, randwrite.
    #[arg(long, default_value = "randread", value_parser = ["read", "write", "randread", "randwrite"])]
    pub rw: String,
    /// Request size (4k to 1M).
    #[arg(long, default_value = "4k")]
    pub bs: String,
    /// Requests in flight (the ATA path is always 1).
    #[arg(long, default_value_t = 32)]
    pub qd: u32,
    /// virtio queues (the backend gets one worker thread per queue).
    #[arg(long, default_value_t = 1)]
    pub queues: u32,
    /// Region of the image the guest works in.
    #[arg(long, default_value = "64M")]
    pub size: String,
    /// Seconds each path runs (each network stream too).
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
    /// Network paths: UDP payload sizes in bytes, one stream each (64 to 1500; port 9).
    #[arg(long, value_delimiter = ',', default_value = "64,1500", value_parser = clap::value_parser!(u32).range(64..=1500))]
    pub net_sizes: Vec<u32>,
    /// Image to use; default: a sparse file of --image-size on tmpfs (/dev/shm), removed after.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Size of the default image.
    #[arg(long, default_value = "256M")]
    pub image_size: ByteSize,
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    pub memory: ByteSize,
    /// The splitvisor-blk binary; default: the one next to this executable.
    #[arg(long, value_name = "PATH")]
    pub backend: Option<PathBuf>,
    /// The splitvisor-net binary; default: the one next to this executable.
    #[arg(long, value_name = "PATH")]
    pub net_backend: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot create the benchmark image {}", .0.display())]
    Image(PathBuf, #[source] std::io::Error),
    #[error("cannot find the splitvisor-blk backend next to this binary ({}); build the workspace or pass --backend PATH", .0.display())]
    NoBackend(PathBuf),
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the backend did not create its socket {} within 10 s; its log: {}", .socket.display(), .log.display())]
    BackendNotReady { socket: PathBuf, log: PathBuf },
    #[error("the {path} run produced no RESULT line (exit {status}); guest output:\n{output}")]
    NoResult {
        path: String,
        status: String,
        output: String,
    },
    #[error("cannot create the run directory")]
    RunDir(#[source] std::io::Error),
    #[error("cannot find the splitvisor-net backend next to this binary ({}); build the workspace or pass --net-backend PATH", .0.display())]
    NoNetBackend(PathBuf),
    #[error("the net-tap path needs root (it creates a network namespace and a TAP device): run as root, or leave net-tap out of --paths")]
    NotRoot,
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
}

/// One benchmark path's outcome.
struct PathResult {
    path: &'static str,
    result: Value,
    vmm: Value,
    backend: Option<Value>,
}

pub fn run(args: &BenchArgs) -> Result<Value, BenchError> {
    let dir = std::env::temp_dir().join(format!("splitvisor-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(BenchError::RunDir)?;
    let outcome = run_in(args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn run_in(args: &BenchArgs, dir: &Path) -> Result<Value, BenchError> {
    let blk = args.paths.iter().any(|p| !p.starts_with("net-"));
    let image = match &args.image {
        Some(path) => path.clone(),
        None if blk => default_image(args.image_size.0)?,
        None => PathBuf::new(),
    };
    let mut results = Vec::new();
    let mut net_rows = Vec::new();
    for path in &args.paths {
        if path.starts_with("net-") {
            net_rows.extend(crate::bench::net::run(args, path, dir)?);
            continue;
        }
        eprintln!(
            "bench: {path}: {} bs={} qd={} for {} s ...",
            args.rw, args.bs, args.qd, args.seconds
        );
        let started = Instant::now();
        let outcome = match path.as_str() {
            "virtio" => run_virtio(args, &image, dir)?,
            _ => run_ata(args, &image)?,
        };
        eprintln!(
            "bench: {path}: done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        results.push(outcome);
    }
    if args.image.is_none() && blk {
        let _ = std::fs::remove_file(&image);
    }
    let mut summary = summarize(args, &results);
    if let Some(paths) = summary["paths"].as_object_mut() {
        paths.extend(net_rows);
    }
    Ok(summary)
}

/// A sparse image on tmpfs when there is one, so the host disk is not what gets measured.
fn default_image(size: u64) -> Result<PathBuf, BenchError> {
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

/// A backend daemon process with its stderr in a log file; stopped (SIGTERM, so it prints
/// its STATS) when asked or dropped.
pub(crate) struct Backend {
    child: Option<Child>,
    log: PathBuf,
}

impl Backend {
    pub(crate) fn start(mut cmd: Command, log: &Path, what: &Path) -> Result<Backend, BenchError> {
        let file = std::fs::File::create(log).map_err(BenchError::RunDir)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|source| BenchError::Spawn {
                what: what.display().to_string(),
                source,
            })?;
        Ok(Backend {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Polls `ready` for up to 10 s; fails if the daemon exits first.
    pub(crate) fn wait_ready(
        &mut self,
        ready: impl Fn() -> bool,
        socket: &Path,
    ) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready() {
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                self.stop();
                return Err(BenchError::BackendNotReady {
                    socket: socket.to_path_buf(),
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

pub(crate) fn stop(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The backend's counters: the last `STATS {json}` line in its log.
pub(crate) fn last_stats_line(log: &Path) -> Option<Value> {
    let mut text = String::new();
    std::fs::File::open(log)
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.find("STATS {").map(|at| &l[at + 6..]))
        .and_then(|json| serde_json::from_str(json).ok())
}

fn summarize(args: &BenchArgs, results: &[PathResult]) -> Value {
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

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The summary as a table for people: the block paths, then the network paths.
pub fn print_table(summary: &Value) {
    let Some(paths) = summary["paths"].as_object() else {
        return;
    };
    if paths.keys().any(|k| !k.starts_with("net-")) {
        print_blk_table(paths);
    }
    if let Some(x) = summary["virtio_over_ata_throughput"].as_f64() {
        println!("vhost-user-blk throughput is {x}x the emulated ATA path's");
    }
    crate::bench::net::print_table(paths);
}

fn print_blk_table(paths: &serde_json::Map<String, Value>) {
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "path", "IOPS", "MB/s", "p50 us", "p99 us", "exits/req", "kicks/req"
    );
    // serde_json's Display ignores width, so render each cell first.
    let cell = |v: &Value| match v {
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    for (name, p) in paths.iter().filter(|(k, _)| !k.starts_with("net-")) {
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
