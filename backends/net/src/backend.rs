//! The virtio-net device on the vhost-user server: features, config space, and the loop of
//! each queue, which the device drives itself (`VhostUserDevice::serve_queue`): an RX queue
//! is filled when the TAP (or another switch port) has a frame, not on a kick. The frames
//! themselves are `rxtx` / `switch`.

use splitvisor_wire::host::error::error_chain;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use splitvisor_vhost_server::{DeviceRing, DrivenQueue, VhostUserDevice, Wake};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use crate::device::{has_mrg_rxbuf, tap_offload_flags, DeviceModel, MAX_CONFIG_READ};
use crate::live::Live;
use crate::ring::{check_avail, Mem};
use crate::rxtx::{process_rx, process_tx, Batch, RxState, RxStop, RxTxError, TxScratch};
use crate::stats::{PortStats, QueueStats};
use crate::switch::{RxTarget, Switch, SwitchScratch, BACKPRESSURE_WAIT, MAX_PORTS};
use crate::tap::TapQueue;

/// Largest queue size offered.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Token of the TAP fd in an RX queue's wait.
const TAP_TOKEN: u64 = 0;
/// Tokens of the other switch ports' RX-room eventfds in a switch TX queue's wait (+ port).
const ROOM_TOKEN: u64 = 1;

/// One TAP queue pair, kept across frontend connections.
pub struct TapPair {
    pub tap: TapQueue,
    rx: Mutex<RxState>,
    tx: Mutex<TxScratch>,
}

impl TapPair {
    pub fn new(tap: TapQueue) -> Self {
        TapPair {
            tap,
            rx: Mutex::new(RxState::default()),
            tx: Mutex::new(TxScratch::default()),
        }
    }
}

/// Where frames go.
pub enum Engine {
    Tap(Arc<Vec<TapPair>>),
    Switch { switch: Arc<Switch>, port: usize },
}

/// The device of one frontend connection (a fresh one per connection).
pub struct NetBackend {
    model: DeviceModel,
    /// `struct virtio_net_config`, zero past the fields we define up to the largest read.
    config: Vec<u8>,
    engine: Engine,
    stats: Arc<PortStats>,
    acked: AtomicU64,
    switch_scratch: Mutex<SwitchScratch>,
    /// Per vring: a broken avail index (see `check_avail`) was logged on this connection.
    broken_logged: Vec<AtomicBool>,
    /// Connection state for the stats API, and this port's index in it.
    live: Arc<Live>,
    port: usize,
}

impl NetBackend {
    pub fn new(
        model: DeviceModel,
        engine: Engine,
        stats: Arc<PortStats>,
        live: Arc<Live>,
        port: usize,
    ) -> Self {
        NetBackend {
            config: model.read_config(0, MAX_CONFIG_READ),
            engine,
            stats,
            acked: AtomicU64::new(0),
            switch_scratch: Mutex::new(SwitchScratch::default()),
            broken_logged: (0..usize::from(model.pairs) * 2)
                .map(|_| AtomicBool::new(false))
                .collect(),
            model,
            live,
            port,
        }
    }

    fn mrg_rxbuf(&self) -> bool {
        has_mrg_rxbuf(self.acked.load(Ordering::Acquire))
    }

    /// Whether vring `index` can be served: not when the driver's avail index ran more than
    /// the ring ahead, which would make popping fail while the notification re-check reports
    /// work forever. Such a ring is not served, logged once per connection; it is looked at
    /// again on the next event.
    fn ring_usable(&self, index: usize, queue: &Queue, mem: &Mem) -> bool {
        let Err(e) = check_avail(queue, mem) else {
            return true;
        };
        let logged = self.broken_logged.get(index);
        if !logged.is_some_and(|l| l.swap(true, Ordering::AcqRel)) {
            log::warn!("vring {index}: {e}");
        }
        false
    }

    /// Drain a TX queue with notifications off, re-enabling them only when it is empty.
    /// Returns true when the switch held a chain back (notifications stay off: the queue
    /// waits for room at the destination, not for a kick).
    fn run_tx(
        &self,
        q: &DrivenQueue,
        stats: &QueueStats,
        mut process: impl FnMut(&mut DeviceRing, &Mem) -> Result<Batch, RxTxError>,
    ) -> Result<bool, RxTxError> {
        let mem = q.memory.memory();
        let mut ring = DeviceRing::lock(&q.ring);
        ring.follow_guest_used(&mem);
        let index = ring.index();
        loop {
            if !self.ring_usable(index, ring.queue(), &mem) {
                return Ok(false);
            }
            let _ = ring.queue_mut().disable_notification(&*mem);
            let batch = process(&mut ring, &mem)?;
            if batch.interrupt {
                signal(&ring, &stats.tx_interrupts);
            }
            if batch.held {
                return Ok(true);
            }
            if !ring.queue_mut().enable_notification(&*mem).unwrap_or(false) {
                return Ok(false);
            }
        }
    }

    /// Move frames from the TAP into the RX queue until the TAP is empty or buffers run out.
    fn run_rx(&self, q: &DrivenQueue, pair: &TapPair, stats: &QueueStats) -> Result<(), RxTxError> {
        let mem = q.memory.memory();
        let mrg = self.mrg_rxbuf();
        let mut rx = pair.rx.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ring = DeviceRing::lock(&q.ring);
        ring.follow_guest_used(&mem);
        let index = ring.index();
        loop {
            if !self.ring_usable(index, ring.queue(), &mem) {
                return Ok(());
            }
            let (batch, stop) = process_rx(&mut ring, &mem, &pair.tap, &mut rx, mrg, stats)?;
            if batch.interrupt {
                signal(&ring, &stats.rx_interrupts);
            }
            // Out of buffers: ask for a kick when the guest adds some (and retry if it just did).
            if stop == RxStop::TapEmpty
                || !ring.queue_mut().enable_notification(&*mem).unwrap_or(false)
            {
                return Ok(());
            }
        }
    }

    fn serve_tap_rx(&self, q: &DrivenQueue, pair: &TapPair, stats: &QueueStats) {
        if let Err(e) = q.add_source(pair.tap.fd(), TAP_TOKEN) {
            log::warn!("cannot watch the TAP, RX is served on kicks only: {e}");
        }
        serve_events(q, |wake| {
            if wake == Wake::Kick {
                QueueStats::bump(&stats.rx_kicks);
            }
            self.run_rx(q, pair, stats)
        });
    }

    fn serve_tap_tx(&self, q: &DrivenQueue, pair: &TapPair, stats: &QueueStats) {
        serve_events(q, |wake| {
            if wake == Wake::Kick {
                QueueStats::bump(&stats.tx_kicks);
            }
            self.run_tx(q, stats, |ring, mem| {
                let mut tx = pair.tx.lock().unwrap_or_else(PoisonError::into_inner);
                process_tx(ring, mem, &pair.tap, &mut tx, stats)
            })
            .map(|_| ())
        });
    }

    /// Switch RX: the other ports deliver into the ring while it runs; nothing is queued, so a
    /// kick (new buffers) only counts.
    /// Switch RX: the other ports deliver into the ring while it runs; a kick means new
    /// buffers, which wakes senders held back for this port.
    fn serve_switch_rx(&self, q: &DrivenQueue, switch: &Switch, port: usize, stats: &QueueStats) {
        let target = RxTarget::new(q.ring.clone(), q.memory.clone(), self.mrg_rxbuf());
        switch.attach(port, target);
        serve_events(q, |wake| {
            if wake == Wake::Kick {
                QueueStats::bump(&stats.rx_kicks);
            }
            switch.rx_refilled(port);
            Ok(())
        });
        switch.detach(port);
        // Senders held back for this port stop waiting for it.
        switch.rx_refilled(port);
    }

    /// Switch TX: forward on kicks; while the switch holds a chain back for a destination
    /// without RX buffers, wait for room at any other port (bounded, see
    /// `switch::BACKPRESSURE_WAIT`) instead of for a kick.
    fn serve_switch_tx(&self, q: &DrivenQueue, switch: &Switch, port: usize, stats: &QueueStats) {
        for (other, fd) in (0..MAX_PORTS)
            .filter(|&p| p != port)
            .filter_map(|p| Some((p, switch.room_fd(p)?)))
        {
            if let Err(e) = q.add_source(fd, ROOM_TOKEN + other as u64) {
                log::warn!("switch port {port}: cannot watch port {other}'s RX room: {e}");
            }
        }
        let index = DeviceRing::lock(&q.ring).index();
        let mut wake = Wake::Source(TAP_TOKEN);
        loop {
            if wake == Wake::Kick {
                QueueStats::bump(&stats.tx_kicks);
            }
            let mut scratch = self
                .switch_scratch
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let held = self
                .run_tx(q, stats, |ring, mem| {
                    switch.process_tx(port, ring, mem, &mut scratch)
                })
                .unwrap_or_else(|e| {
                    log::warn!("queue {index}: {}", error_chain(&e));
                    false
                });
            drop(scratch);
            let next = match held {
                true => q.wait_for(BACKPRESSURE_WAIT),
                false => q.wait(),
            };
            wake = match next {
                Ok(Wake::Stop) => return,
                Ok(wake) => wake,
                Err(e) => {
                    log::warn!("queue {index}: cannot wait for events, the queue stops: {e}");
                    return;
                }
            };
        }
    }
}

/// Serve once at start (chains or frames may be waiting from before this queue started, with
/// no event coming for them), then on every event until the server stops the queue.
fn serve_events(q: &DrivenQueue, mut serve: impl FnMut(Wake) -> Result<(), RxTxError>) {
    let index = DeviceRing::lock(&q.ring).index();
    let mut wake = Wake::Source(TAP_TOKEN);
    loop {
        if let Err(e) = serve(wake) {
            log::warn!("queue {index}: {}", error_chain(&e));
        }
        wake = match q.wait() {
            Ok(Wake::Stop) => return,
            Ok(wake) => wake,
            Err(e) => {
                log::warn!("queue {index}: cannot wait for events, the queue stops: {e}");
                return;
            }
        };
    }
}

fn signal(ring: &DeviceRing, counter: &AtomicU64) {
    match ring.signal() {
        Ok(true) => QueueStats::bump(counter),
        Ok(false) => {}
        Err(e) => log::warn!("failed to signal the guest: {}", error_chain(&e)),
    }
}

impl VhostUserDevice for NetBackend {
    fn num_queues(&self) -> usize {
        usize::from(self.model.pairs) * 2
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.model.features()
    }

    fn features_acked(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
        if let Engine::Tap(pairs) = &self.engine {
            if self.model.offloads {
                for pair in pairs.iter() {
                    if let Err(e) = pair.tap.set_offload(tap_offload_flags(features)) {
                        log::warn!("{e}");
                    }
                }
            }
        }
    }

    fn config_space(&self) -> Option<&[u8]> {
        Some(&self.config)
    }

    /// Never called: every queue is driven (`serve_queue`).
    fn process(
        &self,
        _queue: usize,
        _head: u16,
        _chain: &[Descriptor],
        _: &GuestMemoryMmap,
    ) -> u32 {
        0
    }

    fn drives_queue(&self, _queue: usize) -> bool {
        true
    }

    /// Vrings `2p` (RX) and `2p + 1` (TX) are queue pair `p`.
    fn serve_queue(&self, q: DrivenQueue) {
        let index = DeviceRing::lock(&q.ring).index();
        let (pair, rx) = (index / 2, index.is_multiple_of(2));
        let Some(stats) = self.stats.queues.get(pair) else {
            log::warn!("queue {index} of an unknown queue pair {pair}");
            return;
        };
        match &self.engine {
            Engine::Tap(pairs) => {
                let Some(tap_pair) = pairs.get(pair) else {
                    log::warn!("queue {index}: no TAP queue for pair {pair}");
                    return;
                };
                match rx {
                    true => self.serve_tap_rx(&q, tap_pair, stats),
                    false => self.serve_tap_tx(&q, tap_pair, stats),
                }
            }
            Engine::Switch { switch, port } => match rx {
                true => self.serve_switch_rx(&q, switch, *port, stats),
                false => self.serve_switch_tx(&q, switch, *port, stats),
            },
        }
    }

    fn frontend_connected(&self) {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.live.set_connected(self.port, true);
    }
}
