//! `fault=KIND`: raises a CPU exception on purpose to test the fatal-exception path (report on
//! the console, exit status 3). KIND: `ud` (#UD), `int3` (#BP), `gp` (non-canonical address),
//! `pf` (unmapped address), `de` (divide by zero).

use super::{no_params, Outcome, Task};
use crate::json::Report;
use crate::println;
use core::arch::asm;

/// Far above any RAM or device window, so no identity map covers it.
const UNMAPPED: u64 = 0x7fff_ffff_f000;
/// Not canonical (bits 63:47 differ), so any access raises #GP rather than #PF. (A port outside
/// the TSS I/O bitmap would fault only on PVM: elsewhere IOPL 3 lets CPL 3 use every port.)
const NON_CANONICAL: u64 = 0x8000_0000_0000;

pub fn run(task: &Task, report: &mut Report) -> Outcome {
    if let Err(outcome) = no_params(task, report) {
        return outcome;
    }
    let kind = task.value.unwrap_or("");
    println!("fault: raising `{kind}`; expect an EXCEPTION line and exit status 3");
    // Each instruction below faults before it has any effect; the exception handler reports
    // it and ends the VM, so control never comes back here.
    match kind {
        // SAFETY: ud2 only raises #UD.
        "ud" => unsafe { asm!("ud2", options(nomem, nostack)) },
        // SAFETY: int3 only raises #BP (not from splitvisor_park, so it is not a park request).
        "int3" => unsafe { asm!("int3", options(nomem, nostack)) },
        // SAFETY: a load from a non-canonical address raises #GP and reads nothing.
        "gp" => unsafe { asm!("mov {0}, [{0}]", inout(reg) NON_CANONICAL => _, options(nostack)) },
        // SAFETY: a load from an unmapped address raises #PF and reads nothing.
        "pf" => unsafe { asm!("mov {0}, [{0}]", inout(reg) UNMAPPED => _, options(nostack)) },
        // SAFETY: dividing by zero raises #DE; only the named registers are touched.
        "de" => unsafe {
            asm!("xor edx, edx", "div ecx", in("ecx") 0, inout("eax") 1 => _, out("edx") _,
                 options(nomem, nostack))
        },
        _ => {
            report.str(
                "error",
                format_args!("unknown fault `{kind}` (known: ud, int3, gp, pf, de)"),
            );
            return Outcome::BadCmdline;
        }
    }
    report.str("error", format_args!("fault `{kind}` did not fault"));
    Outcome::Fail
}
