//! docs/api.yaml checked against the server: every route of the router is documented, every
//! documented route is served by the router's own matcher, and what the server sends for each
//! (its typed answers, serialized as the server serializes them, in each variant: a virtio,
//! a busy and an ATA device, a recovery with and without outage...) has exactly the documented
//! properties and types.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::routes::{self, ROUTES};
use super::schema_check::{check, documented, resolve};
use super::types::*;
use splitvisor_wire::stats::{AnyCounters, Drops};

const DOC: &str = include_str!("../../../docs/api.yaml");

fn doc() -> Value {
    serde_yaml::from_str(DOC).expect("docs/api.yaml is YAML")
}

fn served() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for r in ROUTES {
        out.insert((r.method.to_string(), format!("{API_PREFIX}{}", r.path)));
        if r.legacy {
            out.insert((r.method.to_string(), r.path.to_string()));
        }
    }
    out
}

#[test]
fn every_route_is_documented_and_every_documented_route_is_served() {
    let doc = doc();
    let documented: BTreeSet<_> = documented(&doc).into_keys().collect();
    let served = served();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in docs/api.yaml: {undocumented:?}"
    );
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        unserved.is_empty(),
        "in docs/api.yaml but not served: {unserved:?}"
    );
    // The router's own matcher finds each documented path (with an example id) and method.
    for (method, path) in &documented {
        let concrete = path.replace("{id}", "disk0");
        assert!(
            routes::serves(method, &concrete),
            "{method} {concrete} is documented but the router does not match it"
        );
    }
    assert!(
        !routes::serves("GET", "/version"),
        "new endpoints are versioned only"
    );
    assert!(!routes::serves("GET", "/api/v2/vm"));
}

fn switch(outage: Option<u64>) -> SwitchReport {
    SwitchReport {
        kind: if outage.is_some() {
            SwitchKindReport::Recovery
        } else {
            SwitchKindReport::Swap
        },
        from: "/r/a.sock".into(),
        to: "/r/b.sock".into(),
        stall_us: 800,
        first_completion_us: outage.map(|_| 120),
        outage_ms: outage,
        inflight_region: true,
        at_ms: 5000,
    }
}

fn virtio_counters() -> VirtioCounters {
    VirtioCounters {
        mmio_exits: 1,
        used_buffer_interrupts: 2,
        config_interrupts: 0,
        completed_requests: 3,
    }
}

/// A connected virtio device with a swap and a recovery behind it, one busy since before any
/// report, and an ATA disk.
fn devices() -> Vec<DeviceReport> {
    let connected = DeviceReport {
        id: "disk0".into(),
        kind: "block".into(),
        transport: "virtio-mmio".into(),
        mmio_base: Some("0xd0000000".into()),
        gsi: Some(5),
        driver_ok: Some(true),
        needs_reset: false,
        busy: false,
        backend: Some(BackendReport {
            socket: "/r/b.sock".into(),
            state: BackendState::Connected,
            since_ms: 5000,
            features: "0x130000000".into(),
            inflight_tracking: true,
            rings_running: true,
            queues: 1,
            swaps: 1,
            recoveries: 1,
            history: vec![switch(None), switch(Some(40))],
        }),
        counters: Some(DeviceCounters::Virtio(virtio_counters())),
    };
    // Busy since before any report: only what the VMM knows without the device.
    let busy = DeviceReport {
        id: "net0".into(),
        kind: "net".into(),
        driver_ok: None,
        busy: true,
        backend: None,
        counters: None,
        ..connected.clone()
    };
    let ata = DeviceReport {
        id: "ata0".into(),
        transport: "ata-pio".into(),
        mmio_base: None,
        gsi: None,
        driver_ok: None,
        backend: None,
        counters: Some(DeviceCounters::Ata(AtaCounters {
            commands: 1,
            sectors_read: 8,
            sectors_written: 0,
            errors: 0,
        })),
        ..connected.clone()
    };
    vec![connected, busy, ata]
}

/// `backend_stats` with a splitvisor-blk, a splitvisor-net and an unreachable daemon.
fn backend_stats() -> BTreeMap<String, BackendStatsEntry> {
    let daemon = |name: &str, counters| DaemonStats {
        daemon: name.into(),
        uptime_ms: 10,
        state: "connected".into(),
        frontends: 1,
        counters,
    };
    let blk = AnyCounters {
        queues: Some(vec![BlkQueueStats {
            queue: 0,
            requests: 3,
            read_bytes: 1536,
            write_bytes: 0,
            kicks: 3,
            interrupts: 3,
        }]),
        ports: None,
    };
    let blk = daemon("splitvisor-blk", blk);
    let net = AnyCounters {
        queues: None,
        ports: Some(vec![NetPortStats {
            socket: "/r/net0.sock".into(),
            connections: 1,
            state: "connected".into(),
            queues: vec![NetQueueStats {
                rx_frames: 1,
                rx_bytes: 60,
                tx_frames: 1,
                tx_bytes: 60,
                rx_kicks: 1,
                tx_kicks: 1,
                rx_interrupts: 1,
                tx_interrupts: 1,
                drops: Drops(vec![("no_rx_buffers".into(), 0)]),
            }],
        }]),
    };
    let net = daemon("splitvisor-net", net);
    let entry = |stats: Option<DaemonStats>, error: Option<&str>| BackendStatsEntry {
        api_socket: "/r/x.api.sock".into(),
        stats,
        error: error.map(str::to_string),
    };
    BTreeMap::from([
        ("disk0".into(), entry(Some(blk), None)),
        ("net0".into(), entry(Some(net), None)),
        ("disk1".into(), entry(None, Some("cannot connect"))),
    ])
}

/// What each endpoint answers with 200, in every shape it can take.
fn samples() -> BTreeMap<(&'static str, &'static str), Vec<Value>> {
    let vm = VmReport {
        state: VmState::Running,
        guest: GuestReport {
            kind: "splitvisor guest".into(),
            kernel: "<embedded guest>".into(),
        },
        vcpus: 1,
        memory_bytes: 256 << 20,
        uptime_ms: 1500,
        devices: devices(),
    };
    let metrics = MetricsReport {
        uptime_ms: 1500,
        exits: ExitCounts {
            pio: 1,
            mmio: 2,
            other: 3,
            pio_by_device: BTreeMap::from([("serial".into(), 1), ("unclaimed".into(), 0)]),
            mmio_by_device: BTreeMap::from([("disk0".into(), 2)]),
        },
        virtio: vec![VirtioInterrupts {
            id: "disk0".into(),
            used_buffer_interrupts: 2,
            config_interrupts: 0,
            needs_reset: false,
        }],
        devices: BTreeMap::from([
            ("disk0".into(), Some(virtio_counters())),
            ("net0".into(), None),
        ]),
        backend_stats: backend_stats(),
    };
    let states = [VmState::Running, VmState::Paused, VmState::Stopping]
        .map(|state| json!(StateReport { state }))
        .to_vec();
    let swap = SwapReport {
        id: "disk0".into(),
        swap: switch(None),
    };
    BTreeMap::from([
        (("GET", "/vm"), vec![json!(vm)]),
        (("GET", "/metrics"), vec![json!(metrics)]),
        (("PUT", "/vm/pause"), states.clone()),
        (("PUT", "/vm/resume"), states.clone()),
        (("PUT", "/vm/shutdown"), states),
        (("PUT", "/devices/{id}/backend"), vec![json!(swap)]),
        (
            ("PUT", "/vm/snapshot"),
            [VmState::Running, VmState::Stopping]
                .map(|state| {
                    json!(SnapshotReport {
                        dir: "/s".into(),
                        memory_bytes: 256 << 20,
                        vcpus: 2,
                        elapsed_ms: 40,
                        state,
                    })
                })
                .to_vec(),
        ),
        (
            ("PUT", "/vm/upgrade"),
            [VmState::Running, VmState::Paused]
                .map(|state| {
                    json!(UpgradeReport {
                        pid: 7,
                        version: "0.2.0".into(),
                        previous_version: "0.1.0".into(),
                        binary: "/usr/bin/splitvisor".into(),
                        downtime_us: 4200,
                        upgrades: 1,
                        state,
                    })
                })
                .to_vec(),
        ),
        (
            ("GET", "/vm/migrate"),
            vec![
                json!(MigrationStatus {
                    migrating: true,
                    to: Some("tcp:10.0.0.2:4444".into()),
                    phase: Some("pre-copy".into()),
                    sent_bytes: 5 << 20,
                    elapsed_ms: 30,
                    rate_mib_s: 166,
                }),
                json!(MigrationStatus {
                    migrating: false,
                    to: None,
                    phase: None,
                    sent_bytes: 0,
                    elapsed_ms: 0,
                    rate_mib_s: 0,
                }),
            ],
        ),
        (
            ("PUT", "/vm/migrate"),
            vec![json!(MigrateReport {
                to: "unix:/m.sock".into(),
                memory_bytes: 256 << 20,
                sent_bytes: 3 << 20,
                precopy_rounds: 2,
                elapsed_ms: 90,
                downtime_ms: 60,
                rate_mib_s: 400,
            })],
        ),
        (("GET", "/version"), vec![json!(VersionReport::current())]),
        (
            ("GET", "/ping"),
            vec![json!(PingReport { ok: true, pid: 1 })],
        ),
    ])
}

#[test]
fn every_answer_has_the_documented_shape() {
    let doc = doc();
    let samples = samples();
    let error = json!(ErrorReport {
        error: "why".into()
    });
    for ((method, path), op) in documented(&doc) {
        let route = path.strip_prefix(API_PREFIX).unwrap_or(&path);
        let values = samples
            .get(&(method.as_str(), route))
            .unwrap_or_else(|| panic!("no sample answer for {method} {path}: add one"));
        for (status, response) in op["responses"].as_object().expect("responses") {
            let response = resolve(&doc, response);
            let schema = &response["content"]["application/json"]["schema"];
            assert!(
                !schema.is_null(),
                "{method} {path} {status}: no JSON schema"
            );
            let answers = if status.starts_with('2') {
                values.clone()
            } else {
                vec![error.clone()]
            };
            for answer in answers {
                if let Err(why) = check(&doc, schema, &answer, "") {
                    panic!("{method} {path} {status}: {why}\nanswer: {answer}");
                }
            }
        }
    }
}

#[test]
fn the_checker_finds_what_differs() {
    let doc = doc();
    let schema = json!({ "$ref": "#/components/schemas/Switch" });
    let mut good = json!(SwapReport {
        id: "d".into(),
        swap: SwitchReport {
            kind: SwitchKindReport::Swap,
            from: "a".into(),
            to: "b".into(),
            stall_us: 1,
            first_completion_us: None,
            outage_ms: None,
            inflight_region: false,
            at_ms: 2,
        },
    })["swap"]
        .take();
    assert_eq!(check(&doc, &schema, &good, ""), Ok(()));
    good["extra"] = json!(1);
    assert!(
        check(&doc, &schema, &good, "").is_err(),
        "an undocumented field"
    );
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("extra");
    missing.as_object_mut().unwrap().remove("to");
    assert!(
        check(&doc, &schema, &missing, "").is_err(),
        "a missing field"
    );
    missing["to"] = json!(3);
    assert!(check(&doc, &schema, &missing, "").is_err(), "a wrong type");
}
