//! End-to-end: the real daemon in --switch mode with two frontends; a broadcast sent on port A
//! arrives in port B's RX ring; STATS on disconnect; reconnect; socket mode and lock.

mod common;

use std::process::Command;
use std::time::Duration;

use splitvisor_tests::frontend::net::{net_frame, TestFrontend};
use splitvisor_tests::wait::wait_until;
use splitvisor_tests::workdir::{mode, Workdir};
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
const RX_BUFS: u64 = 0x40000;
const TX_BUF: u64 = 0x80000;

#[test]
fn switch_forwards_broadcast_between_ports() {
    let dir = Workdir::new("switch");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let macs = ["--mac", "52:54:00:00:00:0a", "--mac", "52:54:00:00:00:0b"];
    let mut daemon = common::start_switch(&dir, &[&a, &b], &macs);
    for sock in [&a, &b] {
        assert_eq!(mode(sock), 0o600, "{}", sock.display());
    }

    // A second daemon on the same path refuses clearly.
    let second = Command::new(env!("CARGO_BIN_EXE_splitvisor-net"))
        .args(["--switch", "--socket"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let msg = String::from_utf8_lossy(&second.stderr);
    assert!(msg.contains("already served"), "{msg}");

    let mut fa = TestFrontend::connect(&a, 1);
    let mut fb = TestFrontend::connect(&b, 1);
    assert_eq!(&fa.config[..6], &[0x52, 0x54, 0, 0, 0, 0x0a]);
    assert_eq!(&fb.config[..6], &[0x52, 0x54, 0, 0, 0, 0x0b]);
    assert_eq!(
        u16::from_le_bytes([fb.config[6], fb.config[7]]),
        1,
        "link up"
    );
    assert_eq!(
        u16::from_le_bytes([fb.config[8], fb.config[9]]),
        1,
        "one pair"
    );

    fb.post_rx(RX, RX_BUFS, 8, 2048);
    let frame = net_frame(
        [0xff; 6],
        [0x52, 0x54, 0, 0, 0, 0x0a],
        0x88b5,
        b"hello from A",
    );
    // Port B registers its RX queue asynchronously after SET_VRING_ENABLE: resend until seen.
    let mut sent = 0u64;
    let arrived = wait_until(Duration::from_secs(10), || {
        if fb.vqs[RX].used_idx() > 0 {
            return true;
        }
        fa.send(TX, TX_BUF + 0x1000 * (sent % 16), &frame);
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
        false
    });
    assert!(arrived, "frame never reached port B: {}", daemon.log_text());
    let (id, len) = fb.vqs[RX].used_elem(0);
    assert_eq!(len as usize, frame.len());
    let mut got = vec![0u8; frame.len()];
    fb.mem()
        .read_slice(&mut got, GuestAddress(RX_BUFS + u64::from(id) * 2048))
        .unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[12..], &frame[12..]);
    assert!(wait_until(Duration::from_secs(5), || fa.vqs[TX].used_idx()
        as u64
        == sent));

    // Disconnecting A prints STATS; the daemon keeps serving A's socket.
    drop(fa);
    let stats = wait_until(Duration::from_secs(10), || {
        daemon.log_text().contains("STATS {")
    });
    assert!(stats, "no STATS line: {}", daemon.log_text());
    let line = daemon
        .log_text()
        .lines()
        .find(|l| l.starts_with("STATS {"))
        .unwrap()
        .to_string();
    assert!(line.contains("\"tx_frames\":"), "{line}");
    let again = TestFrontend::connect(&a, 1);
    assert_eq!(&again.config[..6], &[0x52, 0x54, 0, 0, 0, 0x0a]);
    assert!(!daemon.has_exited());

    // SIGTERM removes the sockets.
    daemon.stop().expect("the daemon exits on SIGTERM");
    assert!(!a.exists() && !b.exists());
}
