//! The control API's request and response bodies as typed structs, shared by the server
//! (`control`, `api::routes`), its client `splitvisor ctl` and `splitvisor list`, and checked
//! against docs/api.yaml by the tests in `api::doc_tests`.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::vhost_user::{SwitchKind, SwitchRecord};

/// The API version served under `/api/v1/`.
pub const API_VERSION: &str = "v1";
/// The prefix of the versioned paths; the unprefixed paths of the first API stay as aliases.
pub const API_PREFIX: &str = "/api/v1";

/// What the VM is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Paused,
    Stopping,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
        }
    }
}

/// `PUT /vm/pause`, `/vm/resume`, `/vm/shutdown`: the VM's state after the request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateReport {
    pub state: VmState,
}

/// What the VM does once a snapshot is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterSnapshot {
    /// The vCPUs run again (even if the VM was paused before the snapshot).
    #[default]
    Resume,
    /// The VMM ends, exit status 0; `splitvisor run --restore DIR` continues the VM.
    Stop,
}

impl AfterSnapshot {
    pub fn as_str(self) -> &'static str {
        match self {
            AfterSnapshot::Resume => "resume",
            AfterSnapshot::Stop => "stop",
        }
    }
}

/// `PUT /vm/snapshot`'s request body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The directory to write (created if needed; an earlier snapshot in it is replaced).
    pub dir: String,
    #[serde(default)]
    pub then: AfterSnapshot,
}

/// `PUT /vm/snapshot`'s answer: what was written and the VM's state after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub dir: String,
    pub memory_bytes: u64,
    pub vcpus: usize,
    /// From the vCPUs parked to the manifest written.
    pub elapsed_ms: u64,
    pub state: VmState,
}

/// `PUT /vm/upgrade`'s request body (may be empty).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    /// The splitvisor binary to run; default: the one running now (`/proc/self/exe`'s path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
}

/// `PUT /vm/upgrade`'s answer, given by the new VMM process once the vCPUs run again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// The VMM's pid: the same before and after.
    pub pid: u32,
    /// The version of the splitvisor now running.
    pub version: String,
    /// The version that ran before.
    pub previous_version: String,
    /// The binary now running.
    pub binary: String,
    /// From the pause to the vCPUs running again in the new process, in microseconds.
    pub downtime_us: u64,
    /// How many live upgrades this VM has gone through.
    pub upgrades: u64,
    pub state: VmState,
}

/// `PUT /vm/migrate`'s request body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Where the destination (`splitvisor run --incoming ADDR`) waits: `unix:PATH` or
    /// `tcp:HOST:PORT`.
    pub to: String,
}

/// `PUT /vm/migrate`'s answer: the VM runs at the destination now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateReport {
    pub to: String,
    pub memory_bytes: u64,
    /// Guest memory sent (only pages holding data), pre-copy rounds included.
    pub sent_bytes: u64,
    /// Rounds of copying while the VM ran (0: stop-and-copy, because a vhost-user backend
    /// serving rings cannot log its writes).
    pub precopy_rounds: u32,
    /// From the request to the destination's confirmation.
    pub elapsed_ms: u64,
    /// From the vCPUs paused to the destination's confirmation.
    pub downtime_ms: u64,
    /// Guest memory sent per second of sending.
    pub rate_mib_s: u64,
}

/// `GET /vm/migrate`: the migration in progress, if any.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub migrating: bool,
    /// Where to; null when not migrating.
    pub to: Option<String>,
    /// "connecting", "pre-copy", "stop-and-copy" or "handoff"; null when not migrating.
    pub phase: Option<String>,
    /// Bytes sent to the destination so far (pages and framing).
    pub sent_bytes: u64,
    pub elapsed_ms: u64,
    pub rate_mib_s: u64,
}

/// What the VM boots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestReport {
    /// "linux" or "splitvisor guest".
    pub kind: String,
    /// The `--kernel` path, or "<embedded guest>".
    pub kernel: String,
}

/// `GET /vm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    pub state: VmState,
    pub guest: GuestReport,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub uptime_ms: u64,
    pub devices: Vec<DeviceReport>,
}

/// One device of `GET /vm`. Fields a transport does not have are null (an ATA disk has no
/// MMIO window, no driver status and no backend).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceReport {
    pub id: String,
    /// "block" or "net".
    pub kind: String,
    /// "virtio-mmio" or "ata-pio".
    pub transport: String,
    pub mmio_base: Option<String>,
    pub gsi: Option<u32>,
    pub driver_ok: Option<bool>,
    pub needs_reset: bool,
    /// Busy with its backend: `driver_ok`, `backend` and `counters` are from the last report.
    pub busy: bool,
    pub backend: Option<BackendReport>,
    pub counters: Option<DeviceCounters>,
}

/// A vhost-user device's backend connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendReport {
    pub socket: String,
    pub state: BackendState,
    pub since_ms: u64,
    /// The backend's virtio feature bits, in hex.
    pub features: String,
    pub inflight_tracking: bool,
    pub rings_running: bool,
    pub queues: u64,
    pub swaps: u64,
    pub recoveries: u64,
    pub history: Vec<SwitchReport>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Connected,
    Reconnecting,
    Failed,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Connected => "connected",
            BackendState::Reconnecting => "reconnecting",
            BackendState::Failed => "failed",
        }
    }
}

/// One completed switch of backend (a swap or a recovery).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwitchReport {
    pub kind: SwitchKindReport,
    pub from: String,
    pub to: String,
    pub stall_us: u64,
    pub first_completion_us: Option<u64>,
    pub outage_ms: Option<u64>,
    pub inflight_region: bool,
    pub at_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwitchKindReport {
    Swap,
    Recovery,
}

impl SwitchKindReport {
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchKindReport::Swap => "swap",
            SwitchKindReport::Recovery => "recovery",
        }
    }
}

impl SwitchReport {
    /// `record` with its times counted from the VM's start (`epoch`).
    pub fn from_record(record: &SwitchRecord, epoch: Instant) -> Self {
        Self {
            kind: match record.kind {
                SwitchKind::Swap => SwitchKindReport::Swap,
                SwitchKind::Recovery => SwitchKindReport::Recovery,
            },
            from: record.from.display().to_string(),
            to: record.to.display().to_string(),
            stall_us: record.stall.as_micros() as u64,
            first_completion_us: record.first_completion.map(|d| d.as_micros() as u64),
            outage_ms: record.outage.map(|d| d.as_millis() as u64),
            inflight_region: record.inflight_region,
            at_ms: record.at.saturating_duration_since(epoch).as_millis() as u64,
        }
    }
}

/// A device's counters: what the VMM sees of a virtio device, or an ATA disk's commands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceCounters {
    Virtio(VirtioCounters),
    Ata(AtaCounters),
}

impl DeviceCounters {
    /// Requests completed, whatever the transport.
    pub fn requests(&self) -> u64 {
        match self {
            DeviceCounters::Virtio(c) => c.completed_requests,
            DeviceCounters::Ata(c) => c.commands,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtioCounters {
    pub mmio_exits: u64,
    pub used_buffer_interrupts: u64,
    pub config_interrupts: u64,
    pub completed_requests: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AtaCounters {
    pub commands: u64,
    pub sectors_read: u64,
    pub sectors_written: u64,
    pub errors: u64,
}

/// `PUT /devices/{id}/backend`'s request body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapRequest {
    pub socket: String,
}

/// `PUT /devices/{id}/backend`'s answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwapReport {
    pub id: String,
    pub swap: SwitchReport,
}

/// VM exits by kind and by device (also `run --stats`'s `VMM-STATS` line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitCounts {
    pub pio: u64,
    pub mmio: u64,
    pub other: u64,
    pub pio_by_device: BTreeMap<String, u64>,
    pub mmio_by_device: BTreeMap<String, u64>,
}

/// One virtio device's interrupts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtioInterrupts {
    pub id: String,
    pub used_buffer_interrupts: u64,
    pub config_interrupts: u64,
    pub needs_reset: bool,
}

/// What the VMM counted: exits and interrupts (`run --stats`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmmCounters {
    pub exits: ExitCounts,
    pub virtio: Vec<VirtioInterrupts>,
}

/// `GET /metrics`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsReport {
    pub uptime_ms: u64,
    pub exits: ExitCounts,
    pub virtio: Vec<VirtioInterrupts>,
    /// Per vhost-user device; null for a device busy with its backend since before any report.
    pub devices: BTreeMap<String, Option<VirtioCounters>>,
    /// Per vhost-user device whose backend daemon's stats socket is known (`stats=`): its
    /// `GET /stats`, or why it could not be had.
    #[serde(default)]
    pub backend_stats: BTreeMap<String, BackendStatsEntry>,
}

/// One backend daemon's counters as `GET /metrics` reports them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatsEntry {
    /// The daemon's `--api-socket`.
    pub api_socket: String,
    /// Its `GET /stats`; null when it did not answer in time (see `error`).
    pub stats: Option<DaemonStats>,
    /// Why `stats` is null.
    #[serde(default)]
    pub error: Option<String>,
}

/// `GET /stats` of splitvisor-blk (`queues`) or splitvisor-net (`ports`): the daemons'
/// own schema, which they serialize and the VMM reads.
pub use splitvisor_wire::stats::{BlkQueueStats, DaemonStats, NetPortStats, NetQueueStats};

/// `GET /api/v1/version`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionReport {
    /// The splitvisor release serving the API.
    pub version: String,
    /// The API version, "v1".
    pub api_version: String,
}

impl VersionReport {
    pub fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: API_VERSION.to_string(),
        }
    }
}

/// `GET /api/v1/ping`: the VMM answers, and which process it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PingReport {
    pub ok: bool,
    pub pid: u32,
}

/// Every error answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorReport {
    pub error: String,
}
