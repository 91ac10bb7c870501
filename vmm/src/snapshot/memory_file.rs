//! Guest RAM to and from `memory.bin`: only pages holding data are written (the rest stay
//! holes of a sparse file) and only those are read back, so saving and restoring cost what the
//! guest used, not its size.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::format::{MemoryLayout, MemoryRegion, SnapshotError, MEMORY_FILE, PAGE_SIZE};
use crate::memory::GuestMemory;

/// Bytes copied per read; a multiple of `PAGE_SIZE`.
const CHUNK: u64 = 1 << 20;

/// Guest RAM's regions, laid out back to back in `memory.bin` (as in the guest's memfd).
pub fn layout_of(memory: &GuestMemory) -> MemoryLayout {
    let mut file_offset = 0;
    let regions = memory
        .iter()
        .map(|region| {
            let entry = MemoryRegion {
                guest_addr: region.start_addr().0,
                size: region.len(),
                file_offset,
            };
            file_offset += region.len();
            entry
        })
        .collect();
    MemoryLayout {
        size: file_offset,
        page_size: PAGE_SIZE,
        regions,
    }
}

/// Writes guest RAM to `DIR/memory.bin`. The VM must be paused (and its backends quiet) or the
/// copy is torn.
pub fn save(dir: &Path, memory: &GuestMemory) -> Result<MemoryLayout, SnapshotError> {
    let layout = layout_of(memory);
    let path = dir.join(MEMORY_FILE);
    let write_error = |source| SnapshotError::Write {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(write_error)?;
    // The whole length at once: what is never written below reads back as zeros.
    file.set_len(layout.size).map_err(write_error)?;
    let mut buffer = vec![0u8; CHUNK as usize];
    for (region, entry) in memory.iter().zip(&layout.regions) {
        // The memfd's holes are pages the guest never touched: no need to even read them.
        let extents = match region.file_offset() {
            Some(fo) => data_extents(fo.file(), fo.start(), fo.start() + entry.size)
                .into_iter()
                .map(|(start, end)| (start - fo.start(), end - fo.start()))
                .collect(),
            None => vec![(0, entry.size)],
        };
        for (start, end) in extents {
            copy_out(memory, entry, (start, end), &file, &mut buffer).map_err(|e| match e {
                CopyError::Memory(e) => e,
                CopyError::Io(source) => SnapshotError::Write {
                    path: path.clone(),
                    source,
                },
            })?;
        }
    }
    file.sync_all().map_err(write_error)?;
    Ok(layout)
}

enum CopyError {
    Memory(SnapshotError),
    Io(std::io::Error),
}

/// Copies `[start, end)` of one region to the file, skipping all-zero pages.
fn copy_out(
    memory: &GuestMemory,
    entry: &MemoryRegion,
    (start, end): (u64, u64),
    file: &File,
    buffer: &mut [u8],
) -> Result<(), CopyError> {
    let mut offset = start;
    while offset < end {
        let len = (end - offset).min(CHUNK) as usize;
        let addr = entry.guest_addr + offset;
        memory
            .read_slice(&mut buffer[..len], GuestAddress(addr))
            .map_err(|source| CopyError::Memory(SnapshotError::GuestMemory { addr, source }))?;
        for (i, page) in buffer[..len].chunks(PAGE_SIZE as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                let at = entry.file_offset + offset + (i as u64) * PAGE_SIZE;
                file.write_all_at(page, at).map_err(CopyError::Io)?;
            }
        }
        offset += len as u64;
    }
    Ok(())
}

/// Fills `memory`, a fresh (all-zero) guest RAM with the snapshot's layout, from
/// `DIR/memory.bin`. Holes are skipped, so memory that was not fresh would keep stale pages.
pub fn restore(
    dir: &Path,
    layout: &MemoryLayout,
    memory: &GuestMemory,
) -> Result<(), SnapshotError> {
    layout.check_target(&layout_of(memory))?;
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => SnapshotError::Missing { path: path.clone() },
        _ => SnapshotError::Read {
            path: path.clone(),
            source,
        },
    })?;
    let read_error = |path: &PathBuf, source| SnapshotError::Read {
        path: path.clone(),
        source,
    };
    let length = file.metadata().map_err(|e| read_error(&path, e))?.len();
    if length != layout.size {
        return Err(SnapshotError::Truncated {
            path,
            detail: format!(
                "{length} bytes, the manifest says {} bytes of guest memory",
                layout.size
            ),
        });
    }
    let mut buffer = vec![0u8; CHUNK as usize];
    for entry in &layout.regions {
        let region_end = entry.file_offset + entry.size;
        for (start, end) in data_extents(&file, entry.file_offset, region_end) {
            copy_in(memory, entry, (start, end), &file, &mut buffer).map_err(|e| match e {
                CopyError::Memory(e) => e,
                CopyError::Io(source) => read_error(&path, source),
            })?;
        }
    }
    Ok(())
}

/// Copies file range `[start, end)` (inside `entry`) into guest memory, skipping zero pages.
fn copy_in(
    memory: &GuestMemory,
    entry: &MemoryRegion,
    (start, end): (u64, u64),
    file: &File,
    buffer: &mut [u8],
) -> Result<(), CopyError> {
    let mut offset = start;
    while offset < end {
        let len = (end - offset).min(CHUNK) as usize;
        file.read_exact_at(&mut buffer[..len], offset)
            .map_err(CopyError::Io)?;
        for (i, page) in buffer[..len].chunks(PAGE_SIZE as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                let addr = entry.guest_addr + (offset - entry.file_offset) + (i as u64) * PAGE_SIZE;
                memory
                    .write_slice(page, GuestAddress(addr))
                    .map_err(|source| {
                        CopyError::Memory(SnapshotError::GuestMemory { addr, source })
                    })?;
            }
        }
        offset += len as u64;
    }
    Ok(())
}

/// The ranges of `[start, end)` in `file` that hold data (`SEEK_DATA`/`SEEK_HOLE`), aligned
/// out to whole pages. A file system without hole reporting gets the whole range.
pub fn data_extents(file: &File, start: u64, end: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence| {
        // SAFETY: lseek on a valid fd; it only moves this descriptor's file position, which
        // nothing here relies on (all I/O is positional).
        let at = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
        u64::try_from(at).ok()
    };
    let mut extents = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA) else {
            // ENXIO: no data after `at`. Any other error: no hole support, copy it all.
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                extents.push((at, end));
            }
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE).unwrap_or(end).min(end);
        let aligned_start = data - (data - start) % PAGE_SIZE;
        let aligned_end = (start + (hole - start).div_ceil(PAGE_SIZE) * PAGE_SIZE).min(end);
        extents.push((aligned_start, aligned_end));
        at = aligned_end;
    }
    extents
}
