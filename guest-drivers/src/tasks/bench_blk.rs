//! `bench=blk`: a lean polled benchmark loop over the block-device trait: keeps `qd` requests
//! of `bs` bytes in flight (sequential or random offsets in a region), one kick per batch,
//! and reports throughput, IOPS, latency percentiles (TSC) and notification counts.

use super::disk::{self, bad_param};
use super::{Context, Outcome, Task};
use crate::blk::{BlkError, BlockDevice, Completion, IoStatus, Op, Request, SECTOR};
use crate::json::Report;
use crate::{println, time};

/// Most requests in flight the benchmark tracks.
const MAX_QD: usize = 256;
/// Log-linear latency histogram: 16 sub-buckets per power of two of TSC ticks.
const SUB: usize = 16;
const BUCKETS: usize = 64 * SUB;

struct Params<'a> {
    dev: Option<&'a str>,
    op: Op,
    random: bool,
    rw: &'a str,
    bs: u64,
    qd: usize,
    size: u64,
    queues: usize,
    seconds: u64,
    offset: u64,
}

fn parse<'a>(task: &Task<'a>, report: &mut Report) -> Result<Params<'a>, Outcome> {
    let mut p = Params {
        dev: None,
        op: Op::Read,
        random: false,
        rw: "read",
        bs: 4096,
        qd: 1,
        size: 64 << 20,
        queues: 1,
        seconds: 0,
        offset: 0,
    };
    for param in task.params() {
        let (k, v) = param.map_err(|e| {
            report.str("error", format_args!("{e}"));
            Outcome::BadCmdline
        })?;
        let ok = match k {
            "dev" => p.dev.replace(v).is_none(),
            "rw" => {
                let (op, random) = match v {
                    "read" => (Op::Read, false),
                    "write" => (Op::Write, false),
                    "randread" => (Op::Read, true),
                    "randwrite" => (Op::Write, true),
                    _ => return Err(bad_param(report, task, k, v)),
                };
                (p.op, p.random, p.rw) = (op, random, v);
                true
            }
            "bs" => disk::size(v)
                .map(|n| p.bs = n)
                .is_some_and(|_| p.bs.is_multiple_of(SECTOR) && p.bs > 0),
            "qd" => disk::num(v)
                .map(|n| p.qd = n as usize)
                .is_some_and(|_| (1..=MAX_QD).contains(&p.qd)),
            "size" => disk::size(v).map(|n| p.size = n).is_some(),
            "queues" => disk::num(v).map(|n| p.queues = n as usize).is_some(),
            "seconds" => disk::num(v).map(|n| p.seconds = n).is_some(),
            "offset" => disk::num(v).map(|n| p.offset = n).is_some(),
            _ => false,
        };
        if !ok {
            return Err(bad_param(report, task, k, v));
        }
    }
    Ok(p)
}

/// The running benchmark's state.
struct Bench {
    hist: [u64; BUCKETS],
    submitted_at: [u64; MAX_QD],
    requests: u64,
    errors: u64,
    next_seq: u64,
    rng: u64,
}

fn bucket(ticks: u64) -> usize {
    if ticks < SUB as u64 {
        return ticks as usize;
    }
    let msb = 63 - ticks.leading_zeros() as usize;
    let sub = (ticks >> (msb - 4)) as usize & (SUB - 1);
    ((msb - 3) * SUB + sub).min(BUCKETS - 1)
}

/// A representative tick count for a bucket (its lower bound).
fn bucket_ticks(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let msb = b / SUB + 3;
    ((SUB + b % SUB) as u64) << (msb - 4)
}

impl Bench {
    fn percentile(&self, pct: u64) -> u64 {
        let want = (self.requests * pct).div_ceil(100).max(1);
        let mut seen = 0;
        for (b, &n) in self.hist.iter().enumerate() {
            seen += n;
            if seen >= want {
                return time::ticks_to_us(bucket_ticks(b));
            }
        }
        0
    }

    /// The next request's sector (in units of bs within the region).
    fn next_sector(&mut self, p: &Params, blocks: u64) -> u64 {
        let block = if p.random {
            // xorshift64
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng % blocks
        } else {
            let b = self.next_seq % blocks;
            self.next_seq += 1;
            b
        };
        p.offset + block * (p.bs / SECTOR)
    }
}

pub fn run(task: &Task, ctx: &Context, report: &mut Report) -> Outcome {
    let mut p = match parse(task, report) {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    let mut disk = match disk::open(ctx, p.dev, p.queues) {
        Ok(d) => d,
        Err(e) => return disk::fail(report, e),
    };
    let dev = disk.dev();
    p.qd = p.qd.min(dev.queue_depth());
    let cap_bytes = dev.capacity().saturating_sub(p.offset) * SECTOR;
    p.size = p.size.min(cap_bytes) / p.bs * p.bs;
    report.str("dev", format_args!("{}", dev.kind()));
    report.str("rw", format_args!("{}", p.rw));
    report.u64("bs", p.bs);
    report.u64("qd", p.qd as u64);
    report.u64("queues", dev.queues() as u64);
    report.u64("size", p.size);
    if p.size == 0 || p.bs > u64::from(dev.max_request_bytes()) {
        report.str(
            "error",
            format_args!("region smaller than bs, or bs too big"),
        );
        return Outcome::Fail;
    }
    let mut bench = Bench {
        hist: [0; BUCKETS],
        submitted_at: [0; MAX_QD],
        requests: 0,
        errors: 0,
        next_seq: 0,
        rng: 0x9e37_79b9_7f4a_7c15,
    };
    match measure(dev, &p, &mut bench) {
        Ok(ticks) => summarize(dev, &p, &bench, ticks, report),
        Err(e) => disk::fail(report, e),
    }
}

/// The benchmark loop; returns the elapsed TSC ticks.
fn measure(dev: &mut dyn BlockDevice, p: &Params, b: &mut Bench) -> Result<u64, BlkError> {
    let buf = disk::buffer(p.bs * p.qd as u64)?;
    let blocks = p.size / p.bs;
    let total = if p.seconds == 0 { blocks } else { u64::MAX };
    let limit = time::ms_to_ticks(p.seconds.saturating_mul(1000));
    let mut free = [0u32; MAX_QD];
    for (i, f) in free.iter_mut().enumerate().take(p.qd) {
        *f = i as u32;
    }
    let (mut nfree, mut issued) = (p.qd, 0u64);
    let mut done = [Completion {
        tag: 0,
        status: IoStatus::Ok,
    }; MAX_QD];
    println!("bench: starting");
    let start = time::now();
    let mut now = start;
    while b.requests < issued || issued < total {
        let stop = issued >= total || (p.seconds > 0 && now.wrapping_sub(start) >= limit);
        while !stop && nfree > 0 {
            nfree -= 1;
            let tag = free[nfree];
            let req = Request {
                op: p.op,
                sector: b.next_sector(p, blocks),
                buf: buf + u64::from(tag) * p.bs,
                len: p.bs as u32,
                tag,
            };
            dev.submit(&req)?;
            b.submitted_at[tag as usize] = now;
            issued += 1;
        }
        dev.kick();
        let got = dev.poll(&mut done)?;
        now = time::now();
        for c in &done[..got] {
            let slot = (c.tag as usize).min(MAX_QD - 1);
            b.hist[bucket(now.wrapping_sub(b.submitted_at[slot]))] += 1;
            b.errors += u64::from(c.status != IoStatus::Ok);
            free[nfree] = c.tag;
            nfree += 1;
        }
        b.requests += got as u64;
        if stop && b.requests >= issued {
            break;
        }
    }
    Ok(now.wrapping_sub(start).max(1))
}

fn summarize(
    dev: &dyn BlockDevice,
    p: &Params,
    b: &Bench,
    ticks: u64,
    report: &mut Report,
) -> Outcome {
    let us = time::ticks_to_us(ticks).max(1);
    let bytes = b.requests * p.bs;
    // bytes per microsecond = MB/s (10^6 bytes per second); two decimals.
    let centi_mbps = u128::from(bytes) * 100 / u128::from(us);
    report.u64("requests", b.requests);
    report.u64("bytes", bytes);
    report.u64("elapsed_us", us);
    report.raw(
        "mb_per_s",
        format_args!("{}.{:02}", centi_mbps / 100, centi_mbps % 100),
    );
    report.u64(
        "iops",
        (u128::from(b.requests) * 1_000_000 / u128::from(us)) as u64,
    );
    report.u64("lat_p50_us", b.percentile(50));
    report.u64("lat_p99_us", b.percentile(99));
    report.u64("kicks", dev.kicks());
    report.u64("io_errors", b.errors);
    let mut counts = [0u64; 16];
    let n = dev.queue_counts(&mut counts);
    let mut list = crate::json::SmallString::new();
    for (i, c) in counts[..n].iter().enumerate() {
        let _ = core::fmt::Write::write_fmt(
            &mut list,
            format_args!("{}{c}", if i == 0 { "" } else { "," }),
        );
    }
    report.raw("queue_requests", format_args!("[{}]", list.as_str()));
    report.str("tsc_source", format_args!("{}", time::source()));
    report.u64("tsc_khz", time::tsc_hz() / 1000);
    if b.errors > 0 {
        report.str("error", format_args!("{} request(s) failed", b.errors));
        return Outcome::Fail;
    }
    Outcome::Pass
}
