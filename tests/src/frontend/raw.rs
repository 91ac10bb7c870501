//! Raw vhost-user messages for tests that misbehave on purpose (split, stalled, too many
//! descriptors, payloads vhost's parser rejects, values a `u16` cannot hold), which vhost's
//! `Frontend` cannot send.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag};

pub const GET_FEATURES: u32 = FrontendReq::GET_FEATURES as u32;
pub const SET_FEATURES: u32 = FrontendReq::SET_FEATURES as u32;
pub const SET_VRING_BASE: u32 = FrontendReq::SET_VRING_BASE as u32;
pub const SET_VRING_CALL: u32 = FrontendReq::SET_VRING_CALL as u32;
pub const GET_PROTOCOL_FEATURES: u32 = FrontendReq::GET_PROTOCOL_FEATURES as u32;
pub const SET_PROTOCOL_FEATURES: u32 = FrontendReq::SET_PROTOCOL_FEATURES as u32;
pub const GET_QUEUE_NUM: u32 = FrontendReq::GET_QUEUE_NUM as u32;
pub const GET_INFLIGHT_FD: u32 = FrontendReq::GET_INFLIGHT_FD as u32;
pub const SET_INFLIGHT_FD: u32 = FrontendReq::SET_INFLIGHT_FD as u32;
/// Header flags: protocol version 1 (the version field's only value), NEED_REPLY, REPLY.
pub const VERSION_1: u32 = 0x1;
pub const NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();
pub const REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();

/// Header and payload of one message.
pub fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    msg
}

/// Send `bytes` with `fds` attached in one sendmsg.
pub fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
    let data_len = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is pure arithmetic.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; every pointer field is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds one cmsghdr plus `data_len` bytes of descriptors.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), data_len);
    }
    // SAFETY: `msg` points at `iov` (over `bytes`) and `control`, both alive for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

/// Read one reply: `(request, flags, payload)`.
pub fn read_reply(sock: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut header = [0u8; 12];
    sock.read_exact(&mut header).expect("a reply header");
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
    let mut payload = vec![0u8; word(8) as usize];
    sock.read_exact(&mut payload).expect("a reply payload");
    (word(0), word(4), payload)
}

/// Write `bytes` as they are.
pub fn send(sock: &mut UnixStream, bytes: &[u8]) {
    sock.write_all(bytes).unwrap();
}
