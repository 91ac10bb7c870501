//! splitvisor-blk: a vhost-user-blk backend daemon serving a raw image file.

pub mod backend;
pub mod disk;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod iovec;
pub mod live;
pub mod request;
pub mod seccomp;
pub mod stats;

// The vhost-user server's workers rate-limit their log lines as the daemon's device does.
pub use splitvisor_wire::host::loglimit;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ::vhost::vhost_user::Listener;
use log::{info, warn};
use splitvisor_vhost_server as server;
use splitvisor_wire::host::imagelock::LockMode;
use splitvisor_wire::host::signals;
use splitvisor_wire::host::socket::{self, SocketError, SocketGuard};
use splitvisor_wire::host::stats_server;
use splitvisor_wire::stats::stats_line;
use splitvisor_wire::MAX_QUEUES;

use crate::backend::{feature_names, BlkBackend};
use crate::disk::{Disk, DiskError, FileDisk};
use crate::live::{Live, Tracked};
use crate::request::{DeviceInfo, Limits, SECTOR_SIZE};
use crate::stats::DeviceStats;

/// Most queues offered by default.
pub const DEFAULT_MAX_QUEUES: usize = 16;

/// Queues offered without `--queues`: one per host CPU, at most `DEFAULT_MAX_QUEUES`, so
/// that a frontend with one queue per vCPU (QEMU's vhost-user-blk-pci default) fits; a
/// frontend enabling fewer is served with those.
pub fn default_queues() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, DEFAULT_MAX_QUEUES)
}

/// Test-only: milliseconds to sleep before executing each request, so that integration tests
/// can kill the daemon while requests are in flight. Not a user setting; never set it.
pub const TEST_DELAY_ENV: &str = "SPLITVISOR_BLK_TEST_DELAY_MS";
/// Sectors one discard/write-zeroes range may cover (16 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 25;
/// Ranges one discard/write-zeroes request may carry.
pub const MAX_RANGES: u32 = 32;

/// Default of `--poll-us`: long enough to catch a driver that submits again right after its
/// completions, short enough that a queue that went idle sleeps within 50 us.
pub const DEFAULT_POLL_US: u64 = 50;

/// Everything the daemon needs, parsed from the command line by `main`.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub readonly: bool,
    pub queues: usize,
    pub queue_size: usize,
    pub direct: bool,
    /// Microseconds a worker keeps polling its queue after a batch (`--poll-us`; 0: never).
    pub poll_us: u64,
    /// Take a shared image lock even when writing (`--share`): for two daemons that take
    /// turns on one image.
    pub share: bool,
    /// GET_ID answer, at most 20 bytes.
    pub serial: String,
    /// Where to serve `GET /stats`, if anywhere.
    pub api_socket: Option<PathBuf>,
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--queues must be between 1 and {MAX_QUEUES}, got {0}")]
    Queues(usize),
    #[error("--queue-size must be a power of two between 2 and 32768, got {0}")]
    QueueSize(usize),
    #[error("--serial is {0} bytes, at most 20 fit in a virtio-blk ID")]
    Serial(usize),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    StatsApi(#[from] stats_server::StatsApiError),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error("cannot accept a frontend connection on {socket}")]
    Accept {
        socket: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("cannot confine the daemon")]
    Confine(#[from] splitvisor_confine::ConfineError),
}

fn validate(config: &Config) -> Result<(), RunError> {
    // The most queues a device can have is the VMM's limit too.
    if config.queues == 0 || config.queues > usize::from(MAX_QUEUES) {
        return Err(RunError::Queues(config.queues));
    }
    let qs = config.queue_size;
    if !(2..=32768).contains(&qs) || !qs.is_power_of_two() {
        return Err(RunError::QueueSize(qs));
    }
    if config.serial.len() > 20 {
        return Err(RunError::Serial(config.serial.len()));
    }
    Ok(())
}

/// The device description shared by every connection.
pub fn device_info(config: &Config, disk_len: u64) -> DeviceInfo {
    let mut serial = [0u8; 20];
    let bytes = config.serial.as_bytes();
    let n = bytes.len().min(serial.len());
    serial[..n].copy_from_slice(&bytes[..n]);
    // A chain holds the header and the status byte besides the data.
    let seg_max = u32::try_from(config.queue_size.saturating_sub(2)).unwrap_or(u32::MAX);
    DeviceInfo {
        capacity_sectors: disk_len / SECTOR_SIZE,
        readonly: config.readonly,
        serial,
        limits: Limits {
            seg_max: seg_max.max(1),
            max_discard_sectors: MAX_RANGE_SECTORS,
            max_discard_seg: MAX_RANGES,
            max_write_zeroes_sectors: MAX_RANGE_SECTORS,
            max_write_zeroes_seg: MAX_RANGES,
        },
    }
}

/// Open the image, listen on the socket, and serve one frontend after another until a
/// SIGINT/SIGTERM.
pub fn run(config: Config) -> Result<(), RunError> {
    validate(&config)?;
    // The socket first: a second daemon on the same socket (and image) is told about the
    // socket, the more direct conflict; its guard removes the socket again if the image fails.
    let (listener, guard) = socket::bind_locked(&config.socket, "--socket")?;
    let lock = if config.readonly || config.share {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let disk: Arc<dyn Disk> = Arc::new(FileDisk::open(
        &config.image,
        config.readonly,
        config.direct,
        lock,
    )?);
    let info = device_info(&config, disk.len());
    let stats = Arc::new(DeviceStats::new(config.queues));
    let guard = Arc::new(guard);
    handle_signals(guard.clone(), stats.clone(), disk.clone()).map_err(RunError::Signals)?;
    let live = Arc::new(Live::default());
    if let Some(path) = &config.api_socket {
        let (live, stats) = (live.clone(), stats.clone());
        stats_server::start(path, Arc::new(move || live.snapshot(&stats)))?;
    }
    let mut listener = Listener::from(listener);
    info!(
        "serving {} ({} sectors{}{}{}) on {} with {} queue(s) of {}",
        config.image.display(),
        info.capacity_sectors,
        if config.readonly { ", read-only" } else { "" },
        if config.share { ", shared lock" } else { "" },
        if config.direct { ", O_DIRECT" } else { "" },
        guard.path().display(),
        config.queues,
        config.queue_size
    );
    // validate() bounded the queue size by 32768.
    let queue_size = u16::try_from(config.queue_size).unwrap_or(u16::MAX);
    let device = Arc::new(Tracked {
        device: BlkBackend::new(disk, info, config.queues, queue_size, stats.clone())
            .with_request_delay(test_request_delay())
            .with_poll_window(Duration::from_micros(config.poll_us)),
        live: live.clone(),
    });
    // Image open, socket bound, signal and stats threads started: nothing privileged is left
    // to do. The filter covers every thread started so far (TSYNC) and every later one.
    seccomp::confine()?;
    loop {
        let end = server::serve_frontend(&mut listener, device.clone()).map_err(|source| {
            stats_server::cleanup();
            RunError::Accept {
                socket: config.socket.clone(),
                source,
            }
        })?;
        live.frontend_ended();
        let acked = end.acked_features;
        match end.error {
            None => info!(
                "frontend disconnected (features {acked:#x}: {})",
                feature_names(acked)
            ),
            Some(e) => warn!(
                "frontend connection on {} ended with an error (features {acked:#x}): {e}",
                config.socket.display()
            ),
        }
        eprintln!("{}", stats_line(&stats.line()));
    }
}

/// The test-only request delay from `TEST_DELAY_ENV`, if set.
fn test_request_delay() -> Option<Duration> {
    let ms: u64 = std::env::var(TEST_DELAY_ENV).ok()?.parse().ok()?;
    warn!("{TEST_DELAY_ENV}={ms}: delaying every request (test-only setting)");
    Some(Duration::from_millis(ms))
}

/// Take SIGINT/SIGTERM/SIGUSR1 on a thread of their own: SIGUSR1 prints the counters and
/// goes on; the others remove the socket, lock file and stats socket, flush the image, print
/// the counters, exit 0.
fn handle_signals(
    guard: Arc<SocketGuard>,
    stats: Arc<DeviceStats>,
    disk: Arc<dyn Disk>,
) -> std::io::Result<()> {
    let report_stats = stats.clone();
    signals::spawn_daemon_signal_thread(
        move || eprintln!("{}", stats_line(&report_stats.line())),
        move || {
            guard.cleanup();
            if let Err(e) = disk.flush() {
                warn!("cannot flush the image on exit: {e}");
            }
            eprintln!("{}", stats_line(&stats.line()));
        },
    )
}
