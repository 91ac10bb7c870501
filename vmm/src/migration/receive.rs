//! The destination's side of the stream: checks the source's header against the VM it was
//! started for, writes the memory and state it receives into a staging snapshot directory
//! (which `Vm::restore` then reads, as `run --restore` does), and answers the handoff.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::wire::{Kind, Listener, Stream, Verdict, WireError};
use super::Hello;
use crate::layout;
use crate::snapshot::format::{
    Manifest, MemoryLayout, MemoryRegion, SnapshotError, MEMORY_FILE, PAGE_SIZE,
};

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("refused the incoming VM: {0}")]
    Refused(String),
    #[error("receiving the VM failed")]
    Wire(#[from] WireError),
    #[error("could not write the staging directory {}", .0.display())]
    Stage(PathBuf, #[source] std::io::Error),
    #[error("the source sent pages at {addr:#x}+{len}, outside the VM's memory")]
    OutOfRange { addr: u64, len: u64 },
    #[error("the source's state does not fit its header: {0}")]
    State(String),
    #[error(transparent)]
    Manifest(#[from] SnapshotError),
}

/// What the destination was started with.
pub struct Expect {
    pub memory_bytes: u64,
    pub vcpus: usize,
    /// Its --disk/--net devices (and the platform ones) as `id (kind)`; `None` to take the VM's.
    pub devices: Option<Vec<String>>,
}

/// A VM received, waiting to be restored from `dir`; the source waits for `finish`.
pub struct Incoming {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Page data received and from the first byte to the handoff.
    pub bytes: u64,
    pub elapsed: Duration,
    stream: Stream,
}

impl Incoming {
    /// Tells the source whether the VM runs here now (it then ends) or not (it resumes).
    pub fn finish(mut self, outcome: Result<(), String>) -> Result<(), WireError> {
        let verdict = match outcome {
            Ok(()) => Verdict::Accept,
            Err(why) => Verdict::Refuse(why),
        };
        self.stream.send_json(Kind::Verdict, &verdict)
    }
}

/// Guest RAM's layout for `size` bytes, as `memory::create_guest_memory` lays it out.
pub fn layout_for(size: u64) -> MemoryLayout {
    let mut file_offset = 0;
    let regions = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| {
            let region = MemoryRegion {
                guest_addr: start.0,
                size: len,
                file_offset,
            };
            file_offset += len;
            region
        })
        .collect();
    MemoryLayout {
        size: file_offset,
        page_size: PAGE_SIZE,
        regions,
    }
}

/// Waits for a source on `listener`, checks its header against `expect` (a mismatch is sent
/// back and returned), and receives its memory and state into `staging` until the handoff.
pub fn receive(
    listener: &Listener,
    expect: &Expect,
    staging: &Path,
) -> Result<Incoming, ReceiveError> {
    let mut stream = listener.accept()?;
    let start = Instant::now();
    let hello: Hello = stream.receive_json(Kind::Hello)?;
    let memory = layout_for(expect.memory_bytes);
    if let Some(why) = hello.mismatch(&memory, expect.vcpus, expect.devices.as_deref()) {
        stream.send_json(Kind::Verdict, &Verdict::Refuse(why.clone()))?;
        return Err(ReceiveError::Refused(why));
    }
    let stage_error = |e| ReceiveError::Stage(staging.to_path_buf(), e);
    std::fs::create_dir_all(staging).map_err(stage_error)?;
    // Readable too: the digest hook reads it back.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(staging.join(MEMORY_FILE))
        .map_err(stage_error)?;
    file.set_len(memory.size).map_err(stage_error)?;
    stream.send_json(Kind::Verdict, &Verdict::Accept)?;
    let (manifest, bytes) = receive_body(&mut stream, &memory, &file, staging)?;
    super::dirty::digest_hook("destination", || super::dirty::digest_file(&file, &memory));
    if manifest.memory != hello.memory || manifest.vcpus.len() != hello.vcpus {
        return Err(ReceiveError::State(format!(
            "{} bytes and {} vCPU(s) announced, {} and {} sent",
            hello.memory.size,
            hello.vcpus,
            manifest.memory.size,
            manifest.vcpus.len()
        )));
    }
    manifest.write(staging)?;
    Ok(Incoming {
        dir: staging.to_path_buf(),
        manifest,
        bytes,
        elapsed: start.elapsed(),
        stream,
    })
}

/// Pages until the state, then the handoff; returns the state and the page bytes received.
fn receive_body(
    stream: &mut Stream,
    memory: &MemoryLayout,
    file: &File,
    staging: &Path,
) -> Result<(Manifest, u64), ReceiveError> {
    let mut buffer = Vec::new();
    let mut bytes = 0;
    let mut manifest = None;
    loop {
        match (stream.receive(&mut buffer)?, &manifest) {
            (Kind::Pages, None) if buffer.len() >= 8 => {
                let mut addr = [0u8; 8];
                addr.copy_from_slice(&buffer[..8]);
                let data = &buffer[8..];
                let at = file_offset(memory, u64::from_le_bytes(addr), data.len() as u64)?;
                file.write_all_at(data, at)
                    .map_err(|e| ReceiveError::Stage(staging.to_path_buf(), e))?;
                bytes += data.len() as u64;
            }
            (Kind::State, None) => {
                let state = serde_json::from_slice(&buffer)
                    .map_err(|e| WireError::Decode(Kind::State, e))?;
                manifest = Some(state);
            }
            (Kind::Handoff, Some(_)) => break,
            (kind, _) => {
                return Err(WireError::Unexpected {
                    expected: if manifest.is_some() {
                        "Handoff"
                    } else {
                        "Pages or State"
                    }
                    .into(),
                    found: format!("{kind:?} ({} bytes)", buffer.len()),
                }
                .into())
            }
        }
    }
    let manifest = manifest.ok_or_else(|| ReceiveError::State("no state sent".into()))?;
    Ok((manifest, bytes))
}

/// Where guest range `[addr, addr + len)` is in the memory file, if it is all in one region.
fn file_offset(memory: &MemoryLayout, addr: u64, len: u64) -> Result<u64, ReceiveError> {
    memory
        .regions
        .iter()
        .find(|r| {
            addr >= r.guest_addr
                && addr
                    .checked_add(len)
                    .is_some_and(|end| end <= r.guest_addr + r.size)
        })
        .map(|r| r.file_offset + (addr - r.guest_addr))
        .ok_or(ReceiveError::OutOfRange { addr, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_land_only_inside_guest_memory() {
        let memory = layout_for(256 << 20);
        assert_eq!(file_offset(&memory, 0x1000, 4096).unwrap(), 0x1000);
        for (addr, len) in [(256 << 20, 4096), ((256 << 20) - 4096, 8192), (u64::MAX, 2)] {
            assert!(file_offset(&memory, addr, len).is_err(), "{addr:#x}+{len}");
        }
    }
}
