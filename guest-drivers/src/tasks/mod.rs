//! The guest's tasks (selected by the command line) and their common outcome type.

mod bench_blk;
mod bench_net;
mod blk_verify;
mod console_echo;
mod disk;
mod exit;
mod fault;
mod net;
mod selftest;

use crate::bootinfo::BootInfo;
use crate::cmdline::{Cmdline, Task};
use crate::json::Report;

/// How a task ended; decides the RESULT `status` and the debug-exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    BadCmdline,
    /// `exit=N`: the task passed, the VM ends with status N.
    Exit(u8),
}

impl Outcome {
    pub fn status(self) -> &'static str {
        match self {
            Outcome::Pass | Outcome::Exit(_) => "pass",
            Outcome::Fail | Outcome::BadCmdline => "fail",
        }
    }

    pub fn exit_status(self) -> u8 {
        match self {
            Outcome::Pass => 0,
            Outcome::Fail => 1,
            Outcome::BadCmdline => 2,
            Outcome::Exit(n) => n,
        }
    }
}

/// What every task gets to look at.
pub struct Context<'a> {
    pub boot: &'a BootInfo,
    pub cmdline: &'a Cmdline<'a>,
}

/// Runs the task named on the command line, adding its specific fields to `report`.
pub fn run(task: &Task, ctx: &Context, report: &mut Report) -> Outcome {
    match task.name {
        "selftest" => selftest::run(task, ctx, report),
        "exit" => exit::run(task, report),
        "fault" => fault::run(task, report),
        "blk-verify" => blk_verify::run(task, ctx, report),
        "bench" if task.value == Some("blk") => bench_blk::run(task, ctx, report),
        "bench" if task.value == Some("net") => bench_net::run(task, ctx, report),
        "serve" => net::serve(task, ctx, report),
        "ping" => net::ping(task, ctx, report),
        "console-echo" => console_echo::run(task, report),
        other => {
            report.str(
                "error",
                format_args!("unknown task `{other}` (known: selftest, exit=N, fault=KIND, blk-verify, bench=blk, bench=net, serve, ping=ADDR, console-echo)"),
            );
            Outcome::BadCmdline
        }
    }
}

/// Rejects any parameter for tasks that take none; records the error.
fn no_params(task: &Task, report: &mut Report) -> Result<(), Outcome> {
    let mut params = task.params();
    match params.next() {
        None => Ok(()),
        Some(Ok((key, _))) => {
            report.str(
                "error",
                format_args!("task `{}` takes no parameter `{key}`", task.name),
            );
            Err(Outcome::BadCmdline)
        }
        Some(Err(e)) => {
            report.str("error", format_args!("{e}"));
            Err(Outcome::BadCmdline)
        }
    }
}
