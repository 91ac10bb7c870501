//! `blk-verify`: writes the deterministic pattern (blk/pattern.rs) over a disk region, reads it
//! back and verifies it (for `seconds=N`: in rounds), checksums a host-prepared region, and
//! optionally checks that a read past the end fails. See docs/boot-protocol.md.

use super::disk::{self, bad_param, Disk};
use super::{Context, Outcome, Task};
use crate::blk::pattern::{self, Fnv1a, DEFAULT_SEED};
use crate::blk::{run_one, transfer, BlkError, BlockDevice, IoStatus, Op, Request, SECTOR};
use crate::json::Report;
use crate::{println, time};

/// Bytes moved per `transfer` call (and the size of the one buffer).
const CHUNK: u64 = 4 << 20;

struct Params<'a> {
    dev: Option<&'a str>,
    queues: usize,
    offset: u64,
    size: Option<u64>,
    check: Option<(u64, u64)>,
    seconds: u64,
    seed: u64,
    oob: bool,
}

/// Counters for the RESULT line.
#[derive(Default)]
struct Tally {
    rounds: u64,
    io_errors: u64,
    verified_bytes: u64,
    bad_sectors: u64,
    first_bad: Option<u64>,
    write_status: Option<IoStatus>,
    checksum: u64,
}

fn parse<'a>(task: &Task<'a>, report: &mut Report) -> Result<Params<'a>, Outcome> {
    let mut p = Params {
        dev: None,
        queues: 1,
        offset: 0,
        size: None,
        check: None,
        seconds: 0,
        seed: DEFAULT_SEED,
        oob: false,
    };
    let (mut check_offset, mut check_size) = (None, None);
    for param in task.params() {
        let (k, v) = param.map_err(|e| {
            report.str("error", format_args!("{e}"));
            Outcome::BadCmdline
        })?;
        let ok = match k {
            "dev" => p.dev.replace(v).is_none(),
            "queues" => disk::num(v).map(|n| p.queues = n as usize).is_some(),
            "offset" => disk::num(v).map(|n| p.offset = n).is_some(),
            "size" => disk::size(v).map(|n| p.size = Some(n)).is_some(),
            "check_offset" => disk::num(v).map(|n| check_offset = Some(n)).is_some(),
            "check_size" => disk::size(v).map(|n| check_size = Some(n)).is_some(),
            "seconds" => disk::num(v).map(|n| p.seconds = n).is_some(),
            "seed" => disk::num(v).map(|n| p.seed = n).is_some(),
            "oob" => disk::num(v).map(|n| p.oob = n != 0).is_some(),
            _ => false,
        };
        let aligned =
            !matches!(k, "size" | "check_size") || disk::size(v).is_some_and(|n| n % SECTOR == 0);
        if !ok || !aligned {
            return Err(bad_param(report, task, k, v));
        }
    }
    p.check = match (check_offset, check_size) {
        (Some(o), Some(s)) => Some((o, s)),
        (None, None) => None,
        _ => {
            return Err(bad_param(
                report,
                task,
                "check_offset",
                "(needs check_size too)",
            ))
        }
    };
    Ok(p)
}

pub fn run(task: &Task, ctx: &Context, report: &mut Report) -> Outcome {
    let p = match parse(task, report) {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    let mut disk = match disk::open(ctx, p.dev, p.queues) {
        Ok(d) => d,
        Err(e) => return disk::fail(report, e),
    };
    let mut t = Tally::default();
    let result = exercise(&mut disk, &p, &mut t, report);
    report_tally(&t, &p, report);
    match result {
        Err(e) => disk::fail(report, e),
        Ok(outcome) => outcome,
    }
}

fn exercise(
    disk: &mut Disk,
    p: &Params,
    t: &mut Tally,
    report: &mut Report,
) -> Result<Outcome, BlkError> {
    let dev = disk.dev();
    let default_size = if dev.kind() == "ata" {
        64 << 10
    } else {
        1 << 20
    };
    let size = p.size.unwrap_or(default_size);
    report.str("dev", format_args!("{}", dev.kind()));
    report.u64("capacity_sectors", dev.capacity());
    report.bool("read_only", dev.read_only());
    report.u64("queues", dev.queues() as u64);
    report.u64("offset", p.offset);
    report.u64("size", size);
    let cap = dev.capacity();
    let fits = |o: u64, s: u64| o.checked_add(s / SECTOR).is_some_and(|end| end <= cap);
    if !fits(p.offset, size) || p.check.is_some_and(|(o, s)| !fits(o, s)) {
        report.str(
            "error",
            format_args!("region beyond the disk's {cap} sectors"),
        );
        return Ok(Outcome::Fail);
    }
    let buf = disk::buffer(CHUNK.min(size.max(p.check.map_or(0, |c| c.1))))?;
    let start = time::now();
    let limit = time::ms_to_ticks(p.seconds.saturating_mul(1000));
    loop {
        let seed = p.seed.wrapping_add(t.rounds);
        report.str("pattern_seed", format_args!("{seed:016x}"));
        if !write_pass(dev, p.offset, size, seed, buf, t)? {
            break;
        }
        verify_pass(dev, p.offset, size, seed, buf, t)?;
        t.rounds += 1;
        if time::now().wrapping_sub(start) >= limit {
            break;
        }
    }
    if let Some((o, s)) = p.check {
        t.checksum = checksum(dev, o, s, buf, t)?;
    }
    let oob_ok = !p.oob || oob_read(dev, buf, report)?;
    Ok(judge(t, oob_ok, report))
}

fn judge(t: &Tally, oob_ok: bool, report: &mut Report) -> Outcome {
    if let Some(st) = t.write_status.filter(|s| *s != IoStatus::Ok) {
        report.str(
            "error",
            format_args!("writes failed with status {}", st.name()),
        );
        return Outcome::Fail;
    }
    if let Some(off) = t.first_bad {
        report.str(
            "error",
            format_args!(
                "{} sector(s) differ, first at region byte {off}",
                t.bad_sectors
            ),
        );
        return Outcome::Fail;
    }
    if t.io_errors > 0 {
        report.str("error", format_args!("{} request(s) failed", t.io_errors));
        return Outcome::Fail;
    }
    if !oob_ok {
        report.str("error", format_args!("the read past the end did not fail"));
        return Outcome::Fail;
    }
    Outcome::Pass
}

/// Writes the pattern over the region and flushes; false if the device refused writes.
fn write_pass(
    dev: &mut dyn BlockDevice,
    offset: u64,
    size: u64,
    seed: u64,
    buf: u64,
    t: &mut Tally,
) -> Result<bool, BlkError> {
    let mut done = 0;
    while done < size {
        let n = CHUNK.min(size - done);
        let sector = offset + done / SECTOR;
        // SAFETY: buf is our heap buffer of at least min(CHUNK, size) >= n bytes.
        unsafe { pattern::fill(buf, n, sector, seed) };
        let r = transfer(dev, Op::Write, sector, buf, n)?;
        t.io_errors += r.errors;
        if r.status != IoStatus::Ok {
            println!(
                "blk-verify: write at sector {sector} failed: {}",
                r.status.name()
            );
            t.write_status = Some(r.status);
            return Ok(false);
        }
        done += n;
    }
    let flush = Request {
        op: Op::Flush,
        sector: 0,
        buf: 0,
        len: 0,
        tag: 0,
    };
    match run_one(dev, flush)? {
        IoStatus::IoErr => t.io_errors += 1,
        IoStatus::Ok | IoStatus::Unsupported => {}
    }
    t.write_status.get_or_insert(IoStatus::Ok);
    Ok(true)
}

fn verify_pass(
    dev: &mut dyn BlockDevice,
    offset: u64,
    size: u64,
    seed: u64,
    buf: u64,
    t: &mut Tally,
) -> Result<(), BlkError> {
    let mut done = 0;
    let mut fnv = Fnv1a::new();
    while done < size {
        let n = CHUNK.min(size - done);
        let sector = offset + done / SECTOR;
        let r = transfer(dev, Op::Read, sector, buf, n)?;
        t.io_errors += r.errors;
        // SAFETY: buf holds the n bytes just read.
        let bad = unsafe {
            fnv.update(buf, n);
            pattern::verify(buf, n, sector, seed)
        };
        match bad {
            Some((off, count)) => {
                t.bad_sectors += count;
                t.first_bad.get_or_insert(done + off);
            }
            None if r.status == IoStatus::Ok => t.verified_bytes += n,
            None => {}
        }
        done += n;
    }
    t.checksum = fnv.value();
    Ok(())
}

/// FNV-1a 64 of the region's bytes.
fn checksum(
    dev: &mut dyn BlockDevice,
    offset: u64,
    size: u64,
    buf: u64,
    t: &mut Tally,
) -> Result<u64, BlkError> {
    let mut fnv = Fnv1a::new();
    let mut done = 0;
    while done < size {
        let n = CHUNK.min(size - done);
        let r = transfer(dev, Op::Read, offset + done / SECTOR, buf, n)?;
        t.io_errors += r.errors;
        // SAFETY: buf holds the n bytes just read.
        unsafe { fnv.update(buf, n) };
        done += n;
    }
    Ok(fnv.value())
}

/// Reads one sector at the capacity (just past the end); true if the device refused it.
fn oob_read(dev: &mut dyn BlockDevice, buf: u64, report: &mut Report) -> Result<bool, BlkError> {
    let req = Request {
        op: Op::Read,
        sector: dev.capacity(),
        buf,
        len: SECTOR as u32,
        tag: 0,
    };
    let status = run_one(dev, req)?;
    report.str("oob_status", format_args!("{}", status.name()));
    Ok(status != IoStatus::Ok)
}

fn report_tally(t: &Tally, p: &Params, report: &mut Report) {
    report.u64("rounds", t.rounds);
    report.u64("io_errors", t.io_errors);
    report.u64("verified_bytes", t.verified_bytes);
    report.u64("mismatched_sectors", t.bad_sectors);
    if let Some(st) = t.write_status {
        report.str("write_status", format_args!("{}", st.name()));
    }
    report.str("checksum", format_args!("{:016x}", t.checksum));
    report.str(
        "checksum_of",
        format_args!("{}", if p.check.is_some() { "check" } else { "verify" }),
    );
}
