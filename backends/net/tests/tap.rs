//! End-to-end in TAP mode (root, /dev/net/tun): a frame on the TX ring shows up on the TAP
//! (interface rx counter), and a frame sent into the TAP with AF_PACKET reaches the RX ring.

mod common;

use std::time::Duration;

use splitvisor_tests::frontend::net::{inject, net_frame, tap_available, TestFrontend, QSIZE};
use splitvisor_tests::wait::wait_until;
use splitvisor_tests::workdir::Workdir;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
const RX_BUFS: u64 = 0x40000;
const TX_BUF: u64 = 0x80000;
const ETHERTYPE: u16 = 0x88b5;

fn counter(tap: &str, name: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn tap_moves_frames_both_ways() {
    if !tap_available("tap_moves_frames_both_ways") {
        return;
    }
    let dir = Workdir::new("tap");
    let (daemon, sock, tap) = common::start_tap(&dir, "svt");
    common::link_up(&tap);

    let mut fe = TestFrontend::connect(&sock, 1);
    assert_eq!(
        u16::from_le_bytes([fe.config[6], fe.config[7]]),
        1,
        "link up"
    );

    // Guest -> TAP.
    let before = counter(&tap, "rx_packets");
    let frame = net_frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 1], ETHERTYPE, &[7u8; 64]);
    fe.send(TX, TX_BUF, &frame);
    let seen = wait_until(Duration::from_secs(10), || {
        counter(&tap, "rx_packets") > before
    });
    assert!(seen, "TAP never received the frame: {}", daemon.log_text());
    assert!(wait_until(Duration::from_secs(5), || fe.vqs[TX].used_idx() == 1));

    // TAP -> guest. IPv6 autoconfiguration may send frames too: look for ours.
    fe.post_rx(RX, RX_BUFS, 32, 2048);
    let marker = b"splitvisor-net tap rx test";
    let mut raw = net_frame([0xff; 6], [0x02, 0, 0, 0, 0, 9], ETHERTYPE, marker);
    raw.drain(..12);
    let mut found = false;
    let mut checked = 0u16;
    let ok = wait_until(Duration::from_secs(10), || {
        if checked == 0 {
            inject(&tap, &raw);
        }
        let used = fe.vqs[RX].used_idx();
        while checked < used {
            let (id, len) = fe.vqs[RX].used_elem(checked);
            let mut buf = vec![0u8; len as usize];
            let addr = GuestAddress(RX_BUFS + u64::from(id) * 2048);
            fe.mem().read_slice(&mut buf, addr).unwrap();
            if buf.len() == 12 + raw.len() && buf[12..] == raw[..] {
                assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1, "num_buffers");
                found = true;
            }
            checked += 1;
        }
        found
    });
    assert!(
        ok,
        "injected frame never reached the RX ring: {}",
        daemon.log_text()
    );
    drop(fe);
}

#[test]
fn tap_a_flood_of_bad_tx_chains_logs_a_bounded_amount() {
    if !tap_available("tap_a_flood_of_bad_tx_chains_logs_a_bounded_amount") {
        return;
    }
    let dir = Workdir::new("tap-flood");
    let (daemon, sock, _tap) = common::start_tap(&dir, "svf");
    let mut fe = TestFrontend::connect(&sock, 1);
    let log_before = daemon.log_text().len();
    // Shorter than the virtio-net header: each one is dropped (and was logged, 84 bytes each).
    let (total, batch) = (10_000u32, 32u32);
    let mut done = 0u32;
    while done < total {
        for _ in 0..batch {
            fe.send(TX, TX_BUF, &[0u8; 8]);
        }
        done += batch;
        let want = done as u16;
        let completed = wait_until(Duration::from_secs(10), || fe.vqs[TX].used_idx() == want);
        assert!(completed, "batch up to {done}: {}", daemon.log_text());
    }
    let log = daemon.log_text();
    let flood = &log[log_before..];
    assert_eq!(flood.matches("dropping TX chain").count(), 10, "{flood}"); // loglimit::BURST
    assert!(
        flood.len() < 4096,
        "{} log bytes for {total} bad chains",
        flood.len()
    );
    drop(fe);
}

#[test]
fn tap_avail_index_far_ahead_stops_the_queue_once_and_the_daemon_answers() {
    if !tap_available("tap_avail_index_far_ahead_stops_the_queue_once_and_the_daemon_answers") {
        return;
    }
    let dir = Workdir::new("tap-avail");
    let (mut daemon, sock, _tap) = common::start_tap(&dir, "sva");
    let fe = TestFrontend::connect(&sock, 1);
    let ahead: u16 = QSIZE + 100;
    for q in [RX, TX] {
        fe.vqs[q].set_avail_idx(ahead);
        for _ in 0..50 {
            fe.kick(q);
        }
    }
    let logged = wait_until(Duration::from_secs(10), || {
        daemon.log_text().matches("the ring is broken").count() == 2
    });
    assert!(logged, "{}", daemon.log_text());
    // GET_VRING_BASE needs the vring lock a spinning worker would hold.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let bases = [RX, TX].map(|q| fe.fe.get_vring_base(q).map_err(|e| e.to_string()));
        // Hung up before the answer is passed on (a next frontend would be turned away).
        drop(fe);
        let _ = tx.send(bases);
    });
    let bases = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("GET_VRING_BASE answered");
    assert_eq!(bases, [Ok(0), Ok(0)]);
    assert_eq!(daemon.log_text().matches("the ring is broken").count(), 2);
    let again = TestFrontend::connect(&sock, 1);
    assert_eq!(
        again.fe.get_features().ok().map(|f| f & 1 << 32),
        Some(1 << 32)
    );
    assert!(!daemon.has_exited());
}
