//! `splitvisor list`: every VM running on this host, asked through its own API, as a table or
//! as JSON.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::ctl::{self, device_state, seconds, CtlError};
use crate::registry::{self, Entry};
use splitvisor_vmm::api::types::{VmReport, API_PREFIX};

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print a JSON array (name, pid, api_socket, state, and the VM as GET /vm reports it)
    /// instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A VM that does not answer within this time is listed as "unreachable" (it may be busy
/// starting, or stuck).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("cannot write the list as JSON")]
    Serialize(#[source] serde_json::Error),
}

/// One VM of the list (`list --json` prints an array of these).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListedVm {
    pub name: String,
    /// The VMM's pid.
    pub pid: u32,
    pub api_socket: PathBuf,
    /// The VM's state (running, paused, stopping), or "unreachable" when its API did not
    /// answer.
    pub state: String,
    /// The VM as `GET /vm` reports it; null when unreachable.
    pub vm: Option<VmReport>,
    /// Why the API did not answer.
    pub error: Option<String>,
}

/// Asks every registered VM for its state.
pub fn collect() -> Vec<ListedVm> {
    registry::running().into_iter().map(ask).collect()
}

fn ask(entry: Entry) -> ListedVm {
    let path = format!("{API_PREFIX}/vm");
    let answer: Result<VmReport, CtlError> =
        ctl::request_within(&entry.api_socket, "GET", &path, None, ANSWER_TIMEOUT);
    let (state, vm, error) = match answer {
        Ok(vm) => (vm.state.as_str().to_string(), Some(vm), None),
        Err(e) => (
            "unreachable".to_string(),
            None,
            Some(splitvisor_vmm::error_chain(&e)),
        ),
    };
    ListedVm {
        name: entry.name,
        pid: entry.pid,
        api_socket: entry.api_socket,
        state,
        vm,
        error,
    }
}

/// `splitvisor list [--json]`.
pub fn run(args: &ListArgs) -> Result<String, ListError> {
    let vms = collect();
    if args.json {
        return serde_json::to_string(&vms).map_err(ListError::Serialize);
    }
    Ok(table(&vms))
}

/// One line per VM; devices as `id:state`.
pub fn table(vms: &[ListedVm]) -> String {
    let mut out = format!(
        "{:<16} {:>8} {:<11} {:>5} {:>8} {:>10}  DEVICES\n",
        "NAME", "PID", "STATE", "VCPUS", "MEMORY", "UPTIME"
    );
    for v in vms {
        let (vcpus, memory, uptime, devices) = match &v.vm {
            Some(vm) => (
                vm.vcpus.to_string(),
                format!("{}M", vm.memory_bytes >> 20),
                seconds(vm.uptime_ms),
                vm.devices
                    .iter()
                    .map(|d| format!("{}:{}", d.id, device_state(d)))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            None => (
                "-".into(),
                "-".into(),
                "-".into(),
                v.error.clone().unwrap_or_default(),
            ),
        };
        let _ = writeln!(
            out,
            "{:<16} {:>8} {:<11} {:>5} {:>8} {:>10}  {}",
            v.name, v.pid, v.state, vcpus, memory, uptime, devices
        );
    }
    out.trim_end().to_string()
}
