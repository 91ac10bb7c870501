//! Whole vhost-user messages over a Unix socket, with their file descriptors: read with a
//! deadline once a message has started (a peer that stops halfway is cut off, not waited for
//! forever), a payload that arrives in several segments put back together, too many
//! descriptors noticed and the message still read to its end; written with one `sendmsg`.
//!
//! Used by the relay between a frontend and vhost's message parser (relay.rs).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};

/// `u32 request, u32 flags, u32 size`, little-endian.
pub const HEADER_LEN: usize = 12;
/// The only protocol version (the low two flag bits).
pub const VERSION_1: u32 = 0x1;
/// How long the rest of a message may take once its first byte arrived, and how long a peer
/// may refuse to take a message we write.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WireError {
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
        "the {side} sent more file descriptors than a message may carry \
         ({MAX_ATTACHED_FD_ENTRIES}) with request {request}"
    )]
    TooManyFds {
        side: &'static str,
        request: u32,
        flags: u32,
    },
}

/// One vhost-user message: header fields, payload and the descriptors that came with it.
pub struct Message {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    pub fn new(request: FrontendReq, flags: u32, payload: Vec<u8>) -> Message {
        Message {
            request: u32::from(request),
            flags,
            payload,
            fds: Vec::new(),
        }
    }

    pub fn is(&self, request: FrontendReq) -> bool {
        self.request == u32::from(request)
    }

    /// The payload as one `u64` (features, or a vring state `{u32 index, u32 num}`).
    pub fn payload_u64(&self) -> Option<u64> {
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

/// Block until either socket is readable or hung up: `(frontend, backend)`.
pub fn wait_readable(
    frontend: &UnixStream,
    backend: &UnixStream,
) -> Result<(bool, bool), WireError> {
    let mut fds = [pollfd(frontend.as_fd()), pollfd(backend.as_fd())];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ret > 0 {
            return Ok((fds[0].revents != 0, fds[1].revents != 0));
        }
        let err = io::Error::last_os_error();
        if ret < 0 && err.kind() != io::ErrorKind::Interrupted {
            return Err(WireError::Poll(err));
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
pub fn wait_until(
    sock: &UnixStream,
    deadline: Instant,
    side: &'static str,
) -> Result<(), WireError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WireError::Stalled(side));
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
            return Err(WireError::Poll(err));
        }
    }
}

/// Read one whole message; `None` if the peer closed the connection between messages.
pub fn read_message(sock: &UnixStream, side: &'static str) -> Result<Option<Message>, WireError> {
    let mut fds = Vec::new();
    let mut too_many = false;
    let mut header = [0u8; HEADER_LEN];
    let deadline = Instant::now() + MESSAGE_TIMEOUT;
    if !fill(
        sock,
        &mut header,
        &mut fds,
        &mut too_many,
        deadline,
        side,
        true,
    )? {
        return Ok(None);
    }
    let field =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (field(0), field(4), field(8));
    if flags & VhostUserHeaderFlag::VERSION.bits() != VERSION_1 {
        return Err(WireError::Malformed(
            side,
            format!("header flags {flags:#x}: not version 1"),
        ));
    }
    if size as usize > MAX_MSG_SIZE {
        return Err(WireError::Malformed(
            side,
            format!("payload of {size} bytes for request {request} (limit {MAX_MSG_SIZE})"),
        ));
    }
    let mut payload = vec![0u8; size as usize];
    fill(
        sock,
        &mut payload,
        &mut fds,
        &mut too_many,
        deadline,
        side,
        false,
    )?;
    if too_many {
        return Err(WireError::TooManyFds {
            side,
            request,
            flags,
        });
    }
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
    too_many: &mut bool,
    deadline: Instant,
    side: &'static str,
    eof_ok: bool,
) -> Result<bool, WireError> {
    let mut filled = 0;
    while filled < buf.len() {
        wait_until(sock, deadline, side)?;
        match recv_with_fds(sock, &mut buf[filled..], fds, too_many, side)? {
            0 if filled == 0 && eof_ok => return Ok(false),
            0 => return Err(WireError::Truncated(side)),
            n => filled += n,
        }
    }
    Ok(true)
}

/// One `recvmsg`, appending any SCM_RIGHTS descriptors to `fds` (owned, so closed on error).
pub fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    too_many: &mut bool,
    side: &'static str,
) -> Result<usize, WireError> {
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
            return Err(WireError::Read(side, err));
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
    // Too many descriptors: the kernel dropped the rest (MSG_CTRUNC). The message is still
    // read to its end, so that the caller can answer it before closing.
    *too_many |= msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_ATTACHED_FD_ENTRIES;
    Ok(n)
}

/// Control buffer size in u64 words (u64 for cmsghdr alignment) for the most descriptors.
fn control_words() -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    let bytes = unsafe { libc::CMSG_SPACE((MAX_ATTACHED_FD_ENTRIES * size_of::<RawFd>()) as u32) };
    (bytes as usize).div_ceil(8)
}

/// Write header and payload with one `sendmsg` carrying the descriptors, then any remainder.
pub fn write_message(
    sock: &UnixStream,
    message: &Message,
    side: &'static str,
) -> Result<(), WireError> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + message.payload.len());
    bytes.extend_from_slice(&message.header());
    bytes.extend_from_slice(&message.payload);
    let raw: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = send_with_fds(sock, &bytes, &raw).map_err(|e| WireError::Write(side, e))?;
    while sent < bytes.len() {
        sent += send_with_fds(sock, &bytes[sent..], &[]).map_err(|e| WireError::Write(side, e))?;
    }
    Ok(())
}

pub fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
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

/// Answer `request` with a failed REPLY_ACK (`u64` 1) if its `flags` asked for a reply.
pub fn reply_failure(
    sock: &UnixStream,
    request: u32,
    flags: u32,
    side: &'static str,
) -> Result<(), WireError> {
    if flags & VhostUserHeaderFlag::NEED_REPLY.bits() == 0 {
        return Ok(());
    }
    let nack = Message {
        request,
        flags: VERSION_1 | VhostUserHeaderFlag::REPLY.bits(),
        payload: 1u64.to_le_bytes().into(),
        fds: Vec::new(),
    };
    write_message(sock, &nack, side)
}

/// Read the next request from a frontend; one with too many descriptors is answered with a
/// failed REPLY_ACK (if it asked for one) before the error ends the connection.
pub fn read_request(sock: &UnixStream, side: &'static str) -> Result<Option<Message>, WireError> {
    match read_message(sock, side) {
        Err(WireError::TooManyFds {
            side,
            request,
            flags,
        }) => {
            reply_failure(sock, request, flags, side)?;
            Err(WireError::TooManyFds {
                side,
                request,
                flags,
            })
        }
        other => other,
    }
}

/// The frontend side's name in errors.
pub const FRONTEND: &str = "frontend";
