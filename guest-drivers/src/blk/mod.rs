//! The block-device interface both disk drivers (virtio-blk, ATA PIO) implement, so that the
//! block tasks are written once: queued submission, one notification per batch, polled
//! completions; plus synchronous helpers built on top.

pub mod pattern;

use core::fmt;

/// Bytes per sector: the unit of every offset and length here (virtio-blk and ATA alike).
pub const SECTOR: u64 = 512;

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

/// One request: `len` bytes at `sector` from/to the buffer at guest-physical `buf` (identity
/// mapped, so also its address). `tag` comes back in the completion.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub op: Op,
    pub sector: u64,
    pub buf: u64,
    pub len: u32,
    pub tag: u32,
}

/// A request's device-reported status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStatus {
    Ok,
    IoErr,
    Unsupported,
}

impl IoStatus {
    pub fn name(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::IoErr => "ioerr",
            IoStatus::Unsupported => "unsupp",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub tag: u32,
    pub status: IoStatus,
}

/// Why a driver could not go on (distinct from a request's I/O status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// No device of the kind asked for was announced or found.
    NoDevice(&'static str),
    /// Device initialisation failed (the message says at which step).
    Init(&'static str),
    /// The bump heap could not provide ring or buffer memory.
    NoMemory,
    /// No free slot: more requests than `queue_depth` in flight.
    QueueFull,
    /// A request the driver cannot express (bad length or alignment).
    BadRequest,
    /// No progress for the timeout while requests were pending.
    Timeout(&'static str),
    /// The device set DEVICE_NEEDS_RESET (e.g. its backend died).
    NeedsReset,
    /// The device returned something impossible (e.g. a used id out of range).
    DeviceBug(&'static str),
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            BlkError::NoDevice(what) => write!(f, "no {what} device"),
            BlkError::Init(step) => write!(f, "device initialisation failed: {step}"),
            BlkError::NoMemory => write!(f, "out of guest heap memory"),
            BlkError::QueueFull => write!(f, "request queue full"),
            BlkError::BadRequest => write!(f, "request length not a multiple of 512 or too big"),
            BlkError::Timeout(what) => write!(f, "{what}: request timed out"),
            BlkError::NeedsReset => write!(f, "virtio-blk: device needs reset (backend gone?)"),
            BlkError::DeviceBug(what) => write!(f, "device misbehaved: {what}"),
        }
    }
}

/// A disk driven by polling.
pub trait BlockDevice {
    /// `"virtio"` or `"ata"`.
    fn kind(&self) -> &'static str;
    /// Capacity in 512-byte sectors.
    fn capacity(&self) -> u64;
    /// The device says it is read-only (virtio-blk `VIRTIO_BLK_F_RO`).
    fn read_only(&self) -> bool;
    /// Requests that may be in flight at once (1 for ATA).
    fn queue_depth(&self) -> usize;
    /// Largest data length of one request in bytes.
    fn max_request_bytes(&self) -> u32;
    /// Number of hardware queues requests are spread over.
    fn queues(&self) -> usize;
    /// Queues `req`; it may not reach the device before `kick`.
    fn submit(&mut self, req: &Request) -> Result<(), BlkError>;
    /// Makes queued requests visible to the device, notifying it only where needed.
    fn kick(&mut self);
    /// Collects finished requests into `out` without waiting; an error when the device broke or
    /// requests were pending without progress for the timeout.
    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, BlkError>;
    /// Notifications (QueueNotify writes) so far.
    fn kicks(&self) -> u64;
    /// Requests completed per queue (for reports); returns how many queues were written.
    fn queue_counts(&self, out: &mut [u64]) -> usize;
}

/// Runs one request to completion.
pub fn run_one(dev: &mut dyn BlockDevice, req: Request) -> Result<IoStatus, BlkError> {
    dev.submit(&req)?;
    dev.kick();
    let mut done = [Completion {
        tag: 0,
        status: IoStatus::Ok,
    }; 1];
    loop {
        if dev.poll(&mut done)? == 1 {
            return Ok(done[0].status);
        }
        core::hint::spin_loop();
    }
}

/// Reads or writes `[sector, sector + len / 512)` through the buffer at `buf`, in requests
/// of at most `max_request_bytes`, keeping up to `queue_depth` of them in flight.
/// Returns the first non-OK status (or OK) and how many requests failed.
pub fn transfer(
    dev: &mut dyn BlockDevice,
    op: Op,
    sector: u64,
    buf: u64,
    len: u64,
) -> Result<Transferred, BlkError> {
    let chunk = u64::from(dev.max_request_bytes().min(1 << 20)) & !(SECTOR - 1);
    if chunk == 0 || !len.is_multiple_of(SECTOR) {
        return Err(BlkError::BadRequest);
    }
    let depth = dev.queue_depth().max(1);
    let (mut next, mut in_flight) = (0u64, 0usize);
    let mut result = Transferred {
        status: IoStatus::Ok,
        errors: 0,
    };
    let mut done = [Completion {
        tag: 0,
        status: IoStatus::Ok,
    }; 32];
    while next < len || in_flight > 0 {
        while next < len && in_flight < depth {
            let n = chunk.min(len - next);
            let req = Request {
                op,
                sector: sector + next / SECTOR,
                buf: buf + next,
                len: n as u32,
                tag: 0,
            };
            dev.submit(&req)?;
            next += n;
            in_flight += 1;
        }
        dev.kick();
        let got = dev.poll(&mut done)?;
        for c in done[..got].iter().filter(|c| c.status != IoStatus::Ok) {
            if result.status == IoStatus::Ok {
                result.status = c.status;
            }
            result.errors += 1;
        }
        in_flight = in_flight.saturating_sub(got);
    }
    Ok(result)
}

/// The outcome of `transfer`.
#[derive(Clone, Copy, Debug)]
pub struct Transferred {
    pub status: IoStatus,
    pub errors: u64,
}
