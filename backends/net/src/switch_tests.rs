//! Unit tests of the switch: learning/flooding decisions and forwarding between mock rings.

use super::*;
use crate::testutil::{read, Ring, BUF_BASE};
use vm_memory::{Bytes, GuestAddress};

const A: MacAddr = [0x52, 0x54, 0, 0, 0, 0xa];
const B: MacAddr = [0x52, 0x54, 0, 0, 0, 0xb];
const BCAST: MacAddr = [0xff; 6];

#[test]
fn learns_sources_and_floods_unknown_and_broadcast() {
    let mut t = MacTable::default();
    assert_eq!(t.decide(0, &B), Forward::Flood);
    t.learn(&A, 0);
    t.learn(&B, 1);
    assert_eq!(t.decide(0, &B), Forward::Port(1));
    assert_eq!(t.decide(1, &A), Forward::Port(0));
    assert_eq!(t.decide(0, &A), Forward::Drop);
    assert_eq!(t.decide(0, &BCAST), Forward::Flood);
    assert_eq!(t.decide(0, &[0x01, 0, 0x5e, 0, 0, 1]), Forward::Flood);
    // A moves to port 2; multicast sources are never learned.
    t.learn(&A, 2);
    assert_eq!(t.decide(1, &A), Forward::Port(2));
    t.learn(&BCAST, 1);
    assert_eq!(t.decide(0, &BCAST), Forward::Flood);
    t.forget_port(2);
    assert_eq!(t.decide(1, &A), Forward::Flood);
}

/// A port's guest: its own memory with a TX ring at 0 and an RX ring at 0x8000.
struct Guest {
    mem: GuestMemoryAtomic<Mem>,
}

const RX_BASE: u64 = 0x8000;

impl Guest {
    fn new() -> Self {
        Guest {
            mem: GuestMemoryAtomic::new(crate::testutil::memory()),
        }
    }

    fn rx_target(&self, ring: &Ring) -> RxTarget {
        let shared = Arc::new(Mutex::new(ring.queue()));
        RxTarget::new(shared, self.mem.clone(), true)
    }
}

fn eth_frame(dst: MacAddr, src: MacAddr, payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = 0x55; // junk in the sender's header must not leak to the receiver
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend((0..payload).map(|i| i as u8));
    f
}

fn stats(n: usize) -> Vec<Arc<PortStats>> {
    (0..n)
        .map(|i| Arc::new(PortStats::new(format!("p{i}"), 1)))
        .collect()
}

#[test]
fn broadcast_is_copied_into_other_ports_rx_rings() {
    let (ga, gb, gc) = (Guest::new(), Guest::new(), Guest::new());
    let (mem_a, mem_b) = (ga.mem.memory(), gb.mem.memory());
    let mut tx_a = Ring::new(&mem_a, 0);
    let mut rx_b = Ring::new(&mem_b, RX_BASE);
    rx_b.add_chain(&[(BUF_BASE, 2048, true)]);
    let port_stats = stats(3);
    let sw = Switch::new(port_stats.clone());
    sw.attach(1, gb.rx_target(&rx_b));
    // Port 2 is attached but has no RX buffers: its copy is dropped and counted there.
    let mem_c = gc.mem.memory();
    let rx_c = Ring::new(&mem_c, RX_BASE);
    sw.attach(2, gc.rx_target(&rx_c));

    let f = eth_frame(BCAST, A, 50);
    mem_a.write_slice(&f[..20], GuestAddress(BUF_BASE)).unwrap();
    mem_a
        .write_slice(&f[20..], GuestAddress(BUF_BASE + 0x100))
        .unwrap();
    tx_a.add_chain(&[
        (BUF_BASE, 20, false),
        (BUF_BASE + 0x100, (f.len() - 20) as u32, false),
    ]);
    let mut q = tx_a.queue();
    let batch = sw
        .process_tx(0, &mut q, &mem_a, &mut SwitchScratch::default())
        .unwrap();
    assert_eq!(batch.used, 1);
    assert_eq!(tx_a.used_idx(), 1);

    assert_eq!(rx_b.used_idx(), 1);
    assert_eq!(rx_b.used(0), (0, f.len() as u32));
    let got = read(&mem_b, BUF_BASE, f.len());
    let mut want_hdr = [0u8; VNET_HDR_LEN];
    want_hdr[10] = 1;
    assert_eq!(&got[..VNET_HDR_LEN], &want_hdr);
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert_eq!(
        port_stats[1].queues[0]
            .rx_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(port_stats[2].queues[0].drops(DropReason::NoRxBuffers), 1);
    assert_eq!(
        port_stats[0].queues[0]
            .tx_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // A was learned on port 0: B's reply goes only there (port 0 has no RX queue -> dropped,
    // counted at port 0).
    let mut tx_b = Ring::new(&mem_b, 0);
    let reply = eth_frame(A, B, 10);
    mem_b
        .write_slice(&reply, GuestAddress(BUF_BASE + 0x1000))
        .unwrap();
    tx_b.add_chain(&[(BUF_BASE + 0x1000, reply.len() as u32, false)]);
    let mut qb = tx_b.queue();
    sw.process_tx(1, &mut qb, &mem_b, &mut SwitchScratch::default())
        .unwrap();
    assert_eq!(port_stats[0].queues[0].drops(DropReason::NoRxBuffers), 1);
    assert_eq!(port_stats[2].queues[0].drops(DropReason::NoRxBuffers), 1);
}

#[test]
fn runt_frames_are_filtered() {
    let ga = Guest::new();
    let mem_a = ga.mem.memory();
    let mut tx_a = Ring::new(&mem_a, 0);
    tx_a.add_chain(&[(BUF_BASE, 16, false)]);
    let port_stats = stats(2);
    let sw = Switch::new(port_stats.clone());
    let mut q = tx_a.queue();
    sw.process_tx(0, &mut q, &mem_a, &mut SwitchScratch::default())
        .unwrap();
    assert_eq!(port_stats[0].queues[0].drops(DropReason::Filtered), 1);
    assert_eq!(tx_a.used_idx(), 1);
}

/// Unicast to a connected port without RX buffers holds the sender's chain back (nothing
/// consumed, nothing dropped) until buffers come; a wait longer than `BACKPRESSURE_WAIT`
/// drops the frame and marks the port stalled (later frames drop at once) until its driver
/// adds buffers again.
#[test]
fn unicast_waits_for_rx_buffers_then_gives_up() {
    let (ga, gb) = (Guest::new(), Guest::new());
    let (mem_a, mem_b) = (ga.mem.memory(), gb.mem.memory());
    let port_stats = stats(2);
    let sw = Switch::new(port_stats.clone());
    let mut rx_b = Ring::new(&mem_b, RX_BASE);
    sw.attach(1, gb.rx_target(&rx_b));
    // B announces itself (a broadcast from port 1), so frames to B go to port 1 only.
    let mut tx_b = Ring::new(&mem_b, 0);
    let hello = eth_frame(BCAST, B, 10);
    mem_b.write_slice(&hello, GuestAddress(BUF_BASE)).unwrap();
    tx_b.add_chain(&[(BUF_BASE, hello.len() as u32, false)]);
    let mut qb = tx_b.queue();
    sw.process_tx(1, &mut qb, &mem_b, &mut SwitchScratch::default())
        .unwrap();

    let mut tx_a = Ring::new(&mem_a, 0);
    let mut qa = tx_a.queue();
    let mut scratch = SwitchScratch::default();
    let send = |tx: &mut Ring, at: u64| {
        let f = eth_frame(B, A, 40);
        mem_a.write_slice(&f, GuestAddress(at)).unwrap();
        tx.add_chain(&[(at, f.len() as u32, false)]);
    };
    send(&mut tx_a, BUF_BASE);
    let batch = sw.process_tx(0, &mut qa, &mem_a, &mut scratch).unwrap();
    assert!(batch.held, "{batch:?}");
    assert_eq!((batch.used, tx_a.used_idx()), (0, 0), "nothing consumed");
    let drops = |port: usize| port_stats[port].queues[0].drops(DropReason::NoRxBuffers);
    assert_eq!(drops(1), 0);

    // B's driver adds a buffer: the held frame goes through on the next pass.
    rx_b.add_chain(&[(BUF_BASE, 2048, true)]);
    sw.rx_refilled(1);
    let batch = sw.process_tx(0, &mut qa, &mem_a, &mut scratch).unwrap();
    assert!(!batch.held);
    assert_eq!((tx_a.used_idx(), rx_b.used_idx()), (1, 1));
    assert_eq!(scratch.held_since, None);

    // No buffer again, and the wait is over: dropped, and the port is stalled.
    send(&mut tx_a, BUF_BASE + 0x1000);
    assert!(
        sw.process_tx(0, &mut qa, &mem_a, &mut scratch)
            .unwrap()
            .held
    );
    scratch.held_since = Some(Instant::now() - BACKPRESSURE_WAIT * 2);
    assert!(
        !sw.process_tx(0, &mut qa, &mem_a, &mut scratch)
            .unwrap()
            .held
    );
    assert_eq!((tx_a.used_idx(), drops(1)), (2, 1));
    send(&mut tx_a, BUF_BASE + 0x2000);
    assert!(
        !sw.process_tx(0, &mut qa, &mem_a, &mut scratch)
            .unwrap()
            .held
    );
    assert_eq!(
        (tx_a.used_idx(), drops(1)),
        (3, 2),
        "a stalled port drops at once"
    );
    // Buffers again: waiting is allowed again.
    sw.rx_refilled(1);
    send(&mut tx_a, BUF_BASE + 0x3000);
    assert!(
        sw.process_tx(0, &mut qa, &mem_a, &mut scratch)
            .unwrap()
            .held
    );
}
