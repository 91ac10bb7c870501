//! The source's side of the stream: the header and its verdict, guest memory (only pages
//! holding data: the destination's memory starts all zero), the state and the handoff.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::Bitmaps;
use super::wire::{Kind, Stream, Verdict, WireError};
use super::Hello;
use crate::memory::GuestMemory;
use crate::snapshot::format::{Manifest, PAGE_SIZE};
use crate::snapshot::memory_file::data_extents;

/// Bytes read from guest memory at a time; a multiple of `PAGE_SIZE`.
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("the destination could not start the VM: {0}")]
    Failed(String),
    #[error("sending to the destination failed")]
    Wire(#[from] WireError),
    #[error("could not read guest memory at {addr:#x}")]
    ReadMemory {
        addr: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Sends the header and waits for the destination's verdict.
pub fn propose(stream: &mut Stream, hello: &Hello) -> Result<(), SendError> {
    stream.send_json(Kind::Hello, hello)?;
    match stream.receive_json(Kind::Verdict)? {
        Verdict::Accept => Ok(()),
        Verdict::Refuse(why) => Err(SendError::Refused(why)),
    }
}

/// What was sent, for the report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// Bytes of page data (without framing).
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Sends every page of guest memory that holds data. The VM must be paused and its backends'
/// rings stopped, or the copy is torn.
pub fn memory(stream: &mut Stream, memory: &GuestMemory) -> Result<Sent, SendError> {
    let start = Instant::now();
    let mut sent = 0;
    let mut buffer = vec![0u8; CHUNK];
    for region in memory.iter() {
        let (base, len) = (region.start_addr().0, region.len());
        // The memfd's holes are pages the guest never touched: not even read.
        let extents = match region.file_offset() {
            Some(fo) => data_extents(fo.file(), fo.start(), fo.start() + len)
                .into_iter()
                .map(|(s, e)| (s - fo.start(), e - fo.start()))
                .collect(),
            None => vec![(0, len)],
        };
        for (mut offset, end) in extents {
            while offset < end {
                let n = ((end - offset) as usize).min(CHUNK);
                let addr = base + offset;
                read(memory, region, offset, &mut buffer[..n], addr)?;
                sent += send_data_runs(stream, addr, &buffer[..n])?;
                offset += n as u64;
            }
        }
    }
    Ok(Sent {
        bytes: sent,
        elapsed: start.elapsed(),
    })
}

/// Reads `buffer.len()` bytes at `offset` of `region` (guest address `addr`): through its
/// memfd (one pread) or, for memory without a file, the mapping.
fn read(
    memory: &GuestMemory,
    region: &vm_memory::GuestRegionMmap<()>,
    offset: u64,
    buffer: &mut [u8],
    addr: u64,
) -> Result<(), SendError> {
    let result = match region.file_offset() {
        Some(fo) => fo.file().read_exact_at(buffer, fo.start() + offset),
        None => memory
            .read_slice(buffer, GuestAddress(addr))
            .map_err(std::io::Error::other),
    };
    result.map_err(|source| SendError::ReadMemory { addr, source })
}

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Compared with memcmp: much faster than a byte loop in unoptimized builds too.
fn is_zero(page: &[u8]) -> bool {
    page == &ZERO_PAGE[..page.len()]
}

/// Sends each run of pages of `data` (at guest address `addr`) that are not all zero, one
/// frame per run; returns the bytes sent.
fn send_data_runs(stream: &mut Stream, addr: u64, data: &[u8]) -> Result<u64, SendError> {
    let page = PAGE_SIZE as usize;
    let mut sent = 0;
    let mut run_start = None;
    for i in 0..=data.len().div_ceil(page) {
        let at = i * page;
        let has_data = at < data.len() && !is_zero(&data[at..data.len().min(at + page)]);
        match (has_data, run_start) {
            (true, None) => run_start = Some(at),
            (false, Some(first)) => {
                let run = &data[first..data.len().min(at)];
                let guest = addr + first as u64;
                stream.send(Kind::Pages, &[&guest.to_le_bytes(), run])?;
                sent += run.len() as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(sent)
}

/// Sends the captured state.
pub fn state(stream: &mut Stream, manifest: &Manifest) -> Result<(), SendError> {
    stream.send_json(Kind::State, manifest)?;
    Ok(())
}

/// Tells the destination the backends are free (the caller closed its connections) and waits
/// up to `wait` for it to restore the VM and connect to them.
pub fn hand_off(stream: &mut Stream, wait: Duration) -> Result<(), SendError> {
    stream.send(Kind::Handoff, &[])?;
    stream.set_read_timeout(wait)?;
    match stream.receive_json(Kind::Verdict)? {
        Verdict::Accept => Ok(()),
        Verdict::Refuse(why) => Err(SendError::Failed(why)),
    }
}

/// Sends the pages set in `bitmaps` (one per region, in order), zero or not: a page the guest
/// cleared must reach the destination too. Runs of dirty pages go in one frame each, at most
/// `CHUNK` bytes.
pub fn dirty_pages(
    stream: &mut Stream,
    memory: &GuestMemory,
    bitmaps: &Bitmaps,
) -> Result<u64, SendError> {
    let mut sent = 0;
    let mut buffer = vec![0u8; CHUNK];
    let max_pages = (CHUNK as u64) / PAGE_SIZE;
    for (region, bitmap) in memory.iter().zip(bitmaps) {
        let pages = region.len() / PAGE_SIZE;
        let dirty = |page: u64| bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0;
        let mut page = 0;
        while page < pages {
            if !dirty(page) {
                page += 1;
                continue;
            }
            let first = page;
            while page < pages && dirty(page) && page - first < max_pages {
                page += 1;
            }
            let (offset, len) = (first * PAGE_SIZE, ((page - first) * PAGE_SIZE) as usize);
            let addr = region.start_addr().0 + offset;
            read(memory, region, offset, &mut buffer[..len], addr)?;
            stream.send(Kind::Pages, &[&addr.to_le_bytes(), &buffer[..len]])?;
            sent += len as u64;
        }
    }
    Ok(sent)
}
