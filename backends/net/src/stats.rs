//! Per-queue-pair counters (frames, bytes, drops by reason, kicks, interrupts), read out as
//! splitvisor-wire's STATS schema.

use std::sync::atomic::{AtomicU64, Ordering};

use splitvisor_wire::stats::{stats_line, Drops, NetPortStats, NetQueueStats};

/// Why a frame (or a descriptor chain) was dropped. Each reason has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// TX chain shorter than the virtio-net header.
    TxTooShort,
    /// TX chain longer than the largest frame we accept.
    TxTooLarge,
    /// A device-writable descriptor in a TX chain, or a device-readable one in an RX chain.
    WrongDirection,
    /// A descriptor pointing outside guest memory.
    BadAddress,
    /// A TX chain with more segments than we gather.
    TooManySegments,
    /// The TAP refused the frame (write error).
    TapWrite,
    /// Reading from the TAP failed, or it delivered a frame shorter than the vnet header.
    TapRead,
    /// RX frame larger than the buffers the guest posted (or than one chain without MRG_RXBUF).
    RxTooLarge,
    /// Destination had no RX buffers (switch mode) or no connected frontend.
    NoRxBuffers,
    /// Switch: a frame addressed to the port it came from, or a runt without an Ethernet header.
    Filtered,
    /// A chain whose NEXT links go on past its table (a loop, or a link out of the table).
    ChainLoop,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::TxTooShort,
        DropReason::TxTooLarge,
        DropReason::WrongDirection,
        DropReason::BadAddress,
        DropReason::TooManySegments,
        DropReason::TapWrite,
        DropReason::TapRead,
        DropReason::RxTooLarge,
        DropReason::NoRxBuffers,
        DropReason::Filtered,
        DropReason::ChainLoop,
    ];

    /// The counter's name in the STATS line.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::TxTooShort => "tx_too_short",
            DropReason::TxTooLarge => "tx_too_large",
            DropReason::WrongDirection => "wrong_direction",
            DropReason::BadAddress => "bad_address",
            DropReason::TooManySegments => "too_many_segments",
            DropReason::TapWrite => "tap_write",
            DropReason::TapRead => "tap_read",
            DropReason::RxTooLarge => "rx_too_large",
            DropReason::NoRxBuffers => "no_rx_buffers",
            DropReason::Filtered => "filtered",
            DropReason::ChainLoop => "chain_loop",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one RX/TX queue pair. Lock-free so that the API thread can read them live.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_kicks: AtomicU64,
    pub tx_kicks: AtomicU64,
    pub rx_interrupts: AtomicU64,
    pub tx_interrupts: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl QueueStats {
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }

    pub fn count_rx(&self, bytes: usize) {
        self.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_tx(&self, bytes: usize) {
        self.tx_frames.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now, as the STATS line shows them.
    pub fn line(&self) -> NetQueueStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let drops = DropReason::ALL
            .iter()
            .map(|reason| (reason.name().to_string(), self.drops(*reason)));
        NetQueueStats {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            rx_kicks: get(&self.rx_kicks),
            tx_kicks: get(&self.tx_kicks),
            rx_interrupts: get(&self.rx_interrupts),
            tx_interrupts: get(&self.tx_interrupts),
            drops: Drops(drops.collect()),
        }
    }
}

/// Counters of one vhost-user socket (a TAP device's queue pairs, or one switch port).
#[derive(Debug)]
pub struct PortStats {
    pub socket: String,
    pub connections: AtomicU64,
    pub queues: Vec<QueueStats>,
}

impl PortStats {
    pub fn new(socket: String, pairs: usize) -> Self {
        PortStats {
            socket,
            connections: AtomicU64::new(0),
            queues: (0..pairs).map(|_| QueueStats::default()).collect(),
        }
    }

    /// The counters now, as the STATS line shows them (no `state`: `GET /stats` adds it).
    pub fn line(&self) -> NetPortStats {
        NetPortStats {
            socket: self.socket.clone(),
            connections: self.connections.load(Ordering::Relaxed),
            state: String::new(),
            queues: self.queues.iter().map(QueueStats::line).collect(),
        }
    }

    /// The single-line JSON printed as `STATS {...}` when a frontend disconnects.
    pub fn to_json(&self) -> String {
        let line = stats_line(&self.line());
        line.strip_prefix("STATS ").unwrap_or(&line).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_one_line_and_escaped() {
        let stats = PortStats::new("/tmp/a\"b.sock".into(), 2);
        stats.queues[1].count_drop(DropReason::BadAddress);
        stats.queues[0].count_tx(60);
        let json = stats.to_json();
        assert!(!json.contains('\n'));
        assert!(json.starts_with("{\"socket\":\"/tmp/a\\\"b.sock\""));
        assert!(json.contains("\"tx_frames\":1,\"tx_bytes\":60"));
        assert!(json.contains("\"bad_address\":1"));
    }
}
