//! The relay in front of vhost's message parser: whole messages with deadlines (framing.rs), and
//! a `SET_VRING_ENABLE` that arrives before feature negotiation held back.
//!
//! Why the hold: QEMU's vhost-user-net frontend (7.2 and earlier) sends
//! `VHOST_USER_SET_VRING_ENABLE` when the NIC attaches to its netdev, right after `SET_OWNER`
//! and before any `SET_FEATURES`. The `vhost` crate's dispatcher (0.18) checks that
//! `VHOST_USER_F_PROTOCOL_FEATURES` is already acked, fails with "inactive feature", and ends
//! the connection. The spec tracks each ring's enabled state independently of feature
//! negotiation (rings start disabled; `SET_VRING_ENABLE` sets the state), so the request is
//! meaningful. The relay answers such an early request itself (an ack only when the frontend
//! asked for one with `NEED_REPLY`) and replays it to the parser right after the
//! `SET_FEATURES` that acks `PROTOCOL_FEATURES`. Every other message, in both directions,
//! passes through whole with its file descriptors.

use std::os::unix::net::UnixStream;

use crate::framing::{
    read_message, read_request, wait_readable, write_message, Message, WireError, FRONTEND,
    MESSAGE_TIMEOUT, VERSION_1,
};
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, VhostUserVirtioFeatures};

/// Rings with an early enable held at once (a frontend has at most a few dozen).
const MAX_HELD: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the frontend enabled more than {MAX_HELD} rings before SET_FEATURES")]
    TooManyHeld,
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

/// Relay messages between `frontend` and `backend` (our end of the connection vhost's parser
/// reads, named `backend_side` in errors) until either side closes; then shut both down so
/// the other side sees the end too. Waiting for the next message has no time limit (an idle
/// connection is the normal state of a running VM); a message once started must complete
/// within `MESSAGE_TIMEOUT`. The parser reads each message with single `recv` calls and no
/// deadline: in front of it, a frontend that stops halfway is cut off, a payload sent in
/// pieces arrives whole, and a message with too many descriptors gets an answer.
pub fn relay(
    frontend: UnixStream,
    backend: UnixStream,
    backend_side: &'static str,
) -> Result<(), RelayError> {
    let result = pump(&frontend, &backend, backend_side);
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    result
}

fn pump(
    frontend: &UnixStream,
    backend: &UnixStream,
    backend_side: &'static str,
) -> Result<(), RelayError> {
    for (sock, side) in [(frontend, FRONTEND), (backend, backend_side)] {
        sock.set_write_timeout(Some(MESSAGE_TIMEOUT))
            .map_err(|e| WireError::Write(side, e))?;
    }
    let mut gate = Gate::default();
    loop {
        let (from_frontend, from_backend) = wait_readable(frontend, backend)?;
        if from_backend {
            match read_message(backend, backend_side)? {
                Some(reply) => write_message(frontend, &reply, FRONTEND)?,
                None => return Ok(()),
            }
        }
        if from_frontend {
            match read_request(frontend, FRONTEND)? {
                Some(request) => {
                    forward_request(request, &mut gate, frontend, (backend, backend_side))?
                }
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
    (backend, backend_side): (&UnixStream, &'static str),
) -> Result<(), RelayError> {
    if request.is(FrontendReq::SET_VRING_ENABLE) && !gate.protocol_features {
        return hold_enable(request, gate, frontend);
    }
    let features = match request.is(FrontendReq::SET_FEATURES) {
        true => request.payload_u64(),
        false => None,
    };
    write_message(backend, &request, backend_side)?;
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
        // Without PROTOCOL_FEATURES the handler enables every ring at SET_FEATURES itself.
        return Ok(());
    }
    for (_, payload) in held {
        // No NEED_REPLY: the frontend already has its answer, so the handler sends none.
        let replay = Message::new(FrontendReq::SET_VRING_ENABLE, VERSION_1, payload);
        write_message(backend, &replay, backend_side)?;
    }
    Ok(())
}

fn hold_enable(request: Message, gate: &mut Gate, frontend: &UnixStream) -> Result<(), RelayError> {
    let Some(state) = request.payload_u64() else {
        return Err(WireError::Malformed(
            FRONTEND,
            format!(
                "SET_VRING_ENABLE with {} payload bytes",
                request.payload.len()
            ),
        )
        .into());
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

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
