//! Per-queue counters (requests, bytes, kicks, interrupts), kept for the daemon's lifetime.

use std::sync::atomic::{AtomicU64, Ordering};

use splitvisor_wire::stats::{BlkQueueStats, BlkStatsLine};

/// Counters of one virtqueue, updated by its worker thread.
#[derive(Debug, Default)]
pub struct QueueCounters {
    pub requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub kicks: AtomicU64,
    pub interrupts: AtomicU64,
}

impl QueueCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The counters of all queues of the device.
#[derive(Debug)]
pub struct DeviceStats {
    queues: Vec<QueueCounters>,
}

impl DeviceStats {
    pub fn new(num_queues: usize) -> Self {
        DeviceStats {
            queues: (0..num_queues).map(|_| QueueCounters::default()).collect(),
        }
    }

    /// Counters of queue `index`, or `None` for a queue the device does not have.
    pub fn queue(&self, index: usize) -> Option<&QueueCounters> {
        self.queues.get(index)
    }

    /// The counters now, as the STATS line and `GET /stats` show them.
    pub fn line(&self) -> BlkStatsLine {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(queue, q)| BlkQueueStats {
                queue: queue as u64,
                requests: get(&q.requests),
                read_bytes: get(&q.read_bytes),
                write_bytes: get(&q.write_bytes),
                kicks: get(&q.kicks),
                interrupts: get(&q.interrupts),
            });
        BlkStatsLine {
            queues: queues.collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_one_line_per_queue() {
        let s = DeviceStats::new(2);
        QueueCounters::add(&s.queue(1).unwrap().read_bytes, 512);
        assert_eq!(
            serde_json::to_string(&s.line()).unwrap(),
            "{\"queues\":[{\"queue\":0,\"requests\":0,\"read_bytes\":0,\"write_bytes\":0,\"kicks\":0,\"interrupts\":0},\
             {\"queue\":1,\"requests\":0,\"read_bytes\":512,\"write_bytes\":0,\"kicks\":0,\"interrupts\":0}]}"
        );
        assert!(s.queue(2).is_none());
    }
}
