//! End-to-end tests of the `splitvisor-blk` binary: a real vhost-user handshake with the vhost
//! crate's `Frontend`, requests through a virtqueue in shared memfd memory, reconnection,
//! socket ownership and cleanup.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use common::daemon::{make_image, wait_call, wait_exit, wait_for, Daemon, IMAGE_SIZE};
use common::vring::{GuestRam, SplitVring};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

const RAM_GPA: u64 = 0;
const RAM_SIZE: u64 = 4 << 20;
const QUEUE_SIZE: u16 = 64;

const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;
const F_PROTOCOL: u64 = 1 << 30;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// A connected, configured frontend with its queues.
struct Session {
    fe: Frontend,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
}

/// The full handshake a VMM does; returns the session and the config space bytes.
fn handshake(socket: &Path, ram: &GuestRam, rings: &[&SplitVring]) -> (Session, Vec<u8>) {
    let mut fe = Frontend::connect(socket, rings.len() as u64).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_eq!(
        features & (F_VERSION_1 | F_PROTOCOL | F_EVENT_IDX),
        F_VERSION_1 | F_PROTOCOL | F_EVENT_IDX
    );
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(wanted), "protocol features {proto:?}");
    fe.set_protocol_features(wanted).unwrap();
    // Every following message asks for a REPLY_ACK.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert!(fe.get_queue_num().unwrap() >= rings.len() as u64);
    assert_eq!(fe.get_max_mem_slots().unwrap(), 509);
    let (_, config) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .unwrap();
    fe.set_features(features).unwrap();
    fe.set_mem_table(&[ram.region()]).unwrap();
    let (mut kicks, mut calls) = (Vec::new(), Vec::new());
    for (q, ring) in rings.iter().enumerate() {
        let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        fe.set_vring_num(q, ring.size).unwrap();
        fe.set_vring_addr(q, &ring.config()).unwrap();
        fe.set_vring_base(q, 0).unwrap();
        fe.set_vring_call(q, &call).unwrap();
        fe.set_vring_kick(q, &kick).unwrap();
        fe.set_vring_enable(q, true).unwrap();
        kicks.push(kick);
        calls.push(call);
    }
    (Session { fe, kicks, calls }, config)
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

/// Guest addresses of one request's buffers (per queue, so queues do not overlap).
struct Bufs {
    hdr: u64,
    data: u64,
    status: u64,
}

fn bufs(q: usize) -> Bufs {
    let base = 0x10_0000 + q as u64 * 0x10_0000;
    Bufs {
        hdr: base,
        data: base + 0x1000,
        status: base + 0x800,
    }
}

/// Submit one IN/OUT request on queue `q` and wait for its completion.
fn do_request(
    s: &Session,
    ram: &GuestRam,
    ring: &mut SplitVring,
    q: usize,
    kind: u32,
    sector: u64,
    len: u32,
) -> (u8, u32) {
    let b = bufs(q);
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    ram.write(b.hdr, &hdr);
    ram.write(b.status, &[0xff]);
    let before = ring.used_idx();
    let head = ring.add_chain(&[
        (b.hdr, 16, false),
        (b.data, len, kind == T_IN),
        (b.status, 1, true),
    ]);
    s.kicks[q].write(1).unwrap();
    wait_call(&s.calls[q]);
    assert_eq!(ring.used_idx(), before.wrapping_add(1));
    let (id, used_len) = ring.used_elem(before);
    assert_eq!(id, u32::from(head));
    // EVENT_IDX: ask for the next interrupt after this completion.
    ring.set_used_event(ring.used_idx());
    (ram.read(b.status, 1)[0], used_len)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Write through the queue, check the image file, read it back through the queue.
fn write_read_check(
    s: &Session,
    ram: &GuestRam,
    ring: &mut SplitVring,
    q: usize,
    image: &Path,
    seed: u8,
) {
    let data = pattern(8192, seed);
    let sector = 16 + 64 * q as u64;
    ram.write(bufs(q).data, &data);
    assert_eq!(do_request(s, ram, ring, q, T_OUT, sector, 8192), (0, 1));
    let mut on_disk = vec![0u8; 8192];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut on_disk, sector * 512)
        .unwrap();
    assert_eq!(on_disk, data, "image contents after the write on queue {q}");
    ram.fill(bufs(q).data, 8192, 0);
    assert_eq!(do_request(s, ram, ring, q, T_IN, sector, 8192), (0, 8193));
    assert_eq!(ram.read(bufs(q).data, 8192), data);
}

#[test]
fn handshake_io_reconnect_and_cleanup() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = Daemon::start(
        dir.as_path(),
        &image,
        &["--queues", "2", "--serial", "test-disk"],
    );
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    let ram = GuestRam::new(RAM_GPA, RAM_SIZE);
    for round in 0..2u8 {
        let mut r0 = SplitVring::new(&ram, 0x1_0000, QUEUE_SIZE);
        let mut r1 = SplitVring::new(&ram, 0x3_0000, QUEUE_SIZE);
        let (s, config) = handshake(&daemon.socket, &ram, &[&r0, &r1]);
        assert_eq!(le_u64(&config[0..]), IMAGE_SIZE / 512, "capacity");
        assert_eq!(le_u32(&config[20..]), 512, "blk_size");
        assert_eq!(
            u16::from_le_bytes([config[34], config[35]]),
            2,
            "num_queues"
        );
        write_read_check(&s, &ram, &mut r0, 0, &image, round);
        write_read_check(&s, &ram, &mut r1, 1, &image, round + 100);
        // Out of range: IOERR in the status byte, the daemon keeps serving.
        assert_eq!(
            do_request(&s, &ram, &mut r0, 0, T_IN, IMAGE_SIZE / 512, 512),
            (1, 1)
        );
        write_read_check(&s, &ram, &mut r0, 0, &image, round + 50);
        // GET_VRING_BASE stops the ring and reports the next avail index: 5 requests so far.
        assert_eq!(s.fe.get_vring_base(0).unwrap(), 5);
        drop(s);
        // Each disconnect logs one STATS line.
        wait_for("the STATS line", || {
            let n = daemon
                .log()
                .lines()
                .filter(|l| l.starts_with("STATS {\"queues\":["))
                .count();
            (n == usize::from(round) + 1).then_some(())
        });
    }
    let log = daemon.log();
    assert!(log.contains("\"queue\":1,\"requests\":4,"), "{log}");

    let status = daemon.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(
        !dir.as_path().join("blk.sock").exists(),
        "socket removed on SIGTERM"
    );
    assert!(
        !dir.as_path().join("blk.sock.lock").exists(),
        "lock removed on SIGTERM"
    );
}

#[test]
fn second_daemon_on_the_same_socket_fails() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let first = Daemon::start(dir.as_path(), &image, &[]);
    let mut second = Daemon::spawn(dir.as_path(), "second", &image, &[]);
    let status = wait_exit(&mut second);
    assert!(!status.success());
    let err = std::fs::read_to_string(dir.as_path().join("second.log")).unwrap();
    assert!(err.contains("another daemon is serving"), "{err}");
    assert!(err.contains(&first.socket.display().to_string()), "{err}");
    // The first daemon still owns its socket.
    assert!(UnixStream::connect(&first.socket).is_ok());
}

#[test]
fn stale_socket_is_replaced() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    drop(UnixListener::bind(dir.as_path().join("blk.sock")).unwrap());
    // The stale path already exists, so wait for the daemon to say it is serving.
    let daemon = Daemon::start(dir.as_path(), &image, &[]);
    wait_for("the daemon to serve", || {
        daemon.log().contains("serving ").then_some(())
    });
    assert!(
        daemon.log().contains("replacing stale socket"),
        "{}",
        daemon.log()
    );
    assert!(UnixStream::connect(&daemon.socket).is_ok());
}

#[test]
fn readonly_rejects_writes() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = Daemon::start(dir.as_path(), &image, &["--readonly"]);
    let ram = GuestRam::new(RAM_GPA, RAM_SIZE);
    let mut ring = SplitVring::new(&ram, 0x1_0000, QUEUE_SIZE);
    let (s, _) = handshake(&daemon.socket, &ram, &[&ring]);
    ram.fill(bufs(0).data, 512, 0xab);
    assert_eq!(do_request(&s, &ram, &mut ring, 0, T_OUT, 0, 512), (1, 1));
    assert_eq!(do_request(&s, &ram, &mut ring, 0, T_IN, 0, 512), (0, 513));
    assert_eq!(ram.read(bufs(0).data, 512), vec![0u8; 512]);
    // A chain whose status byte is not device-writable comes back with length 0...
    let b = bufs(0);
    let before = ring.used_idx();
    ring.add_chain(&[
        (b.hdr, 16, false),
        (b.data, 512, true),
        (b.status, 1, false),
    ]);
    s.kicks[0].write(1).unwrap();
    wait_call(&s.calls[0]);
    ring.set_used_event(ring.used_idx());
    assert_eq!(ring.used_elem(before).1, 0);
    // ...and the daemon keeps serving.
    assert_eq!(do_request(&s, &ram, &mut ring, 0, T_IN, 0, 512), (0, 513));
    assert!(
        daemon.log().contains("no usable status byte"),
        "{}",
        daemon.log()
    );
}

#[test]
fn missing_image_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let mut child = Daemon::spawn(
        dir.as_path(),
        "missing",
        &dir.as_path().join("nope.img"),
        &[],
    );
    assert!(!wait_exit(&mut child).success());
    let err = std::fs::read_to_string(dir.as_path().join("missing.log")).unwrap();
    assert!(
        err.contains("nope.img") && err.contains("cannot open image"),
        "{err}"
    );
    assert_eq!(
        err.lines().count(),
        1,
        "the error chain is printed once: {err}"
    );
}

#[test]
fn direct_io_round_trips() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = Daemon::start(dir.as_path(), &image, &["--direct"]);
    let ram = GuestRam::new(RAM_GPA, RAM_SIZE);
    let mut ring = SplitVring::new(&ram, 0x1_0000, QUEUE_SIZE);
    let (s, _) = handshake(&daemon.socket, &ram, &[&ring]);
    write_read_check(&s, &ram, &mut ring, 0, &image, 7);
    assert!(
        !daemon.log().contains("O_DIRECT transfer failed"),
        "{}",
        daemon.log()
    );
}
