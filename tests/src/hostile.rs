//! Misbehaving vhost-user backends for tests: listeners that accept and then stay silent (or
//! send a few bytes, or half a reply), and a proxy in front of a real daemon that relays
//! every message - with its file descriptors - until a chosen request, which it swallows.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user request codes (frontend to backend) the tests stall on.
pub mod request {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const GET_VRING_BASE: u32 = 11;
    pub const GET_INFLIGHT_FD: u32 = 31;
}

/// The vhost-user message header: request, flags, payload size (u32 each, little endian).
const HEADER_LEN: usize = 12;
/// More than any message the VMM sends (a memory table of 8 regions is about 300 bytes).
const MAX_PAYLOAD: usize = 64 << 10;
/// vhost-user allows at most this many file descriptors per message.
const MAX_FDS: usize = 32;

/// What a fake backend does with each connection before it goes silent.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Accepts and never sends anything.
    Silent,
    /// Sends these bytes at once, then nothing.
    Send(Vec<u8>),
    /// Reads messages until `GET_FEATURES`, answers it with a header and half of its body.
    HalfReply,
    /// Closes each connection at once, as a daemon busy with another frontend does.
    CloseAtOnce,
}

/// A listener that accepts connections and misbehaves on each; it holds them open until the
/// peer closes.
pub struct FakeBackend {
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl FakeBackend {
    pub fn spawn(socket: &Path, behaviour: Behaviour) -> FakeBackend {
        let listener =
            UnixListener::bind(socket).unwrap_or_else(|e| panic!("bind {}: {e}", socket.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let behaviour = behaviour.clone();
                std::thread::spawn(move || misbehave(stream, &behaviour));
            }
        });
        FakeBackend {
            socket: socket.to_path_buf(),
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        stop_listener(&self.stop, &self.socket, self.thread.take());
    }
}

/// Wakes a listener's accept loop with a connection of our own and joins it.
fn stop_listener(stop: &AtomicBool, socket: &Path, thread: Option<JoinHandle<()>>) {
    stop.store(true, Ordering::SeqCst);
    let _ = UnixStream::connect(socket);
    if let Some(thread) = thread {
        let _ = thread.join();
    }
    let _ = std::fs::remove_file(socket);
}

fn misbehave(mut stream: UnixStream, behaviour: &Behaviour) {
    match behaviour {
        Behaviour::CloseAtOnce => return,
        Behaviour::Silent => {}
        Behaviour::Send(bytes) => {
            let _ = stream.write_all(bytes);
        }
        Behaviour::HalfReply => loop {
            let mut header = [0u8; HEADER_LEN];
            if stream.read_exact(&mut header).is_err() {
                return;
            }
            let (code, size) = (le32(&header[0..4]), le32(&header[8..12]) as usize);
            let mut payload = vec![0; size.min(MAX_PAYLOAD)];
            if stream.read_exact(&mut payload).is_err() {
                return;
            }
            if code == request::GET_FEATURES {
                // A reply header (flags: version 1 | reply) announcing 8 bytes; 4 follow.
                let mut reply = Vec::new();
                reply.extend_from_slice(&code.to_le_bytes());
                reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
                reply.extend_from_slice(&8u32.to_le_bytes());
                reply.extend_from_slice(&[0xff; 4]);
                let _ = stream.write_all(&reply);
                break;
            }
        },
    }
    // Silent from now on; hold the connection until the peer goes.
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
}

fn le32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// A proxy on its own socket in front of a real backend: relays each connection to a new
/// connection of the backend, message by message, until the frontend sends request
/// `stall_on` (the first `stalls` times), which it swallows: from then on that connection is
/// silent. When the frontend closes, the proxy closes the backend's side too.
pub struct StallingProxy {
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    stalled: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

struct Stall {
    on: u32,
    left: Mutex<usize>,
    stalled: Arc<AtomicUsize>,
}

impl StallingProxy {
    pub fn spawn(socket: &Path, backend: &Path, stall_on: u32, stalls: usize) -> StallingProxy {
        let listener =
            UnixListener::bind(socket).unwrap_or_else(|e| panic!("bind {}: {e}", socket.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicUsize::new(0));
        let stall = Arc::new(Stall {
            on: stall_on,
            left: Mutex::new(stalls),
            stalled: stalled.clone(),
        });
        let (flag, backend) = (stop.clone(), backend.to_path_buf());
        let thread = std::thread::spawn(move || {
            for frontend in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(frontend) = frontend else { continue };
                let Ok(upstream) = UnixStream::connect(&backend) else {
                    continue;
                };
                spawn_relays(frontend, upstream, stall.clone());
            }
        });
        StallingProxy {
            socket: socket.to_path_buf(),
            stop,
            stalled,
            thread: Some(thread),
        }
    }

    /// How many messages the proxy swallowed so far.
    pub fn stalled(&self) -> usize {
        self.stalled.load(Ordering::SeqCst)
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        stop_listener(&self.stop, &self.socket, self.thread.take());
    }
}

fn spawn_relays(frontend: UnixStream, upstream: UnixStream, stall: Arc<Stall>) {
    let (Ok(f2), Ok(u2)) = (frontend.try_clone(), upstream.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        relay(&frontend, &upstream, Some(&stall));
        let _ = frontend.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
    });
    std::thread::spawn(move || {
        relay(&u2, &f2, None);
        let _ = f2.shutdown(Shutdown::Both);
        let _ = u2.shutdown(Shutdown::Both);
    });
}

/// Copies whole messages with their descriptors from `from` to `to` until either side closes,
/// or until the message to stall on, after which it only drains `from`.
fn relay(from: &UnixStream, to: &UnixStream, stall: Option<&Stall>) {
    loop {
        let mut header = [0u8; HEADER_LEN];
        let mut raw_fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: HEADER_LEN,
        }];
        // SAFETY: the iovec points into `header`, which outlives the call; any bytes are valid.
        let received = unsafe { from.recv_with_fds(&mut iov, &mut raw_fds) };
        let Ok((got, nfds)) = received else { return };
        // SAFETY: the first `nfds` descriptors were just received and are ours to close.
        let fds: Vec<OwnedFd> = raw_fds[..nfds]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if got == 0 {
            return;
        }
        let mut reader = from;
        if got < HEADER_LEN && reader.read_exact(&mut header[got..]).is_err() {
            return;
        }
        let (code, size) = (le32(&header[0..4]), le32(&header[8..12]) as usize);
        if size > MAX_PAYLOAD {
            return;
        }
        let mut payload = vec![0; size];
        if reader.read_exact(&mut payload).is_err() {
            return;
        }
        if let Some(stall) = stall.filter(|s| s.on == code) {
            let mut left = stall.left.lock().unwrap_or_else(|e| e.into_inner());
            if *left > 0 {
                *left -= 1;
                drop(left);
                stall.stalled.fetch_add(1, Ordering::SeqCst);
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
                return;
            }
        }
        let raw: Vec<RawFd> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        if to
            .send_with_fds(&[&header[..], &payload[..]], &raw)
            .is_err()
        {
            return;
        }
    }
}
