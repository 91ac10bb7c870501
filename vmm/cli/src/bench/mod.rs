//! `splitvisor bench`: its flags, and the paths it measures one after the other into one
//! summary (`BENCH {json}`) and table. The block paths (`virtio`, `ata`) are in `blk`, the
//! network paths (`net-switch`, `net-tap`) in `net`; both start their daemons with `daemon`,
//! `net-tap` works in a namespace of its own (`netns`), and both render with `table`.
//! `blk-host` (`blk_host`) measures a vhost-user-blk backend without a VM, from a frontend in
//! this process (`frontend`, `load`).

mod blk;
mod blk_host;
mod daemon;
mod frontend;
mod load;
mod net;
mod netns;
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
    #[error("blk-host: {0}")]
    BlkHost(#[source] blk_host::BlkHostError),
}

pub fn run(args: &BenchArgs) -> Result<Value, BenchError> {
    if args.paths.iter().any(|p| p == blk_host::PATH) {
        // Before anything starts: a bad flag must not cost a VM run first.
        let image_len = args
            .image
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok().map(|m| m.len()));
        blk_host::validate(args, image_len).map_err(BenchError::BlkHost)?;
    }
    let dir = std::env::temp_dir().join(format!("splitvisor-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(BenchError::RunDir)?;
    let outcome = run_in(args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn run_in(args: &BenchArgs, dir: &Path) -> Result<Value, BenchError> {
    let blk = args
        .paths
        .iter()
        .any(|p| !p.starts_with("net-") && p != blk_host::PATH);
    let image = match &args.image {
        Some(path) => path.clone(),
        None if blk => blk::default_image(args.image_size.0)?,
        None => PathBuf::new(),
    };
    let mut results = Vec::new();
    let mut net_rows = Vec::new();
    let mut host_compare = Value::Null;
    for path in &args.paths {
        if path == blk_host::PATH {
            let (rows, compare) = blk_host::run(args)?;
            net_rows.extend(rows);
            host_compare = compare;
            continue;
        }
        if path.starts_with("net-") {
            net_rows.extend(net::run(args, path, dir)?);
            continue;
        }
        results.push(blk::run(args, path, &image, dir)?);
    }
    if args.image.is_none() && blk {
        let _ = std::fs::remove_file(&image);
    }
    let mut summary = blk::summarize(args, &results);
    if let Some(paths) = summary["paths"].as_object_mut() {
        paths.extend(net_rows);
    }
    if args.paths.iter().any(|p| p == blk_host::PATH) {
        if let Some(top) = summary.as_object_mut() {
            for (key, value) in [
                ("rw", json!(args.rw)),
                ("bs", json!(args.bs)),
                ("qd", json!(args.qd)),
                ("queues", json!(args.queues)),
                ("seconds", json!(args.seconds)),
            ] {
                top.entry(key).or_insert(value);
            }
            top.insert("blk_host_compare".into(), host_compare);
        }
    }
    Ok(summary)
}

/// The summary as a table for people: the block paths, then the network paths.
pub fn print_table(summary: &Value) {
    blk::print_table(summary);
    blk_host::print_table(summary);
    if let Some(paths) = summary["paths"].as_object() {
        net::print_table(paths);
    }
}
