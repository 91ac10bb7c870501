//! splitvisor-blk: a vhost-user-blk backend daemon serving a raw image file.

pub mod backend;
pub mod disk;
pub mod request;
pub mod socket;
pub mod stats;

use std::path::PathBuf;
use std::sync::Arc;

use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{feature_names, BlkBackend};
use crate::disk::{Disk, DiskError, FileDisk};
use crate::request::{DeviceInfo, Limits, SECTOR_SIZE};
use crate::socket::{SocketError, SocketGuard};
use crate::stats::DeviceStats;

/// Most queues a device can have (vhost-user-backend maps queues to threads with a u64 mask).
pub const MAX_QUEUES: usize = 64;
/// Sectors one discard/write-zeroes range may cover (16 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 25;
/// Ranges one discard/write-zeroes request may carry.
pub const MAX_RANGES: u32 = 32;

/// Everything the daemon needs, parsed from the command line by `main`.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub readonly: bool,
    pub queues: usize,
    pub queue_size: usize,
    pub direct: bool,
    /// GET_ID answer, at most 20 bytes.
    pub serial: String,
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
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    // vhost_user_backend::Error implements Display but not std::error::Error, so its text
    // is carried here instead of as a source.
    #[error("cannot create the vhost-user device for {socket}: {reason}")]
    Daemon { socket: PathBuf, reason: String },
    #[error("cannot accept a frontend connection on {socket}: {reason}")]
    Accept { socket: PathBuf, reason: String },
}

fn validate(config: &Config) -> Result<(), RunError> {
    if config.queues == 0 || config.queues > MAX_QUEUES {
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
    let disk: Arc<dyn Disk> = Arc::new(FileDisk::open(
        &config.image,
        config.readonly,
        config.direct,
    )?);
    let info = device_info(&config, disk.len());
    let stats = Arc::new(DeviceStats::new(config.queues));
    let (listener, guard) = socket::bind(&config.socket)?;
    let guard = Arc::new(guard);
    handle_signals(guard.clone(), stats.clone(), disk.clone()).map_err(RunError::Signals)?;
    let mut listener = Listener::from(listener);
    info!(
        "serving {} ({} sectors{}{}) on {} with {} queue(s) of {}",
        config.image.display(),
        info.capacity_sectors,
        if config.readonly { ", read-only" } else { "" },
        if config.direct { ", O_DIRECT" } else { "" },
        guard.path().display(),
        config.queues,
        config.queue_size
    );
    loop {
        serve_one(&config, &disk, &info, &stats, &mut listener)?;
        eprintln!("STATS {}", stats.to_json());
    }
}

/// Accept one frontend and serve it until it disconnects.
/// Each connection gets a fresh backend, vrings and worker threads; the disk and the counters
/// are shared.
fn serve_one(
    config: &Config,
    disk: &Arc<dyn Disk>,
    info: &DeviceInfo,
    stats: &Arc<DeviceStats>,
    listener: &mut Listener,
) -> Result<(), RunError> {
    let socket = config.socket.clone();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(BlkBackend::new(
        disk.clone(),
        info.clone(),
        config.queues,
        config.queue_size,
        stats.clone(),
        mem.clone(),
    ));
    let mut daemon =
        VhostUserDaemon::new("splitvisor-blk".into(), backend.clone(), mem).map_err(|e| {
            RunError::Daemon {
                socket: socket.clone(),
                reason: e.to_string(),
            }
        })?;
    daemon.start(listener).map_err(|e| RunError::Accept {
        socket,
        reason: e.to_string(),
    })?;
    info!("frontend connected on {}", config.socket.display());
    let result = daemon.wait();
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    let acked = backend.acked();
    match result {
        // A frontend closing the socket between messages is an ordinary disconnect.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => info!(
            "frontend disconnected (features {acked:#x}: {})",
            feature_names(acked)
        ),
        Err(e) => warn!("frontend connection ended with an error (features {acked:#x}): {e}"),
    }
    Ok(())
}

/// Block SIGINT/SIGTERM in every thread and handle them in a dedicated one: flush the image,
/// remove the socket and lock file, print the counters, exit 0.
fn handle_signals(
    guard: Arc<SocketGuard>,
    stats: Arc<DeviceStats>,
    disk: Arc<dyn Disk>,
) -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    // SAFETY: `set` is initialised; the old mask is not needed. Threads spawned later
    // inherit the mask, so only the sigwait thread below receives these signals.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid for the duration of the call.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                error!("sigwait failed: {}", std::io::Error::from_raw_os_error(rc));
            }
            info!("signal {sig} received, removing {}", guard.path().display());
            guard.cleanup();
            if let Err(e) = disk.flush() {
                warn!("cannot flush the image on exit: {e}");
            }
            eprintln!("STATS {}", stats.to_json());
            std::process::exit(0);
        })?;
    Ok(())
}
