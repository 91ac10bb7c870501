//! Ring takeover: a frontend hands the daemon rings that earlier backends already ran up to
//! used index 1000 (a VMM reconnecting after a crash, or swapping backends), kicks each queue
//! once, and frames flow with the used index continuing from 1000, never going backwards,
//! whether guest memory showed that position before the ring was configured (the VMM's order;
//! vhost-user-backend reads it at SET_VRING_ADDR) or only after (the daemon reads it again at
//! each event).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::frontend::{net_frame, wait_for, Daemon, RingPosition, TestFrontend, QSIZE};
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
const RX_BUFS: u64 = 0x40000;
const TX_BUF: u64 = 0x80000;
const BUF_LEN: u32 = 2048;
const BASE: u16 = 1000;
const ETHERTYPE: u16 = 0x88b5;

/// Post `count` RX buffers without a kick: the guest did this before the handover.
fn post_rx_silently(fe: &mut TestFrontend, count: u64) {
    let mem = fe.mem().clone();
    for i in 0..count {
        fe.vqs[RX].add_chain(&mem, &[(RX_BUFS + i * u64::from(BUF_LEN), BUF_LEN, true)]);
    }
}

/// The handover kick a VMM writes once per queue after passing the rings on.
fn handover_kicks(fe: &TestFrontend) {
    fe.kick(RX);
    fe.kick(TX);
}

/// Bytes of used RX element `i` (virtio-net header included).
fn rx_frame(fe: &TestFrontend, i: u16) -> Vec<u8> {
    let (id, len) = fe.vqs[RX].used_elem(fe.mem(), i);
    assert!(u16::try_from(id).is_ok_and(|id| id < QSIZE), "used id {id}");
    let mut buf = vec![0u8; len as usize];
    fe.mem()
        .read_slice(
            &mut buf,
            GuestAddress(RX_BUFS + u64::from(id) * u64::from(BUF_LEN)),
        )
        .unwrap();
    buf
}

#[test]
fn switch_port_taken_over_at_used_index_1000_continues_from_it() {
    let dir = common::frontend::temp_dir("takeover-switch");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let args: Vec<String> = vec![
        "--switch".into(),
        "--socket".into(),
        a.display().to_string(),
        "--socket".into(),
        b.display().to_string(),
    ];
    let daemon = Daemon::spawn(&dir, &args, &[a.clone(), b.clone()]);
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
    let arrived = wait_for(Duration::from_secs(10), || {
        if fb.vqs[RX].used_idx(fb.mem()) != BASE {
            return true;
        }
        // B's RX queue joins the switch when its handover kick is handled: resend until then.
        fa.send(TX, TX_BUF + 0x1000 * (sent % 16), &to_b);
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
        false
    });
    assert!(arrived, "frame never reached port B: {}", daemon.stderr());
    assert_eq!(fb.vqs[RX].used_idx(fb.mem()), BASE + 1, "B's RX used index");
    assert_eq!(&rx_frame(&fb, BASE)[12..], &to_b[12..]);

    // B -> A: B's TX ring also continues from 1000.
    let to_a = net_frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 0x0b], ETHERTYPE, b"to A");
    fb.send(TX, TX_BUF, &to_a);
    let done = wait_for(Duration::from_secs(10), || {
        fb.vqs[TX].used_idx(fb.mem()) == BASE + 1 && fa.vqs[RX].used_idx(fa.mem()) == 1
    });
    assert!(
        done,
        "B's TX used index {} (want {}), A's RX used index {}: {}",
        fb.vqs[TX].used_idx(fb.mem()),
        BASE + 1,
        fa.vqs[RX].used_idx(fa.mem()),
        daemon.stderr()
    );
    assert_eq!(fb.vqs[TX].used_elem(fb.mem(), BASE).1, 0, "TX used length");
    assert_eq!(&rx_frame(&fa, 0)[12..], &to_a[12..]);
    drop(fa);
    drop(fb);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Transmit `frame` (no vnet header) out of interface `ifname` with an AF_PACKET socket.
fn inject(ifname: &str, frame: &[u8]) {
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: plain libc calls on values we own; the socket is closed below.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        assert!(ifindex > 0, "no interface {ifname}");
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "AF_PACKET socket");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        libc::close(fd);
        assert_eq!(sent, frame.len() as isize, "sendto");
    }
}

#[test]
fn tap_frame_queued_before_takeover_arrives_after_one_handover_kick() {
    if !Path::new("/dev/net/tun").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "/dev/net/tun is missing and CI is set: the TAP test must run"
        );
        eprintln!("skipping TAP takeover test: /dev/net/tun is missing");
        return;
    }
    let dir = common::frontend::temp_dir("takeover-tap");
    let sock = dir.join("net.sock");
    let tap = format!("svto{}", std::process::id() % 100_000);
    let args: Vec<String> = vec![
        "--tap".into(),
        tap.clone(),
        "--socket".into(),
        sock.display().to_string(),
    ];
    let daemon = Daemon::spawn(&dir, &args, std::slice::from_ref(&sock));
    let up = Command::new("ip")
        .args(["link", "set", "dev", &tap, "up"])
        .status()
        .expect("run ip");
    assert!(up.success(), "ip link set up failed");

    // A first connection goes away; a frame reaches the TAP while nobody is connected.
    drop(TestFrontend::connect(&sock, 1));
    let marker = b"splitvisor-net takeover rx test";
    let mut raw = net_frame([0xff; 6], [0x02, 0, 0, 0, 0, 9], ETHERTYPE, marker);
    raw.drain(..12);
    inject(&tap, &raw);

    // The new connection takes the rings over at 1000; the guest posted its RX buffers before
    // and never kicks again: only the handover kicks follow.
    let mut fe = TestFrontend::connect_at(&sock, 1, BASE, RingPosition::BeforeSetup);
    post_rx_silently(&mut fe, 32);
    handover_kicks(&fe);
    // IPv6 autoconfiguration may queue frames too: look for ours.
    let mut checked = BASE;
    let found = wait_for(Duration::from_secs(10), || {
        let used = fe.vqs[RX].used_idx(fe.mem());
        assert!(
            used.wrapping_sub(BASE) <= 32,
            "RX used index went from {BASE} to {used}"
        );
        let mut found = false;
        while checked != used {
            let buf = rx_frame(&fe, checked);
            found |= buf.len() == 12 + raw.len() && buf[12..] == raw[..];
            checked = checked.wrapping_add(1);
        }
        found
    });
    assert!(
        found,
        "the queued frame never reached the RX ring (used index {}): {}",
        fe.vqs[RX].used_idx(fe.mem()),
        daemon.stderr()
    );
    drop(fe);
    let _ = std::fs::remove_dir_all(&dir);
}
