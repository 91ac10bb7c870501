//! What `GET /stats` on `--api-socket` reports: every socket's STATS counters plus uptime and
//! whether a frontend is connected to it now.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use splitvisor_wire::stats::{state_name, DaemonStats, NetPortStats, NetPorts};

use crate::stats::PortStats;

/// The daemon's live state: one connected flag per port, next to its counters.
#[derive(Debug)]
pub struct Live {
    started: Instant,
    ports: Vec<(Arc<PortStats>, AtomicBool)>,
}

impl Live {
    pub fn new(stats: &[Arc<PortStats>]) -> Self {
        Self {
            started: Instant::now(),
            ports: stats
                .iter()
                .map(|s| (s.clone(), AtomicBool::new(false)))
                .collect(),
        }
    }

    /// A frontend connected to port `port` (true) or left it (false).
    pub fn set_connected(&self, port: usize, connected: bool) {
        if let Some((_, flag)) = self.ports.get(port) {
            flag.store(connected, Ordering::SeqCst);
        }
    }

    /// The answer of `GET /stats`: `{"daemon","uptime_ms","state","frontends","ports":[STATS
    /// line of each socket plus its "state"]}`; the top-level state is `connected` if any port
    /// has a frontend, `frontends` the sum of every port's connections.
    pub fn snapshot(&self) -> serde_json::Value {
        let mut any = false;
        let ports: Vec<NetPortStats> = self
            .ports
            .iter()
            .map(|(stats, flag)| {
                let connected = flag.load(Ordering::SeqCst);
                any |= connected;
                NetPortStats {
                    state: state_name(connected).into(),
                    ..stats.line()
                }
            })
            .collect();
        let reply = DaemonStats {
            daemon: "splitvisor-net".into(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            state: state_name(any).into(),
            frontends: ports.iter().map(|p| p.connections).sum(),
            counters: NetPorts { ports },
        };
        // Strings and integers only: this cannot fail.
        serde_json::to_value(reply).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::DropReason;

    #[test]
    fn snapshot_carries_each_port_and_its_state() {
        let stats = vec![
            Arc::new(PortStats::new("/a".into(), 1)),
            Arc::new(PortStats::new("/b".into(), 1)),
        ];
        stats[1].queues[0].count_drop(DropReason::Filtered);
        stats[1].connections.fetch_add(1, Ordering::Relaxed);
        let live = Live::new(&stats);
        let s = live.snapshot();
        assert_eq!(
            (s["state"].as_str(), s["frontends"].as_u64()),
            (Some("waiting"), Some(1))
        );
        live.set_connected(1, true);
        let s = live.snapshot();
        assert_eq!(s["state"], "connected");
        assert_eq!(s["ports"][0]["state"], "waiting");
        assert_eq!(s["ports"][1]["state"], "connected");
        assert_eq!(s["ports"][1]["socket"], "/b");
        assert_eq!(s["ports"][1]["queues"][0]["drops"]["filtered"], 1);
    }
}
