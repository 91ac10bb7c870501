//! Relays one frontend's vhost-user control connection to the vhost crates, holding back a
//! `SET_VRING_ENABLE` that arrives before feature negotiation.
//!
//! Why this exists: QEMU's vhost-user-net frontend (7.2 and earlier) sends
//! `VHOST_USER_SET_VRING_ENABLE` when the NIC attaches to its netdev, right after `SET_OWNER`
//! and before any `SET_FEATURES`. Both the `vhost` crate's dispatcher (0.18) and
//! `vhost-user-backend` (0.24) check that `VHOST_USER_F_PROTOCOL_FEATURES` is already acked,
//! fail with "inactive feature", and end the connection. The spec tracks each ring's enabled
//! state independently of feature negotiation (rings start disabled; `SET_VRING_ENABLE` sets
//! the state), so the request is meaningful. We may not patch the crates, so this relay sits
//! between the frontend and a private connection to the crates: it answers such an early
//! request itself (an ack only when the frontend asked for one with `NEED_REPLY`) and replays
//! it to the crates right after the `SET_FEATURES` that acks `PROTOCOL_FEATURES`. Every other
//! message, in both directions, passes through byte for byte with its file descriptors.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::relay_check;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserVirtioFeatures, MAX_ATTACHED_FD_ENTRIES,
    MAX_MSG_SIZE,
};

/// `u32 request, u32 flags, u32 size`, little-endian.
const HEADER_LEN: usize = 12;
/// The only protocol version (the low two flag bits).
const VERSION_1: u32 = 0x1;
/// How long the rest of a message may take once its first byte arrived, and how long a peer
/// may refuse to take a message we write.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Rings with an early enable held at once (a frontend has at most a few dozen).
const MAX_HELD: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("failed to wait for vhost-user messages")]
    Poll(#[source] io::Error),
    #[error("failed to read a message from the {0}")]
    Read(&'static str, #[source] io::Error),
    #[error("failed to write a message to the {0}")]
    Write(&'static str, #[source] io::Error),
    #[error("malformed message from the {0}: {1}")]
    Malformed(&'static str, String),
    #[error("the {0} stopped in the middle of a message for {MESSAGE_TIMEOUT:?}")]
    Stalled(&'static str),
    #[error("the {0} closed the connection in the middle of a message")]
    Truncated(&'static str),
    #[error(
        "the {0} sent more file descriptors than a message may carry ({MAX_ATTACHED_FD_ENTRIES})"
    )]
    TooManyFds(&'static str),
    #[error("the frontend enabled more than {MAX_HELD} rings before SET_FEATURES")]
    TooManyHeld,
    #[error("refused a request that asked for no reply, closing the connection: {0}")]
    Refused(String),
}

const FRONTEND: &str = "frontend";
const BACKEND: &str = "vhost-user-backend side";

/// One vhost-user message: header fields, payload and the descriptors that came with it.
struct Message {
    request: u32,
    flags: u32,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn new(request: FrontendReq, flags: u32, payload: Vec<u8>) -> Message {
        Message {
            request: u32::from(request),
            flags,
            payload,
            fds: Vec::new(),
        }
    }

    fn is(&self, request: FrontendReq) -> bool {
        self.request == u32::from(request)
    }

    /// The payload as one `u64` (features, or a vring state `{u32 index, u32 num}`).
    fn payload_u64(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.payload.as_slice().try_into().ok()?))
    }

    fn header(&self) -> [u8; HEADER_LEN] {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&self.request.to_le_bytes());
        header[4..8].copy_from_slice(&self.flags.to_le_bytes());
        // The payload length was bounded by MAX_MSG_SIZE when it was read or built.
        header[8..].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        header
    }
}

/// What the relay remembers of the negotiation so far.
#[derive(Default)]
struct Gate {
    /// The last SET_FEATURES acked VHOST_USER_F_PROTOCOL_FEATURES.
    protocol_features: bool,
    /// SET_VRING_ENABLE payloads held back until then, one per ring (the latest state wins,
    /// as if each had been applied in turn), in order of first arrival.
    held: Vec<(u32, Vec<u8>)>,
    /// Whether the QEMU-order note was logged on this connection.
    noted: bool,
}

/// Relay messages between `frontend` and `backend` (our end of the crates' connection) until
/// either side closes; then shut both down so the other side sees the end too. Waiting for
/// the next message has no time limit (an idle connection is the normal state of a running
/// VM); a message once started must complete within `MESSAGE_TIMEOUT`.
pub fn run(frontend: UnixStream, backend: UnixStream) -> Result<(), RelayError> {
    let result = pump(&frontend, &backend);
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    result
}

fn pump(frontend: &UnixStream, backend: &UnixStream) -> Result<(), RelayError> {
    for (sock, side) in [(frontend, FRONTEND), (backend, BACKEND)] {
        sock.set_write_timeout(Some(MESSAGE_TIMEOUT))
            .map_err(|e| RelayError::Write(side, e))?;
    }
    let mut gate = Gate::default();
    loop {
        let (from_frontend, from_backend) = wait_readable(frontend, backend)?;
        if from_backend {
            match read_message(backend, BACKEND)? {
                Some(reply) => write_message(frontend, &reply, FRONTEND)?,
                None => return Ok(()),
            }
        }
        if from_frontend {
            match read_message(frontend, FRONTEND)? {
                Some(request) => forward_request(request, &mut gate, frontend, backend)?,
                None => return Ok(()),
            }
        }
    }
}

/// Pass one frontend request on, or hold it back if it is an early SET_VRING_ENABLE.
fn forward_request(
    request: Message,
    gate: &mut Gate,
    frontend: &UnixStream,
    backend: &UnixStream,
) -> Result<(), RelayError> {
    if let Some(why) = relay_check::refusal(request.request, &request.payload, &request.fds) {
        return refuse(&request, why, frontend);
    }
    if request.is(FrontendReq::SET_VRING_ENABLE) && !gate.protocol_features {
        return hold_enable(request, gate, frontend);
    }
    let features = match request.is(FrontendReq::SET_FEATURES) {
        true => request.payload_u64(),
        false => None,
    };
    write_message(backend, &request, BACKEND)?;
    let Some(features) = features else {
        return Ok(());
    };
    gate.protocol_features = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
    log::debug!(
        "SET_FEATURES {features:#x}; {} enable(s) held",
        gate.held.len()
    );
    let held = std::mem::take(&mut gate.held);
    if !gate.protocol_features {
        // Without PROTOCOL_FEATURES the crates enable every ring at SET_FEATURES themselves.
        return Ok(());
    }
    for (_, payload) in held {
        // No NEED_REPLY: the frontend already has its answer, so the crates send none.
        let replay = Message::new(FrontendReq::SET_VRING_ENABLE, VERSION_1, payload);
        write_message(backend, &replay, BACKEND)?;
    }
    Ok(())
}

/// Answer a refused request with a failed REPLY_ACK if the frontend asked for one (the
/// connection goes on; the crates never saw it), or end the connection.
fn refuse(request: &Message, why: String, frontend: &UnixStream) -> Result<(), RelayError> {
    if request.flags & VhostUserHeaderFlag::NEED_REPLY.bits() == 0 {
        return Err(RelayError::Refused(why));
    }
    log::warn!("refusing request: {why}");
    let flags = VERSION_1 | VhostUserHeaderFlag::REPLY.bits();
    let nack = Message {
        request: request.request,
        flags,
        payload: 1u64.to_le_bytes().into(),
        fds: Vec::new(),
    };
    write_message(frontend, &nack, FRONTEND)
}

fn hold_enable(request: Message, gate: &mut Gate, frontend: &UnixStream) -> Result<(), RelayError> {
    let Some(state) = request.payload_u64() else {
        return Err(RelayError::Malformed(
            FRONTEND,
            format!(
                "SET_VRING_ENABLE with {} payload bytes",
                request.payload.len()
            ),
        ));
    };
    let (ring, num) = (state as u32, state >> 32);
    let level = match std::mem::replace(&mut gate.noted, true) {
        false => log::Level::Info,
        true => log::Level::Debug,
    };
    log::log!(
        level,
        "SET_VRING_ENABLE(ring {ring}, {num}) before SET_FEATURES (QEMU <= 7.2 order): \
         answering it and replaying it after SET_FEATURES"
    );
    if request.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0 {
        let flags = VERSION_1 | VhostUserHeaderFlag::REPLY.bits();
        let ack = Message::new(
            FrontendReq::SET_VRING_ENABLE,
            flags,
            0u64.to_le_bytes().into(),
        );
        write_message(frontend, &ack, FRONTEND)?;
    }
    if let Some(entry) = gate.held.iter_mut().find(|(held, _)| *held == ring) {
        entry.1 = request.payload;
    } else if gate.held.len() < MAX_HELD {
        gate.held.push((ring, request.payload));
    } else {
        return Err(RelayError::TooManyHeld);
    }
    Ok(())
}

/// Block until either socket is readable or hung up: `(frontend, backend)`.
fn wait_readable(frontend: &UnixStream, backend: &UnixStream) -> Result<(bool, bool), RelayError> {
    let mut fds = [pollfd(frontend.as_fd()), pollfd(backend.as_fd())];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ret > 0 {
            return Ok((fds[0].revents != 0, fds[1].revents != 0));
        }
        let err = io::Error::last_os_error();
        if ret < 0 && err.kind() != io::ErrorKind::Interrupted {
            return Err(RelayError::Poll(err));
        }
    }
}

fn pollfd(fd: BorrowedFd<'_>) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Wait until `sock` is readable, at most until `deadline`.
fn wait_until(sock: &UnixStream, deadline: Instant, side: &'static str) -> Result<(), RelayError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RelayError::Stalled(side));
        }
        let mut fds = [pollfd(sock.as_fd())];
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        if ret > 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if ret < 0 && err.kind() != io::ErrorKind::Interrupted {
            return Err(RelayError::Poll(err));
        }
    }
}

/// Read one whole message; `None` if the peer closed the connection between messages.
fn read_message(sock: &UnixStream, side: &'static str) -> Result<Option<Message>, RelayError> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    let deadline = Instant::now() + MESSAGE_TIMEOUT;
    if !fill(sock, &mut header, &mut fds, deadline, side, true)? {
        return Ok(None);
    }
    let field =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (field(0), field(4), field(8));
    if flags & VhostUserHeaderFlag::VERSION.bits() != VERSION_1 {
        return Err(RelayError::Malformed(
            side,
            format!("header flags {flags:#x}: not version 1"),
        ));
    }
    if size as usize > MAX_MSG_SIZE {
        return Err(RelayError::Malformed(
            side,
            format!("payload of {size} bytes for request {request} (limit {MAX_MSG_SIZE})"),
        ));
    }
    let mut payload = vec![0u8; size as usize];
    fill(sock, &mut payload, &mut fds, deadline, side, false)?;
    Ok(Some(Message {
        request,
        flags,
        payload,
        fds,
    }))
}

/// Fill `buf` completely, collecting descriptors. Returns false if the peer closed before the
/// first byte and `eof_ok`.
fn fill(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    deadline: Instant,
    side: &'static str,
    eof_ok: bool,
) -> Result<bool, RelayError> {
    let mut filled = 0;
    while filled < buf.len() {
        wait_until(sock, deadline, side)?;
        match recv_with_fds(sock, &mut buf[filled..], fds, side)? {
            0 if filled == 0 && eof_ok => return Ok(false),
            0 => return Err(RelayError::Truncated(side)),
            n => filled += n,
        }
    }
    Ok(true)
}

/// One `recvmsg`, appending any SCM_RIGHTS descriptors to `fds` (owned, so closed on error).
fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    side: &'static str,
) -> Result<usize, RelayError> {
    let mut control = vec![0u64; control_words()];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer field is set below or left null.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`) and `control`, both alive for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(RelayError::Read(side, err));
        }
    };
    // SAFETY: `msg` was filled by recvmsg; the CMSG macros stay within `msg_controllen`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null pointer from CMSG_FIRSTHDR/NXTHDR points at a whole cmsghdr.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is pure arithmetic.
            let data_len = header.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            // SAFETY: the data of an SCM_RIGHTS cmsg is `data_len / 4` descriptors.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..data_len / size_of::<RawFd>() {
                // SAFETY: in bounds as above; the kernel installed each fd for us to own.
                let fd = unsafe { std::ptr::read_unaligned(data.add(i)) };
                // SAFETY: as above, nobody else owns this new descriptor.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: `cmsg` is a header inside `msg`'s control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_ATTACHED_FD_ENTRIES {
        return Err(RelayError::TooManyFds(side));
    }
    Ok(n)
}

/// Control buffer size in u64 words (u64 for cmsghdr alignment) for the most descriptors.
fn control_words() -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    let bytes = unsafe { libc::CMSG_SPACE((MAX_ATTACHED_FD_ENTRIES * size_of::<RawFd>()) as u32) };
    (bytes as usize).div_ceil(8)
}

/// Write header and payload with one `sendmsg` carrying the descriptors, then any remainder.
fn write_message(
    sock: &UnixStream,
    message: &Message,
    side: &'static str,
) -> Result<(), RelayError> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + message.payload.len());
    bytes.extend_from_slice(&message.header());
    bytes.extend_from_slice(&message.payload);
    let raw: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = send_with_fds(sock, &bytes, &raw).map_err(|e| RelayError::Write(side, e))?;
    while sent < bytes.len() {
        sent += send_with_fds(sock, &bytes[sent..], &[]).map_err(|e| RelayError::Write(side, e))?;
    }
    Ok(())
}

fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut control = vec![0u64; control_words()];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; every pointer field is set below or left null.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE is pure arithmetic; at most MAX_ATTACHED_FD_ENTRIES descriptors
        // (checked when they were received) fit the buffer from `control_words`.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: the control buffer holds one cmsghdr plus `data_len` bytes of data.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                data_len,
            );
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (over `bytes`) and `control`, alive for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
