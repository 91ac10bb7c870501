//! The new process's side of a live upgrade: taking over the state and descriptors the old
//! process left (`splitvisor run --resume-upgrade FD`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use super::{monotonic_ns, UpgradeState};

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("descriptor {fd} ({what}) is not open; --resume-upgrade is for the VMM's own use during `splitvisor ctl NAME upgrade`")]
    NotOpen { fd: RawFd, what: &'static str },
    #[error("could not read the upgrade state from descriptor {fd}")]
    ReadState {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("the upgrade state is not the JSON this splitvisor reads (was it written by an incompatible version?)")]
    ParseState(#[source] serde_json::Error),
}

/// What the old process handed over, owned by this process now.
pub struct Handoff {
    pub state: UpgradeState,
    pub memory: File,
    pub api: Option<UnixListener>,
    /// The upgrade request's connection, answered by `api::upgrade_answer::PendingAnswer`.
    pub client: UnixStream,
}

impl Handoff {
    /// Takes the state memfd `fd` (closed after reading) and the descriptors it names.
    pub fn take(fd: RawFd) -> Result<Self, HandoffError> {
        let mut file = File::from(own(fd, "upgrade state")?);
        let mut text = Vec::new();
        // The old process left the file position at the end of what it wrote.
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.read_to_end(&mut text))
            .map_err(|source| HandoffError::ReadState { fd, source })?;
        drop(file);
        let state: UpgradeState =
            serde_json::from_slice(&text).map_err(HandoffError::ParseState)?;
        let memory = File::from(own(state.memory_fd, "guest memory")?);
        let api = match state.api_fd {
            Some(fd) => Some(UnixListener::from(own(fd, "API listener")?)),
            None => None,
        };
        let client = UnixStream::from(own(state.client_fd, "upgrade request")?);
        log::info!(
            "upgrade: state taken over {} us after the pause",
            monotonic_ns().saturating_sub(state.paused_at_ns) / 1000
        );
        Ok(Self {
            state,
            memory,
            api,
            client,
        })
    }
}

/// Takes ownership of inherited descriptor `fd` and marks it close-on-exec again (the next
/// upgrade hands over fresh duplicates).
fn own(fd: RawFd, what: &'static str) -> Result<OwnedFd, HandoffError> {
    // SAFETY: F_GETFD only reads the flags of a descriptor number.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(HandoffError::NotOpen { fd, what });
    }
    // SAFETY: the descriptor is open, was left to this process by the old one for exactly
    // this use, and nothing else in this process knows its number.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD on a descriptor owned here.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}
