//! Relay tests over socketpairs: the test plays the frontend on one pair and vhost's parser on
//! the other, with the relay in a thread between them.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

use super::*;
use crate::framing::{recv_with_fds, send_with_fds, HEADER_LEN};
use std::io;
use vhost::vhost_user::message::MAX_MSG_SIZE;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ENABLE: u32 = 18;
const NEED_REPLY: u32 = 0x8;
const REPLY: u32 = 0x4;
const PROTOCOL_FEATURES: u64 = 1 << 30;

struct Harness {
    frontend: UnixStream,
    backend: UnixStream,
    relay: JoinHandle<Result<(), RelayError>>,
}

impl Harness {
    fn new() -> Harness {
        let (frontend, relay_frontend) = UnixStream::pair().expect("socketpair");
        let (backend, relay_backend) = UnixStream::pair().expect("socketpair");
        for sock in [&frontend, &backend] {
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let relay = std::thread::spawn(move || relay(relay_frontend, relay_backend, "server"));
        Harness {
            frontend,
            backend,
            relay,
        }
    }

    fn finish(self) -> Result<(), RelayError> {
        drop(self.frontend);
        let result = self.relay.join().expect("relay thread");
        // The relay shut the crates' side down too.
        let mut rest = Vec::new();
        let mut backend = self.backend;
        assert_eq!(backend.read_to_end(&mut rest).ok(), Some(0), "{rest:?}");
        result
    }
}

fn raw(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&request.to_le_bytes());
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    ((u64::from(num) << 32) | u64::from(index))
        .to_le_bytes()
        .to_vec()
}

/// Read exactly `len` bytes (the relay writes each message whole).
fn read_exact(sock: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    sock.read_exact(&mut buf).expect("message from the relay");
    buf
}

/// Nothing more arrives within a short while.
fn assert_quiet(sock: &UnixStream) {
    sock.set_nonblocking(true).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut byte = [0u8; 1];
    let got = (&*sock).read(&mut byte);
    assert!(
        matches!(&got, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        "unexpected data: {got:?}"
    );
    sock.set_nonblocking(false).unwrap();
}

#[test]
fn early_enable_is_acked_and_replayed_after_set_features() {
    let mut h = Harness::new();
    let owner = raw(SET_OWNER, VERSION_1, &[]);
    h.frontend.write_all(&owner).unwrap();
    assert_eq!(read_exact(&mut h.backend, owner.len()), owner);

    // QEMU 7.2's order: enable before SET_FEATURES, here with NEED_REPLY.
    let enable = raw(SET_VRING_ENABLE, VERSION_1 | NEED_REPLY, &vring_state(0, 1));
    h.frontend.write_all(&enable).unwrap();
    let ack = read_exact(&mut h.frontend, HEADER_LEN + 8);
    assert_eq!(
        ack,
        raw(SET_VRING_ENABLE, VERSION_1 | REPLY, &0u64.to_le_bytes())
    );
    // And others without NEED_REPLY: no answer. Ring 1 is disabled, then enabled again
    // (QEMU repeats its enables at each device start): only the last state is replayed.
    let disable1 = raw(SET_VRING_ENABLE, VERSION_1, &vring_state(1, 0));
    h.frontend.write_all(&disable1).unwrap();
    let enable1 = raw(SET_VRING_ENABLE, VERSION_1, &vring_state(1, 1));
    h.frontend.write_all(&enable1).unwrap();
    h.frontend.write_all(&enable).unwrap();
    assert_eq!(read_exact(&mut h.frontend, ack.len()), ack);
    assert_quiet(&h.frontend);
    assert_quiet(&h.backend);

    let features = raw(
        SET_FEATURES,
        VERSION_1,
        &(PROTOCOL_FEATURES | 1 << 32).to_le_bytes(),
    );
    h.frontend.write_all(&features).unwrap();
    assert_eq!(read_exact(&mut h.backend, features.len()), features);
    // Replayed in order, without NEED_REPLY, right after SET_FEATURES.
    let replay0 = raw(SET_VRING_ENABLE, VERSION_1, &vring_state(0, 1));
    assert_eq!(read_exact(&mut h.backend, replay0.len()), replay0);
    assert_eq!(read_exact(&mut h.backend, enable1.len()), enable1);
    assert_quiet(&h.backend);

    // From now on an enable passes through untouched, NEED_REPLY and the crates' ack included.
    let later = raw(SET_VRING_ENABLE, VERSION_1 | NEED_REPLY, &vring_state(1, 0));
    h.frontend.write_all(&later).unwrap();
    assert_eq!(read_exact(&mut h.backend, later.len()), later);
    let crate_ack = raw(SET_VRING_ENABLE, VERSION_1 | REPLY, &1u64.to_le_bytes());
    h.backend.write_all(&crate_ack).unwrap();
    assert_eq!(read_exact(&mut h.frontend, crate_ack.len()), crate_ack);
    assert_quiet(&h.backend);
    h.finish().expect("clean end");
}

#[test]
fn normal_sequence_passes_untouched_both_ways() {
    let mut h = Harness::new();
    let get = raw(GET_FEATURES, VERSION_1, &[]);
    h.frontend.write_all(&get).unwrap();
    assert_eq!(read_exact(&mut h.backend, get.len()), get);
    let reply = raw(
        GET_FEATURES,
        VERSION_1 | REPLY,
        &0x1234_5678u64.to_le_bytes(),
    );
    h.backend.write_all(&reply).unwrap();
    assert_eq!(read_exact(&mut h.frontend, reply.len()), reply);

    // A message written in pieces arrives whole.
    let features = raw(
        SET_FEATURES,
        VERSION_1 | NEED_REPLY,
        &PROTOCOL_FEATURES.to_le_bytes(),
    );
    h.frontend.write_all(&features[..5]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    h.frontend.write_all(&features[5..]).unwrap();
    assert_eq!(read_exact(&mut h.backend, features.len()), features);
    let enable = raw(SET_VRING_ENABLE, VERSION_1, &vring_state(0, 1));
    h.frontend.write_all(&enable).unwrap();
    assert_eq!(read_exact(&mut h.backend, enable.len()), enable);
    // A request the relay knows nothing about (and its reply) passes as well.
    let unknown = raw(4242, VERSION_1 | NEED_REPLY, &[7u8; 40]);
    h.frontend.write_all(&unknown).unwrap();
    assert_eq!(read_exact(&mut h.backend, unknown.len()), unknown);
    assert_quiet(&h.frontend);
    h.finish().expect("clean end");
}

fn send_with_fd(sock: &UnixStream, bytes: &[u8], fd: &OwnedFd) {
    let sent = send_with_fds(sock, bytes, &[fd.as_raw_fd()]).expect("sendmsg");
    assert_eq!(sent, bytes.len());
}

fn recv_with_fd(sock: &UnixStream, len: usize) -> (Vec<u8>, Vec<OwnedFd>) {
    let mut buf = vec![0u8; len];
    let mut fds = Vec::new();
    let n = recv_with_fds(sock, &mut buf, &mut fds, &mut false, "test").expect("recvmsg");
    assert_eq!(n, len);
    (buf, fds)
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd with valid flags; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[test]
fn descriptors_survive_the_relay_both_ways() {
    let h = Harness::new();
    let call = eventfd();
    let msg = raw(SET_VRING_CALL, VERSION_1, &0u64.to_le_bytes());
    send_with_fd(&h.frontend, &msg, &call);
    let (got, fds) = recv_with_fd(&h.backend, msg.len());
    assert_eq!(got, msg);
    assert_eq!(fds.len(), 1, "one descriptor passed on");
    // The same eventfd: a signal through the relayed copy is seen on the original.
    std::fs::File::from(fds.into_iter().next().unwrap())
        .write_all(&5u64.to_ne_bytes())
        .unwrap();
    let mut count = [0u8; 8];
    std::fs::File::from(call.try_clone().unwrap())
        .read_exact(&mut count)
        .unwrap();
    assert_eq!(u64::from_ne_bytes(count), 5);

    // Replies with a descriptor (e.g. GET_INFLIGHT_FD) go back the same way.
    let reply = raw(31, VERSION_1 | REPLY, &[0u8; 24]);
    send_with_fd(&h.backend, &reply, &call);
    let (got, fds) = recv_with_fd(&h.frontend, reply.len());
    assert_eq!(got, reply);
    assert_eq!(fds.len(), 1);
    h.finish().expect("clean end");
}

#[test]
fn oversized_message_closes_both_sides() {
    let mut h = Harness::new();
    let mut bad = raw(SET_OWNER, VERSION_1, &[]);
    bad[8..12].copy_from_slice(&((MAX_MSG_SIZE + 1) as u32).to_le_bytes());
    h.frontend.write_all(&bad).unwrap();
    let mut rest = Vec::new();
    assert_eq!(h.frontend.read_to_end(&mut rest).ok(), Some(0));
    let result = h.finish();
    assert!(
        matches!(
            result,
            Err(RelayError::Wire(WireError::Malformed(FRONTEND, _)))
        ),
        "{result:?}"
    );
}

#[test]
fn bad_version_and_truncated_message_end_the_connection() {
    let h = Harness::new();
    (&h.frontend).write_all(&raw(SET_OWNER, 0x2, &[])).unwrap();
    let result = h.finish();
    assert!(
        matches!(result, Err(RelayError::Wire(WireError::Malformed(..)))),
        "{result:?}"
    );

    // The frontend dies in the middle of a message.
    let h = Harness::new();
    let msg = raw(SET_FEATURES, VERSION_1, &PROTOCOL_FEATURES.to_le_bytes());
    (&h.frontend).write_all(&msg[..HEADER_LEN + 3]).unwrap();
    let result = h.finish();
    assert!(
        matches!(
            result,
            Err(RelayError::Wire(WireError::Truncated(FRONTEND)))
        ),
        "{result:?}"
    );
}

#[test]
fn early_enable_with_a_short_payload_is_refused() {
    let h = Harness::new();
    (&h.frontend)
        .write_all(&raw(SET_VRING_ENABLE, VERSION_1, &[1, 0, 0, 0]))
        .unwrap();
    let result = h.finish();
    assert!(
        matches!(result, Err(RelayError::Wire(WireError::Malformed(..)))),
        "{result:?}"
    );
}

#[test]
fn crates_closing_ends_the_frontend_connection() {
    let mut h = Harness::new();
    h.backend.shutdown(std::net::Shutdown::Both).unwrap();
    let mut rest = Vec::new();
    assert_eq!(h.frontend.read_to_end(&mut rest).ok(), Some(0));
    assert!(h.relay.join().expect("relay thread").is_ok());
}

#[test]
fn early_enables_are_bounded() {
    let mut h = Harness::new();
    for ring in 0..=MAX_HELD as u32 {
        h.frontend
            .write_all(&raw(SET_VRING_ENABLE, VERSION_1, &vring_state(ring, 1)))
            .unwrap();
    }
    let mut rest = Vec::new();
    assert_eq!(h.frontend.read_to_end(&mut rest).ok(), Some(0));
    let result = h.finish();
    assert!(matches!(result, Err(RelayError::TooManyHeld)), "{result:?}");
}
