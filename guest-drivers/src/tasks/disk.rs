//! Shared by the block tasks: choosing and opening the disk (`dev=virtio|ata`), buffers from
//! the heap, and the parameter parsing helpers.

use super::{Context, Outcome};
use crate::ata::Ata;
use crate::blk::{BlkError, BlockDevice};
use crate::bump::HEAP;
use crate::cmdline::{parse_size, parse_u64, Task};
use crate::json::Report;
use crate::println;
use crate::virtio::blk::{self, VirtioBlk};

/// The opened disk, whichever driver runs it. One lives on the task's stack, so the size
/// difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Disk {
    Virtio(VirtioBlk),
    Ata(Ata),
}

impl Disk {
    pub fn dev(&mut self) -> &mut dyn BlockDevice {
        match self {
            Disk::Virtio(d) => d,
            Disk::Ata(d) => d,
        }
    }
}

/// Opens the disk: `which` = `virtio`, `ata`, or `None` for the first virtio-blk device, else
/// the announced ATA disk.
pub fn open(ctx: &Context, which: Option<&str>, queues: usize) -> Result<Disk, BlkError> {
    let virtio = || {
        let mmio = blk::find(ctx.cmdline.virtio_mmio()).ok_or(BlkError::NoDevice("virtio-blk"))?;
        let d = VirtioBlk::open(mmio, queues)?;
        println!(
            "virtio-blk: {} sectors, blk_size {}, seg_max {}, {} of {} queue(s), features {:#x}",
            d.info.capacity,
            d.info.blk_size,
            d.info.seg_max,
            d.queues(),
            d.info.num_queues,
            d.info.features
        );
        Ok(Disk::Virtio(d))
    };
    let ata = || {
        let d = Ata::open()?;
        println!("ata: {} sectors", d.capacity());
        Ok(Disk::Ata(d))
    };
    match which {
        Some("virtio") => virtio(),
        Some("ata") => ata(),
        Some(_) => Err(BlkError::NoDevice("such (want dev=virtio or dev=ata)")),
        None if blk::find(ctx.cmdline.virtio_mmio()).is_some() => virtio(),
        None if ctx.cmdline.ata_primary => ata(),
        None => Err(BlkError::NoDevice("block")),
    }
}

/// A zeroed, page-aligned DMA buffer from the heap (below the MMIO hole, identity mapped).
pub fn buffer(len: u64) -> Result<u64, BlkError> {
    HEAP.alloc(len.max(1), 4096)
        .map(|p| p.as_ptr() as u64)
        .ok_or(BlkError::NoMemory)
}

/// Records a bad parameter and returns the outcome for it.
pub fn bad_param(report: &mut Report, task: &Task, key: &str, value: &str) -> Outcome {
    report.str(
        "error",
        format_args!("task `{}`: bad parameter `{key}={value}`", task.name),
    );
    Outcome::BadCmdline
}

/// Parses a number (`0x` allowed).
pub fn num(value: &str) -> Option<u64> {
    parse_u64(value)
}

/// Parses a size with an optional K/M/G suffix.
pub fn size(value: &str) -> Option<u64> {
    parse_size(value)
}

/// Reports a driver error and fails.
pub fn fail(report: &mut Report, error: BlkError) -> Outcome {
    println!("block: {error}");
    report.str("error", format_args!("{error}"));
    Outcome::Fail
}
