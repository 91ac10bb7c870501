//! `bench=net`: a one-way UDP stream on port 9 (discard). `dir=tx` resolves the peer by ARP and
//! sends datagrams of `size` payload bytes as fast as the TX ring takes them, in bursts published
//! with one avail-index store and at most one kick each; `dir=rx` counts the datagrams that
//! arrive on the port for `seconds`, measured from the first one. Both report packets/s and
//! Gbit/s of UDP payload, and the queue notifications (kicks) the guest made.

use super::disk::{bad_param, num};
use super::net::{self as tasks_net, Health};
use super::{Context, Outcome, Task};
use crate::json::Report;
use crate::net::{self, Ip, Stack, MAX_FRAME, STREAM_PORT, UDP_FRAME_OVERHEAD};
use crate::{println, time};

/// UDP payload sizes accepted (the range; 1500 makes a 1528-byte IP packet).
const MIN_SIZE: u64 = 64;
const MAX_SIZE: u64 = 1500;
const MAX_SECONDS: u64 = 3600;
/// Frames queued per publish by default: small enough that the device keeps finding new work
/// while it drains the previous burst, large enough to spread the publish cost.
const DEFAULT_BURST: usize = 32;
/// `dir=rx` waits this long for the first datagram before failing.
const FIRST_DATAGRAM_MS: u64 = 30_000;
/// After the last burst, `dir=tx` waits this long for the device to complete every frame.
const DRAIN_MS: u64 = 2_000;
/// Offset of the per-datagram sequence number (u64, big endian) in the frame: the first eight
/// payload bytes.
const SEQ_AT: usize = UDP_FRAME_OVERHEAD;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Tx,
    Rx,
}

struct Params {
    dir: Dir,
    peer: Option<[u8; 4]>,
    size: usize,
    seconds: u64,
    burst: usize,
    /// `outages=wait`: ride out link outages (a backend restarting) instead of failing.
    wait_outages: bool,
}

fn parse(task: &Task, report: &mut Report) -> Result<Params, Outcome> {
    let mut p = Params {
        dir: Dir::Tx,
        peer: None,
        size: MAX_SIZE as usize,
        seconds: 5,
        burst: DEFAULT_BURST,
        wait_outages: false,
    };
    for param in task.params() {
        let (k, v) = param.map_err(|e| {
            report.str("error", format_args!("{e}"));
            Outcome::BadCmdline
        })?;
        let ok = match k {
            "dir" => match v {
                "tx" => Some(Dir::Tx),
                "rx" => Some(Dir::Rx),
                _ => None,
            }
            .map(|d| p.dir = d),
            "peer" => net::parse_ipv4(v).map(|a| p.peer = Some(a)),
            "size" => num(v)
                .filter(|n| (MIN_SIZE..=MAX_SIZE).contains(n))
                .map(|n| p.size = n as usize),
            "seconds" => num(v)
                .filter(|n| (1..=MAX_SECONDS).contains(n))
                .map(|n| p.seconds = n),
            "burst" => num(v)
                .filter(|n| (1..=256).contains(n))
                .map(|n| p.burst = n as usize),
            "outages" => (v == "wait").then(|| p.wait_outages = true),
            _ => None,
        };
        if ok.is_none() {
            return Err(bad_param(report, task, k, v));
        }
    }
    if p.dir == Dir::Tx && p.peer.is_none() {
        report.str("error", format_args!("bench=net,dir=tx needs peer=a.b.c.d"));
        return Err(Outcome::BadCmdline);
    }
    Ok(p)
}

pub fn run(task: &Task, ctx: &Context, report: &mut Report) -> Outcome {
    let p = match parse(task, report) {
        Ok(p) => p,
        Err(o) => return o,
    };
    report.str(
        "dir",
        format_args!("{}", if p.dir == Dir::Tx { "tx" } else { "rx" }),
    );
    if let Some(peer) = p.peer {
        report.str("peer", format_args!("{}", Ip(peer)));
    }
    report.u64("size", p.size as u64);
    report.u64("frame_len", (UDP_FRAME_OVERHEAD + p.size) as u64);
    report.u64("seconds", p.seconds);
    report.u64("port", u64::from(STREAM_PORT));
    let mut stack = match tasks_net::open(ctx, report) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let mut health = match p.wait_outages {
        true => Health::tolerating_outages(),
        false => Health::new(),
    };
    let mut outcome = match p.dir {
        Dir::Tx => transmit(&mut stack, &mut health, &p, report),
        Dir::Rx => receive(&mut stack, &mut health, &p, report),
    };
    if p.wait_outages && outcome == Outcome::Pass {
        outcome = health.finish(report);
    }
    tasks_net::counters(&stack, report);
    report.u64("tsc_khz", time::tsc_hz() / 1000);
    outcome
}

/// Records `packets_per_s` and `gbit_per_s` (UDP payload bits, three decimals).
fn rates(report: &mut Report, packets: u64, payload_bytes: u64, ticks: u64) {
    let us = u128::from(time::ticks_to_us(ticks).max(1));
    report.u64("elapsed_us", us as u64);
    report.u64("payload_bytes", payload_bytes);
    report.u64(
        "packets_per_s",
        (u128::from(packets) * 1_000_000 / us) as u64,
    );
    // bits per microsecond = Mbit/s; /1000 = Gbit/s.
    let mbit = u128::from(payload_bytes) * 8 / us;
    report.raw(
        "gbit_per_s",
        format_args!("{}.{:03}", mbit / 1000, mbit % 1000),
    );
}

fn transmit(stack: &mut Stack, health: &mut Health, p: &Params, report: &mut Report) -> Outcome {
    let Some(peer) = p.peer else {
        return Outcome::BadCmdline;
    };
    let peer_mac = match tasks_net::resolve(stack, health, report, peer) {
        Ok(mac) => mac,
        Err(o) => return o,
    };
    // The whole frame is built once; each datagram is a copy with its sequence number.
    let mut template = [0u8; MAX_FRAME];
    let Some(len) = stack.stream_frame(peer, peer_mac, p.size, &mut template) else {
        report.str(
            "error",
            format_args!("size {} does not fit a frame", p.size),
        );
        return Outcome::Fail;
    };
    let template = &template[..len];
    println!(
        "splitvisor-guest: streaming {}-byte datagrams to {}:{STREAM_PORT} for {} s",
        p.size,
        Ip(peer),
        p.seconds
    );
    let kicks_before = stack.nic.stats.tx_kicks;
    let start = time::now();
    let end = start + time::ms_to_ticks(p.seconds * 1000);
    let mut seq = 0u64;
    let mut outcome = Outcome::Pass;
    // One TSC read per burst: it ends the stream and drives the health check.
    let mut now = start;
    while now < end {
        let sent = stack.nic.send_burst(p.burst, |buf| {
            buf[..len].copy_from_slice(template);
            buf[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_be_bytes());
            seq += 1;
            len
        });
        if let Err(e) = sent {
            outcome = tasks_net::fail(report, e);
            break;
        }
        // Answer ARP from the peer meanwhile (one used-index read when nothing came).
        if let Err(e) = stack.poll() {
            outcome = tasks_net::fail(report, e);
            break;
        }
        now = time::now();
        if let Err(o) = health.check_at(now, stack, report) {
            outcome = o;
            break;
        }
    }
    // Every datagram counts only once the device has taken it: wait for the ring to drain.
    let drain_end = time::now() + time::ms_to_ticks(DRAIN_MS);
    let mut unconfirmed = 0;
    while outcome == Outcome::Pass {
        match stack.nic.tx_in_flight() {
            Ok(0) => break,
            Ok(n) if time::now() >= drain_end => {
                unconfirmed = n;
                break;
            }
            Ok(_) => core::hint::spin_loop(),
            Err(e) => outcome = tasks_net::fail(report, e),
        }
    }
    let ticks = time::now().wrapping_sub(start).max(1);
    report.u64("sent", seq);
    report.u64("unconfirmed", u64::from(unconfirmed));
    report.u64("stream_tx_kicks", stack.nic.stats.tx_kicks - kicks_before);
    rates(report, seq, seq * p.size as u64, ticks);
    if outcome == Outcome::Pass && unconfirmed > 0 {
        report.str(
            "error",
            format_args!("{unconfirmed} frames still in the TX ring after {DRAIN_MS} ms"),
        );
        return Outcome::Fail;
    }
    outcome
}

fn receive(stack: &mut Stack, health: &mut Health, p: &Params, report: &mut Report) -> Outcome {
    stack.stream = net::StreamCount {
        from: p.peer,
        ..Default::default()
    };
    println!(
        "splitvisor-guest: waiting for datagrams on port {STREAM_PORT} for up to {} s",
        FIRST_DATAGRAM_MS / 1000
    );
    let first = tasks_net::wait(stack, health, report, FIRST_DATAGRAM_MS, |s| {
        s.stream.datagrams > 0
    });
    match first {
        Ok(true) => {}
        Ok(false) => {
            report.u64("received", 0);
            report.str(
                "error",
                format_args!(
                    "no datagram on port {STREAM_PORT} within {} s",
                    FIRST_DATAGRAM_MS / 1000
                ),
            );
            return Outcome::Fail;
        }
        Err(o) => return o,
    }
    let window = time::ms_to_ticks(p.seconds * 1000);
    let first_tsc = stack.stream.first_tsc;
    // One TSC read per pass: it stamps the batch just received and drives the health check.
    let outcome = loop {
        let got = match stack.poll() {
            Ok(n) => n,
            Err(e) => break tasks_net::fail(report, e),
        };
        let now = time::now();
        if got > 0 {
            stack.stream.last_tsc = now;
        }
        if let Err(o) = health.check_at(now, stack, report) {
            break o;
        }
        if now.wrapping_sub(first_tsc) >= window {
            break Outcome::Pass;
        }
    };
    let s = stack.stream;
    report.u64("received", s.datagrams);
    // The rate runs from the first datagram to the last one counted.
    rates(
        report,
        s.datagrams,
        s.payload_bytes,
        s.last_tsc.wrapping_sub(s.first_tsc).max(1),
    );
    outcome
}
