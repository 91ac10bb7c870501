//! Unit tests of request parsing and execution over real descriptor chains built with
//! virtio-queue's `MockSplitQueue` against the in-memory disk.

use super::*;
use crate::disk::MemDisk;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;

const MEM_SIZE: usize = 0x10_0000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x8_0000;
const DISK_SECTORS: u64 = 64;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const OK: u8 = VIRTIO_BLK_S_OK as u8;

struct Fixture {
    mem: GuestMemoryMmap,
    disk: MemDisk,
    dev: DeviceInfo,
    buf: IoBuffer,
}

fn ro(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

fn wo(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

impl Fixture {
    fn new() -> Self {
        let mut serial = [0u8; 20];
        serial[..6].copy_from_slice(b"disk-1");
        Fixture {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            disk: MemDisk::new((DISK_SECTORS * SECTOR_SIZE) as usize),
            dev: DeviceInfo {
                capacity_sectors: DISK_SECTORS,
                readonly: false,
                serial,
                limits: Limits {
                    seg_max: 8,
                    max_discard_sectors: 16,
                    max_discard_seg: 2,
                    max_write_zeroes_sectors: 16,
                    max_write_zeroes_seg: 2,
                },
            },
            buf: IoBuffer::default(),
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Run a chain made of `descs`; returns the completion and the status byte in memory.
    fn run(&mut self, descs: &[RawDescriptor]) -> (Completion, u8) {
        let q = MockSplitQueue::new(&self.mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let head = chain.head_index();
        let descs: Vec<_> = chain.collect();
        let done = process_chain(
            head,
            &descs,
            &self.mem,
            &self.dev,
            &self.disk,
            &mut self.buf,
        );
        let status = self.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
        (done, status)
    }

    /// A request with a standard header, the given data descriptors, and a status byte.
    fn request(&mut self, kind: u32, sector: u64, data: &[RawDescriptor]) -> (Completion, u8) {
        self.header(kind, sector);
        let mut descs = vec![ro(HDR, 16)];
        descs.extend_from_slice(data);
        descs.push(wo(STATUS, 1));
        self.run(&descs)
    }

    fn range(&self, at: u64, sector: u64, sectors: u32, flags: u32) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&sectors.to_le_bytes());
        raw[12..].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn write_then_read_across_uneven_descriptors() {
    let mut f = Fixture::new();
    let data = pattern(1024);
    f.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (done, status) = f.request(VIRTIO_BLK_T_OUT, 2, &[ro(DATA, 100), ro(DATA + 100, 924)]);
    assert!(done.error.is_none(), "{:?}", done.error);
    assert_eq!((status, done.used_len, done.write_bytes), (OK, 1, 1024));
    assert_eq!(&f.disk.contents()[1024..2048], &data[..]);

    let out = DATA + 0x1000;
    let (done, status) = f.request(
        VIRTIO_BLK_T_IN,
        2,
        &[wo(out, 1), wo(out + 1, 511), wo(out + 512, 512)],
    );
    assert!(done.error.is_none(), "{:?}", done.error);
    assert_eq!((status, done.used_len, done.read_bytes), (OK, 1025, 1024));
    let mut back = vec![0u8; 1024];
    f.mem.read_slice(&mut back, GuestAddress(out)).unwrap();
    assert_eq!(back, data);
}

#[test]
fn large_read_spans_several_bounce_chunks() {
    let mut f = Fixture::new();
    f.disk = MemDisk::new(CHUNK_SIZE * 2 + 4096);
    f.dev.capacity_sectors = f.disk.len() / SECTOR_SIZE;
    let data = pattern(CHUNK_SIZE + 4096);
    f.disk.write_at(&data, 512).unwrap();
    let len = data.len() as u32;
    let (done, status) = f.request(VIRTIO_BLK_T_IN, 1, &[wo(0x2_0000, len)]);
    assert_eq!((status, done.used_len), (OK, len + 1));
    let mut back = vec![0u8; data.len()];
    f.mem.read_slice(&mut back, GuestAddress(0x2_0000)).unwrap();
    assert_eq!(back, data);
}

#[test]
fn flush_get_id_discard_write_zeroes() {
    let mut f = Fixture::new();
    let (done, status) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((status, done.used_len), (OK, 1));
    assert_eq!(f.disk.flushes.load(std::sync::atomic::Ordering::Relaxed), 1);

    let (done, status) = f.request(VIRTIO_BLK_T_GET_ID, 0, &[wo(DATA, 20)]);
    assert_eq!((status, done.used_len), (OK, 21));
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..7], b"disk-1\0");

    f.disk.write_at(&[0xaa; 4096], 0).unwrap();
    f.range(DATA, 1, 2, 0);
    f.range(DATA + 16, 4, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let (done, status) = f.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[ro(DATA, 32)]);
    assert!(done.error.is_none(), "{:?}", done.error);
    assert_eq!(status, OK);
    let c = f.disk.contents();
    assert!(c[..512].iter().all(|&b| b == 0xaa));
    assert!(c[512..1536].iter().all(|&b| b == 0));
    assert!(c[1536..2048].iter().all(|&b| b == 0xaa));
    assert!(c[2048..2560].iter().all(|&b| b == 0));

    f.range(DATA, 0, 8, 0);
    let (_, status) = f.request(VIRTIO_BLK_T_DISCARD, 0, &[ro(DATA, 16)]);
    assert_eq!(status, OK);
    assert_eq!(
        f.disk.discards.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn discard_and_write_zeroes_limits() {
    let mut f = Fixture::new();
    // The UNMAP flag is not allowed on discard.
    f.range(DATA, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        f.request(VIRTIO_BLK_T_DISCARD, 0, &[ro(DATA, 16)]).1,
        UNSUPP
    );
    // Unknown flags.
    f.range(DATA, 0, 8, 0x80);
    assert_eq!(
        f.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[ro(DATA, 16)]).1,
        UNSUPP
    );
    // Too many sectors in one range, too many ranges, a payload that is not 16-byte ranges.
    f.range(DATA, 0, 17, 0);
    assert_eq!(f.request(VIRTIO_BLK_T_DISCARD, 0, &[ro(DATA, 16)]).1, IOERR);
    assert_eq!(f.request(VIRTIO_BLK_T_DISCARD, 0, &[ro(DATA, 48)]).1, IOERR);
    assert_eq!(f.request(VIRTIO_BLK_T_DISCARD, 0, &[ro(DATA, 20)]).1, IOERR);
    assert_eq!(f.request(VIRTIO_BLK_T_DISCARD, 0, &[]).1, IOERR);
    // A range past the end leaves the disk untouched even if an earlier range was fine.
    f.disk.write_at(&[0xaa; 512], 0).unwrap();
    f.range(DATA, 0, 1, 0);
    f.range(DATA + 16, DISK_SECTORS - 1, 2, 0);
    assert_eq!(
        f.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[ro(DATA, 32)]).1,
        IOERR
    );
    assert_eq!(f.disk.contents()[0], 0xaa);
    // Data that the device would have to write into.
    assert_eq!(f.request(VIRTIO_BLK_T_DISCARD, 0, &[wo(DATA, 16)]).1, IOERR);
}

#[test]
fn malformed_headers() {
    let mut f = Fixture::new();
    f.header(VIRTIO_BLK_T_IN, 0);
    let (done, status) = f.run(&[ro(HDR, 8), wo(DATA, 512), wo(STATUS, 1)]);
    assert_eq!((status, done.used_len), (IOERR, 1));
    assert!(matches!(done.error, Some(RequestError::HeaderTooShort(8))));

    f.header(VIRTIO_BLK_T_IN, 0);
    let (done, status) = f.run(&[wo(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]);
    assert_eq!(status, IOERR);
    assert!(matches!(done.error, Some(RequestError::HeaderWritable)));

    f.header(VIRTIO_BLK_T_IN, 0);
    let (done, status) = f.run(&[ro(MEM_SIZE as u64 - 8, 16), wo(STATUS, 1)]);
    assert_eq!(status, IOERR);
    assert!(matches!(
        done.error,
        Some(RequestError::HeaderOutsideMemory(_))
    ));

    // Only a status descriptor: no header.
    f.header(VIRTIO_BLK_T_IN, 0);
    let (done, status) = f.run(&[wo(STATUS, 1)]);
    assert_eq!(status, IOERR);
    assert!(matches!(done.error, Some(RequestError::MissingHeader)));
}

#[test]
fn unusable_status_returns_length_zero() {
    let mut f = Fixture::new();
    f.header(VIRTIO_BLK_T_IN, 0);
    let (done, status) = f.run(&[ro(HDR, 16), wo(DATA, 512), ro(STATUS, 1)]);
    assert_eq!(done.used_len, 0);
    assert_eq!(status, 0xff, "a read-only status byte must not be written");
    assert!(matches!(done.error, Some(RequestError::StatusReadOnly)));

    let (done, _) = f.run(&[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 0)]);
    assert_eq!(done.used_len, 0);
    assert!(matches!(done.error, Some(RequestError::StatusEmpty)));

    let (done, _) = f.run(&[ro(HDR, 16), wo(MEM_SIZE as u64, 1)]);
    assert_eq!(done.used_len, 0);
    assert!(matches!(
        done.error,
        Some(RequestError::StatusOutsideMemory { .. })
    ));

    let (done, _) = f.run(&[ro(HDR, 16), wo(u64::MAX, 2)]);
    assert_eq!(done.used_len, 0);
    assert!(matches!(
        done.error,
        Some(RequestError::StatusOutsideMemory { .. })
    ));
}

#[test]
fn wrong_data_direction() {
    let mut f = Fixture::new();
    let (done, status) = f.request(VIRTIO_BLK_T_IN, 0, &[ro(DATA, 512)]);
    assert_eq!((status, done.used_len), (IOERR, 1));
    assert!(matches!(
        done.error,
        Some(RequestError::DataDirection { index: 0, .. })
    ));
    let (_, status) = f.request(VIRTIO_BLK_T_OUT, 0, &[ro(DATA, 512), wo(DATA, 512)]);
    assert_eq!(status, IOERR);
    let (_, status) = f.request(VIRTIO_BLK_T_GET_ID, 0, &[ro(DATA, 20)]);
    assert_eq!(status, IOERR);
    let (done, status) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[ro(DATA, 512)]);
    assert_eq!(status, IOERR);
    assert!(matches!(done.error, Some(RequestError::FlushWithData(1))));
}

#[test]
fn out_of_range_and_overflowing_requests() {
    let mut f = Fixture::new();
    // Last sector is fine, one past it is not.
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, &[wo(DATA, 512)])
            .1,
        OK
    );
    let (done, status) = f.request(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, &[wo(DATA, 1024)]);
    assert_eq!(status, IOERR);
    assert!(matches!(done.error, Some(RequestError::OutOfRange { .. })));
    assert_eq!(
        f.request(VIRTIO_BLK_T_OUT, DISK_SECTORS, &[ro(DATA, 512)])
            .1,
        IOERR
    );
    // sector + sectors overflows u64.
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, u64::MAX, &[wo(DATA, 512)]).1,
        IOERR
    );
    f.range(DATA, u64::MAX, 16, 0);
    assert_eq!(f.request(VIRTIO_BLK_T_DISCARD, 0, &[ro(DATA, 16)]).1, IOERR);
    // Length not a multiple of the sector size.
    let (done, _) = f.request(VIRTIO_BLK_T_IN, 0, &[wo(DATA, 100)]);
    assert!(matches!(
        done.error,
        Some(RequestError::UnalignedLength(100))
    ));
    // Too many data descriptors for seg_max (8).
    let many: Vec<_> = (0..9).map(|i| wo(DATA + i * 512, 512)).collect();
    let (done, _) = f.request(VIRTIO_BLK_T_IN, 0, &many);
    assert!(matches!(
        done.error,
        Some(RequestError::TooManySegments { .. })
    ));
    // Nothing was written into the disk by the failed writes.
    assert!(f.disk.contents().iter().all(|&b| b == 0));
}

#[test]
fn data_outside_guest_memory() {
    let mut f = Fixture::new();
    let end = MEM_SIZE as u64;
    let (done, status) = f.request(VIRTIO_BLK_T_IN, 0, &[wo(end - 256, 512)]);
    assert_eq!((status, done.used_len), (IOERR, 1));
    assert!(matches!(
        done.error,
        Some(RequestError::DataOutsideMemory { .. })
    ));
    assert_eq!(
        f.request(VIRTIO_BLK_T_OUT, 0, &[ro(u64::MAX - 100, 512)]).1,
        IOERR
    );
    assert_eq!(f.request(VIRTIO_BLK_T_GET_ID, 0, &[wo(end, 20)]).1, IOERR);
}

#[test]
fn unknown_type_and_readonly() {
    let mut f = Fixture::new();
    let (done, status) = f.request(99, 0, &[wo(DATA, 512)]);
    assert_eq!((status, done.used_len), (UNSUPP, 1));
    assert!(matches!(
        done.error,
        Some(RequestError::UnsupportedType(99))
    ));

    f.dev.readonly = true;
    let (done, status) = f.request(VIRTIO_BLK_T_OUT, 0, &[ro(DATA, 512)]);
    assert_eq!(status, IOERR);
    assert!(matches!(done.error, Some(RequestError::ReadOnly(_))));
    f.range(DATA, 0, 1, 0);
    assert_eq!(f.request(VIRTIO_BLK_T_DISCARD, 0, &[ro(DATA, 16)]).1, IOERR);
    assert_eq!(
        f.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[ro(DATA, 16)]).1,
        IOERR
    );
    // Reads and flushes still work.
    assert_eq!(f.request(VIRTIO_BLK_T_IN, 0, &[wo(DATA, 512)]).1, OK);
    assert_eq!(f.request(VIRTIO_BLK_T_FLUSH, 0, &[]).1, OK);
}

#[test]
fn indirect_chain_is_followed() {
    let mut f = Fixture::new();
    f.disk.write_at(&[0x5a; 512], 0).unwrap();
    f.header(VIRTIO_BLK_T_IN, 0);
    // Indirect table at 0x4_0000 holding header, data, status.
    let table = 0x4_0000u64;
    let descs = [
        SplitDescriptor::new(HDR, 16, VIRTQ_NEXT, 1),
        SplitDescriptor::new(DATA, 512, VIRTQ_NEXT | VRING_DESC_F_WRITE as u16, 2),
        SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        f.mem
            .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let indirect = RawDescriptor::from(SplitDescriptor::new(
        table,
        48,
        virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    let (done, status) = f.run(&[indirect]);
    assert_eq!((status, done.used_len), (OK, 513));
    assert_eq!(
        f.mem.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(),
        0x5a
    );
}

const VIRTQ_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

/// A disk that needs direct-I/O alignment and records which path each transfer took.
struct AlignedDisk {
    inner: MemDisk,
    vectored: std::sync::atomic::AtomicU64,
    bounced: std::sync::atomic::AtomicU64,
}

impl Disk for AlignedDisk {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.bounced
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.bounced
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.write_at(buf, offset)
    }
    fn read_vectored_at(&self, iov: &IoVecs, offset: u64) -> io::Result<()> {
        assert!(
            iov.aligned(512),
            "a misaligned buffer reached the vectored path"
        );
        self.vectored
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_vectored_at(iov, offset)
    }
    fn write_vectored_at(&self, iov: &IoVecs, offset: u64) -> io::Result<()> {
        assert!(
            iov.aligned(512),
            "a misaligned buffer reached the vectored path"
        );
        self.vectored
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.write_vectored_at(iov, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn direct_alignment(&self) -> Option<usize> {
        Some(512)
    }
}

#[test]
fn direct_disk_bounces_only_misaligned_guest_buffers() {
    let mut f = Fixture::new();
    let disk = AlignedDisk {
        inner: MemDisk::new((DISK_SECTORS * SECTOR_SIZE) as usize),
        vectored: Default::default(),
        bounced: Default::default(),
    };
    let data = pattern(1024);
    f.mem.write_slice(&data, GuestAddress(DATA + 1)).unwrap();
    f.mem
        .write_slice(&data, GuestAddress(DATA + 0x1000))
        .unwrap();
    let run = |f: &mut Fixture, kind, at| {
        f.header(kind, 4);
        let dir = if kind == VIRTIO_BLK_T_IN { wo } else { ro };
        let descs = [ro(HDR, 16), dir(at, 1024), wo(STATUS, 1)];
        let q = MockSplitQueue::new(&f.mem, 16);
        let chain = q.build_desc_chain(&descs).unwrap();
        let head = chain.head_index();
        let descs: Vec<_> = chain.collect();
        let done = process_chain(head, &descs, &f.mem, &f.dev, &disk, &mut f.buf);
        assert!(done.error.is_none(), "{:?}", done.error);
    };
    run(&mut f, VIRTIO_BLK_T_OUT, DATA + 1);
    assert_eq!(&disk.inner.contents()[2048..3072], &data[..]);
    run(&mut f, VIRTIO_BLK_T_IN, DATA + 0x2001);
    run(&mut f, VIRTIO_BLK_T_OUT, DATA + 0x1000);
    run(&mut f, VIRTIO_BLK_T_IN, DATA + 0x3000);
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((count(&disk.bounced), count(&disk.vectored)), (2, 2));
    for at in [DATA + 0x2001, DATA + 0x3000] {
        let mut back = vec![0u8; 1024];
        f.mem.read_slice(&mut back, GuestAddress(at)).unwrap();
        assert_eq!(back, data, "read into {at:#x}");
    }
}

#[test]
fn data_descriptor_straddling_two_memory_regions_is_split() {
    let mut f = Fixture::new();
    // Two adjacent regions: a descriptor over their boundary maps to two host buffers.
    // (Between DATA and STATUS, away from the header and the status byte.)
    let split = 0x4_0000;
    f.mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), split),
        (GuestAddress(split as u64), MEM_SIZE - split),
    ])
    .unwrap();
    let at = split as u64 - 512;
    let data = pattern(2048);
    f.mem.write_slice(&data, GuestAddress(at)).unwrap();
    let (done, status) = f.request(VIRTIO_BLK_T_OUT, 8, &[ro(at, 2048)]);
    assert!(done.error.is_none(), "{:?}", done.error);
    assert_eq!(status, OK);
    assert_eq!(&f.disk.contents()[4096..6144], &data[..]);
    f.mem.write_slice(&[0u8; 2048], GuestAddress(at)).unwrap();
    let (done, status) = f.request(VIRTIO_BLK_T_IN, 8, &[wo(at, 2048)]);
    assert_eq!((status, done.used_len), (OK, 2049));
    let mut back = vec![0u8; 2048];
    f.mem.read_slice(&mut back, GuestAddress(at)).unwrap();
    assert_eq!(back, data);
}
