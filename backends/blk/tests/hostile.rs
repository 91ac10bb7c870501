//! A hostile frontend or guest against the `splitvisor-blk` binary: memory it cannot back,
//! rings that lie, file descriptors of the wrong kind. Each case is refused or contained, and
//! a well-behaved frontend is served afterwards.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use common::{make_image, start};
use splitvisor_tests::frontend::blk::{
    assert_serves, bufs, connect, handshake, request_header, QUEUE_SIZE, RAM_GPA, RAM_SIZE, T_OUT,
};
use splitvisor_tests::frontend::raw;
use splitvisor_tests::frontend::wait_call;
use splitvisor_tests::frontend::{GuestRam, SplitVring};
use splitvisor_tests::wait::{wait_for, TIMEOUT};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

/// Queues a daemon started without `--queues` offers.
fn default_queues() -> u64 {
    splitvisor_blk::default_queues() as u64
}

#[test]
fn memory_past_the_end_of_its_file_or_unsealed_is_refused() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = start(dir.as_path(), &image, &[]);
    let ram = GuestRam::new(RAM_GPA, RAM_SIZE);
    let (mut fe, features) = connect(&daemon.socket, 1);
    fe.set_features(features).unwrap();

    let mut too_big = ram.region();
    too_big.memory_size = RAM_SIZE * 2;
    let mut offset_past_end = ram.region();
    offset_past_end.mmap_offset = RAM_SIZE;
    offset_past_end.memory_size = 4096;
    // (An offset + size that wraps is refused by vhost's parser already; the unit tests in
    // fdcheck.rs cover it.)
    for (what, region) in [
        ("larger than its file", &too_big),
        ("offset past the end", &offset_past_end),
    ] {
        assert!(
            fe.set_mem_table(&[*region]).is_err(),
            "SET_MEM_TABLE {what}"
        );
        assert!(fe.add_mem_region(region).is_err(), "ADD_MEM_REG {what}");
    }
    let unsealed = GuestRam::unsealed(RAM_GPA, RAM_SIZE);
    assert!(fe.set_mem_table(&[unsealed.region()]).is_err());
    let alive = fe.get_queue_num();
    assert_eq!(
        alive.ok(),
        Some(default_queues()),
        "the connection still works: {}",
        daemon.log_text()
    );
    drop(fe);
    let log = daemon.log_text();
    for needle in ["lies beyond the end of the", "F_SEAL_SHRINK"] {
        assert!(log.contains(needle), "log lacks {needle:?}: {log}");
    }
    assert_serves(&daemon.socket);
}

/// `fe.get_vring_base(q)` with a deadline (vhost's frontend would wait forever).
fn get_vring_base_within(fe: vhost::vhost_user::Frontend, q: usize) -> u32 {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let base = fe.get_vring_base(q).map_err(|e| e.to_string());
        // Hung up before the answer is passed on, as a frontend does before it reconnects:
        // the next frontend must not find this one still connected (it would be turned away
        // as a second frontend).
        drop(fe);
        let _ = tx.send(base);
    });
    rx.recv_timeout(TIMEOUT)
        .expect("GET_VRING_BASE answered in time")
        .expect("GET_VRING_BASE succeeds")
}

#[test]
fn avail_index_far_ahead_stops_the_queue_once_and_the_daemon_answers() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = start(dir.as_path(), &image, &[]);
    let ram = GuestRam::new(RAM_GPA, RAM_SIZE);
    let mut ring = SplitVring::new(&ram, 0x1_0000, QUEUE_SIZE);
    // The session negotiates EVENT_IDX, where the busy loop was.
    let (s, _) = handshake(&daemon.socket, &ram, &[&ring]);
    // One good request first, so the ring is known to work.
    ram.write(bufs(0).hdr, &request_header(T_OUT, 1));
    ring.add_chain(&[
        (bufs(0).hdr, 16, false),
        (bufs(0).data, 512, false),
        (bufs(0).status, 1, true),
    ]);
    s.kicks[0].write(1).unwrap();
    wait_call(&s.calls[0]);
    let ahead: u16 = 1 + QUEUE_SIZE + 100;
    ring.set_avail_idx(ahead);
    for _ in 0..100 {
        s.kicks[0].write(1).unwrap();
    }
    wait_for("the broken ring to be logged", || {
        daemon
            .log_text()
            .contains("the ring is broken")
            .then_some(())
    });
    assert_eq!(get_vring_base_within(s.fe, 0), 1, "the device's position");
    let log = daemon.log_text();
    assert_eq!(log.matches("the ring is broken").count(), 1, "{log}");
    assert!(log.len() < 16 * 1024, "log of {} bytes: {log}", log.len());
    assert_serves(&daemon.socket);
}

#[test]
fn kick_and_call_fds_must_be_eventfds() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = start(dir.as_path(), &image, &[]);
    let ram = GuestRam::new(RAM_GPA, RAM_SIZE);
    let ring = SplitVring::new(&ram, 0x1_0000, QUEUE_SIZE);
    let (mut fe, features) = connect(&daemon.socket, 1);
    fe.set_features(features).unwrap();
    fe.set_mem_table(&[ram.region()]).unwrap();
    fe.set_vring_num(0, QUEUE_SIZE).unwrap();
    fe.set_vring_addr(0, &ring.config()).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_enable(0, true).unwrap();

    let mut pipe = [0i32; 2];
    // SAFETY: `pipe` has room for the two descriptors pipe2 returns.
    let rc = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0);
    // SAFETY: a fresh descriptor owned by nothing else.
    let pipe_eof = unsafe { EventFd::from_raw_fd(pipe[0]) };
    // SAFETY: as above. The write end closes at once, so the read end is at EOF (always
    // readable: the busy loop this guards against).
    let write_end = unsafe { OwnedFd::from_raw_fd(pipe[1]) };
    drop(write_end);
    assert!(
        fe.set_vring_kick(0, &pipe_eof).is_err(),
        "a pipe as kick fd"
    );
    let file = File::create(dir.as_path().join("regular")).unwrap();
    // SAFETY: a duplicate of the file's descriptor that the EventFd alone owns.
    let regular =
        unsafe { EventFd::from_raw_fd(libc::dup(std::os::fd::AsRawFd::as_raw_fd(&file))) };
    assert!(fe.set_vring_kick(0, &regular).is_err(), "a file as kick fd");
    assert!(fe.set_vring_call(0, &regular).is_err(), "a file as call fd");
    assert_eq!(
        fe.get_queue_num().unwrap(),
        default_queues(),
        "the connection still works"
    );
    drop(fe);
    let log = daemon.log_text();
    assert!(log.contains("the kick fd is not an eventfd"), "{log}");
    assert!(log.contains("the call fd is not an eventfd"), "{log}");
    assert_serves(&daemon.socket);
}

#[test]
fn a_flood_of_bad_requests_logs_a_bounded_amount() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = start(dir.as_path(), &image, &[]);
    let ram = GuestRam::new(RAM_GPA, RAM_SIZE);
    let mut ring = SplitVring::new(&ram, 0x1_0000, QUEUE_SIZE);
    let (s, _) = handshake(&daemon.socket, &ram, &[&ring]);
    let b = bufs(0);
    ram.write(b.hdr, &request_header(99, 0));
    let log_before = daemon.log_text().len();
    let (total, batch) = (10_000u32, 32u16);
    let mut done = 0u32;
    while done < total {
        for _ in 0..batch {
            ring.add_chain(&[(b.hdr, 16, false), (b.status, 1, true)]);
        }
        s.kicks[0].write(1).unwrap();
        done += u32::from(batch);
        let want = done as u16;
        wait_for("the batch to complete", || {
            (ring.used_idx() == want).then_some(())
        });
    }
    let log = daemon.log_text();
    let flood = &log[log_before..];
    let lines = flood.matches("unsupported request type 99").count();
    assert_eq!(lines, splitvisor_blk::loglimit::BURST as usize, "{flood}");
    assert!(
        flood.len() < 4096,
        "{} log bytes for {total} bad requests",
        flood.len()
    );
    drop(s);
    assert_serves(&daemon.socket);
}

#[test]
fn a_frontend_stalling_mid_message_is_cut_off() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = start(dir.as_path(), &image, &[]);
    let mut stalled = UnixStream::connect(&daemon.socket).unwrap();
    stalled.set_read_timeout(Some(TIMEOUT)).unwrap();
    // Half a header, then nothing: the daemon gives up on the message (5 s) and the
    // connection, instead of waiting forever while other frontends queue up.
    raw::send(
        &mut stalled,
        &raw::message(raw::GET_FEATURES, raw::VERSION_1, &[])[..6],
    );
    let mut byte = [0u8; 1];
    let n = stalled
        .read(&mut byte)
        .expect("the daemon ends the connection in time");
    assert_eq!(n, 0, "closed, not answered");
    wait_for("the stalled connection to be logged", || {
        let log = daemon.log_text();
        log.contains("stopped in the middle of a message")
            .then_some(())
    });
    assert_serves(&daemon.socket);
}

#[test]
fn a_payload_in_two_segments_is_read_whole() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = start(dir.as_path(), &image, &[]);
    let mut fe = UnixStream::connect(&daemon.socket).unwrap();
    fe.set_read_timeout(Some(TIMEOUT)).unwrap();
    let features = 1u64 << 0; // VHOST_USER_PROTOCOL_F_MQ
    let msg = raw::message(
        raw::SET_PROTOCOL_FEATURES,
        raw::VERSION_1,
        &features.to_le_bytes(),
    );
    raw::send(&mut fe, &msg[..16]);
    // The rest a moment later, as its own segment.
    std::thread::sleep(Duration::from_millis(50));
    raw::send(&mut fe, &msg[16..]);
    raw::send(
        &mut fe,
        &raw::message(raw::GET_QUEUE_NUM, raw::VERSION_1, &[]),
    );
    let (request, _, payload) = raw::read_reply(&mut fe);
    assert_eq!(request, raw::GET_QUEUE_NUM);
    assert_eq!(payload, default_queues().to_le_bytes());
    drop(fe);
    assert_serves(&daemon.socket);
}

#[test]
fn a_message_with_too_many_fds_is_answered_and_the_connection_closed() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = start(dir.as_path(), &image, &[]);
    let mut fe = UnixStream::connect(&daemon.socket).unwrap();
    fe.set_read_timeout(Some(TIMEOUT)).unwrap();
    let efd = EventFd::new(0).unwrap();
    let fds = vec![std::os::fd::AsRawFd::as_raw_fd(&efd); 40];
    let msg = raw::message(
        raw::SET_VRING_CALL,
        raw::VERSION_1 | raw::NEED_REPLY,
        &0u64.to_le_bytes(),
    );
    raw::send_with_fds(&fe, &msg, &fds);
    let (request, flags, payload) = raw::read_reply(&mut fe);
    assert_eq!(request, raw::SET_VRING_CALL);
    assert_ne!(flags & raw::REPLY, 0, "a reply");
    assert_ne!(payload, 0u64.to_le_bytes(), "a failure");
    let mut byte = [0u8; 1];
    assert_eq!(fe.read(&mut byte).expect("closed in time"), 0);
    wait_for("the refused message to be logged", || {
        let log = daemon.log_text();
        log.contains("more file descriptors than a message may carry")
            .then_some(())
    });
    assert_serves(&daemon.socket);
}
