//! splitvisor-vhost-server: the vhost-user backend server for split virtqueues with inflight I/O tracking
//! (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), independent of the device it serves.
//!
//! vhost's `BackendReqHandler` parses the frontend's messages and calls `FrontendHandler`
//! (handler.rs), which keeps the connection state: features, guest memory (memory.rs), the
//! vrings and the inflight region (inflight.rs). Each started queue is served by its own
//! thread (worker.rs) that reads chains (chain.rs) and hands them to the `VhostUserDevice`,
//! or, for a queue the device drives itself (a TAP's RX queue), runs the device's own loop
//! over a `DeviceRing` (driven.rs).
//!
//! rust-vmm's vhost-user-backend crate answers GET/SET_INFLIGHT_FD with "not supported",
//! which is why this module exists.
//!
//! # Message order the server accepts
//!
//! - GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
//!   GET_CONFIG: any time (GET_INFLIGHT_FD needs INFLIGHT_SHMFD acknowledged first).
//! - SET_INFLIGHT_FD: any time no ring is running (refused otherwise); the region in place
//!   when a ring starts is the one that ring uses. GET_INFLIGHT_FD may come before or after.
//! - SET_VRING_ENABLE may also come before SET_FEATURES (QEMU <= 7.2's vhost-user-net order):
//!   the relay answers it and replays it after the SET_FEATURES that acks PROTOCOL_FEATURES.
//! - SET_FEATURES before the rings start (EVENT_IDX, INDIRECT_DESC, and whether rings start
//!   enabled: without VHOST_USER_F_PROTOCOL_FEATURES they are enabled at once).
//! - SET_MEM_TABLE (or ADD_MEM_REG) before SET_VRING_ADDR, which is translated on arrival.
//! - Per ring, while it is stopped: SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE; the ring
//!   starts as soon as it has addresses, a kick fd and is enabled (SET_VRING_KICK and
//!   SET_VRING_ENABLE in either order). SET_VRING_CALL may come any time, also while running.
//! - GET_VRING_BASE stops the ring after the request in progress and answers the next avail
//!   index; a new SET_VRING_KICK starts it again. SET_VRING_ENABLE(0) stops it too.
//!
//! At start, a region with history decides where the avail ring resumes (the guest's used
//! index plus the heads still in flight, which are resubmitted first); SET_VRING_BASE is used
//! only with a fresh region or none.

mod chain;
pub mod dirty_log;
mod doorman;
mod driven;
mod fdcheck;
mod handler;
mod inflight;
mod relay;
// Per-queue rate limiting of guest-caused log lines, as the daemons' devices do.
use splitvisor_wire::host::loglimit;
use std::time::Duration;
pub mod framing;
mod memory;
mod worker;

use std::sync::{Arc, Mutex};

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use log::{info, warn};
use vhost::vhost_user::{BackendReqHandler, Listener};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryMmap;

pub use chain::{ChainError, DescriptorTable};
pub use driven::{DeviceRing, DrivenQueue, RingError, SharedRing, Wake};
pub use handler::FrontendHandler;
pub use inflight::{queue_area_len, region_len, REGION_VERSION};
pub use memory::MAX_MEM_SLOTS;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub use {
    handler::is_refusal as fuzz_is_refusal, worker::fuzz::queue_worker as fuzz_queue_worker,
    worker::fuzz::Input as FuzzInput,
};

/// The device behind the vhost-user protocol: what it offers and how it serves a request.
pub trait VhostUserDevice: Send + Sync + 'static {
    /// Number of queues (GET_QUEUE_NUM).
    fn num_queues(&self) -> usize;
    /// Largest ring the device accepts (a power of two, at most 32768).
    fn max_queue_size(&self) -> u16;
    /// Virtio feature bits offered; VHOST_USER_F_PROTOCOL_FEATURES is added by the server.
    fn features(&self) -> u64;
    /// The frontend's SET_FEATURES.
    fn features_acked(&self, _features: u64) {}
    /// The device's config space, offered with VHOST_USER_PROTOCOL_F_CONFIG when `Some`.
    fn config_space(&self) -> Option<&[u8]>;
    /// Serve the request at `head` of queue `queue`, whose descriptors are `chain`; returns
    /// the number of bytes written into device-writable buffers (the used length).
    fn process(
        &self,
        queue: usize,
        head: u16,
        chain: &[Descriptor],
        memory: &GuestMemoryMmap,
    ) -> u32;
    /// Whether the device serves `queue` itself (`serve_queue`) instead of the server's
    /// kick -> pop -> `process` -> used ring -> call loop: for a queue fed by the device's
    /// own events (a TAP's frames, another switch port's). Such a queue must complete chains
    /// in the order it pops them: it resumes at the guest's used index (driven.rs).
    fn drives_queue(&self, _queue: usize) -> bool {
        false
    }
    /// Serve a queue `drives_queue` claimed, on the queue's own thread, until
    /// `DrivenQueue::wait` answers `Wake::Stop`; pop with `DeviceRing::pop`, complete with
    /// `DeviceRing::publish` and `DeviceRing::signal`, which keep the inflight region right.
    fn serve_queue(&self, _queue: DrivenQueue) {}
    /// How long a queue's worker keeps polling the avail ring after a batch, notifications
    /// still suppressed (EVENT_IDX), before it re-enables them and sleeps on the kick
    /// eventfd; zero never polls. Polling spends CPU to save the driver's kicks and the
    /// worker's wake-ups; an idle queue sleeps once the window has passed.
    fn poll_window(&self) -> Duration {
        Duration::ZERO
    }
    /// A frontend connected, before its first message.
    fn frontend_connected(&self) {}
    /// The driver kicked `queue`.
    fn queue_kicked(&self, _queue: usize) {}
    /// The backend signalled `queue`'s call eventfd.
    fn queue_signalled(&self, _queue: usize) {}
}

/// How a frontend connection ended.
pub struct ConnectionEnd {
    /// Virtio features the frontend acknowledged (0 if it never sent SET_FEATURES).
    pub acked_features: u64,
    /// `None` for an ordinary disconnect between messages.
    pub error: Option<vhost::vhost_user::Error>,
}

/// Accept one frontend on `listener` and serve it until it disconnects or sends something
/// the server cannot answer (a message vhost cannot parse, or a failed request whose reply
/// has no way to say so); every queue worker is stopped before this returns. Refused
/// requests that were answered do not end the connection.
pub fn serve_frontend<D: VhostUserDevice>(
    listener: &mut Listener,
    device: Arc<D>,
) -> vhost::vhost_user::Result<ConnectionEnd> {
    let handler = Arc::new(Mutex::new(FrontendHandler::new(device.clone())));
    let frontend = loop {
        if let Some(stream) = listener.accept()? {
            break stream;
        }
    };
    // Closes any other frontend's connection at once while this one is served ("busy").
    // SAFETY: the listener's fd stays open for this call, which only duplicates it.
    let listener_fd = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    let doorman = match doorman::Doorman::start(listener_fd, &frontend) {
        Ok(d) => Some(d),
        Err(e) => {
            warn!("second frontends will wait in the backlog instead of hearing busy: {e}");
            None
        }
    };
    // vhost's parser reads each message with single recv calls and no deadline: the relay in
    // front of it gives it whole messages (framing.rs), cuts off a frontend that stalls and holds
    // back a SET_VRING_ENABLE sent before SET_FEATURES (relay.rs).
    let (relay_end, server_end) =
        UnixStream::pair().map_err(vhost::vhost_user::Error::SocketError)?;
    let relay = std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || relay::relay(frontend, relay_end, "vhost-user server side"))
        .map_err(vhost::vhost_user::Error::SocketError)?;
    let mut connection = BackendReqHandler::from_stream(server_end, handler.clone());
    info!("frontend connected");
    device.frontend_connected();
    let error = loop {
        match connection.handle_request() {
            Ok(()) => {}
            // Logged by the handler; the frontend got its failed REPLY_ACK.
            Err(e) if handler::is_refusal(&e) => {}
            Err(e) => break e,
        }
    };
    // Closing our end ends the relay if the frontend is still there.
    drop(connection);
    match relay.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(
            "frontend connection cut off: {}",
            splitvisor_wire::host::error::error_chain(&e)
        ),
        Err(_) => warn!("the relay thread panicked"),
    }
    let mut handler = handler.lock().unwrap_or_else(|e| e.into_inner());
    handler.stop_all_queues();
    if let Some(doorman) = doorman {
        doorman.stop();
    }
    let error = match error {
        vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage => None,
        other => Some(other),
    };
    Ok(ConnectionEnd {
        acked_features: handler.acked_features(),
        error,
    })
}
