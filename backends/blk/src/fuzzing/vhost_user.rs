//! Target `vhost_user_messages`: the vhost-user server (`FrontendHandler` behind vhost's
//! `BackendReqHandler`) fed a fuzzed message sequence over a socketpair, with memfds and
//! eventfds attached where the fuzzer asks for them, then served to the end of the stream.

use std::fs::File;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{blk_device, Input};
use splitvisor_vhost_server::{fuzz_is_refusal, FrontendHandler};

/// Messages per input: enough for a full handshake plus noise, few enough that replies and
/// fds in flight stay far below the socket buffer and fd limits.
const MAX_MESSAGES: usize = 64;
/// Highest request code tried (a few past the last one vhost 0.18 knows).
const MAX_REQUEST: u8 = 48;
/// VhostUserHeaderFlag::VERSION and NEED_REPLY (vhost-user spec, "Header").
const FLAG_VERSION: u32 = 0x1;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Size of the memfd every memory region and inflight message refers to; sealed like the
/// VMM's guest memory.
const MEMFD_LEN: usize = 0x10000;

/// A sealed memfd of `MEMFD_LEN` bytes starting with `contents`.
fn memfd(contents: &[u8]) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked before use.
    let fd = unsafe {
        libc::memfd_create(
            c"fuzz-guest".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(MEMFD_LEN as u64).expect("memfd size");
    file.write_all(&contents[..contents.len().min(MEMFD_LEN)])
        .expect("memfd contents");
    // SAFETY: F_ADD_SEALS on a memfd we own; failure only loses the seal, checked below.
    let sealed = unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    assert_eq!(sealed, 0, "memfd seals");
    file
}

/// A fresh non-blocking eventfd.
fn eventfd() -> File {
    // SAFETY: plain eventfd(2); the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes one fuzzed message to `frontend`; false once the input is used up.
fn send_message(input: &mut Input, frontend: &UnixStream, memory: &File) -> bool {
    if input.0.is_empty() {
        return false;
    }
    let request = u32::from(input.byte() % (MAX_REQUEST + 1));
    let shape = input.byte();
    let fd_kinds = input.byte();
    let len = usize::from(input.byte());
    let payload = input.take(len);
    // Mostly well-formed headers; bit 7 sends raw flags, bit 6 a size that lies.
    let flags = if shape & 0x80 != 0 {
        u32::from(shape)
    } else {
        FLAG_VERSION | (u32::from(shape) & FLAG_NEED_REPLY)
    };
    let size = if shape & 0x40 != 0 {
        u32::from(input.byte())
    } else {
        payload.len() as u32
    };
    let mut message = Vec::with_capacity(12 + payload.len());
    for field in [request, flags, size] {
        message.extend_from_slice(&field.to_le_bytes());
    }
    message.extend_from_slice(payload);
    let events: Vec<File> = (0..fd_kinds % 4).map(|_| eventfd()).collect();
    let fds: Vec<i32> = (0..usize::from(fd_kinds % 4))
        .map(|i| {
            if fd_kinds & (4 << i) != 0 {
                memory.as_raw_fd()
            } else {
                events[i].as_raw_fd()
            }
        })
        .collect();
    // A full socket is impossible at these sizes; a failed send just ends the sequence.
    frontend.send_with_fds(&[&message[..]], &fds).is_ok()
}

/// Input: queue count and size selectors, a length-prefixed memfd image (16-byte units),
/// then messages: request code, shape (flags/lying size), fd count and kinds, payload length,
/// payload.
pub fn vhost_user_messages(data: &[u8]) {
    let mut input = Input(data);
    let queues = 1 + usize::from(input.byte() % 2);
    let queue_size = 2u16 << (input.byte() % 4);
    let image_len = usize::from(input.byte()) * 16;
    let memory = memfd(input.take(image_len));
    let device = blk_device(false, queues, queue_size);
    let handler = Arc::new(Mutex::new(FrontendHandler::new(device)));
    let (frontend, backend) = UnixStream::pair().expect("socketpair");
    let mut server = BackendReqHandler::from_stream(backend, handler.clone());
    let mut sent = 0;
    while sent < MAX_MESSAGES && send_message(&mut input, &frontend, &memory) {
        sent += 1;
    }
    frontend
        .shutdown(Shutdown::Write)
        .expect("shutdown of our own socket");
    // As serve_frontend: refusals were answered and serving goes on; anything else ends it.
    // Each message is handled at most once, so this ends even if every one is refused.
    for _ in 0..=MAX_MESSAGES {
        match server.handle_request() {
            Ok(()) => {}
            Err(e) if fuzz_is_refusal(&e) => {}
            Err(e) => {
                log::info!("fuzz: serving ended after {sent} messages sent: {e}");
                break;
            }
        }
    }
    let mut handler = handler.lock().unwrap_or_else(|e| e.into_inner());
    handler.stop_all_queues();
}
