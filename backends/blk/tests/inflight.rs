//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) against real daemon processes:
//! resubmission from a hand-built region, recovery after `kill -9`, and malformed requests.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::{make_image, start, start_with};
use splitvisor_tests::frontend::blk::{connect_with, request_header, T_IN, T_OUT};
use splitvisor_tests::frontend::inflight::{area_len, InflightMap};
use splitvisor_tests::frontend::{self, raw, GuestRam, SplitVring};
use splitvisor_tests::pattern::random_bytes;
use splitvisor_tests::wait::{wait_for, TIMEOUT};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

const RAM_SIZE: u64 = 4 << 20;
const RING_GPA: u64 = 0x1_0000;
const QUEUE_SIZE: u16 = 64;
const DATA_LEN: u32 = 4096;
/// Test-only knob of the daemon (`splitvisor_blk::TEST_DELAY_ENV`).
const DELAY_ENV: &str = "SPLITVISOR_BLK_TEST_DELAY_MS";

/// Handshake up to (not including) SET_FEATURES, with INFLIGHT_SHMFD and REPLY_ACK on every
/// message; returns the frontend and the features to acknowledge.
fn connect(socket: &Path) -> (Frontend, u64) {
    connect_with(socket, 1, VhostUserProtocolFeatures::INFLIGHT_SHMFD)
}

/// SET_FEATURES, SET_MEM_TABLE and queue 0 from `base`, as the VMM sends them; returns the
/// kick and call eventfds.
fn start_queue(
    fe: &mut Frontend,
    features: u64,
    ram: &GuestRam,
    ring: &SplitVring,
    base: u16,
) -> (EventFd, EventFd) {
    fe.set_features(features).unwrap();
    fe.set_mem_table(&[ram.region()]).unwrap();
    frontend::start_queue(fe, 0, ring, base)
}

fn inflight_request(queue_size: u16) -> VhostUserInflight {
    VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size,
    }
}

/// The data request `seed` writes (odd seeds: random_bytes sets bit 0, so each `seed` gives
/// its own bytes).
fn pattern(seed: u8) -> Vec<u8> {
    random_bytes(u64::from(seed) << 1 | 1, DATA_LEN as usize)
}

/// Buffers of request `i`, each request in its own 64 KiB of guest memory.
struct Req {
    hdr: u64,
    status: u64,
    data: u64,
}

fn req(i: usize) -> Req {
    let base = 0x10_0000 + i as u64 * 0x1_0000;
    Req {
        hdr: base,
        status: base + 0x100,
        data: base + 0x1000,
    }
}

/// Make request `i` available (no kick): header, data (for writes) and status 0xff.
fn add_request(
    ram: &GuestRam,
    ring: &mut SplitVring,
    i: usize,
    kind: u32,
    sector: u64,
    data: Option<&[u8]>,
) -> u16 {
    let r = req(i);
    ram.write(r.hdr, &request_header(kind, sector));
    ram.write(r.status, &[0xff]);
    match data {
        Some(d) => ram.write(r.data, d),
        None => ram.fill(r.data, DATA_LEN as usize, 0),
    }
    ring.add_chain(&[
        (r.hdr, 16, false),
        (r.data, DATA_LEN, kind == T_IN),
        (r.status, 1, true),
    ])
}

fn status(ram: &GuestRam, i: usize) -> u8 {
    ram.read(req(i).status, 1)[0]
}

fn image_sector(image: &Path, sector: u64) -> Vec<u8> {
    let mut buf = vec![0u8; DATA_LEN as usize];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut buf, sector * 512)
        .unwrap();
    buf
}

fn wait_used(ring: &SplitVring, n: u16) {
    wait_for(&format!("used index {n}"), || {
        (ring.used_idx() == n).then_some(())
    });
}

#[test]
fn resubmits_recorded_requests_in_counter_order_and_skips_the_stale_last_batch() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = start(dir.as_path(), &image, &[]);
    let ram = GuestRam::new(0, RAM_SIZE);
    let mut ring = SplitVring::new(&ram, RING_GPA, QUEUE_SIZE);

    // What the guest and a previous backend left: six requests made available,
    let done_long_ago = add_request(&ram, &mut ring, 0, T_OUT, 300, Some(&pattern(0)));
    let stale_batch = add_request(&ram, &mut ring, 1, T_OUT, 200, Some(&pattern(1)));
    let third = add_request(&ram, &mut ring, 2, T_OUT, 100, Some(&pattern(2)));
    let first = add_request(&ram, &mut ring, 3, T_OUT, 100, Some(&pattern(3)));
    let second = add_request(&ram, &mut ring, 4, T_OUT, 100, Some(&pattern(4)));
    let fresh = add_request(&ram, &mut ring, 5, T_IN, 100, None);
    // two of them completed in the used ring,
    ring.push_used(done_long_ago, 1);
    ring.push_used(stale_batch, 1);

    let (mut fe, features) = connect(&daemon.socket);
    let (region, file) = fe.get_inflight_fd(&inflight_request(QUEUE_SIZE)).unwrap();
    assert!(
        region.mmap_size >= area_len(QUEUE_SIZE) as u64,
        "{}",
        region.mmap_size
    );
    assert_eq!((region.num_queues, region.queue_size), (1, QUEUE_SIZE));
    let map = InflightMap::new(&file, region.mmap_size, QUEUE_SIZE);
    assert_eq!(map.version(0), 0, "a new region is zero-filled");
    // and the region: the stale batch's completion reached the used ring (used->idx 2) but
    // not the region (used_idx 1, flag still set); three heads in flight, fetched out of
    // order relative to their descriptor indices.
    map.set_header(0, 1, QUEUE_SIZE, stale_batch, 1);
    map.set_desc(0, done_long_ago, 0, 1);
    map.set_desc(0, stale_batch, 1, 2);
    map.set_desc(0, third, 1, 5);
    map.set_desc(0, first, 1, 3);
    map.set_desc(0, second, 1, 4);
    fe.set_inflight_fd(&region, file.as_raw_fd()).unwrap();
    // As QEMU after a crash: the base is the guest's used index. Nobody kicks.
    let (_kick, _call) = start_queue(&mut fe, features, &ram, &ring, ring.used_idx());

    wait_used(&ring, 6);
    assert_eq!(
        ring.used_heads(2, 6),
        [first, second, third, fresh],
        "resubmitted in counter order, then the ring resumes after them"
    );
    for i in 2..6 {
        assert_eq!(status(&ram, i), 0, "status of request {i}");
    }
    assert_eq!(
        status(&ram, 0),
        0xff,
        "a completed request is not re-executed"
    );
    assert_eq!(
        status(&ram, 1),
        0xff,
        "the stale last batch is not resubmitted"
    );
    assert_eq!(
        image_sector(&image, 100),
        pattern(2),
        "highest counter ran last"
    );
    assert_eq!(ram.read(req(5).data, DATA_LEN as usize), pattern(2));
    assert_eq!(image_sector(&image, 200), vec![0u8; DATA_LEN as usize]);
    assert_eq!(image_sector(&image, 300), vec![0u8; DATA_LEN as usize]);
    assert!(
        map.inflight_heads(0).is_empty(),
        "{:?}",
        map.inflight_heads(0)
    );
    assert_eq!(map.used_idx(0), 6);
    assert_eq!(ring.used_elem(5).1, DATA_LEN + 1, "read used length");
    // GET_VRING_BASE reports where the avail ring stands.
    assert_eq!(fe.get_vring_base(0).unwrap(), 6);
    let log = daemon.log_text();
    assert!(log.contains("resubmitting 3 request(s)"), "{log}");
}

#[test]
fn kill_9_with_requests_in_flight_then_a_new_daemon_completes_each_exactly_once() {
    const REQUESTS: usize = 6;
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let mut first = start_with(dir.as_path(), "first", &image, &[], &[(DELAY_ENV, "500")]);
    let ram = GuestRam::new(0, RAM_SIZE);
    let mut ring = SplitVring::new(&ram, RING_GPA, QUEUE_SIZE);

    let (mut fe, features) = connect(&first.socket);
    let (region, file) = fe.get_inflight_fd(&inflight_request(QUEUE_SIZE)).unwrap();
    fe.set_inflight_fd(&region, file.as_raw_fd()).unwrap();
    let (kick, _call) = start_queue(&mut fe, features, &ram, &ring, 0);
    let map = InflightMap::new(&file, region.mmap_size, QUEUE_SIZE);
    let heads: Vec<u16> = (0..REQUESTS)
        .map(|i| {
            add_request(
                &ram,
                &mut ring,
                i,
                T_OUT,
                1000 + 16 * i as u64,
                Some(&pattern(i as u8 + 40)),
            )
        })
        .collect();
    kick.write(1).unwrap();

    // Kill once the first request is served (its used entry waits for the rest of the
    // batch: nothing is published yet) and the second is fetched but, delayed by the test
    // knob, not yet executed. Both are in flight and are served again (the first rewrites
    // the same data) but completed only once.
    let mut first_two = heads[..2].to_vec();
    first_two.sort_unstable();
    wait_for("the second request in flight", || {
        (ring.used_idx() == 0 && map.inflight_heads(0) == first_two).then_some(())
    });
    first.kill().expect("kill the daemon");
    drop(fe);
    assert_eq!(map.inflight_heads(0), first_two, "region after the kill");
    assert_eq!(ring.used_idx(), 0);

    // A new daemon on the same (now stale) socket; the frontend replays the handshake with
    // the region it kept, and the guest's used index as base. Nobody kicks.
    let second = start_with(dir.as_path(), "second", &image, &[], &[]);
    let (mut fe, features) = connect(&second.socket);
    fe.set_inflight_fd(&region, file.as_raw_fd()).unwrap();
    let (kick, _call) = start_queue(&mut fe, features, &ram, &ring, ring.used_idx());
    wait_used(&ring, REQUESTS as u16);

    let mut completed = ring.used_heads(0, REQUESTS as u16);
    completed.sort_unstable();
    assert_eq!(completed, heads, "every request completed exactly once");
    for i in 0..REQUESTS {
        assert_eq!(status(&ram, i), 0, "status of request {i}");
        assert_eq!(
            image_sector(&image, 1000 + 16 * i as u64),
            pattern(i as u8 + 40),
            "image contents of request {i}"
        );
    }
    assert!(map.inflight_heads(0).is_empty());
    let log = second.log_text();
    assert!(log.contains("resubmitting 2 request(s)"), "{log}");

    // The recovered queue keeps serving kicked requests.
    add_request(&ram, &mut ring, 7, T_IN, 1000, None);
    kick.write(1).unwrap();
    wait_used(&ring, REQUESTS as u16 + 1);
    assert_eq!(ram.read(req(7).data, DATA_LEN as usize), pattern(40));
}

#[test]
fn bad_inflight_requests_get_errors_and_the_daemon_keeps_serving() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    // One queue: a region for two is one more than the device has.
    let mut daemon = start(dir.as_path(), &image, &["--queues", "1"]);

    // Requests vhost's parser accepts but that make no sense get an error answer on a
    // connection that stays usable.
    let (mut fe, _) = connect(&daemon.socket);
    let (r, _) = fe.get_inflight_fd(&inflight_request(40000)).unwrap();
    assert_eq!(r.mmap_size, 0, "queue_size above 32768: no region");
    let mut two_queues = inflight_request(QUEUE_SIZE);
    two_queues.num_queues = 2;
    let (r, _) = fe.get_inflight_fd(&two_queues).unwrap();
    assert_eq!(r.mmap_size, 0, "more queues than the device has: no region");

    let small = tempfile(dir.as_path(), "small", 64);
    let mut too_small = inflight_request(QUEUE_SIZE);
    too_small.mmap_size = 64;
    assert!(fe.set_inflight_fd(&too_small, small.as_raw_fd()).is_err());
    let mut beyond_file = inflight_request(QUEUE_SIZE);
    beyond_file.mmap_size = area_len(QUEUE_SIZE) as u64;
    assert!(fe.set_inflight_fd(&beyond_file, small.as_raw_fd()).is_err());
    let big = tempfile(dir.as_path(), "big", 1 << 20);
    let mut huge_queue = inflight_request(40000);
    huge_queue.mmap_size = 1 << 20;
    assert!(fe.set_inflight_fd(&huge_queue, big.as_raw_fd()).is_err());
    assert_eq!(fe.get_queue_num().unwrap(), 1, "the connection still works");
    let (r, _) = fe.get_inflight_fd(&inflight_request(QUEUE_SIZE)).unwrap();
    assert!(r.mmap_size >= area_len(QUEUE_SIZE) as u64);
    drop(fe);
    let log = daemon.log_text();
    for needle in [
        "queue_size 40000",
        "num_queues 2",
        "smaller than",
        "beyond the end",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}: {log}");
    }

    // Messages vhost's parser rejects (wrong payload size, queue_size 0, no fd) have no reply
    // to give: the daemon drops that connection and serves the next one.
    let body = inflight_request(0);
    let cases: [(&str, u32, Vec<u8>); 3] = [
        ("short GET_INFLIGHT_FD", raw::GET_INFLIGHT_FD, vec![0u8; 8]),
        (
            "GET_INFLIGHT_FD with queue_size 0",
            raw::GET_INFLIGHT_FD,
            body.as_slice().to_vec(),
        ),
        ("SET_INFLIGHT_FD without an fd", raw::SET_INFLIGHT_FD, {
            let mut m = inflight_request(QUEUE_SIZE);
            m.mmap_size = area_len(QUEUE_SIZE) as u64;
            m.as_slice().to_vec()
        }),
    ];
    for (what, code, payload) in cases {
        let mut raw = UnixStream::connect(&daemon.socket).unwrap();
        raw.set_read_timeout(Some(TIMEOUT)).unwrap();
        let proto = (VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK)
            .bits();
        send(&mut raw, raw::SET_PROTOCOL_FEATURES, &proto.to_le_bytes());
        send(&mut raw, code, &payload);
        let mut reply = [0u8; 64];
        let n = raw
            .read(&mut reply)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(n, 0, "{what}: the daemon closes the connection");
        assert!(!daemon.has_exited(), "{what}: daemon died");
    }
    let (mut fe, _) = connect(&daemon.socket);
    assert_eq!(fe.get_queue_num().unwrap(), 1, "a new frontend is served");
    drop(fe);
    daemon.kill().expect("kill the daemon");
}

/// Write one raw vhost-user message (no fds) asking for a reply.
fn send(stream: &mut UnixStream, code: u32, payload: &[u8]) {
    raw::send(
        stream,
        &raw::message(code, raw::VERSION_1 | raw::NEED_REPLY, payload),
    );
}

fn tempfile(dir: &Path, name: &str, len: u64) -> File {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join(name))
        .unwrap();
    f.set_len(len).unwrap();
    f
}
