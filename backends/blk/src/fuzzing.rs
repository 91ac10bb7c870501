//! Entry points of the fuzz targets in `fuzz/` (feature `fuzzing`), and the tests that feed
//! every committed corpus file through them, so that `cargo test` exercises the corpus
//! without building the fuzzer. Each entry takes raw fuzzer bytes and must never panic.

mod vhost_user;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::BlkBackend;
use crate::disk::{Disk, MemDisk};
use crate::request::{process_chain, DeviceInfo, IoBuffer, Limits, SECTOR_SIZE};
use crate::stats::DeviceStats;
use splitvisor_vhost_server::DescriptorTable;

pub use splitvisor_vhost_server::FuzzInput as Input;
pub use vhost_user::vhost_user_messages;

/// Guest memory of the targets: the fuzzer's image at 0, then a hole, then a second region,
/// so that buffers can straddle a region end or fall into the hole.
const IMAGE_LEN: usize = 0x8000;
const SECOND_REGION: (u64, usize) = (0x9000, 0x1000);
/// Sectors of the in-memory disk.
const DISK_SECTORS: u64 = 16;

thread_local! {
    /// Mapped once: a fresh mapping per input costs more than the input itself.
    static MEMORY: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), IMAGE_LEN),
        (GuestAddress(SECOND_REGION.0), SECOND_REGION.1),
    ])
    .expect("fixed test layout maps");
}

/// Guest memory holding `image` at address 0 and zeroes everywhere else (a handle to the
/// thread's one mapping, rewritten for each input).
pub fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    static ZEROES: [u8; IMAGE_LEN] = [0; IMAGE_LEN];
    let image = &image[..image.len().min(IMAGE_LEN)];
    MEMORY.with(|memory| {
        let fill = [
            (0, image),
            (image.len() as u64, &ZEROES[image.len()..]),
            (SECOND_REGION.0, &ZEROES[..SECOND_REGION.1]),
        ];
        for (addr, bytes) in fill {
            memory
                .write_slice(bytes, GuestAddress(addr))
                .expect("fixed test layout is writable");
        }
        memory.clone()
    })
}

/// Target `queue_worker`: the server's queue worker serving a fuzzed ring of a blk device (see
/// `splitvisor_vhost_server::fuzz_queue_worker` for the input layout).
pub fn queue_worker(data: &[u8]) {
    splitvisor_vhost_server::fuzz_queue_worker(data, guest_memory, |readonly, size| {
        blk_device(readonly, 1, size)
    });
}

/// The device the targets serve: a small writable or read-only disk with tight limits.
pub fn device_info(readonly: bool) -> DeviceInfo {
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    serial[..4].copy_from_slice(b"fuzz");
    DeviceInfo {
        capacity_sectors: DISK_SECTORS,
        readonly,
        serial,
        limits: Limits {
            seg_max: 8,
            max_discard_sectors: 8,
            max_discard_seg: 2,
            max_write_zeroes_sectors: 8,
            max_write_zeroes_seg: 2,
        },
    }
}

/// An in-memory disk of `DISK_SECTORS` sectors.
pub fn mem_disk() -> MemDisk {
    MemDisk::new((DISK_SECTORS * SECTOR_SIZE) as usize)
}

/// Device shape: read-only, number of queues, queue size.
type Shape = (bool, usize, u16);
/// A device and a handle to its disk.
type Device = (Arc<BlkBackend>, Arc<MemDisk>);

thread_local! {
    /// Devices reused across inputs: a new one allocates a 260 KiB bounce buffer per queue.
    static DEVICES: RefCell<HashMap<Shape, Device>> =
        RefCell::new(HashMap::new());
}

/// The blk device of this shape on an all-zero in-memory disk (the thread's one device of
/// that shape, its disk wiped for each input).
pub fn blk_device(readonly: bool, queues: usize, queue_size: u16) -> Arc<BlkBackend> {
    DEVICES.with(|devices| {
        let mut devices = devices.borrow_mut();
        let (device, disk) = devices
            .entry((readonly, queues, queue_size))
            .or_insert_with(|| {
                let disk = Arc::new(mem_disk());
                let device = BlkBackend::new(
                    disk.clone(),
                    device_info(readonly),
                    queues,
                    queue_size,
                    Arc::new(DeviceStats::new(queues)),
                );
                (Arc::new(device), disk)
            });
        disk.write_zeroes(0, disk.len(), false)
            .expect("the in-memory disk zeroes its whole length");
        device.clone()
    })
}

thread_local! {
    /// The 260 KiB bounce buffer, allocated once rather than per input.
    static IO_BUFFER: RefCell<IoBuffer> = RefCell::new(IoBuffer::default());
}

/// Target `blk_request`: read the chain at a fuzzed head of a fuzzed descriptor table (direct
/// or indirect) and run it as a virtio-blk request against an in-memory disk.
///
/// Input: ring size selector, flags (bit 0 INDIRECT_DESC, bit 1 read-only), head, then the
/// guest memory image (the descriptor table at 0).
pub fn blk_request(data: &[u8]) {
    let mut input = Input(data);
    let size = 1u16 << (input.byte() % 9);
    let flags = input.byte();
    let head = u16::from(input.byte());
    let readonly = flags & 2 != 0;
    let memory = guest_memory(input.0);
    let table = DescriptorTable {
        addr: GuestAddress(0),
        size,
        indirect: flags & 1 != 0,
    };
    let Ok(chain) = table.chain(&memory, head) else {
        return;
    };
    assert!(
        chain.len() <= usize::from(size),
        "chain longer than its table"
    );
    let writable: u64 = chain
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum();
    let disk = mem_disk();
    let before = readonly.then(|| disk.contents());
    let info = device_info(readonly);
    let done = IO_BUFFER
        .with(|buf| process_chain(head, &chain, &memory, &info, &disk, &mut buf.borrow_mut()));
    assert!(
        u64::from(done.used_len) <= writable,
        "used length {} exceeds the {writable} device-writable bytes",
        done.used_len
    );
    if let Some(before) = before {
        assert!(before == disk.contents(), "a read-only disk was modified");
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Every file of `fuzz/corpus/<target>`; fails if there are none (a moved corpus must not
    /// silently test nothing).
    pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        // RUST_LOG=info shows what each corpus file made the server do (with --nocapture).
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list the corpus {}: {e}", dir.display()))
            .map(|entry| entry.expect("corpus entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "corpus {} is empty", dir.display());
        files
            .into_iter()
            .map(|path| {
                let data = std::fs::read(&path).expect("corpus file readable");
                (path, data)
            })
            .collect()
    }

    #[test]
    fn blk_request_corpus() {
        for (_, data) in corpus("blk_request") {
            super::blk_request(&data);
        }
    }

    #[test]
    fn queue_worker_corpus() {
        for (_, data) in corpus("queue_worker") {
            super::queue_worker(&data);
        }
    }

    #[test]
    fn vhost_user_messages_corpus() {
        for (_, data) in corpus("vhost_user_messages") {
            super::vhost_user_messages(&data);
        }
    }
}
