//! virtio-blk request handling: validates a descriptor chain, runs it against a `Disk`, and
//! writes the status byte. Pure logic, no vhost-user; a bad request never panics.

use std::io;
use std::mem::size_of;

use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use crate::disk::Disk;
use crate::iovec::IoVecs;
use stream::DataStream;

/// Bytes per virtio-blk sector (the unit of `sector` fields and of the capacity).
pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: usize = size_of::<virtio_blk_outhdr>();
const RANGE_LEN: usize = size_of::<virtio_blk_discard_write_zeroes>();
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Size of the bounce buffer data moves through between guest memory and the disk.
pub const CHUNK_SIZE: usize = 256 * 1024;
const CHUNK_ALIGN: usize = 4096;

/// Limits advertised in the config space and enforced on every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub seg_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

/// What the request executor needs to know about the device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub capacity_sectors: u64,
    pub readonly: bool,
    /// GET_ID answer: NUL-padded, not necessarily NUL-terminated.
    pub serial: [u8; ID_BYTES],
    pub limits: Limits,
}

/// A request that could not be served; `status()` is what the guest sees.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain is empty or unreadable")]
    EmptyChain,
    #[error("status descriptor is not device-writable")]
    StatusReadOnly,
    #[error("status descriptor has length 0")]
    StatusEmpty,
    #[error("status byte of descriptor {addr:#x}+{len} is outside guest memory")]
    StatusOutsideMemory { addr: u64, len: u32 },
    #[error("chain has no request header")]
    MissingHeader,
    #[error("request header descriptor is device-writable")]
    HeaderWritable,
    #[error("request header is {0} bytes, need at least 16")]
    HeaderTooShort(u32),
    #[error("request header at {0:#x} is outside guest memory")]
    HeaderOutsideMemory(u64),
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("data descriptor {index} of a {kind} request has the wrong direction")]
    DataDirection { index: usize, kind: &'static str },
    #[error("data buffer {addr:#x}+{len} is outside guest memory")]
    DataOutsideMemory { addr: u64, len: u32 },
    #[error("{count} data descriptors exceed seg_max {max}")]
    TooManySegments { count: usize, max: u32 },
    #[error("flush request carries {0} data descriptors")]
    FlushWithData(usize),
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{sectors} exceed the capacity of {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("{0} request to a read-only device")]
    ReadOnly(&'static str),
    #[error(
        "discard/write-zeroes payload of {0} bytes is not a non-empty array of 16-byte ranges"
    )]
    BadRangePayload(u64),
    #[error("{count} discard/write-zeroes ranges exceed the maximum of {max}")]
    TooManyRanges { count: u64, max: u32 },
    #[error("{sectors} sectors in one range exceed the maximum of {max}")]
    RangeTooLarge { sectors: u32, max: u32 },
    #[error("unsupported {kind} flags {flags:#x}")]
    UnsupportedFlags { kind: &'static str, flags: u32 },
    #[error("cannot access guest memory")]
    Memory(#[source] GuestMemoryError),
    #[error("{op} of the image failed")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl RequestError {
    /// The virtio-blk status byte for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags { .. } => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// The outcome of one chain: what to put in the used ring and what to count.
#[derive(Debug)]
pub struct Completion {
    pub head: u16,
    /// Bytes written into device-writable buffers, status byte included; 0 when even the
    /// status byte could not be written.
    pub used_len: u32,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Why the request failed, if it did.
    pub error: Option<RequestError>,
}

/// Per-queue scratch space reused across requests: the scatter-gather list of a zero-copy
/// transfer, and a page-aligned bounce buffer for the transfers that cannot be zero-copy
/// (O_DIRECT with a misaligned guest buffer), allocated on first use.
#[derive(Default)]
pub struct IoBuffer {
    iov: IoVecs,
    raw: Vec<u8>,
    start: usize,
}

impl IoBuffer {
    /// The first `len` (at most `CHUNK_SIZE`) bytes of the aligned buffer.
    fn chunk(&mut self, len: usize) -> &mut [u8] {
        if self.raw.is_empty() {
            self.raw = vec![0u8; CHUNK_SIZE + CHUNK_ALIGN];
            self.start = (CHUNK_ALIGN - self.raw.as_ptr() as usize % CHUNK_ALIGN) % CHUNK_ALIGN;
        }
        &mut self.raw[self.start..self.start + len.min(CHUNK_SIZE)]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

impl Kind {
    fn from_type(t: u32) -> Result<Kind, RequestError> {
        Ok(match t {
            VIRTIO_BLK_T_IN => Kind::In,
            VIRTIO_BLK_T_OUT => Kind::Out,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_GET_ID => Kind::GetId,
            VIRTIO_BLK_T_DISCARD => Kind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
            other => return Err(RequestError::UnsupportedType(other)),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::In => "read",
            Kind::Out => "write",
            Kind::Flush => "flush",
            Kind::GetId => "get-id",
            Kind::Discard => "discard",
            Kind::WriteZeroes => "write-zeroes",
        }
    }

    /// Whether the data descriptors are written by the device.
    fn device_writes_data(self) -> bool {
        matches!(self, Kind::In | Kind::GetId)
    }

    fn modifies_disk(self) -> bool {
        matches!(self, Kind::Out | Kind::Discard | Kind::WriteZeroes)
    }
}

struct Header {
    kind: u32,
    sector: u64,
}

/// Successful execution: bytes the device wrote into guest buffers, and traffic to count.
#[derive(Default)]
struct Outcome {
    written: u32,
    read_bytes: u64,
    write_bytes: u64,
}

/// Serve the request at `head` whose descriptors (indirect tables already flattened) are
/// `descs`. Never panics on guest-controlled input; always yields a completion.
pub fn process_chain<G: GuestMemory + ?Sized>(
    head: u16,
    descs: &[Descriptor],
    mem: &G,
    dev: &DeviceInfo,
    disk: &dyn Disk,
    buf: &mut IoBuffer,
) -> Completion {
    let dropped = |error| Completion {
        head,
        used_len: 0,
        read_bytes: 0,
        write_bytes: 0,
        error: Some(error),
    };
    let Some((status_desc, rest)) = descs.split_last() else {
        return dropped(RequestError::EmptyChain);
    };
    let status_addr = match status_location(mem, status_desc) {
        Ok(addr) => addr,
        Err(e) => return dropped(e),
    };
    let (status, outcome, error) = match execute(mem, rest, dev, disk, buf) {
        Ok(out) => (VIRTIO_BLK_S_OK as u8, out, None),
        Err(e) => (e.status(), Outcome::default(), Some(e)),
    };
    if let Err(e) = mem.write_obj(status, status_addr) {
        return dropped(RequestError::Memory(e));
    }
    Completion {
        head,
        used_len: outcome.written.saturating_add(1),
        read_bytes: outcome.read_bytes,
        write_bytes: outcome.write_bytes,
        error,
    }
}

/// The status byte is the last byte of the last descriptor, which must be device-writable.
fn status_location<G: GuestMemory + ?Sized>(
    mem: &G,
    desc: &Descriptor,
) -> Result<GuestAddress, RequestError> {
    if !desc.is_write_only() {
        return Err(RequestError::StatusReadOnly);
    }
    let len = desc.len();
    if len == 0 {
        return Err(RequestError::StatusEmpty);
    }
    let outside = || RequestError::StatusOutsideMemory {
        addr: desc.addr().0,
        len,
    };
    let addr = desc
        .addr()
        .0
        .checked_add(u64::from(len) - 1)
        .map(GuestAddress)
        .ok_or_else(outside)?;
    if !mem.check_range(addr, 1, Permissions::Write) {
        return Err(outside());
    }
    Ok(addr)
}

fn read_header<G: GuestMemory + ?Sized>(
    mem: &G,
    desc: &Descriptor,
) -> Result<Header, RequestError> {
    if desc.is_write_only() {
        return Err(RequestError::HeaderWritable);
    }
    if (desc.len() as usize) < HEADER_LEN {
        return Err(RequestError::HeaderTooShort(desc.len()));
    }
    let mut raw = [0u8; HEADER_LEN];
    mem.read_slice(&mut raw, desc.addr())
        .map_err(|_| RequestError::HeaderOutsideMemory(desc.addr().0))?;
    // Layout of virtio_blk_outhdr: le32 type, le32 ioprio, le64 sector.
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..16]);
    Ok(Header {
        kind: u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
        sector: u64::from_le_bytes(sector),
    })
}

fn execute<G: GuestMemory + ?Sized>(
    mem: &G,
    rest: &[Descriptor],
    dev: &DeviceInfo,
    disk: &dyn Disk,
    buf: &mut IoBuffer,
) -> Result<Outcome, RequestError> {
    let (hdr_desc, data) = rest.split_first().ok_or(RequestError::MissingHeader)?;
    let hdr = read_header(mem, hdr_desc)?;
    let kind = Kind::from_type(hdr.kind)?;
    check_data(mem, data, kind, dev.limits.seg_max)?;
    if dev.readonly && kind.modifies_disk() {
        return Err(RequestError::ReadOnly(kind.name()));
    }
    let data_len = data.iter().map(|d| u64::from(d.len())).sum::<u64>();
    match kind {
        Kind::In | Kind::Out => {
            let offset = sector_range(hdr.sector, data_len, dev.capacity_sectors)?;
            let mut stream = DataStream { mem, descs: data };
            if kind == Kind::In {
                stream.disk_to_guest(disk, offset, data_len, buf)
            } else {
                stream.guest_to_disk(disk, offset, data_len, buf)
            }
        }
        Kind::Flush => {
            if !data.is_empty() {
                return Err(RequestError::FlushWithData(data.len()));
            }
            disk.flush().map_err(|source| RequestError::Io {
                op: "flush",
                source,
            })?;
            Ok(Outcome::default())
        }
        Kind::GetId => {
            let n = data_len.min(ID_BYTES as u64) as usize;
            DataStream { mem, descs: data }.scatter(0, &dev.serial[..n])?;
            Ok(Outcome {
                written: n as u32,
                ..Outcome::default()
            })
        }
        Kind::Discard | Kind::WriteZeroes => {
            let ranges = read_ranges(mem, data, data_len, kind, &dev.limits)?;
            apply_ranges(disk, &ranges, kind, dev.capacity_sectors)?;
            Ok(Outcome::default())
        }
    }
}

/// Every data descriptor must lie in guest memory and point the way the request type needs.
fn check_data<G: GuestMemory + ?Sized>(
    mem: &G,
    data: &[Descriptor],
    kind: Kind,
    seg_max: u32,
) -> Result<(), RequestError> {
    if data.len() > seg_max as usize {
        return Err(RequestError::TooManySegments {
            count: data.len(),
            max: seg_max,
        });
    }
    for (index, d) in data.iter().enumerate() {
        if d.is_write_only() != kind.device_writes_data() {
            return Err(RequestError::DataDirection {
                index,
                kind: kind.name(),
            });
        }
        let access = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(RequestError::DataOutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
    }
    Ok(())
}

/// Byte offset of a transfer of `len` bytes at `sector`, checked against the capacity.
fn sector_range(sector: u64, len: u64, capacity: u64) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(len));
    }
    let sectors = len / SECTOR_SIZE;
    check_sectors(sector, sectors, capacity)?;
    // sector + sectors <= capacity, and capacity * 512 is the disk size, so this fits.
    Ok(sector * SECTOR_SIZE)
}

fn check_sectors(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

struct Range {
    sector: u64,
    sectors: u32,
    unmap: bool,
}

/// Parse and validate the `virtio_blk_discard_write_zeroes` array of a discard/write-zeroes.
fn read_ranges<G: GuestMemory + ?Sized>(
    mem: &G,
    data: &[Descriptor],
    data_len: u64,
    kind: Kind,
    limits: &Limits,
) -> Result<Vec<Range>, RequestError> {
    let (max_seg, max_sectors, allowed_flags) = if kind == Kind::Discard {
        (limits.max_discard_seg, limits.max_discard_sectors, 0)
    } else {
        (
            limits.max_write_zeroes_seg,
            limits.max_write_zeroes_sectors,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        )
    };
    if data_len == 0 || !data_len.is_multiple_of(RANGE_LEN as u64) {
        return Err(RequestError::BadRangePayload(data_len));
    }
    let count = data_len / RANGE_LEN as u64;
    if count > u64::from(max_seg) {
        return Err(RequestError::TooManyRanges {
            count,
            max: max_seg,
        });
    }
    // count <= max_seg, so the payload is small.
    let mut raw = vec![0u8; data_len as usize];
    DataStream { mem, descs: data }.gather(0, &mut raw)?;
    let mut ranges = Vec::with_capacity(count as usize);
    for r in raw.chunks_exact(RANGE_LEN) {
        let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&r[..8]);
        let sectors = le32(&r[8..12]);
        let flags = le32(&r[12..16]);
        if flags & !allowed_flags != 0 {
            return Err(RequestError::UnsupportedFlags {
                kind: kind.name(),
                flags,
            });
        }
        if sectors > max_sectors {
            return Err(RequestError::RangeTooLarge {
                sectors,
                max: max_sectors,
            });
        }
        ranges.push(Range {
            sector: u64::from_le_bytes(sector),
            sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(ranges)
}

/// Check every range first so a bad one leaves the disk untouched, then apply them.
fn apply_ranges(
    disk: &dyn Disk,
    ranges: &[Range],
    kind: Kind,
    capacity: u64,
) -> Result<(), RequestError> {
    for r in ranges {
        check_sectors(r.sector, u64::from(r.sectors), capacity)?;
    }
    for r in ranges {
        let (offset, len) = (r.sector * SECTOR_SIZE, u64::from(r.sectors) * SECTOR_SIZE);
        let result = if kind == Kind::Discard {
            disk.discard(offset, len)
        } else {
            disk.write_zeroes(offset, len, r.unmap)
        };
        result.map_err(|source| RequestError::Io {
            op: kind.name(),
            source,
        })?;
    }
    Ok(())
}

mod stream;

#[cfg(test)]
mod tests;
