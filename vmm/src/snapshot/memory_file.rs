//! Guest RAM to and from `memory.bin`: only pages holding data are written (the rest stay
//! holes of a sparse file) and only those are read back, so saving and restoring cost what the
//! guest used, not its size.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::format::{MemoryLayout, MemoryRegion, SnapshotError, MEMORY_FILE, PAGE_SIZE};
use crate::memory::GuestMemory;

/// Bytes copied per read; a multiple of `PAGE_SIZE`.
const CHUNK: u64 = 1 << 20;

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Compared with memcmp: much faster than a byte loop in unoptimized builds too.
fn is_zero(page: &[u8]) -> bool {
    page == &ZERO_PAGE[..page.len()]
}

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
        let memfd = region.file_offset().map(|fo| (fo.file(), fo.start()));
        // The memfd's holes are pages the guest never touched: no need to even read them.
        let extents = match memfd {
            Some((fd, base)) => data_extents(fd, base, base + entry.size)
                .into_iter()
                .map(|(start, end)| (start - base, end - base))
                .collect(),
            None => vec![(0, entry.size)],
        };
        let source = Source { memory, memfd };
        for (start, end) in extents {
            copy_out(&source, entry, (start, end), &file, &mut buffer).map_err(|e| match e {
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

/// Where a region's bytes are read from: its memfd and the region's offset in it (one pread
/// per chunk, the kernel copies), or the mapping for memory without a file.
struct Source<'a> {
    memory: &'a GuestMemory,
    memfd: Option<(&'a File, u64)>,
}

impl Source<'_> {
    fn read(&self, entry: &MemoryRegion, offset: u64, buffer: &mut [u8]) -> Result<(), CopyError> {
        let addr = entry.guest_addr + offset;
        match self.memfd {
            Some((file, base)) => file.read_exact_at(buffer, base + offset).map_err(|e| {
                CopyError::Memory(SnapshotError::GuestMemory {
                    addr,
                    source: vm_memory::GuestMemoryError::IOError(e),
                })
            }),
            None => self
                .memory
                .read_slice(buffer, GuestAddress(addr))
                .map_err(|source| CopyError::Memory(SnapshotError::GuestMemory { addr, source })),
        }
    }
}

/// Copies `[start, end)` of one region to the file; all-zero pages are left as holes, each
/// run of other pages is one write.
fn copy_out(
    source: &Source,
    entry: &MemoryRegion,
    (start, end): (u64, u64),
    file: &File,
    buffer: &mut [u8],
) -> Result<(), CopyError> {
    let page = PAGE_SIZE as usize;
    let mut offset = start;
    while offset < end {
        let len = (end - offset).min(CHUNK) as usize;
        source.read(entry, offset, &mut buffer[..len])?;
        let mut run_start = None;
        for i in 0..=len.div_ceil(page) {
            let data = i * page < len && !is_zero(&buffer[i * page..len.min((i + 1) * page)]);
            match (data, run_start) {
                (true, None) => run_start = Some(i * page),
                (false, Some(first)) => {
                    let at = entry.file_offset + offset + first as u64;
                    file.write_all_at(&buffer[first..len.min(i * page)], at)
                        .map_err(CopyError::Io)?;
                    run_start = None;
                }
                _ => {}
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
    for entry in &layout.regions {
        let region_end = entry.file_offset + entry.size;
        for (start, end) in data_extents(&file, entry.file_offset, region_end) {
            copy_in(memory, entry, (start, end), &file).map_err(|e| match e {
                CopyError::Memory(e) => e,
                CopyError::Io(source) => read_error(&path, source),
            })?;
        }
    }
    Ok(())
}

/// Copies file range `[start, end)` (inside `entry`) into guest memory, read by the kernel
/// straight into the mapping. Only data extents get here (the saved zero pages are holes), so
/// there is nothing to skip.
fn copy_in(
    memory: &GuestMemory,
    entry: &MemoryRegion,
    (start, end): (u64, u64),
    mut file: &File,
) -> Result<(), CopyError> {
    file.seek(SeekFrom::Start(start)).map_err(CopyError::Io)?;
    let mut offset = start;
    while offset < end {
        let len = (end - offset).min(CHUNK) as usize;
        let addr = entry.guest_addr + (offset - entry.file_offset);
        memory
            .read_exact_volatile_from(GuestAddress(addr), &mut file, len)
            .map_err(|source| CopyError::Memory(SnapshotError::GuestMemory { addr, source }))?;
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
