//! A hostile frontend or guest against `splitvisor-net --switch`: memory it cannot back, a ring
//! base that does not fit, an avail index that runs ahead, and many reconnects. Each case is
//! refused or contained, and a well-behaved frontend is served afterwards.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use splitvisor_tests::daemon::Daemon;
use splitvisor_tests::frontend::net::{negotiate, TestFrontend, MEM_SIZE, QSIZE};
use splitvisor_tests::frontend::{fd_count, raw, GuestRam};
use splitvisor_tests::wait::{wait_until, TIMEOUT};
use splitvisor_tests::workdir::Workdir;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const TX: usize = 1;
/// VHOST_USER_F_PROTOCOL_FEATURES and VHOST_USER_PROTOCOL_F_REPLY_ACK.
const PROTOCOL_FEATURES_BIT: u32 = 1 << 30;
const REPLY_ACK_BIT: u32 = 1 << 3;

/// `splitvisor-net --switch` with one port; the work directory outlives the daemon.
fn switch_daemon(name: &str) -> (Workdir, Daemon, PathBuf) {
    let dir = Workdir::new(name);
    let sock = dir.join("a.sock");
    let daemon = common::start_switch(&dir, &[&sock], &[]);
    (dir, daemon, sock)
}

/// A new frontend gets the whole handshake through and the daemon lives.
fn assert_serves(daemon: &mut Daemon, sock: &Path) {
    let mut fe = TestFrontend::connect(sock, 1);
    assert_eq!(
        fe.fe.get_features().ok().map(|f| f & 1 << 32),
        Some(1 << 32)
    );
    assert!(!daemon.has_exited(), "{}", daemon.log_text());
    fe.fe
        .set_vring_enable(0, false)
        .expect("the daemon answers");
}

#[test]
fn memory_past_the_end_of_its_file_unsealed_or_a_wide_ring_base_is_refused() {
    let (_dir, mut daemon, sock) = switch_daemon("hostile-mem");
    let (mut fe, _) = negotiate(&sock, 1);
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let guest = TestFrontend::guest();
    let mut too_big = guest.region();
    too_big.memory_size *= 2;
    assert!(
        fe.set_mem_table(&[too_big]).is_err(),
        "larger than its file"
    );
    let mut past_end = guest.region();
    past_end.mmap_offset = past_end.memory_size;
    past_end.memory_size = 4096;
    assert!(
        fe.set_mem_table(&[past_end]).is_err(),
        "offset past the end"
    );
    let unsealed = GuestRam::unsealed(0, MEM_SIZE);
    let region = unsealed.region();
    assert!(fe.set_mem_table(&[region]).is_err(), "an unsealed memfd");
    assert!(
        fe.add_mem_region(&past_end).is_err(),
        "ADD_MEM_REG past the end"
    );
    fe.set_mem_table(&[guest.region()])
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
    send(&mut raw, &[raw::GET_FEATURES, raw::VERSION_1, 0]);
    let mut features = [0u8; 20];
    raw.read_exact(&mut features)
        .expect("raw::GET_FEATURES answered");
    send(
        &mut raw,
        &[
            raw::SET_FEATURES,
            raw::VERSION_1,
            8,
            PROTOCOL_FEATURES_BIT,
            0,
        ],
    );
    send(
        &mut raw,
        &[
            raw::SET_PROTOCOL_FEATURES,
            raw::VERSION_1,
            8,
            REPLY_ACK_BIT,
            0,
        ],
    );
    send(
        &mut raw,
        &[
            raw::SET_VRING_BASE,
            raw::VERSION_1 | raw::NEED_REPLY,
            8,
            0,
            65536,
        ],
    );
    let mut reply = [0u8; 20];
    raw.read_exact(&mut reply).expect("a reply");
    assert_eq!(&reply[..4], &raw::SET_VRING_BASE.to_le_bytes());
    assert_ne!(
        u64::from_le_bytes(reply[12..].try_into().unwrap()),
        0,
        "failure"
    );
    drop(raw);
    let log = daemon.log_text();
    for needle in [
        "lies beyond the end of the",
        "F_SEAL_SHRINK",
        "SET_VRING_BASE 65536",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}: {log}");
    }

    // Without NEED_REPLY there is no way to say no: the table is refused and logged, nothing
    // is mapped, and the connection goes on (as the shared vhost-user server does for blk).
    let refusals = |daemon: &Daemon| daemon.log_text().matches("refusing request").count();
    let before = refusals(&daemon);
    let (fe, _) = negotiate(&sock, 1);
    let mut past_end = guest.region();
    past_end.mmap_offset = past_end.memory_size;
    let _ = fe.set_mem_table(&[past_end]);
    assert!(fe.get_features().is_ok(), "the connection goes on");
    assert_eq!(refusals(&daemon), before + 1, "{}", daemon.log_text());
    drop(fe);
    assert_serves(&mut daemon, &sock);
}

#[test]
fn avail_index_far_ahead_stops_the_queue_once_and_the_daemon_answers() {
    let (_dir, mut daemon, sock) = switch_daemon("hostile-avail");
    let fe = TestFrontend::connect(&sock, 1);
    let ahead: u16 = QSIZE + 100;
    fe.vqs[TX].set_avail_idx(ahead);
    for _ in 0..100 {
        fe.kick(TX);
    }
    let logged = wait_until(TIMEOUT, || daemon.log_text().contains("the ring is broken"));
    assert!(logged, "{}", daemon.log_text());
    // GET_VRING_BASE needs the ring the worker would be spinning on.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let base = fe.fe.get_vring_base(TX).map_err(|e| e.to_string());
        // Hung up before the answer is passed on: the next frontend must not find this one
        // still connected (it would be turned away as a second frontend).
        drop(fe);
        let _ = tx.send(base);
    });
    let base = rx.recv_timeout(TIMEOUT).expect("GET_VRING_BASE answered");
    assert_eq!(base, Ok(0));
    let log = daemon.log_text();
    assert_eq!(log.matches("the ring is broken").count(), 1, "{log}");
    assert_serves(&mut daemon, &sock);
}

#[test]
fn reconnects_do_not_leak_descriptors() {
    let (_dir, mut daemon, sock) = switch_daemon("hostile-fds");
    let pid = daemon.pid();
    let waiting = |daemon: &Daemon| daemon.log_text().matches("waiting for a frontend").count();
    let settled = |daemon: &Daemon, n: usize| wait_until(TIMEOUT, || waiting(daemon) == n);
    assert!(settled(&daemon, 1), "{}", daemon.log_text());
    // One connection first: anything set up once per daemon is in place.
    drop(TestFrontend::connect(&sock, 1));
    assert!(settled(&daemon, 2), "{}", daemon.log_text());
    let before = fd_count(pid);
    for i in 0..50 {
        drop(TestFrontend::connect(&sock, 1));
        assert!(settled(&daemon, 3 + i), "{}", daemon.log_text());
    }
    assert_eq!(fd_count(pid), before, "descriptors after 50 reconnects");
    assert_serves(&mut daemon, &sock);
}
