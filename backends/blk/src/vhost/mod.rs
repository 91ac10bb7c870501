//! A vhost-user backend server for split virtqueues with inflight I/O tracking
//! (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), independent of the device it serves.
//!
//! vhost's `BackendReqHandler` parses the frontend's messages and calls `FrontendHandler`
//! (handler.rs), which keeps the connection state: features, guest memory (memory.rs), the
//! vrings and the inflight region (inflight.rs). Each started queue is served by its own
//! thread (worker.rs) that reads chains (chain.rs) and hands them to the `VhostUserDevice`.
//!
//! rust-vmm's vhost-user-backend crate answers GET/SET_INFLIGHT_FD with "not supported",
//! which is why this module exists.

mod chain;
mod handler;
mod inflight;
mod memory;
mod worker;

use std::sync::{Arc, Mutex};

use log::info;
use vhost::vhost_user::{BackendListener, Listener};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryMmap;

pub use chain::{ChainError, DescriptorTable};
pub use handler::FrontendHandler;
pub use inflight::{queue_area_len, region_len, REGION_VERSION};
pub use memory::MAX_MEM_SLOTS;

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
    let handler = Arc::new(Mutex::new(FrontendHandler::new(device)));
    let mut backend_listener = BackendListener::new(listener, handler.clone())?;
    let mut connection = loop {
        if let Some(connection) = backend_listener.accept()? {
            break connection;
        }
    };
    info!("frontend connected");
    let error = loop {
        match connection.handle_request() {
            Ok(()) => {}
            // Logged by the handler; the frontend got its failed REPLY_ACK.
            Err(e) if handler::is_refusal(&e) => {}
            Err(e) => break e,
        }
    };
    let mut handler = handler.lock().unwrap_or_else(|e| e.into_inner());
    handler.stop_all_queues();
    let error = match error {
        vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage => None,
        other => Some(other),
    };
    Ok(ConnectionEnd {
        acked_features: handler.acked_features(),
        error,
    })
}
