//! `splitvisor bench`: its flags (checked up front by `check`), and the paths it measures one
//! after the other, `--repeat` times at each `--qd` (folded by `stats`), into one summary
//! (`BENCH {json}`), a table, and on request a file (`output`) and a chart (`plot`). The
//! block paths (`virtio`, `ata`) are in `blk`, the network paths (`net-switch`, `net-tap`)
//! in `net`; both start their daemons with `daemon`,
//! `net-tap` works in a namespace of its own (`netns`), and both render with `table`.
//! `blk-host` (`blk_host`) measures a vhost-user-blk backend without a VM, from a frontend in
//! this process (`frontend`, `load`), shown by `host_table`.

mod blk;
mod blk_host;
mod check;
mod daemon;
mod frontend;
mod host_table;
mod load;
mod net;
mod netns;
mod output;
mod plot;
mod stats;
mod table;

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{json, Value};
use splitvisor_vmm::config::ByteSize;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which paths to measure, in order. Block: virtio, ata. Network: net-switch (two VMs on a
    /// `splitvisor-net --switch`, one sending a UDP stream, one receiving), net-tap (one VM
    /// sending to a TAP owned by `splitvisor-net --tap` in a private network namespace that is
    /// deleted afterwards; needs root; also pings the guest from the namespace with
    /// `ping -c 20 -i 0.01`). blk-host: no VM; this process is the vhost-user frontend of a
    /// splitvisor-blk daemon (or of --backend-cmd) on a tmpfs image filled with data.
    #[arg(long, value_delimiter = ',', default_value = "virtio,ata", value_parser = ["virtio", "ata", "net-switch", "net-tap", "blk-host"])]
    pub paths: Vec<String>,
    /// Access pattern: read, write, randread, randwrite.
    #[arg(long, default_value = "randread", value_parser = ["read", "write", "randread", "randwrite"])]
    pub rw: String,
    /// Request size: a multiple of 512 bytes, at most 1M.
    #[arg(long, default_value = "4k")]
    pub bs: String,
    /// Requests in flight, or a comma list to sweep (e.g. 1,4,16,32): the virtio and blk-host
    /// paths run at each; ATA always runs at 1 (once). Ratios between two paths are taken
    /// only at a queue depth both ran at; the table's and `paths`' headline is the last. The
    /// default sweeps 1 and 32, so that virtio is compared with ATA at the same depth.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub qd: Vec<u32>,
    /// Runs of each configuration (1 to 100): each figure is their median, shown as
    /// `median (min-max)`; BENCH rows hold the median with `min`, `max` and `runs` beside.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Also write every result (one object per path and queue depth, with `min`, `max` and
    /// `runs`) to FILE: a JSON array, or CSV when FILE ends in .csv.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Draw throughput (MB/s) and latency (p50, p99) of each block path over the queue
    /// depths into FILE.svg, with the min-max of the runs as error bars.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// virtio queues (the backend gets one worker thread per queue).
    #[arg(long, default_value_t = 1)]
    pub queues: u32,
    /// Region of the image the guest works in.
    #[arg(long, default_value = "64M")]
    pub size: String,
    /// Seconds each run takes (each network stream too).
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
    /// blk-host: drive this vhost-user-blk backend instead of splitvisor-blk; run by `sh -c`
    /// with {socket} and {image} replaced by the socket it must listen on and the image.
    #[arg(long, value_name = "COMMAND")]
    pub backend_cmd: Option<String>,
    /// blk-host: also measure these reference backends on the same image in the same run and
    /// print the figures side by side with the ratios. qsd: qemu-storage-daemon (aio=io_uring,
    /// else aio=threads).
    #[arg(long, value_delimiter = ',', value_parser = ["qsd"])]
    pub compare: Vec<String>,
    /// blk-host: check every read against the pattern the image was filled with (reads only,
    /// on the image blk-host fills itself).
    #[arg(long)]
    pub verify: bool,
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
    #[error("blk-host")]
    BlkHost(#[source] blk_host::BlkHostError),
    #[error("refused before starting anything")]
    Flags(#[source] check::FlagError),
    #[error("cannot write the results to {} (--output)", .0.display())]
    Output(PathBuf, #[source] output::OutputError),
    #[error("cannot draw the chart {} (--plot)", .0.display())]
    Plot(PathBuf, #[source] plot::PlotError),
}

pub fn run(args: &BenchArgs) -> Result<Value, BenchError> {
    // Before anything starts: a bad flag must not cost a VM run first.
    let image_len = args
        .image
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok().map(|m| m.len()));
    check::validate(args, image_len).map_err(BenchError::Flags)?;
    if args.paths.iter().any(|p| p == blk_host::PATH) {
        blk_host::validate(args, image_len).map_err(BenchError::BlkHost)?;
    }
    let dir = std::env::temp_dir().join(format!("splitvisor-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(BenchError::RunDir)?;
    let outcome = run_in(args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let summary = outcome?;
    if let Some(path) = &args.output {
        output::write(path, &summary).map_err(|e| BenchError::Output(path.clone(), e))?;
        eprintln!("bench: results written to {}", path.display());
    }
    if let Some(path) = &args.plot {
        plot::draw(path, &summary).map_err(|e| BenchError::Plot(path.clone(), e))?;
        eprintln!("bench: chart drawn into {}", path.display());
    }
    Ok(summary)
}

fn run_in(args: &BenchArgs, dir: &Path) -> Result<Value, BenchError> {
    let blk = args
        .paths
        .iter()
        .any(|p| check::is_block(p) && p != blk_host::PATH);
    let image = match &args.image {
        Some(path) => path.clone(),
        None if blk => blk::default_image(args.image_size.0)?,
        None => PathBuf::new(),
    };
    let outcome = run_paths(args, &image, dir);
    if args.image.is_none() && blk {
        let _ = std::fs::remove_file(&image);
    }
    let (results, host_compare) = outcome?;
    Ok(summarize(args, results, host_compare))
}

/// Every requested path at every queue depth it takes, `--repeat` times each: the folded
/// results, and blk-host's comparison.
fn run_paths(
    args: &BenchArgs,
    image: &Path,
    dir: &Path,
) -> Result<(Vec<Value>, Value), BenchError> {
    let mut results = Vec::new();
    let mut host_compare = Value::Null;
    for path in &args.paths {
        if path == blk_host::PATH {
            let (rows, compare) = blk_host::run(args)?;
            results.extend(rows);
            host_compare = compare;
        } else if path.starts_with("net-") {
            results.extend(repeat_runs(args, path, None, || net::run(args, path, dir))?);
        } else {
            for qd in blk::depths(path, &args.qd) {
                let once = || blk::run(args, path, qd, image, dir).map(|r| vec![(path.clone(), r)]);
                results.extend(repeat_runs(args, path, Some(qd), once)?);
            }
        }
    }
    Ok((results, host_compare))
}

/// Runs one configuration `--repeat` times, with a progress line per run on stderr, and folds
/// the runs of each row it yields (rows are named; blk-host yields one per backend) into one
/// result `{path, qd, ...}` (`stats::fold`).
pub(super) fn repeat_runs<E>(
    args: &BenchArgs,
    label: &str,
    qd: Option<u32>,
    mut once: impl FnMut() -> Result<Vec<(String, Value)>, E>,
) -> Result<Vec<Value>, E> {
    let mut runs: Vec<(String, Vec<Value>)> = Vec::new();
    let at = qd.map(|q| format!(" qd={q}")).unwrap_or_default();
    for i in 1..=args.repeat {
        eprintln!("bench: {label}{at} run {i}/{} ...", args.repeat);
        for (name, row) in once()? {
            match runs.iter_mut().find(|(n, _)| *n == name) {
                Some((_, rows)) => rows.push(row),
                None => runs.push((name, vec![row])),
            }
        }
    }
    Ok(runs
        .into_iter()
        .map(|(name, rows)| {
            let mut result = stats::fold(&rows);
            if let Some(obj) = result.as_object_mut() {
                obj.insert("path".into(), json!(name));
                // The guest reports the depth it really used (ATA: 1); blk-host's is ours.
                obj.entry("qd").or_insert(json!(qd));
            }
            result
        })
        .collect())
}

/// The pairs of paths compared (ours over theirs) wherever both ran at one queue depth.
const COMPARED_PATHS: [(&str, &str); 2] = [("virtio", "ata"), (blk_host::PATH, "blk-host-qsd")];

/// The BENCH summary: `results` has every path at every queue depth; `paths` keeps one row
/// per path (at the last `--qd`, or its only one) as before sweeps; `ratios` compare paths at
/// equal queue depth only.
fn summarize(args: &BenchArgs, results: Vec<Value>, host_compare: Value) -> Value {
    let headline = json!(args.qd.last().copied().unwrap_or_default());
    let mut paths = serde_json::Map::new();
    for r in &results {
        let Some(name) = r["path"].as_str() else {
            continue;
        };
        if r["qd"] == headline || r["qd"].is_null() || !paths.contains_key(name) {
            paths.insert(name.to_string(), r.clone());
        }
    }
    let ratios: Vec<Value> = COMPARED_PATHS
        .iter()
        .flat_map(|(ours, theirs)| stats::matched_ratios(&results, ours, theirs))
        .collect();
    let virtio_over_ata = ratios
        .iter()
        .find(|r| r["ours"] == "virtio" && r["theirs"] == "ata")
        .map(|r| r["mb_per_s"].clone());
    let mut summary = json!({
        "rw": args.rw, "bs": args.bs, "qd": headline, "qds": args.qd, "queues": args.queues,
        "seconds": args.seconds, "repeat": args.repeat, "net_sizes": args.net_sizes,
        "paths": paths,
        "results": results,
        "ratios": ratios,
        "virtio_over_ata_throughput": virtio_over_ata,
    });
    if args.paths.iter().any(|p| p == blk_host::PATH) {
        summary["blk_host_compare"] = host_compare;
    }
    summary
}

/// The summary as a table for people: the block paths, then the network paths.
pub fn print_table(summary: &Value) {
    blk::print_table(summary);
    host_table::print_table(summary);
    if let Some(paths) = summary["paths"].as_object() {
        net::print_table(paths);
    }
}
