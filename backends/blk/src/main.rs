//! `splitvisor-blk` command line: parse flags, set up logging, call `run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use splitvisor_blk::{run, Config};
use splitvisor_confine::SeccompMode;

/// vhost-user-blk backend daemon of splitvisor: serves a raw disk image to a VMM over a
/// vhost-user Unix socket, one frontend at a time, accepting the next one after a disconnect.
#[derive(Debug, Parser)]
#[command(name = "splitvisor-blk", version)]
struct Cli {
    /// Unix socket to listen on (created with mode 0600; PATH.lock guards against a second daemon).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Raw disk image: a regular file or block device of whole 512-byte sectors (with
    /// --readonly, any size, rounded down). It is locked like QEMU does (an OFD lock): shared
    /// with --readonly or --share, exclusive otherwise; a second writer is refused.
    #[arg(long, visible_alias = "path", value_name = "PATH")]
    image: PathBuf,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO); writes fail with IOERR.
    #[arg(long, visible_alias = "ro")]
    readonly: bool,
    /// Take a shared image lock even though the disk is writable: for two splitvisor-blk
    /// daemons on one image that a VMM swaps between (planned swaps), which both need it.
    /// The VMM must use only one of them at a time; nothing else protects the image then.
    #[arg(long)]
    share: bool,
    /// Number of virtqueues offered, each served by its own worker thread once the frontend
    /// enables it (1-64) [default: the host's CPUs, at most 16].
    #[arg(long, value_name = "N", default_value_t = splitvisor_blk::default_queues(), hide_default_value = true)]
    queues: usize,
    /// Maximum size of each virtqueue (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256)]
    queue_size: usize,
    /// Open the image with O_DIRECT (unaligned transfers fall back to buffered I/O).
    #[arg(long)]
    direct: bool,
    /// After serving a batch, keep polling the queue for new requests this many microseconds
    /// (driver notifications stay off) before sleeping until the next kick; 0 disables. This
    /// trades CPU for latency: under load a queue's worker spins through each gap of up to N
    /// us between batches (at most one core per busy queue); an idle queue costs nothing once
    /// the window has passed.
    #[arg(long, value_name = "N", default_value_t = splitvisor_blk::DEFAULT_POLL_US)]
    poll_us: u64,
    /// Disk ID returned by GET_ID (at most 20 bytes) [default: image file name, truncated].
    #[arg(long, visible_aliases = ["id", "disk-id"], value_name = "ID")]
    serial: Option<String>,
    /// Serve `GET /stats` (the STATS counters, uptime, connection state) over HTTP on this
    /// Unix socket (mode 0600; a stale one is replaced, removed at exit).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace (RUST_LOG overrides it).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
    /// seccomp filter once set-up is done: `on` kills the daemon with SIGSYS on a system call
    /// outside its allow-list (saying which), `log` lets it through but logs it in the kernel
    /// log (dmesg, type=1326), `off` does not filter. Capabilities are dropped in every mode.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompMode::On)]
    seccomp: SeccompMode,
}

fn default_serial(image: &std::path::Path) -> String {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut end = name.len().min(20);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .parse_env("RUST_LOG")
        .init();
    splitvisor_blk::seccomp::set_mode(cli.seccomp);
    let config = Config {
        serial: cli.serial.unwrap_or_else(|| default_serial(&cli.image)),
        socket: cli.socket,
        image: cli.image,
        readonly: cli.readonly,
        queues: cli.queues,
        queue_size: cli.queue_size,
        direct: cli.direct,
        poll_us: cli.poll_us,
        share: cli.share,
        api_socket: cli.api_socket,
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            splitvisor_wire::host::error::report("splitvisor-blk", &e);
            ExitCode::FAILURE
        }
    }
}
