//! `exit=N`: ends the VM at once with status N (0-255); tests the exit-status plumbing.

use super::{no_params, Outcome, Task};
use crate::json::Report;

pub fn run(task: &Task, report: &mut Report) -> Outcome {
    if let Err(outcome) = no_params(task, report) {
        return outcome;
    }
    let value = task.value.unwrap_or("");
    match value.parse::<u8>() {
        Ok(status) => {
            report.u64("exit_status", u64::from(status));
            Outcome::Exit(status)
        }
        Err(_) => {
            report.str(
                "error",
                format_args!("exit wants a status 0-255, got `{value}`"),
            );
            Outcome::BadCmdline
        }
    }
}
