//! The learning L2 switch between VM NICs: MAC learning and forwarding decisions (pure), and
//! copying frames straight from one guest's TX chain into other guests' RX chains.
//!
//! Unicast holds back instead of dropping: when the one destination is connected but has no
//! RX buffer free, the sender's TX chain is given back to its ring and the sender's TX queue
//! waits until that port's driver adds buffers (its RX kick) - a receiver that keeps up on
//! average then loses nothing, and a faster sender is slowed to its pace, the way a NIC's
//! full TX ring slows a host. The wait is bounded (`BACKPRESSURE_WAIT`): after it the frame is
//! dropped as `no_rx_buffers` and the port counts as stalled (frames to it drop at once, so
//! a receiver that stopped reading cannot hold its senders) until its driver adds buffers.
//! Flooded frames never wait.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use splitvisor_vhost_server::{DeviceRing, SharedRing};
use virtio_queue::QueueT;
use vm_memory::{Address, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ring::{
    needs_interrupt, write_rx_frame, FrameSource, Mem, RxOutcome, Slice, UsedBatch, VNET_HDR_LEN,
};
use crate::rxtx::{gather_tx_chain, Batch, RxTxError, MAX_TX_SEGMENTS};
use crate::stats::{DropReason, PortStats, QueueStats};

/// Most ports (bounded by the dirty-port bitmask).
pub const MAX_PORTS: usize = 64;
/// Most learned MACs; beyond that, unknown destinations are simply flooded.
const MAX_MACS: usize = 4096;
const ETH_ADDR_LEN: usize = 6;
/// Longest a unicast frame waits for its destination's RX buffers (see the module comment).
pub const BACKPRESSURE_WAIT: Duration = Duration::from_millis(100);

pub type MacAddr = [u8; ETH_ADDR_LEN];

/// Where a frame goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Forward {
    /// To one known port.
    Port(usize),
    /// To every port except the source (broadcast, multicast, unknown unicast).
    Flood,
    /// Nowhere (destination is the source port itself).
    Drop,
}

/// Learned MAC -> port table.
#[derive(Debug, Default)]
pub struct MacTable {
    entries: HashMap<MacAddr, usize>,
}

fn is_multicast(mac: &MacAddr) -> bool {
    mac[0] & 1 == 1
}

impl MacTable {
    /// Whether learning `src` on `port` would change the table (lets callers take a read lock).
    pub fn needs_learning(&self, src: &MacAddr, port: usize) -> bool {
        !is_multicast(src)
            && self.entries.get(src) != Some(&port)
            && (self.entries.len() < MAX_MACS || self.entries.contains_key(src))
    }

    pub fn learn(&mut self, src: &MacAddr, port: usize) {
        if self.needs_learning(src, port) {
            self.entries.insert(*src, port);
        }
    }

    pub fn decide(&self, src_port: usize, dst: &MacAddr) -> Forward {
        if is_multicast(dst) {
            return Forward::Flood;
        }
        match self.entries.get(dst) {
            Some(&port) if port == src_port => Forward::Drop,
            Some(&port) => Forward::Port(port),
            None => Forward::Flood,
        }
    }

    /// Forget everything learned on `port` (its frontend went away).
    pub fn forget_port(&mut self, port: usize) {
        self.entries.retain(|_, p| *p != port);
    }
}

/// A connected port's RX queue, reachable from the other ports' worker threads.
pub struct RxTarget {
    pub ring: SharedRing,
    pub mem: GuestMemoryAtomic<Mem>,
    pub mrg_rxbuf: bool,
    /// `used.idx` when the current batch first touched this queue (interrupt decision).
    batch_start: Option<u16>,
    used: UsedBatch,
}

impl RxTarget {
    pub fn new(ring: SharedRing, mem: GuestMemoryAtomic<Mem>, mrg_rxbuf: bool) -> Self {
        RxTarget {
            ring,
            mem,
            mrg_rxbuf,
            batch_start: None,
            used: UsedBatch::default(),
        }
    }
}

struct Port {
    target: Mutex<Option<RxTarget>>,
    stats: Arc<PortStats>,
    /// Written when the port's driver adds RX buffers: wakes senders held back for it.
    room: Option<EventFd>,
    /// A frame waited `BACKPRESSURE_WAIT` for this port in vain: drop without waiting until
    /// its driver adds buffers.
    stalled: AtomicBool,
}

/// All ports of one switch.
pub struct Switch {
    ports: Vec<Port>,
    /// `0..ports.len()`, so flooding iterates without allocating.
    flood_order: Vec<usize>,
    table: RwLock<MacTable>,
}

/// A frame in a source guest's TX chain, presented with a fresh (zeroed) virtio-net header.
struct ChainFrame<'a> {
    mem: &'a Mem,
    segments: &'a [(GuestAddress, usize)],
    len: usize,
}

impl ChainFrame<'_> {
    /// Copy bytes of the source chain starting at chain offset `offset` into `dst`.
    fn copy_payload(&self, mut offset: usize, dst: &Slice<'_>) -> Result<usize, DropReason> {
        let mut copied = 0;
        for &(addr, len) in self.segments {
            if copied == dst.len() {
                break;
            }
            if offset >= len {
                offset -= len;
                continue;
            }
            let want = (len - offset).min(dst.len() - copied);
            let src_addr = addr.unchecked_add(offset as u64);
            let mut done = 0;
            for src in self.mem.get_slices(src_addr, want) {
                let src = src.map_err(|_| DropReason::BadAddress)?;
                let part = dst
                    .subslice(copied + done, src.len())
                    .map_err(|_| DropReason::BadAddress)?;
                src.copy_to_volatile_slice(part);
                done += src.len();
            }
            copied += done;
            offset = 0;
        }
        Ok(copied)
    }
}

impl FrameSource for ChainFrame<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn copy_to(&self, offset: usize, dst: &Slice<'_>) -> Result<usize, DropReason> {
        let mut copied = 0;
        if offset < VNET_HDR_LEN {
            let n = (VNET_HDR_LEN - offset).min(dst.len());
            dst.copy_from(&[0u8; VNET_HDR_LEN][..n]);
            copied = n;
        }
        if copied < dst.len() {
            let rest = dst.offset(copied).map_err(|_| DropReason::BadAddress)?;
            // The source chain starts with its own header, so frame offsets are chain offsets.
            copied += self.copy_payload(offset + copied, &rest)?;
        }
        Ok(copied)
    }
}

/// Reusable per-port scratch so forwarding does not allocate per frame.
#[derive(Default)]
pub struct SwitchScratch {
    segments: Vec<(GuestAddress, usize)>,
    used: UsedBatch,
    /// Since when the TX queue's first chain waits for its destination's RX buffers.
    held_since: Option<Instant>,
}

/// What became of a frame offered to the switch.
enum Forwarded {
    /// Copied (or dropped and counted at its destinations); the frame's length.
    Done(usize),
    /// Its one destination has no RX buffer yet: give it back and wait.
    HeldBack,
}

impl Switch {
    pub fn new(stats: Vec<Arc<PortStats>>) -> Self {
        let flood_order = (0..stats.len()).collect();
        Switch {
            flood_order,
            ports: stats
                .into_iter()
                .map(|stats| Port {
                    target: Mutex::new(None),
                    stats,
                    room: EventFd::new(EFD_NONBLOCK)
                        .map_err(|e| log::warn!("no backpressure on a switch port: {e}"))
                        .ok(),
                    stalled: AtomicBool::new(false),
                })
                .collect(),
            table: RwLock::new(MacTable::default()),
        }
    }

    fn stats(&self, port: usize) -> Option<&QueueStats> {
        self.ports.get(port).and_then(|p| p.stats.queues.first())
    }

    /// Make `port`'s RX queue a forwarding destination.
    pub fn attach(&self, port: usize, target: RxTarget) {
        if let Some(p) = self.ports.get(port) {
            *p.target.lock().unwrap_or_else(PoisonError::into_inner) = Some(target);
        }
    }

    /// The eventfd written when `port`'s driver adds RX buffers (a sender's TX queue waits on
    /// the other ports').
    pub fn room_fd(&self, port: usize) -> Option<RawFd> {
        self.ports.get(port)?.room.as_ref().map(|r| r.as_raw_fd())
    }

    /// `port`'s driver added RX buffers (or its RX queue started): wake the held-back senders.
    pub fn rx_refilled(&self, port: usize) {
        let Some(p) = self.ports.get(port) else {
            return;
        };
        p.stalled.store(false, Ordering::Relaxed);
        if let Some(room) = &p.room {
            // Only fails with the counter at its maximum, which still wakes the waiters.
            let _ = room.write(1);
        }
    }

    /// Whether a frame for `to` may wait: the port is connected with its RX ring running
    /// and not stalled. If so, asks its driver to kick when it adds buffers (with EVENT_IDX
    /// a driver kicks only when told to), and wakes the waiters at once if it already did.
    fn hold_for(&self, to: usize) -> bool {
        let Some(port) = self.ports.get(to) else {
            return false;
        };
        if port.room.is_none() || port.stalled.load(Ordering::Relaxed) {
            return false;
        }
        let slot = port.target.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(target) = slot.as_ref() else {
            return false;
        };
        let mem = target.mem.memory();
        let mut ring = DeviceRing::lock(&target.ring);
        if !ring.is_running() {
            return false;
        }
        // True: buffers arrived since the delivery failed; the kick for them may be gone.
        let arrived = ring.queue_mut().enable_notification(&*mem).unwrap_or(true);
        drop(ring);
        drop(slot);
        if arrived {
            self.rx_refilled(to);
        }
        true
    }

    /// `port`'s frontend went away: stop delivering to it and forget its MACs.
    pub fn detach(&self, port: usize) {
        if let Some(p) = self.ports.get(port) {
            *p.target.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        self.table
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .forget_port(port);
    }

    /// Forward every available chain of `port`'s TX queue; each goes back to its used ring.
    pub fn process_tx(
        &self,
        port: usize,
        ring: &mut DeviceRing,
        mem: &Mem,
        scratch: &mut SwitchScratch,
    ) -> Result<Batch, RxTxError> {
        let old_used = ring.queue().next_used();
        let mut dirty: u64 = 0;
        let mut used = 0;
        let mut held = false;
        // At most a ring's worth per call (see rxtx::process_tx).
        for _ in 0..ring.queue().size() {
            let may_wait = scratch
                .held_since
                .is_none_or(|since| since.elapsed() < BACKPRESSURE_WAIT);
            let avail_before = ring.queue().next_avail();
            let Some(chain) = ring.pop(mem) else { break };
            let head = chain.head_index();
            scratch.segments.clear();
            let segments = &mut scratch.segments;
            let gathered = gather_tx_chain(chain, mem, |addr, len| {
                if segments.len() == MAX_TX_SEGMENTS {
                    return Err(DropReason::TooManySegments);
                }
                segments.push((addr, len));
                Ok(())
            });
            let result = gathered.and_then(|len| {
                let frame = ChainFrame {
                    mem,
                    segments: &scratch.segments,
                    len,
                };
                self.forward(port, &frame, &mut dirty, may_wait)
            });
            if let Ok(Forwarded::HeldBack) = result {
                // Popped again once the destination has buffers (or the wait is over).
                ring.rewind(avail_before, [head]);
                scratch.held_since.get_or_insert_with(Instant::now);
                held = true;
                break;
            }
            scratch.held_since = None;
            if let Some(stats) = self.stats(port) {
                match result {
                    Ok(Forwarded::Done(len)) => stats.count_tx(len - VNET_HDR_LEN),
                    Ok(Forwarded::HeldBack) => {}
                    Err(reason) => stats.count_drop(reason),
                }
            }
            // Completed one by one, as the TAP path does (rxtx::process_tx).
            scratch.used.push(head, 0);
            used += scratch.used.publish(ring, mem)?;
        }
        self.signal_dirty(dirty);
        let interrupt = needs_interrupt(ring.queue(), mem, old_used)?;
        Ok(Batch {
            used,
            interrupt,
            held,
        })
    }

    /// Learn the source, pick destinations, copy; a unicast frame whose destination has no
    /// RX buffer yet is held back when `may_wait`.
    fn forward(
        &self,
        port: usize,
        frame: &ChainFrame,
        dirty: &mut u64,
        may_wait: bool,
    ) -> Result<Forwarded, DropReason> {
        let mut eth = [0u8; 2 * ETH_ADDR_LEN];
        let got = frame.copy_payload(VNET_HDR_LEN, &Slice::from(&mut eth[..]))?;
        if got < eth.len() {
            return Err(DropReason::Filtered);
        }
        let mut dst = MacAddr::default();
        let mut src = MacAddr::default();
        dst.copy_from_slice(&eth[..ETH_ADDR_LEN]);
        src.copy_from_slice(&eth[ETH_ADDR_LEN..]);
        let decision = {
            let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
            let learn = table.needs_learning(&src, port);
            let decision = table.decide(port, &dst);
            drop(table);
            if learn {
                let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
                table.learn(&src, port);
            }
            decision
        };
        let single;
        let destinations = match decision {
            Forward::Port(to) => {
                single = [to];
                &single[..]
            }
            Forward::Flood => &self.flood_order[..],
            Forward::Drop => return Err(DropReason::Filtered),
        };
        let unicast = matches!(decision, Forward::Port(_));
        // The frame counts as sent once offered; each destination counts its own drops.
        for &to in destinations.iter().filter(|&&p| p != port) {
            match self.deliver(to, frame, dirty) {
                Ok(()) => {}
                Err(DropReason::NoRxBuffers) if unicast && may_wait && self.hold_for(to) => {
                    return Ok(Forwarded::HeldBack);
                }
                Err(reason) => {
                    if unicast && reason == DropReason::NoRxBuffers {
                        if let Some(p) = self.ports.get(to) {
                            p.stalled.store(true, Ordering::Relaxed);
                        }
                    }
                    if let Some(stats) = self.stats(to) {
                        stats.count_drop(reason);
                    }
                }
            }
        }
        Ok(Forwarded::Done(frame.len))
    }

    fn deliver(&self, to: usize, frame: &ChainFrame, dirty: &mut u64) -> Result<(), DropReason> {
        let port = self.ports.get(to).ok_or(DropReason::NoRxBuffers)?;
        let mut slot = port.target.lock().unwrap_or_else(PoisonError::into_inner);
        let target = slot.as_mut().ok_or(DropReason::NoRxBuffers)?;
        let mem = target.mem.memory();
        let mut ring = DeviceRing::lock(&target.ring);
        if !ring.is_running() {
            return Err(DropReason::NoRxBuffers);
        }
        ring.follow_guest_used(&mem);
        let start = ring.queue().next_used();
        let outcome = write_rx_frame(&mut ring, &mem, frame, target.mrg_rxbuf, &mut target.used);
        if target.used.publish(&mut ring, &mem).is_err() {
            return Err(DropReason::BadAddress);
        }
        if ring.queue().next_used() != start {
            target.batch_start.get_or_insert(start);
            *dirty |= 1u64 << to;
        }
        match outcome {
            RxOutcome::Delivered(_) => {
                if let Some(stats) = port.stats.queues.first() {
                    stats.count_rx(frame.len - VNET_HDR_LEN);
                }
                Ok(())
            }
            RxOutcome::NoBuffers => Err(DropReason::NoRxBuffers),
            RxOutcome::Dropped(reason) => Err(reason),
        }
    }

    /// Interrupt the ports that received frames in this batch, if their drivers want it.
    fn signal_dirty(&self, dirty: u64) {
        for (index, port) in self.ports.iter().enumerate() {
            if dirty & (1u64 << index) == 0 {
                continue;
            }
            let mut slot = port.target.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(target) = slot.as_mut() else {
                continue;
            };
            let Some(start) = target.batch_start.take() else {
                continue;
            };
            let mem = target.mem.memory();
            let ring = DeviceRing::lock(&target.ring);
            let wanted = needs_interrupt(ring.queue(), &mem, start).unwrap_or(true);
            if wanted {
                match ring.signal() {
                    Err(e) => log::warn!("failed to interrupt switch port {index}: {e}"),
                    Ok(true) => {
                        if let Some(stats) = port.stats.queues.first() {
                            QueueStats::bump(&stats.rx_interrupts);
                        }
                    }
                    // No call fd (yet): nobody to interrupt.
                    Ok(false) => {}
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "switch_tests.rs"]
mod tests;
