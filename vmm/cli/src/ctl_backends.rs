//! `ctl metrics`' text for the backend daemons' counters (`GET /metrics`' `backend_stats`):
//! per device its daemon's state, then per queue kicks, bytes, requests and drops by reason.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use splitvisor_vmm::api::types::{BackendStatsEntry, BlkQueueStats, DaemonStats, NetPortStats};

/// One block per device; empty when no device's stats socket is known.
pub fn describe(backends: &BTreeMap<String, BackendStatsEntry>) -> String {
    let mut out = String::new();
    for (id, entry) in backends {
        match (&entry.stats, &entry.error) {
            (Some(stats), _) => describe_daemon(&mut out, id, stats),
            (None, error) => {
                let why = error.as_deref().unwrap_or("no answer");
                let _ = writeln!(out, "backend {id}: counters unavailable: {why}");
            }
        }
    }
    out
}

fn describe_daemon(out: &mut String, id: &str, s: &DaemonStats) {
    let _ = writeln!(
        out,
        "backend {id}: {} {}, {} frontend(s) served, up {:.1} s",
        s.daemon,
        s.state,
        s.frontends,
        s.uptime_ms as f64 / 1000.0
    );
    if let Some(queues) = &s.counters.queues {
        describe_blk(out, queues);
    }
    for port in s.counters.ports.iter().flatten() {
        describe_port(out, port);
    }
}

fn describe_blk(out: &mut String, queues: &[BlkQueueStats]) {
    let _ = writeln!(
        out,
        "  {:<6} {:>10} {:>14} {:>14} {:>10} {:>10}",
        "QUEUE", "REQUESTS", "READ BYTES", "WRITE BYTES", "KICKS", "INTERRUPTS"
    );
    for q in queues {
        let _ = writeln!(
            out,
            "  {:<6} {:>10} {:>14} {:>14} {:>10} {:>10}",
            q.queue, q.requests, q.read_bytes, q.write_bytes, q.kicks, q.interrupts
        );
    }
}

fn describe_port(out: &mut String, port: &NetPortStats) {
    let _ = writeln!(
        out,
        "  port {} ({}, {} connection(s))",
        port.socket, port.state, port.connections
    );
    let _ = writeln!(
        out,
        "  {:<5} {:>10} {:>12} {:>10} {:>12} {:>9} {:>9}",
        "PAIR", "RX FRAMES", "RX BYTES", "TX FRAMES", "TX BYTES", "RX KICKS", "TX KICKS"
    );
    for (pair, q) in port.queues.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {:<5} {:>10} {:>12} {:>10} {:>12} {:>9} {:>9}",
            pair, q.rx_frames, q.rx_bytes, q.tx_frames, q.tx_bytes, q.rx_kicks, q.tx_kicks
        );
        let drops: Vec<String> = q
            .drops
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        let drops = if drops.is_empty() {
            "none".to_string()
        } else {
            drops.join(", ")
        };
        let _ = writeln!(out, "        drops: {drops}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemons_and_unreachable_ones_are_described() {
        let backends: BTreeMap<String, BackendStatsEntry> = serde_json::from_value(serde_json::json!({
            "disk0": {"api_socket": "/r/disk0.api.sock", "stats": {
                "daemon": "splitvisor-blk", "uptime_ms": 2500, "state": "connected", "frontends": 1,
                "queues": [{"queue": 0, "requests": 42, "read_bytes": 4096, "write_bytes": 512, "kicks": 40, "interrupts": 41}]}},
            "net0": {"api_socket": "/r/net0.api.sock", "stats": {
                "daemon": "splitvisor-net", "uptime_ms": 100, "state": "waiting", "frontends": 0,
                "ports": [{"socket": "/r/net0.sock", "connections": 0, "state": "waiting", "queues": [{
                    "rx_frames": 1, "rx_bytes": 60, "tx_frames": 2, "tx_bytes": 120, "rx_kicks": 3, "tx_kicks": 4,
                    "rx_interrupts": 0, "tx_interrupts": 0, "drops": {"no_rx_buffers": 5, "filtered": 0}}]}]}},
            "net1": {"api_socket": "/r/x.sock", "stats": null, "error": "cannot connect"}
        }))
        .unwrap();
        let text = describe(&backends);
        assert!(
            text.contains(
                "backend disk0: splitvisor-blk connected, 1 frontend(s) served, up 2.5 s"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "  0              42           4096            512         40         41"
            ),
            "{text}"
        );
        assert!(
            text.contains("port /r/net0.sock (waiting, 0 connection(s))"),
            "{text}"
        );
        assert!(text.contains("drops: no_rx_buffers 5\n"), "{text}");
        assert!(
            text.contains("backend net1: counters unavailable: cannot connect"),
            "{text}"
        );
    }
}
