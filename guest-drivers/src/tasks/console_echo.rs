//! `console-echo[,lines=N][,seconds=S]`: reads lines from the serial console (polling COM1) and
//! prints `ECHO <line>` for each; passes after N lines (default 1), fails if S seconds (default
//! 30) pass first. Tests the VMM's console input end to end.

use super::disk::{bad_param, num};
use super::{Outcome, Task};
use crate::json::Report;
use crate::{println, serial, time};
use core::fmt::Write;

/// Longer lines are cut (the rest up to the line end is dropped, and counted).
const MAX_LINE: usize = 256;
const MAX_SECONDS: u64 = 3600;

struct Params {
    lines: u64,
    seconds: u64,
}

fn parse(task: &Task, report: &mut Report) -> Result<Params, Outcome> {
    let mut p = Params {
        lines: 1,
        seconds: 30,
    };
    for param in task.params() {
        let (k, v) = param.map_err(|e| {
            report.str("error", format_args!("{e}"));
            Outcome::BadCmdline
        })?;
        let ok = match k {
            "lines" => num(v).filter(|n| *n >= 1).map(|n| p.lines = n),
            "seconds" => num(v)
                .filter(|n| (1..=MAX_SECONDS).contains(n))
                .map(|n| p.seconds = n),
            _ => None,
        };
        if ok.is_none() {
            return Err(bad_param(report, task, k, v));
        }
    }
    Ok(p)
}

/// Gathers bytes into lines; a line ends at CR (what a raw terminal sends for Enter), LF, or
/// CR LF (counted once).
struct LineBuffer {
    buf: [u8; MAX_LINE],
    len: usize,
    after_cr: bool,
    cut_bytes: u64,
}

impl LineBuffer {
    /// Takes one byte; returns true when it ended a line (then `line()` holds it).
    fn push(&mut self, byte: u8) -> bool {
        let after_cr = core::mem::replace(&mut self.after_cr, byte == b'\r');
        match byte {
            b'\n' if after_cr => false,
            b'\r' | b'\n' => true,
            _ => {
                match self.buf.get_mut(self.len) {
                    Some(slot) => {
                        *slot = byte;
                        self.len += 1;
                    }
                    None => self.cut_bytes += 1,
                }
                false
            }
        }
    }

    fn line(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

pub fn run(task: &Task, report: &mut Report) -> Outcome {
    let p = match parse(task, report) {
        Ok(p) => p,
        Err(o) => return o,
    };
    println!(
        "console-echo: waiting for {} line(s) on the serial console for {} s",
        p.lines, p.seconds
    );
    let deadline = time::now() + time::ms_to_ticks(p.seconds * 1000);
    let mut input = LineBuffer {
        buf: [0; MAX_LINE],
        len: 0,
        after_cr: false,
        cut_bytes: 0,
    };
    let mut lines = 0;
    while lines < p.lines && time::now() < deadline {
        let Some(byte) = serial::read_byte() else {
            core::hint::spin_loop();
            continue;
        };
        if input.push(byte) {
            echo(input.line());
            input.len = 0;
            lines += 1;
        }
    }
    report.u64("lines", lines);
    if input.cut_bytes > 0 {
        report.u64("cut_bytes", input.cut_bytes);
    }
    if lines < p.lines {
        report.str(
            "error",
            format_args!("{lines} of {} line(s) within {} s", p.lines, p.seconds),
        );
        return Outcome::Fail;
    }
    Outcome::Pass
}

/// Prints `ECHO <line>`, bytes that are not printable ASCII as `\xNN`.
fn echo(line: &[u8]) {
    let mut console = serial::Console::lock();
    let _ = console.write_str("ECHO ");
    for &b in line {
        let _ = if (0x20..0x7f).contains(&b) {
            console.write_char(char::from(b))
        } else {
            write!(console, "\\x{b:02x}")
        };
    }
    let _ = console.write_str("\n");
}
