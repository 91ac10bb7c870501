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

use std::os::unix::net::UnixStream;

use crate::relay_check;
use crate::wire::{
    read_message, read_request, reply_failure, wait_readable, write_message, Message, WireError,
    FRONTEND, MESSAGE_TIMEOUT, VERSION_1,
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
    #[error("refused a request that asked for no reply, closing the connection: {0}")]
    Refused(String),
}

const BACKEND: &str = "vhost-user-backend side";

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
            .map_err(|e| WireError::Write(side, e))?;
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
            match read_request(frontend, FRONTEND)? {
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
    Ok(reply_failure(
        frontend,
        request.request,
        request.flags,
        FRONTEND,
    )?)
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
