//! A hostile frontend or guest against `splitvisor-net --switch`: memory it cannot back, a ring
//! base that does not fit, an avail index that runs ahead, and many reconnects. Each case is
//! refused or contained, and a well-behaved frontend is served afterwards.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use common::frontend::{fd_count, negotiate, wait_for, Daemon, GuestMem, TestFrontend, QSIZE};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

const TX: usize = 1;
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_BASE: u32 = 10;
/// VHOST_USER_F_PROTOCOL_FEATURES and VHOST_USER_PROTOCOL_F_REPLY_ACK.
const PROTOCOL_FEATURES_BIT: u32 = 1 << 30;
const REPLY_ACK_BIT: u32 = 1 << 3;
const VERSION_1: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
const TIMEOUT: Duration = Duration::from_secs(10);

fn switch_daemon(name: &str) -> (Daemon, PathBuf) {
    let dir = common::frontend::temp_dir(name);
    let sock = dir.join("a.sock");
    let args = vec![
        "--switch".into(),
        "--socket".into(),
        sock.display().to_string(),
    ];
    (
        Daemon::spawn(&dir, &args, std::slice::from_ref(&sock)),
        sock,
    )
}

/// A new frontend gets the whole handshake through and the daemon lives.
fn assert_serves(daemon: &mut Daemon, sock: &Path) {
    let mut fe = TestFrontend::connect(sock, 1);
    assert_eq!(
        fe.fe.get_features().ok().map(|f| f & 1 << 32),
        Some(1 << 32)
    );
    assert!(!daemon.exited(), "{}", daemon.stderr());
    fe.fe
        .set_vring_enable(0, false)
        .expect("the daemon answers");
}

#[test]
fn memory_past_the_end_of_its_file_unsealed_or_a_wide_ring_base_is_refused() {
    let (mut daemon, sock) = switch_daemon("hostile-mem");
    let (mut fe, _) = negotiate(&sock, 1);
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let guest = GuestMem::new();
    let mut too_big = TestFrontend::region(&guest);
    too_big.memory_size *= 2;
    assert!(
        fe.set_mem_table(&[too_big]).is_err(),
        "larger than its file"
    );
    let mut past_end = TestFrontend::region(&guest);
    past_end.mmap_offset = past_end.memory_size;
    past_end.memory_size = 4096;
    assert!(
        fe.set_mem_table(&[past_end]).is_err(),
        "offset past the end"
    );
    let unsealed = GuestMem::unsealed();
    let region = TestFrontend::region(&unsealed);
    assert!(fe.set_mem_table(&[region]).is_err(), "an unsealed memfd");
    assert!(
        fe.add_mem_region(&past_end).is_err(),
        "ADD_MEM_REG past the end"
    );
    fe.set_mem_table(&[TestFrontend::region(&guest)])
        .expect("good memory is still accepted on this connection");
    drop(fe);
    // vhost's frontend cannot even say 65536 (u16): a raw SET_VRING_BASE asking for a reply,
    // once REPLY_ACK is negotiated (without it a backend answers no SET_* request).
    let mut raw = UnixStream::connect(&sock).unwrap();
    raw.set_read_timeout(Some(TIMEOUT)).unwrap();
    let send = |raw: &mut UnixStream, words: &[u32]| {
        let msg: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        raw.write_all(&msg).unwrap();
    };
    send(&mut raw, &[GET_FEATURES, VERSION_1, 0]);
    let mut features = [0u8; 20];
    raw.read_exact(&mut features)
        .expect("GET_FEATURES answered");
    send(
        &mut raw,
        &[SET_FEATURES, VERSION_1, 8, PROTOCOL_FEATURES_BIT, 0],
    );
    send(
        &mut raw,
        &[SET_PROTOCOL_FEATURES, VERSION_1, 8, REPLY_ACK_BIT, 0],
    );
    send(
        &mut raw,
        &[SET_VRING_BASE, VERSION_1 | NEED_REPLY, 8, 0, 65536],
    );
    let mut reply = [0u8; 20];
    raw.read_exact(&mut reply).expect("a reply");
    assert_eq!(&reply[..4], &SET_VRING_BASE.to_le_bytes());
    assert_ne!(
        u64::from_le_bytes(reply[12..].try_into().unwrap()),
        0,
        "failure"
    );
    drop(raw);
    let log = daemon.stderr();
    for needle in [
        "lies beyond the end of the",
        "F_SEAL_SHRINK",
        "SET_VRING_BASE 65536",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}: {log}");
    }

    // Without NEED_REPLY there is no way to say no: the table is refused and logged, nothing
    // is mapped, and the connection goes on (as the shared vhost-user server does for blk).
    let refusals = |daemon: &Daemon| daemon.stderr().matches("refusing request").count();
    let before = refusals(&daemon);
    let (fe, _) = negotiate(&sock, 1);
    let mut past_end = TestFrontend::region(&guest);
    past_end.mmap_offset = past_end.memory_size;
    let _ = fe.set_mem_table(&[past_end]);
    assert!(fe.get_features().is_ok(), "the connection goes on");
    assert_eq!(refusals(&daemon), before + 1, "{}", daemon.stderr());
    drop(fe);
    assert_serves(&mut daemon, &sock);
}

#[test]
fn avail_index_far_ahead_stops_the_queue_once_and_the_daemon_answers() {
    let (mut daemon, sock) = switch_daemon("hostile-avail");
    let fe = TestFrontend::connect(&sock, 1);
    let ahead: u16 = QSIZE + 100;
    fe.mem()
        .write_obj(ahead.to_le(), GuestAddress(fe.vqs[TX].avail() + 2))
        .unwrap();
    for _ in 0..100 {
        fe.kick(TX);
    }
    let logged = wait_for(TIMEOUT, || daemon.stderr().contains("the ring is broken"));
    assert!(logged, "{}", daemon.stderr());
    // GET_VRING_BASE needs the ring the worker would be spinning on.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fe.fe.get_vring_base(TX).map_err(|e| e.to_string()));
        drop(fe);
    });
    let base = rx.recv_timeout(TIMEOUT).expect("GET_VRING_BASE answered");
    assert_eq!(base, Ok(0));
    let log = daemon.stderr();
    assert_eq!(log.matches("the ring is broken").count(), 1, "{log}");
    assert_serves(&mut daemon, &sock);
}

#[test]
fn reconnects_do_not_leak_descriptors() {
    let (mut daemon, sock) = switch_daemon("hostile-fds");
    let pid = daemon.child.id();
    let waiting = |daemon: &Daemon| daemon.stderr().matches("waiting for a frontend").count();
    let settled = |daemon: &Daemon, n: usize| wait_for(TIMEOUT, || waiting(daemon) == n);
    assert!(settled(&daemon, 1), "{}", daemon.stderr());
    // One connection first: anything set up once per daemon is in place.
    drop(TestFrontend::connect(&sock, 1));
    assert!(settled(&daemon, 2), "{}", daemon.stderr());
    let before = fd_count(pid);
    for i in 0..50 {
        drop(TestFrontend::connect(&sock, 1));
        assert!(settled(&daemon, 3 + i), "{}", daemon.stderr());
    }
    assert_eq!(fd_count(pid), before, "descriptors after 50 reconnects");
    assert_serves(&mut daemon, &sock);
}
