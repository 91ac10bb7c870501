//! End-to-end tests of the `splitvisor-blk` binary: a real vhost-user handshake with the vhost
//! crate's `Frontend`, requests through a virtqueue in shared memfd memory, reconnection,
//! socket ownership and cleanup.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use common::{make_image, spawn, start, start_with};
use splitvisor_tests::frontend::blk::{
    assert_serves, bufs, do_request, handshake, le_u32, le_u64, Session, IMAGE_SIZE, QUEUE_SIZE,
    RAM_GPA, RAM_SIZE, T_IN, T_OUT,
};
use splitvisor_tests::frontend::wait_call;
use splitvisor_tests::frontend::{GuestRam, SplitVring};
use splitvisor_tests::pattern::random_bytes;
use splitvisor_tests::wait::wait_for;
use vhost::VhostBackend;
use vmm_sys_util::tempdir::TempDir;

/// Write through the queue, check the image file, read it back through the queue.
fn write_read_check(
    s: &Session,
    ram: &GuestRam,
    ring: &mut SplitVring,
    q: usize,
    image: &Path,
    seed: u8,
) {
    // Odd seeds: random_bytes sets bit 0, so each `seed` gives its own bytes.
    let data = random_bytes(u64::from(seed) << 1 | 1, 8192);
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
    let mut daemon = start(
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
                .log_text()
                .lines()
                .filter(|l| l.starts_with("STATS {\"queues\":["))
                .count();
            (n == usize::from(round) + 1).then_some(())
        });
    }
    let log = daemon.log_text();
    assert!(log.contains("\"queue\":1,\"requests\":4,"), "{log}");

    let status = daemon.stop().unwrap();
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
    let first = start(dir.as_path(), &image, &[]);
    let mut second = spawn(dir.as_path(), "second", &image, &[]);
    let status = second.wait_exit().unwrap();
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
    let daemon = start(dir.as_path(), &image, &[]);
    wait_for("the daemon to serve", || {
        daemon.log_text().contains("serving ").then_some(())
    });
    assert!(
        daemon.log_text().contains("replacing stale socket"),
        "{}",
        daemon.log_text()
    );
    assert!(UnixStream::connect(&daemon.socket).is_ok());
}

#[test]
fn readonly_rejects_writes() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    let daemon = start(dir.as_path(), &image, &["--readonly"]);
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
        daemon.log_text().contains("no usable status byte"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn missing_image_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let mut child = spawn(
        dir.as_path(),
        "missing",
        &dir.as_path().join("nope.img"),
        &[],
    );
    assert!(!child.wait_exit().unwrap().success());
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
    let daemon = start(dir.as_path(), &image, &["--direct"]);
    let ram = GuestRam::new(RAM_GPA, RAM_SIZE);
    let mut ring = SplitVring::new(&ram, 0x1_0000, QUEUE_SIZE);
    let (s, _) = handshake(&daemon.socket, &ram, &[&ring]);
    write_read_check(&s, &ram, &mut ring, 0, &image, 7);
    assert!(
        !daemon.log_text().contains("O_DIRECT transfer failed"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_second_writer_on_one_image_is_refused_unless_both_share() {
    let (dir, other) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let image = make_image(dir.as_path());
    let first = start(dir.as_path(), &image, &[]);
    for (name, flags) in [
        ("writer", &[][..]),
        ("reader", &["--readonly"][..]),
        ("sharer", &["--share"][..]),
    ] {
        let mut second = spawn(other.as_path(), name, &image, flags);
        assert!(!second.wait_exit().unwrap().success(), "{name}");
        let err = std::fs::read_to_string(other.as_path().join(format!("{name}.log"))).unwrap();
        assert!(err.contains(&image.display().to_string()), "{err}");
        assert!(err.contains("in use by another process"), "{err}");
        assert!(err.contains("exclusive lock"), "{err}");
        assert!(err.contains("--share"), "{err}");
        assert!(
            !other.as_path().join("blk.sock").exists(),
            "{name}: socket removed"
        );
    }
    assert_serves(&first.socket);
    drop(first);

    // Two daemons taking turns on one image (planned swaps) both say --share.
    let first = start(dir.as_path(), &image, &["--share"]);
    let second = start_with(other.as_path(), "second", &image, &["--share"], &[]);
    assert_serves(&second.socket);
    assert_serves(&first.socket);
    let third = TempDir::new().unwrap();
    let mut writer = spawn(third.as_path(), "late-writer", &image, &[]);
    assert!(!writer.wait_exit().unwrap().success());
    let err = std::fs::read_to_string(third.as_path().join("late-writer.log")).unwrap();
    assert!(err.contains("shared lock"), "{err}");
    drop((first, second));

    // A killed daemon's lock goes with it.
    let mut first = start(dir.as_path(), &image, &[]);
    first.kill().expect("kill the daemon");
    let again = start_with(other.as_path(), "again", &image, &[], &[]);
    assert_serves(&again.socket);
}

#[test]
fn an_image_of_partial_sectors_or_not_a_file_is_refused_for_writing() {
    let dir = TempDir::new().unwrap();
    let odd = dir.as_path().join("odd.img");
    File::create(&odd).unwrap().set_len(4096 + 100).unwrap();
    let mut child = spawn(dir.as_path(), "odd", &odd, &[]);
    assert!(!child.wait_exit().unwrap().success());
    let err = std::fs::read_to_string(dir.as_path().join("odd.log")).unwrap();
    assert!(
        err.contains("odd.img") && err.contains("not a whole number of 512-byte sectors"),
        "{err}"
    );
    assert!(err.contains("--readonly"), "{err}");
    let reader = start(dir.as_path(), &odd, &["--readonly"]);
    drop(reader);
    let mut child = spawn(dir.as_path(), "null", Path::new("/dev/null"), &[]);
    assert!(!child.wait_exit().unwrap().success());
    let err = std::fs::read_to_string(dir.as_path().join("null.log")).unwrap();
    assert!(
        err.contains("/dev/null is not a regular file or block device"),
        "{err}"
    );
}

/// CPU time (user + system) the process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_polling_queue_serves_and_then_sleeps_once_idle() {
    let dir = TempDir::new().unwrap();
    let image = make_image(dir.as_path());
    // A long window (20 ms) so that a worker that never stopped polling would show.
    let daemon = start(
        dir.as_path(),
        &image,
        &["--queues", "1", "--poll-us", "20000"],
    );
    let ram = GuestRam::new(RAM_GPA, RAM_SIZE);
    let mut ring = SplitVring::new(&ram, 0x1_0000, QUEUE_SIZE);
    let (s, _) = handshake(&daemon.socket, &ram, &[&ring]);
    for seed in 1..4 {
        write_read_check(&s, &ram, &mut ring, 0, &image, seed);
    }
    // Past the window the worker sleeps on its kick eventfd: over one second (a measuring
    // interval, not a wait for readiness) the daemon uses next to no CPU, where a spinning
    // worker would use the whole second (100 ticks at the usual 100 Hz).
    std::thread::sleep(std::time::Duration::from_millis(100));
    let before = cpu_ticks(daemon.pid());
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used = cpu_ticks(daemon.pid()) - before;
    assert!(
        used <= 10,
        "an idle polling daemon used {used} ticks in 1 s"
    );
    // And it still wakes up for the next request.
    write_read_check(&s, &ram, &mut ring, 0, &image, 9);
}
