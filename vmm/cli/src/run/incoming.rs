//! `splitvisor run --incoming ADDR`: the destination of a live migration. Listens on ADDR,
//! checks the source's VM against its own flags (refusals go back to the source, which keeps
//! running), receives it into a staging directory and restores it from there as
//! `run --restore` would, connecting to the same backends once the source let them go.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use splitvisor_wire::host::signals::{signal_name, Blocked, STOP};

use splitvisor_vmm::config::{DiskConfig, VmConfig};
use splitvisor_vmm::migration::receive::{self, Expect, Incoming};
use splitvisor_vmm::migration::wire::{Address, Listener};
use splitvisor_vmm::snapshot::take;
use splitvisor_vmm::vm::{RestoreFrom, Vm};

/// The staging directory, removed when dropped (the restored VM has its memory by then).
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `receive::receive` on a thread of its own while this one takes SIGINT/SIGTERM: the wait
/// for a source may last for ever, and Ctrl-C must leave no socket, staging directory or
/// registry entry behind (returning the error drops the entry; the rest is removed here).
fn receive_interruptibly(
    listener: Listener,
    address: &Address,
    expect: Expect,
    staging: &Staging,
) -> Result<Incoming, Box<dyn std::error::Error>> {
    // Blocked before the thread starts, so that it inherits the mask and only this thread
    // takes the signals.
    let blocked = Blocked::block(&STOP)?;
    let (done, outcome) = mpsc::channel();
    let dir = staging.0.clone();
    let spawned = std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            let result = receive::receive(&listener, &expect, &dir);
            drop(listener);
            let _ = done.send(result);
        });
    let received = match spawned {
        Err(e) => Err(e.into()),
        Ok(_) => loop {
            if let Some(signal) = blocked.wait_timeout(Duration::from_millis(50)) {
                if let Address::Unix(path) = address {
                    let _ = std::fs::remove_file(path);
                }
                let _ = std::fs::remove_dir_all(&staging.0);
                break Err(format!(
                    "{} while waiting for a VM to migrate in on {address}; nothing was started",
                    signal_name(signal)
                )
                .into());
            }
            match outcome.try_recv() {
                Ok(result) => break result.map_err(Into::into),
                Err(mpsc::TryRecvError::Empty) => continue,
                Err(mpsc::TryRecvError::Disconnected) => {
                    break Err("the thread receiving the VM died".into())
                }
            }
        },
    };
    blocked.restore();
    received
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
    let incoming = receive_interruptibly(listener, &address, expect, &staging)?;
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
