//! vhost-user glue: features, config, memory updates, and `handle_event` dispatching named
//! events (queue kicks, TAP readable) to the frame path in `rxtx` / `switch`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::{has_mrg_rxbuf, tap_offload_flags, DeviceModel};
use crate::ring::{check_avail, sync_next_used, Mem};
use crate::rxtx::{process_rx, process_tx, Batch, RxState, RxStop, RxTxError, TxScratch};
use crate::stats::{PortStats, QueueStats};
use crate::switch::{RxTarget, Switch, SwitchScratch};
use crate::tap::TapQueue;

/// Largest queue size offered.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Per worker thread, the vrings are `[rx, tx]` of one pair: these are their event ids.
pub const RX_QUEUE_EVENT: u16 = 0;
pub const TX_QUEUE_EVENT: u16 = 1;

pub type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

/// Event id of the TAP fd in each pair's worker: ids up to `num_queues` are reserved by
/// vhost-user-backend (queues, then its exit event).
pub fn tap_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

/// One TAP queue pair, kept across frontend connections.
pub struct TapPair {
    pub tap: TapQueue,
    state: Mutex<PairState>,
}

#[derive(Default)]
struct PairState {
    rx: RxState,
    tx: TxScratch,
}

impl TapPair {
    pub fn new(tap: TapQueue) -> Self {
        TapPair {
            tap,
            state: Mutex::new(PairState::default()),
        }
    }
}

/// Where frames go.
pub enum Engine {
    Tap(Arc<Vec<TapPair>>),
    Switch { switch: Arc<Switch>, port: usize },
}

/// The backend of one frontend connection (a fresh one per connection).
pub struct NetBackend {
    model: DeviceModel,
    engine: Engine,
    stats: Arc<PortStats>,
    /// The same object the daemon's handler updates on SET_MEM_TABLE.
    mem: GuestMemoryAtomic<Mem>,
    acked: AtomicU64,
    attached: AtomicBool,
    switch_scratch: Mutex<SwitchScratch>,
    /// The exit-event consumers handed to vhost-user-backend, which keeps each as a raw fd
    /// registered in a worker's epoll and never closes it (0.24, `VringEpollHandler::new`):
    /// closed in `Drop`, when the daemon and its workers that used them are gone.
    exit_consumers: Mutex<Vec<RawFd>>,
    /// Per vring: a broken avail index (see `check_avail`) was logged on this connection.
    broken_logged: Vec<AtomicBool>,
}

impl NetBackend {
    pub fn new(
        model: DeviceModel,
        engine: Engine,
        stats: Arc<PortStats>,
        mem: GuestMemoryAtomic<Mem>,
    ) -> Self {
        NetBackend {
            engine,
            stats,
            mem,
            acked: AtomicU64::new(0),
            attached: AtomicBool::new(false),
            switch_scratch: Mutex::new(SwitchScratch::default()),
            exit_consumers: Mutex::new(Vec::new()),
            broken_logged: (0..usize::from(model.pairs) * 2)
                .map(|_| AtomicBool::new(false))
                .collect(),
            model,
        }
    }

    fn mrg_rxbuf(&self) -> bool {
        has_mrg_rxbuf(self.acked.load(Ordering::Acquire))
    }

    fn queue_stats(&self, pair: usize) -> Option<&QueueStats> {
        self.stats.queues.get(pair)
    }

    fn handle_tap(&self, pairs: &[TapPair], event: u16, vrings: &[Vring], pair: usize) {
        let (Some(tap_pair), Some(stats), [rx, tx]) =
            (pairs.get(pair), self.queue_stats(pair), vrings)
        else {
            log::warn!("event {event} for unknown queue pair {pair}");
            return;
        };
        let result = match event {
            RX_QUEUE_EVENT => {
                QueueStats::bump(&stats.rx_kicks);
                self.run_rx(2 * pair, tap_pair, rx, stats)
            }
            TX_QUEUE_EVENT => {
                QueueStats::bump(&stats.tx_kicks);
                self.run_tx(2 * pair + 1, tx, stats, |queue, mem| {
                    let mut st = tap_pair
                        .state
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    process_tx(queue, mem, &tap_pair.tap, &mut st.tx, stats)
                })
            }
            e if e == tap_event(self.num_queues()) => self.run_rx(2 * pair, tap_pair, rx, stats),
            other => {
                log::warn!("unexpected event id {other}");
                Ok(())
            }
        };
        if let Err(e) = result {
            log::warn!("queue pair {pair}: {}", with_causes(&e));
        }
    }

    /// Drain a TX queue with notifications off, re-enabling them only when it is empty.
    fn run_tx(
        &self,
        index: usize,
        vring: &Vring,
        stats: &QueueStats,
        mut process: impl FnMut(&mut virtio_queue::Queue, &Mem) -> Result<Batch, RxTxError>,
    ) -> Result<(), RxTxError> {
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        sync_next_used(state.get_queue_mut(), &mem)?;
        loop {
            if !self.ring_usable(index, state.get_queue(), &mem) {
                return Ok(());
            }
            let _ = state.disable_notification();
            let batch = process(state.get_queue_mut(), &mem)?;
            if batch.interrupt {
                signal(&state, &stats.tx_interrupts);
            }
            if !state.enable_notification().unwrap_or(false) {
                return Ok(());
            }
        }
    }

    fn run_rx(
        &self,
        index: usize,
        pair: &TapPair,
        vring: &Vring,
        stats: &QueueStats,
    ) -> Result<(), RxTxError> {
        let mem = self.mem.memory();
        let mrg = self.mrg_rxbuf();
        let mut st = pair.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        sync_next_used(state.get_queue_mut(), &mem)?;
        loop {
            if !self.ring_usable(index, state.get_queue(), &mem) {
                return Ok(());
            }
            let (batch, stop) = process_rx(
                state.get_queue_mut(),
                &mem,
                &pair.tap,
                &mut st.rx,
                mrg,
                stats,
            )?;
            if batch.interrupt {
                signal(&state, &stats.rx_interrupts);
            }
            // Out of buffers: ask for a kick when the guest adds some (and retry if it just did).
            if stop == RxStop::TapEmpty || !state.enable_notification().unwrap_or(false) {
                return Ok(());
            }
        }
    }

    /// Whether vring `index` can be served: not when the driver's avail index ran more than
    /// the ring ahead, which would make popping fail while the notification re-check reports
    /// work forever (a busy loop holding the vring lock GET_VRING_BASE needs). Such a ring is
    /// not served, logged once per connection; it is looked at again on the next event (a
    /// frontend taking the ring over may still be writing its indices).
    fn ring_usable(&self, index: usize, queue: &virtio_queue::Queue, mem: &Mem) -> bool {
        let Err(e) = check_avail(queue, mem) else {
            return true;
        };
        let logged = self.broken_logged.get(index);
        if !logged.is_some_and(|l| l.swap(true, Ordering::AcqRel)) {
            log::warn!("vring {index}: {e}");
        }
        false
    }

    fn handle_switch(&self, switch: &Switch, port: usize, event: u16, vrings: &[Vring]) {
        let (Some(stats), [rx, tx]) = (self.queue_stats(0), vrings) else {
            return;
        };
        if !self.attached.swap(true, Ordering::AcqRel) {
            switch.attach(
                port,
                RxTarget::new(rx.clone(), self.mem.clone(), self.mrg_rxbuf()),
            );
        }
        match event {
            // New RX buffers: nothing is queued in switch mode, frames are dropped instead.
            RX_QUEUE_EVENT => QueueStats::bump(&stats.rx_kicks),
            TX_QUEUE_EVENT => {
                QueueStats::bump(&stats.tx_kicks);
                let mut scratch = self
                    .switch_scratch
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let result = self.run_tx(TX_QUEUE_EVENT.into(), tx, stats, |queue, mem| {
                    switch.process_tx(port, queue, mem, &mut scratch)
                });
                if let Err(e) = result {
                    log::warn!("switch port {port}: {}", with_causes(&e));
                }
            }
            other => log::warn!("unexpected event id {other}"),
        }
    }
}

/// `e` and its causes in one line, for the log.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    msg
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        let fds = self
            .exit_consumers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for fd in fds.drain(..) {
            // SAFETY: `fd` is an exit-event consumer this backend created in `exit_event`;
            // vhost-user-backend (pinned to 0.24.0 in the workspace) turned it into a raw fd
            // that nothing closes. The last reference to this backend is going away, so the
            // daemon that registered the fd and its worker epolls are gone: nobody uses it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

fn signal(state: &vhost_user_backend::VringState<GuestMemoryAtomic<Mem>>, counter: &AtomicU64) {
    match state.signal_used_queue() {
        Ok(()) => QueueStats::bump(counter),
        Err(e) => log::warn!("failed to signal the guest: {e}"),
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.model.pairs) * 2
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.model.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
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

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.model.read_config(offset, size)
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        // `self.mem` is a clone of the handler's GuestMemoryAtomic: it already sees the update.
        Ok(())
    }

    /// One worker thread per queue pair: thread `p` owns vrings `2p` (RX) and `2p + 1` (TX).
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.model.pairs).map(|p| 0b11u64 << (2 * p)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                self.exit_consumers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(pair.0.as_raw_fd());
                Some(pair)
            }
            Err(e) => {
                log::error!("failed to create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        match &self.engine {
            Engine::Tap(pairs) => self.handle_tap(pairs, device_event, vrings, thread_id),
            Engine::Switch { switch, port } => {
                self.handle_switch(switch, *port, device_event, vrings)
            }
        }
        Ok(())
    }
}
