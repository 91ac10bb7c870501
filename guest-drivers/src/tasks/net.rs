//! Network tasks over virtio-net and the `net` stack: `serve,seconds=N` answers ARP, ping and
//! UDP echo (port 7) for N seconds; `ping=ADDR,count=N` resolves ADDR and sends N echo
//! requests one at a time (1 s timeout each), reporting round-trip times from the TSC.

use super::disk::{bad_param, num};
use super::{Context, Outcome, Task};
use crate::blk::BlkError;
use crate::json::Report;
use crate::net::{self, Ip, Mac, Stack};
use crate::virtio::net::{self as vnet, VirtioNet};
use crate::{println, time};

/// Link and DEVICE_NEEDS_RESET are checked this often (each check is a few exits).
const CHECK_MS: u64 = 100;
const ECHO_TIMEOUT_MS: u64 = 1000;
const ARP_RETRY_MS: u64 = 500;
const ARP_TRIES: u32 = 20;
const MAX_COUNT: usize = 1000;
const PING_PAYLOAD: usize = 56;

pub(super) fn fail(report: &mut Report, error: BlkError) -> Outcome {
    // BlkError's own text names virtio-blk for this case.
    if error == BlkError::NeedsReset {
        report.str(
            "error",
            format_args!("virtio-net: device needs reset (backend gone?)"),
        );
    } else {
        report.str("error", format_args!("virtio-net: {error}"));
    }
    Outcome::Fail
}

/// Opens the NIC and the stack from `ip=`; fills `ip`, `mac`, `link`.
pub(super) fn open(ctx: &Context, report: &mut Report) -> Result<Stack, Outcome> {
    let Some(ip_word) = ctx.cmdline.ip else {
        report.str(
            "error",
            format_args!("network tasks need the option ip=ADDR/PREFIX"),
        );
        return Err(Outcome::BadCmdline);
    };
    let Some((ip, prefix)) = net::parse_cidr(ip_word) else {
        report.str(
            "error",
            format_args!("bad ip=`{ip_word}` (want a.b.c.d/prefix)"),
        );
        return Err(Outcome::BadCmdline);
    };
    report.str("ip", format_args!("{}/{prefix}", Ip(ip)));
    let Some(mmio) = vnet::find(ctx.cmdline.virtio_mmio()) else {
        report.str("error", format_args!("no virtio-net device"));
        return Err(Outcome::Fail);
    };
    let nic = match VirtioNet::open(mmio) {
        Ok(nic) => nic,
        Err(BlkError::NeedsReset) => {
            report.str("link", format_args!("down"));
            return Err(fail(report, BlkError::NeedsReset));
        }
        Err(e) => return Err(fail(report, e)),
    };
    report.str("mac", format_args!("{}", Mac(nic.mac)));
    let up = nic.link_up();
    report.str("link", format_args!("{}", if up { "up" } else { "down" }));
    println!(
        "splitvisor-guest: virtio-net mac {} ip {}/{prefix} link {}",
        Mac(nic.mac),
        Ip(ip),
        if up { "up" } else { "down" }
    );
    if !up {
        report.str("error", format_args!("virtio-net: link is down"));
        return Err(Outcome::Fail);
    }
    Ok(Stack::new(nic, ip, prefix))
}

/// Periodic health check: DEVICE_NEEDS_RESET ends the task; so does the link going down,
/// unless the task rides out outages (`serve`: a backend restart takes the link down, the
/// VMM brings it back up when the backend returns).
pub(super) struct Health {
    last: u64,
    tolerate_outages: bool,
    link_up: bool,
    outages: u64,
}

impl Health {
    pub(super) fn new() -> Health {
        Health {
            last: time::now(),
            tolerate_outages: false,
            link_up: true,
            outages: 0,
        }
    }

    /// A check that waits out link outages instead of failing.
    pub(super) fn tolerating_outages() -> Health {
        Health {
            tolerate_outages: true,
            ..Health::new()
        }
    }

    /// Every CHECK_MS: reads the device status and the config's link status. When either says
    /// the device is gone, records `link` = `down`, `link_up_bit` (VIRTIO_NET_S_LINK_UP as read
    /// from config) and `needs_reset` (DEVICE_NEEDS_RESET) and ends the task.
    pub(super) fn check(&mut self, stack: &Stack, report: &mut Report) -> Result<(), Outcome> {
        self.check_at(time::now(), stack, report)
    }

    /// `check` for a caller that has just read the TSC (`now`).
    pub(super) fn check_at(
        &mut self,
        now: u64,
        stack: &Stack,
        report: &mut Report,
    ) -> Result<(), Outcome> {
        if now.wrapping_sub(self.last) < time::ms_to_ticks(CHECK_MS) {
            return Ok(());
        }
        self.last = now;
        let needs_reset = stack.nic.needs_reset();
        let link_up = stack.nic.link_up();
        if !needs_reset && link_up {
            if !self.link_up {
                println!("splitvisor-guest: virtio-net link up again");
                self.link_up = true;
            }
            return Ok(());
        }
        if !needs_reset && self.tolerate_outages {
            if self.link_up {
                println!("splitvisor-guest: virtio-net link down; waiting for it to come back");
                self.link_up = false;
                self.outages += 1;
            }
            return Ok(());
        }
        report.str("link", format_args!("down"));
        report.bool("link_up_bit", link_up);
        report.bool("needs_reset", needs_reset);
        println!(
            "splitvisor-guest: virtio-net link down (LINK_UP bit {}, DEVICE_NEEDS_RESET {})",
            u8::from(link_up),
            u8::from(needs_reset)
        );
        if needs_reset {
            return Err(fail(report, BlkError::NeedsReset));
        }
        report.str("error", format_args!("virtio-net: link went down"));
        Err(Outcome::Fail)
    }

    /// For a task that rode out outages: how many there were, and whether the link is up at
    /// the end (a task that ends with the link down fails).
    pub(super) fn finish(&self, report: &mut Report) -> Outcome {
        report.u64("link_outages", self.outages);
        if self.link_up {
            return Outcome::Pass;
        }
        report.str("link", format_args!("down"));
        report.str(
            "error",
            format_args!("virtio-net: the link was still down at the end"),
        );
        Outcome::Fail
    }
}

pub(super) fn counters(stack: &Stack, report: &mut Report) {
    report.u64("rx_frames", stack.nic.stats.rx_frames);
    report.u64("tx_frames", stack.nic.stats.tx_frames);
    report.u64("pings_answered", stack.stats.pings_answered);
    report.u64("udp_echoed", stack.stats.udp_echoed);
    report.u64("arp_replies", stack.stats.arp_replies_sent);
    report.u64("bad_frames", stack.stats.bad_frames);
    report.u64("kicks", stack.nic.stats.kicks);
    report.u64("tx_kicks", stack.nic.stats.tx_kicks);
    report.u64("rx_kicks", stack.nic.stats.rx_kicks);
}

/// `serve,seconds=N`.
pub fn serve(task: &Task, ctx: &Context, report: &mut Report) -> Outcome {
    let mut seconds = 10;
    for param in task.params() {
        let (k, v) = match param {
            Ok(kv) => kv,
            Err(e) => {
                report.str("error", format_args!("{e}"));
                return Outcome::BadCmdline;
            }
        };
        match (k, num(v)) {
            ("seconds", Some(n)) => seconds = n,
            _ => return bad_param(report, task, k, v),
        }
    }
    report.u64("seconds", seconds);
    let mut stack = match open(ctx, report) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let end = time::now() + time::ms_to_ticks(seconds * 1000);
    let mut health = Health::tolerating_outages();
    let outcome = loop {
        if let Err(e) = stack.poll() {
            break fail(report, e);
        }
        if let Err(o) = health.check(&stack, report) {
            break o;
        }
        if time::now() >= end {
            break health.finish(report);
        }
        core::hint::spin_loop();
    };
    counters(&stack, report);
    outcome
}

/// Polls (serving others meanwhile) until `done` says so or `ms` pass; false on timeout.
pub(super) fn wait(
    stack: &mut Stack,
    health: &mut Health,
    report: &mut Report,
    ms: u64,
    mut done: impl FnMut(&mut Stack) -> bool,
) -> Result<bool, Outcome> {
    let deadline = time::now() + time::ms_to_ticks(ms);
    loop {
        stack.poll().map_err(|e| fail(report, e))?;
        if done(stack) {
            return Ok(true);
        }
        health.check(stack, report)?;
        if time::now() >= deadline {
            return Ok(false);
        }
        core::hint::spin_loop();
    }
}

/// `ping=ADDR,count=N`.
pub fn ping(task: &Task, ctx: &Context, report: &mut Report) -> Outcome {
    let Some(addr) = task.value.and_then(net::parse_ipv4) else {
        report.str(
            "error",
            format_args!("ping needs an IPv4 address: ping=a.b.c.d"),
        );
        return Outcome::BadCmdline;
    };
    let mut count = 4usize;
    for param in task.params() {
        let (k, v) = match param {
            Ok(kv) => kv,
            Err(e) => {
                report.str("error", format_args!("{e}"));
                return Outcome::BadCmdline;
            }
        };
        match (k, num(v)) {
            ("count", Some(n)) if (1..=MAX_COUNT as u64).contains(&n) => count = n as usize,
            _ => return bad_param(report, task, k, v),
        }
    }
    report.str("target", format_args!("{}", Ip(addr)));
    report.u64("count", count as u64);
    let mut stack = match open(ctx, report) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let mut health = Health::new();
    let outcome = run_ping(&mut stack, &mut health, report, addr, count);
    counters(&stack, report);
    outcome
}

/// Resolves `addr` (on our subnet) by ARP: a broadcast request every ARP_RETRY_MS until it
/// answers, ARP_TRIES times at most. Records `peer_mac`.
pub(super) fn resolve(
    stack: &mut Stack,
    health: &mut Health,
    report: &mut Report,
    addr: [u8; 4],
) -> Result<[u8; 6], Outcome> {
    if !stack.on_link(addr) {
        report.str(
            "error",
            format_args!("{} is not on the local subnet (no gateway)", Ip(addr)),
        );
        return Err(Outcome::Fail);
    }
    for _ in 0..ARP_TRIES {
        stack.send_arp_request(addr).map_err(|e| fail(report, e))?;
        if wait(stack, health, report, ARP_RETRY_MS, |s| {
            s.arp_lookup(addr).is_some()
        })? {
            if let Some(mac) = stack.arp_lookup(addr) {
                report.str("peer_mac", format_args!("{}", Mac(mac)));
                println!("splitvisor-guest: {} is at {}", Ip(addr), Mac(mac));
                return Ok(mac);
            }
        }
    }
    report.str("error", format_args!("no ARP reply from {}", Ip(addr)));
    Err(Outcome::Fail)
}

fn run_ping(
    stack: &mut Stack,
    health: &mut Health,
    report: &mut Report,
    addr: [u8; 4],
    count: usize,
) -> Outcome {
    let mac = match resolve(stack, health, report, addr) {
        Ok(mac) => mac,
        Err(o) => {
            report.u64("sent", 0);
            report.u64("received", 0);
            return o;
        }
    };
    let mut rtts = [0u64; MAX_COUNT];
    let (mut sent, mut received) = (0usize, 0usize);
    for seq in 1..=count as u16 {
        stack.echo_reply = None;
        let start = time::now();
        if let Err(e) = stack.send_echo_request(addr, mac, seq, PING_PAYLOAD) {
            return fail(report, e);
        }
        sent += 1;
        let got = wait(stack, health, report, ECHO_TIMEOUT_MS, |s| {
            s.echo_reply.is_some_and(|r| r.seq == seq && r.from == addr)
        });
        match got {
            Ok(true) => {
                let tsc = stack.echo_reply.map_or(start, |r| r.tsc);
                rtts[received] = time::ticks_to_us(tsc.wrapping_sub(start));
                received += 1;
            }
            Ok(false) => println!("splitvisor-guest: no reply to seq {seq}"),
            Err(o) => {
                report.u64("sent", sent as u64);
                report.u64("received", received as u64);
                return o;
            }
        }
    }
    report.u64("sent", sent as u64);
    report.u64("received", received as u64);
    let rtts = &mut rtts[..received];
    rtts.sort_unstable();
    if let (Some(&max), Some(&p50)) = (rtts.last(), rtts.get(received.saturating_sub(1) / 2)) {
        report.u64("rtt_p50_us", p50);
        report.u64("rtt_max_us", max);
    }
    if received == count {
        Outcome::Pass
    } else {
        report.str(
            "error",
            format_args!("{} of {count} echo requests unanswered", count - received),
        );
        Outcome::Fail
    }
}
