//! Ring takeover: a frontend hands the daemon rings that earlier backends already ran up to
//! used index 1000 (a VMM reconnecting after a crash, or swapping backends), kicks each queue
//! once, and frames flow with the used index continuing from 1000, never going backwards,
//! whether guest memory showed that position before the ring was configured (the VMM's order;
//! vhost-user-backend reads it at SET_VRING_ADDR) or only after (the daemon reads it again at
//! each event).

mod common;

use std::time::Duration;

use splitvisor_tests::frontend::net::{
    inject, net_frame, tap_available, RingPosition, TestFrontend, VNET_HDR_LEN,
};
use splitvisor_tests::wait::wait_until;
use splitvisor_tests::workdir::Workdir;

const RX: usize = 0;
const TX: usize = 1;
const RX_BUFS: u64 = 0x40000;
const TX_BUF: u64 = 0x80000;
const BUF_LEN: u32 = 2048;
const BASE: u16 = 1000;
const ETHERTYPE: u16 = 0x88b5;

/// Post `count` RX buffers without a kick: the guest did this before the handover.
fn post_rx_silently(fe: &mut TestFrontend, count: u64) {
    fe.post_rx_silently(RX, RX_BUFS, count, BUF_LEN);
}

/// The handover kick a VMM writes once per queue after passing the rings on.
fn handover_kicks(fe: &TestFrontend) {
    fe.kick(RX);
    fe.kick(TX);
}

/// Bytes of used RX element `i` (virtio-net header included).
fn rx_frame(fe: &TestFrontend, i: u16) -> Vec<u8> {
    fe.rx_frame(RX, RX_BUFS, BUF_LEN, i)
}

#[test]
fn switch_port_taken_over_at_used_index_1000_continues_from_it() {
    let dir = Workdir::new("takeover-switch");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let daemon = common::start_switch(&dir, &[&a, &b], &[]);
    let mut fa = TestFrontend::connect(&a, 1);
    fa.post_rx(RX, RX_BUFS, 8, BUF_LEN);

    // Port B: a first connection, then a second one taking over its rings at 1000; the old
    // backend's last completions land after the new one got the ring addresses.
    drop(TestFrontend::connect(&b, 1));
    let mut fb = TestFrontend::connect_at(&b, 1, BASE, RingPosition::AfterSetup);
    post_rx_silently(&mut fb, 8);
    handover_kicks(&fb);

    // A -> B: B's first completion lands at used position 1000, the index becomes 1001.
    let to_b = net_frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 0x0a], ETHERTYPE, b"to B");
    let mut sent = 0u64;
    let arrived = wait_until(Duration::from_secs(10), || {
        if fb.vqs[RX].used_idx() != BASE {
            return true;
        }
        // B's RX queue joins the switch when its handover kick is handled: resend until then.
        fa.send(TX, TX_BUF + 0x1000 * (sent % 16), &to_b);
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
        false
    });
    assert!(arrived, "frame never reached port B: {}", daemon.log_text());
    assert_eq!(fb.vqs[RX].used_idx(), BASE + 1, "B's RX used index");
    assert_eq!(&rx_frame(&fb, BASE)[12..], &to_b[12..]);

    // B -> A: B's TX ring also continues from 1000.
    let to_a = net_frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 0x0b], ETHERTYPE, b"to A");
    fb.send(TX, TX_BUF, &to_a);
    let done = wait_until(Duration::from_secs(10), || {
        fb.vqs[TX].used_idx() == BASE + 1 && fa.vqs[RX].used_idx() == 1
    });
    assert!(
        done,
        "B's TX used index {} (want {}), A's RX used index {}: {}",
        fb.vqs[TX].used_idx(),
        BASE + 1,
        fa.vqs[RX].used_idx(),
        daemon.log_text()
    );
    assert_eq!(fb.vqs[TX].used_elem(BASE).1, 0, "TX used length");
    assert_eq!(&rx_frame(&fa, 0)[12..], &to_a[12..]);
    drop(fa);
    drop(fb);
}

#[test]
fn tap_frame_queued_before_takeover_arrives_after_one_handover_kick() {
    if !tap_available("tap_frame_queued_before_takeover_arrives_after_one_handover_kick") {
        return;
    }
    let dir = Workdir::new("takeover-tap");
    let (daemon, sock, tap) = common::start_tap(&dir, "svto");
    common::link_up(&tap);

    // A first connection goes away; a frame reaches the TAP while nobody is connected.
    drop(TestFrontend::connect(&sock, 1));
    let marker = b"splitvisor-net takeover rx test";
    let mut raw = net_frame([0xff; 6], [0x02, 0, 0, 0, 0, 9], ETHERTYPE, marker);
    raw.drain(..VNET_HDR_LEN);
    inject(&tap, &raw);

    // The new connection takes the rings over at 1000; the guest posted its RX buffers before
    // and never kicks again: only the handover kicks follow.
    let mut fe = TestFrontend::connect_at(&sock, 1, BASE, RingPosition::BeforeSetup);
    post_rx_silently(&mut fe, 32);
    handover_kicks(&fe);
    // IPv6 autoconfiguration may queue frames too: look for ours.
    let mut checked = BASE;
    let found = wait_until(Duration::from_secs(10), || {
        let used = fe.vqs[RX].used_idx();
        assert!(
            used.wrapping_sub(BASE) <= 32,
            "RX used index went from {BASE} to {used}"
        );
        let mut found = false;
        while checked != used {
            let buf = rx_frame(&fe, checked);
            found |= buf.len() == VNET_HDR_LEN + raw.len() && buf[VNET_HDR_LEN..] == raw[..];
            checked = checked.wrapping_add(1);
        }
        found
    });
    assert!(
        found,
        "the queued frame never reached the RX ring (used index {}): {}",
        fe.vqs[RX].used_idx(),
        daemon.log_text()
    );
    drop(fe);
}
