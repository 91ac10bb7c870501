//! Reaching a vhost-user backend: connect to its socket (retrying while it starts, up to a
//! deadline), and negotiate features and protocol features, each exchange bounded by the
//! message deadline (`deadline`).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

use super::deadline::{exchange, ExchangeError};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no vhost-user backend answered on {} within {}s ({source}); is the backend daemon running with --socket {}?", .path.display(), .waited.as_secs(), .path.display())]
    Unreachable {
        path: PathBuf,
        waited: Duration,
        source: std::io::Error,
    },
    #[error("the backend on {} failed the vhost-user handshake{}", .path.display(), if .source.timed_out() { " (a daemon that already serves another VMM leaves a new connection unanswered)" } else { "" })]
    Handshake {
        path: PathBuf,
        #[source]
        source: ExchangeError,
    },
    #[error("the backend on {} is busy or failed: it closed the connection before answering {message}; a vhost-user backend serves one VMM at a time - is another VM using it? (start another daemon, or stop that VM; otherwise see the backend's log)", .path.display())]
    Busy {
        path: PathBuf,
        message: &'static str,
    },
    #[error("the backend on {} does not offer VHOST_USER_F_PROTOCOL_FEATURES, which splitvisor requires (for CONFIG and REPLY_ACK)", .0.display())]
    NoProtocolFeatures(PathBuf),
    #[error("the backend on {} does not offer the CONFIG protocol feature, so its device configuration cannot be read", .0.display())]
    NoConfig(PathBuf),
}

/// A connected backend after the feature handshake.
pub struct Connection {
    pub frontend: Frontend,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    pub max_queues: Option<u64>,
}

/// Connects to `path`, retrying until `wait` has passed (the daemon may still be starting);
/// `wait` of zero tries once. Says once on stderr that it waits, if the first try fails.
pub fn connect(path: &Path, wait: Duration) -> Result<UnixStream, ConnectError> {
    let deadline = Instant::now() + wait;
    let mut delay = Duration::from_millis(5);
    let mut announced = wait.is_zero();
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(source) if Instant::now() >= deadline => {
                return Err(ConnectError::Unreachable {
                    path: path.to_path_buf(),
                    waited: wait,
                    source,
                })
            }
            Err(e) => {
                if !announced {
                    warn!(
                        "waiting for the backend on {} (up to {}s)",
                        path.display(),
                        wait.as_secs()
                    );
                    announced = true;
                }
                debug!("{}: not yet reachable ({e}); retrying", path.display());
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES and, with MQ, GET_QUEUE_NUM.
pub fn handshake(
    path: &Path,
    stream: UnixStream,
    max_queues: u64,
) -> Result<Connection, ConnectError> {
    let failed = |source| ConnectError::Handshake {
        path: path.to_path_buf(),
        source,
    };
    // A daemon busy with another frontend accepts and closes at once: the first exchanges
    // then end in a disconnection, which says more than a failed handshake.
    let busy_or_failed = |message: &'static str| {
        move |source: ExchangeError| {
            if source.disconnected() {
                ConnectError::Busy {
                    path: path.to_path_buf(),
                    message,
                }
            } else {
                failed(source)
            }
        }
    };
    let mut frontend = Frontend::from_stream(stream, max_queues);
    exchange(&mut frontend, "SET_OWNER", |f| f.set_owner()).map_err(busy_or_failed("SET_OWNER"))?;
    let features = exchange(&mut frontend, "GET_FEATURES", |f| f.get_features())
        .map_err(busy_or_failed("GET_FEATURES"))?;
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
        return Err(ConnectError::NoProtocolFeatures(path.to_path_buf()));
    }
    let offered = exchange(&mut frontend, "GET_PROTOCOL_FEATURES", |f| {
        f.get_protocol_features()
    })
    .map_err(failed)?;
    let protocol_features = offered & splitvisor_wire::protocol::FRONTEND_WANTS;
    if !protocol_features.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(ConnectError::NoConfig(path.to_path_buf()));
    }
    exchange(&mut frontend, "SET_PROTOCOL_FEATURES", |f| {
        f.set_protocol_features(protocol_features)
    })
    .map_err(failed)?;
    if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        // Every message waits for the backend's verdict: failures surface where they happen.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let max_queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
        Some(exchange(&mut frontend, "GET_QUEUE_NUM", |f| f.get_queue_num()).map_err(failed)?)
    } else {
        None
    };
    debug!(
        "{}: features {features:#x}, protocol features {:#x}, max queues {max_queues:?}",
        path.display(),
        protocol_features.bits()
    );
    Ok(Connection {
        frontend,
        features,
        protocol_features,
        max_queues,
    })
}
