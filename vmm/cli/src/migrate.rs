//! `splitvisor run --incoming ADDR`: the destination of a live migration. Listens on ADDR,
//! checks the source's VM against its own flags (refusals go back to the source, which keeps
//! running), receives it into a staging directory and restores it from there as
//! `run --restore` would, connecting to the same backends once the source let them go.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use splitvisor_vmm::api::types::{MigrateReport, MigrateRequest, MigrationStatus, API_PREFIX};

use splitvisor_vmm::config::{DiskConfig, VmConfig};
use splitvisor_vmm::migration::receive::{self, Expect, Incoming};
use splitvisor_vmm::migration::wire::{Address, Listener};
use splitvisor_vmm::snapshot::take;
use splitvisor_vmm::vm::{RestoreFrom, Vm};

use crate::ctl::{self, CtlError};

/// The staging directory, removed when dropped (the restored VM has its memory by then).
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for the VM on `address` and restores it with `config` (its --memory and --vcpus must
/// be the VM's; without --disk/--net it takes the VM's backends). `explicit_devices`: whether
/// --disk/--net were given.
pub fn receive_vm(
    address: &str,
    config: &mut VmConfig,
    explicit_devices: bool,
) -> Result<Vm, Box<dyn std::error::Error>> {
    let address: Address = address.parse()?;
    let listener = Listener::bind(&address)?;
    splitvisor_vmm::eprintln_whole!("splitvisor: waiting for a VM to migrate in on {address}");
    let staging =
        Staging(std::env::temp_dir().join(format!("splitvisor-incoming-{}", std::process::id())));
    let expect = Expect {
        memory_bytes: config.memory.0,
        vcpus: usize::from(config.vcpus),
        devices: explicit_devices.then(|| device_keys(config)),
    };
    let incoming = receive::receive(&listener, &expect, &staging.0)?;
    drop(listener);
    if !explicit_devices {
        (config.disks, config.nets) = crate::run::snapshot_backends(&incoming.manifest);
    }
    let start = Instant::now();
    let restored = Vm::restore(
        config,
        &RestoreFrom {
            dir: &incoming.dir,
            manifest: &incoming.manifest,
        },
    );
    let (bytes, received_ms) = (incoming.bytes, incoming.elapsed.as_millis());
    match restored {
        Ok(vm) => {
            finish(incoming, Ok(()))?;
            splitvisor_vmm::eprintln_whole!(
                "splitvisor: migrated in from {address}: {} MiB received in {received_ms} ms, restored in {} ms",
                bytes >> 20,
                start.elapsed().as_millis()
            );
            Ok(vm)
        }
        Err(e) => {
            let why = splitvisor_vmm::error_chain(&e);
            let _ = finish(incoming, Err(why));
            Err(e.into())
        }
    }
}

fn finish(
    incoming: Incoming,
    outcome: Result<(), String>,
) -> Result<(), Box<dyn std::error::Error>> {
    incoming.finish(outcome).map_err(|e| {
        format!(
            "the VM was restored but the source could not be told: {}",
            splitvisor_vmm::error_chain(&e)
        )
        .into()
    })
}

/// Prints `GET /vm/migrate` on one stderr line every 250 ms until `done`.
fn show_progress(socket: &Path, done: &AtomicBool) {
    let path = format!("{API_PREFIX}/vm/migrate");
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let status: Result<MigrationStatus, _> =
            ctl::request_within(socket, "GET", &path, None, Duration::from_secs(2));
        if let (Ok(s), false) = (status, done.load(Ordering::Relaxed)) {
            if s.migrating {
                eprint!(
                    "\rmigrating to {}: {}, {} MiB sent, {} MiB/s ",
                    s.to.unwrap_or_default(),
                    s.phase.unwrap_or_default(),
                    s.sent_bytes >> 20,
                    s.rate_mib_s
                );
            }
        }
    }
}

/// The devices `config` gives the VM, as a migration header names them.
fn device_keys(config: &VmConfig) -> Vec<String> {
    let mut keys: Vec<String> = take::platform_devices().iter().map(|d| d.key()).collect();
    for (disk, id) in config.disks.iter().zip(config.disk_ids()) {
        let kind = match disk {
            DiskConfig::VhostUser { .. } => "block",
            DiskConfig::Ata { .. } => take::ATA_KIND,
        };
        keys.push(format!("{id} ({kind})"));
    }
    keys.extend(config.net_ids().into_iter().map(|id| format!("{id} (net)")));
    keys
}

/// `splitvisor ctl NAME migrate ADDR`: asks the VMM on `socket` to migrate its VM, showing on
/// stderr how long it has been at it until the answer, then the figures.
pub fn ctl_migrate(socket: &Path, to: &str, json: bool) -> Result<String, CtlError> {
    let to = match to.strip_prefix("unix:") {
        // The VMM resolves the path itself, so a relative one must not depend on its cwd.
        Some(path) => format!(
            "unix:{}",
            std::path::absolute(path)
                .unwrap_or_else(|_| path.into())
                .display()
        ),
        None => to.to_string(),
    };
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (done, socket) = (done.clone(), socket.to_path_buf());
        std::thread::spawn(move || show_progress(&socket, &done))
    };
    let body = json!(MigrateRequest { to });
    let answer: Result<MigrateReport, CtlError> = ctl::request(
        socket,
        "PUT",
        &format!("{API_PREFIX}/vm/migrate"),
        Some(&body),
    );
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let report = answer?;
    eprintln!(
        "\rsent {} MiB of {} MiB in {} ms ({} MiB/s), VM paused for {} ms",
        report.sent_bytes >> 20,
        report.memory_bytes >> 20,
        report.elapsed_ms,
        report.rate_mib_s,
        report.downtime_ms
    );
    ctl::show(json, &report, |r| {
        format!("VM migrated to {}; it runs there now", r.to)
    })
}
