//! The control API server: HTTP/1.1 + JSON on a Unix socket (the convention of Firecracker and
//! Cloud Hypervisor), described in docs/api.yaml. One thread accepts; each connection gets a
//! thread of its own (a swap may wait seconds for a backend), up to a small limit. A request
//! must arrive whole within a deadline, and clients still sending theirs cannot starve the
//! others: when every slot is taken, the one that has been sending its request the longest
//! is dropped for the newcomer (see `Slots`).

pub mod backend_stats;
pub mod control;
pub mod routes;
pub mod stats;
pub mod types;
pub mod upgrade_answer;

#[cfg(test)]
mod doc_tests;
#[cfg(test)]
pub mod schema_check;

use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};
use splitvisor_wire::host::slots::{Slot, Slots};
use splitvisor_wire::host::socket::{self, SocketError, SocketGuard};

/// The HTTP codec of the API (and of `ctl`, and of the daemons' stats sockets).
pub use splitvisor_wire::host::http;

use crate::api::control::VmControl;
use routes::Response;

/// A client that reads nothing of its answer for this long is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A request (head and body) must arrive within this time from the connection.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Connections served at once; more get 503 if every one is being handled.
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Bind(#[from] SocketError),
    #[error("could not start the API thread")]
    Spawn(#[source] std::io::Error),
    #[error("could not take over the API socket from the process this one replaced")]
    Adopt(#[source] std::io::Error),
}

/// A bound API socket, not yet serving.
pub struct ApiListener {
    guard: SocketGuard,
    listener: UnixListener,
}

impl ApiListener {
    /// Binds `path` with mode 0600. A stale socket left by a dead VMM is replaced; a live one
    /// or a non-socket file is an error.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let listener = socket::bind_replacing(path, "--api-socket")?;
        Ok(Self {
            guard: socket::guard(path),
            listener,
        })
    }

    /// Serves on `listener`, bound to `path` by the process this one replaced (a live
    /// upgrade); a duplicate is kept, the socket removed when the server is dropped.
    pub fn adopt(listener: &UnixListener, path: &Path) -> Result<Self, ApiError> {
        let listener = listener.try_clone().map_err(ApiError::Adopt)?;
        Ok(Self {
            guard: socket::adopt(path),
            listener,
        })
    }

    /// The listening socket's descriptor (handed over by a live upgrade).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.listener)
    }

    /// Serves requests on a thread of its own until the returned server is dropped.
    pub fn serve(self, control: Arc<VmControl>) -> Result<ApiServer, ApiError> {
        let stopping = Arc::new(AtomicBool::new(false));
        let listener = self.listener;
        let flag = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(listener, control, flag))
            .map_err(ApiError::Spawn)?;
        Ok(ApiServer {
            guard: self.guard,
            stopping,
            thread: Some(thread),
        })
    }
}

/// The running API; dropping it stops accepting and removes the socket.
pub struct ApiServer {
    /// Removes the socket when the server is dropped.
    guard: SocketGuard,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept() with a connection of our own.
        let _ = UnixStream::connect(self.guard.path());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.guard.cleanup();
    }
}

fn accept_loop(listener: UnixListener, control: Arc<VmControl>, stopping: Arc<AtomicBool>) {
    crate::seccomp::confine(crate::seccomp::ThreadKind::Api);
    let slots = Arc::new(Slots::new(MAX_CONNECTIONS));
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("api: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
        let Some(slot) = slots.take(&stream) else {
            respond(
                &stream,
                Response::error(503, "too many API requests in progress; retry"),
            );
            continue;
        };
        let control = control.clone();
        let spawned = std::thread::Builder::new()
            .name("api-client".into())
            .spawn(move || serve_one(&stream, &control, slot));
        if let Err(e) = spawned {
            warn!("api: could not start a connection thread: {e}");
        }
    }
}

fn serve_one(stream: &UnixStream, control: &VmControl, slot: Slot) {
    let mut response = answer(stream, control, slot);
    if let Some(upgrade) = response.as_mut().and_then(|r| r.then_upgrade.take()) {
        // Returns only if the upgrade failed: the new process answers on this connection.
        let binary = upgrade.binary.as_deref().map(Path::new);
        let error = control.upgrade(binary, std::os::fd::AsRawFd::as_raw_fd(stream));
        response = Some(routes::upgrade_failed(&error));
    }
    let then_end = response.as_mut().and_then(|r| r.then_end.take());
    if let Some(response) = response {
        respond(stream, response);
    }
    if let Some(why) = then_end {
        control.end_after_request(why);
    }
}

/// The response to the request on `stream`, if it sent one.
fn answer(stream: &UnixStream, control: &VmControl, slot: Slot) -> Option<Response> {
    let reader = DeadlineReader {
        stream,
        deadline: Instant::now() + REQUEST_DEADLINE,
    };
    match http::read_request(reader) {
        Ok(Some(request)) => {
            slot.handling();
            debug!("api: {} {}", request.method, request.path);
            Some(routes::handle(control, &request))
        }
        Ok(None) => None,
        Err(e) => Some(Response::error(e.status, e.message)),
    }
}

/// Reads from a client until a deadline for the whole request, not per read: a client that
/// trickles a byte at a time still runs out of time.
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl std::io::Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream: &UnixStream = self.stream;
        stream.read(buf)
    }
}

fn respond(stream: &UnixStream, response: Response) {
    let headers: Vec<(&str, String)> = response.headers.into_iter().collect();
    if let Err(e) = http::write_response(stream, response.status, &headers, &response.body) {
        debug!("api: writing a response failed: {e}");
    }
}
