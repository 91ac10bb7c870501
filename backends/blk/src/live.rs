//! What `GET /stats` on `--api-socket` reports beyond the STATS line: uptime, whether a
//! frontend is connected, how many were served. `Tracked` wraps the device to notice a
//! frontend's first message without touching the vhost-user server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use splitvisor_wire::stats::{state_name, DaemonStats};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryMmap;

use crate::stats::DeviceStats;
use splitvisor_vhost_server::VhostUserDevice;

/// The daemon's connection state, shared by the serve loop, the device and the API thread.
#[derive(Debug)]
pub struct Live {
    started: Instant,
    connected: AtomicBool,
    frontends: AtomicU64,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            connected: AtomicBool::new(false),
            frontends: AtomicU64::new(0),
        }
    }
}

impl Live {
    /// A frontend sent its first message (GET_FEATURES is the first of every connection).
    fn frontend_started(&self) {
        if !self.connected.swap(true, Ordering::SeqCst) {
            self.frontends.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The frontend's connection ended; the daemon waits for the next one.
    pub fn frontend_ended(&self) {
        self.connected.store(false, Ordering::SeqCst);
    }

    /// The answer of `GET /stats`: the STATS line's counters plus uptime and connection state.
    pub fn snapshot(&self, stats: &DeviceStats) -> serde_json::Value {
        let reply = DaemonStats {
            daemon: "splitvisor-blk".into(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            state: state_name(self.connected.load(Ordering::SeqCst)).into(),
            frontends: self.frontends.load(Ordering::SeqCst),
            counters: stats.line(),
        };
        // Strings and integers only: this cannot fail.
        serde_json::to_value(reply).unwrap_or_default()
    }
}

/// The device, with every frontend's first message noted in `Live`.
pub struct Tracked<D> {
    pub device: D,
    pub live: Arc<Live>,
}

impl<D: VhostUserDevice> VhostUserDevice for Tracked<D> {
    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> u16 {
        self.device.max_queue_size()
    }

    fn features(&self) -> u64 {
        self.live.frontend_started();
        self.device.features()
    }

    fn features_acked(&self, features: u64) {
        self.live.frontend_started();
        self.device.features_acked(features)
    }

    fn config_space(&self) -> Option<&[u8]> {
        self.device.config_space()
    }

    fn process(
        &self,
        queue: usize,
        head: u16,
        chain: &[Descriptor],
        memory: &GuestMemoryMmap,
    ) -> u32 {
        self.device.process(queue, head, chain, memory)
    }

    fn queue_kicked(&self, queue: usize) {
        self.device.queue_kicked(queue)
    }

    fn queue_signalled(&self, queue: usize) {
        self.device.queue_signalled(queue)
    }

    fn poll_window(&self) -> std::time::Duration {
        self.device.poll_window()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_has_the_stats_line_and_the_state() {
        let live = Live::default();
        let stats = DeviceStats::new(1);
        let s = live.snapshot(&stats);
        assert_eq!(s["state"], "waiting");
        assert_eq!(s["frontends"], 0);
        assert_eq!(s["queues"][0]["requests"], 0);
        live.frontend_started();
        live.frontend_started();
        let s = live.snapshot(&stats);
        assert_eq!(
            (s["state"].as_str(), s["frontends"].as_u64()),
            (Some("connected"), Some(1))
        );
        live.frontend_ended();
        assert_eq!(live.snapshot(&stats)["state"], "waiting");
    }
}
