//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) against real daemon processes:
//! resubmission from a hand-built region, recovery after `kill -9`, and malformed requests.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::daemon::{make_image, wait_for, Daemon, TIMEOUT};
use common::inflight::{area_len, InflightMap};
use common::vring::{GuestRam, SplitVring};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

const RAM_SIZE: u64 = 4 << 20;
const RING_GPA: u64 = 0x1_0000;
const QUEUE_SIZE: u16 = 64;
const DATA_LEN: u32 = 4096;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
/// Test-only knob of the daemon (`splitvisor_blk::TEST_DELAY_ENV`).
const DELAY_ENV: &str = "SPLITVISOR_BLK_TEST_DELAY_MS";

/// Handshake up to (not including) SET_FEATURES, with INFLIGHT_SHMFD and REPLY_ACK on every
/// message; returns the frontend and the features to acknowledge.
fn connect(socket: &Path) -> (Frontend, u64) {
    let mut fe = Frontend::connect(socket, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    let offered = fe.get_protocol_features().unwrap();
    assert!(offered.contains(wanted), "protocol features {offered:?}");
    fe.set_protocol_features(wanted).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    (fe, features)
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
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    fe.set_vring_num(0, ring.size).unwrap();
    fe.set_vring_addr(0, &ring.config()).unwrap();
    fe.set_vring_base(0, base).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    (kick, call)
}

fn inflight_request(queue_size: u16) -> VhostUserInflight {
    VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size,
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..DATA_LEN as usize)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
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
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    ram.write(r.hdr, &hdr);
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
    let daemon = Daemon::start(dir.as_path(), &image, &[]);
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
    let log = daemon.log();
    assert!(log.contains("resubmitting 3 request(s)"), "{log}");
}

#[test]
fn kill_9_with_requests_in_flight_then_a_new_daemon_completes_each_exactly_once() {
    const REQUESTS: usize = 6;
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let mut first = Daemon::start_with(dir.as_path(), "first", &image, &[], &[(DELAY_ENV, "500")]);
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

    // Kill once the first request is complete and the second is fetched but, delayed by the
    // test knob, not yet executed.
    wait_for("the second request in flight", || {
        (ring.used_idx() == 1 && map.inflight_heads(0) == [heads[1]]).then_some(())
    });
    first.kill();
    drop(fe);
    assert_eq!(map.inflight_heads(0), [heads[1]], "region after the kill");
    assert_eq!(ring.used_idx(), 1);

    // A new daemon on the same (now stale) socket; the frontend replays the handshake with
    // the region it kept, and the guest's used index as base. Nobody kicks.
    let second = Daemon::start_with(dir.as_path(), "second", &image, &[], &[]);
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
    let log = second.log();
    assert!(log.contains("resubmitting 1 request(s)"), "{log}");

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
    let mut daemon = Daemon::start(dir.as_path(), &image, &["--queues", "1"]);

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
    let log = daemon.log();
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
        ("short GET_INFLIGHT_FD", GET_INFLIGHT_FD, vec![0u8; 8]),
        (
            "GET_INFLIGHT_FD with queue_size 0",
            GET_INFLIGHT_FD,
            body.as_slice().to_vec(),
        ),
        ("SET_INFLIGHT_FD without an fd", SET_INFLIGHT_FD, {
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
        send(&mut raw, SET_PROTOCOL_FEATURES, &proto.to_le_bytes());
        send(&mut raw, code, &payload);
        let mut reply = [0u8; 64];
        let n = raw
            .read(&mut reply)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(n, 0, "{what}: the daemon closes the connection");
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "{what}: daemon died"
        );
    }
    let (mut fe, _) = connect(&daemon.socket);
    assert_eq!(fe.get_queue_num().unwrap(), 1, "a new frontend is served");
    drop(fe);
    daemon.kill();
}

const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
/// Header flags: protocol version 1 and NEED_REPLY.
const FLAGS: u32 = 0x1 | 0x8;

/// Write one raw vhost-user message (no fds).
fn send(stream: &mut UnixStream, code: u32, payload: &[u8]) {
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&FLAGS.to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    stream.write_all(&msg).unwrap();
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
