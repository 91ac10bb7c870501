//! The answer to `PUT /vm/upgrade`, which the new VMM process gives on the connection the old
//! one handed over (see `crate::upgrade`), once the vCPUs run again.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use super::http;
use super::types::{UpgradeReport, VmState};
use crate::upgrade::monotonic_ns;
use crate::upgrade::resume::Handoff;

/// The upgrade request's answer, owed by the new process.
pub struct PendingAnswer {
    client: UnixStream,
    paused_at_ns: u64,
    previous_version: String,
    binary: PathBuf,
    upgrades: u64,
}

impl PendingAnswer {
    /// The answer owed for the upgrade `handoff` comes from.
    pub fn for_handoff(handoff: &Handoff) -> std::io::Result<Self> {
        Ok(Self {
            client: handoff.client.try_clone()?,
            paused_at_ns: handoff.state.paused_at_ns,
            previous_version: handoff.state.from_version.clone(),
            binary: handoff.state.binary.clone(),
            upgrades: handoff.state.upgrades,
        })
    }

    /// Answers the client with the downtime (from the pause to now) and returns the report.
    pub fn send(self, state: VmState) -> UpgradeReport {
        let report = UpgradeReport {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            previous_version: self.previous_version,
            binary: self.binary.display().to_string(),
            downtime_us: monotonic_ns().saturating_sub(self.paused_at_ns) / 1000,
            upgrades: self.upgrades,
            state,
        };
        let body = serde_json::to_value(&report).unwrap_or_default();
        if let Err(e) = http::write_response(&self.client, 200, &[], &body) {
            log::warn!("upgrade: could not answer the upgrade request: {e}");
        }
        report
    }

    /// Tells the client the new process could not take the VM over (it then exits).
    pub fn fail(self, message: &str) {
        let body = serde_json::json!({ "error": message });
        if let Err(e) = http::write_response(&self.client, 500, &[], &body) {
            log::warn!("upgrade: could not answer the upgrade request: {e}");
        }
    }
}
