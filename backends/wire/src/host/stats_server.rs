//! The daemons' optional stats API: `GET /stats` over HTTP/1.1 on a Unix socket, answered
//! with a JSON snapshot of the daemon's counters (`crate::stats::DaemonStats`). It speaks the
//! VMM's bounded HTTP (`http`, `slots`): a request must arrive whole within a deadline, and
//! clients that send slowly or nothing cannot take every slot.

use std::io::{ErrorKind, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::http;
use super::slots::{Slot, Slots};
use super::socket::{self, SocketError};

/// A client that reads nothing of its answer for this long is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A request must arrive within this time from the connection.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; a snapshot is quick, so a few suffice.
const MAX_CONNECTIONS: usize = 4;

/// The socket to remove when the daemon exits (its signal thread calls `cleanup`).
static BOUND: Mutex<Option<socket::SocketGuard>> = Mutex::new(None);

/// Produces the JSON answer of `GET /stats`.
pub type Snapshot = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StatsApiError {
    #[error(transparent)]
    Bind(#[from] SocketError),
    #[error("could not start the stats API thread")]
    Spawn(#[source] std::io::Error),
}

/// Binds `path` (mode 0600; a stale socket is replaced, a live one or a non-socket refused)
/// and serves `GET /stats` on a thread of its own for the rest of the process.
pub fn start(path: &Path, snapshot: Snapshot) -> Result<(), StatsApiError> {
    let listener = socket::bind_replacing(path, "--api-socket")?;
    *BOUND.lock().unwrap_or_else(PoisonError::into_inner) = Some(socket::guard(path));
    std::thread::Builder::new()
        .name("stats-api".into())
        .spawn(move || accept_loop(listener, snapshot))
        .map_err(StatsApiError::Spawn)?;
    log::info!("stats API on {}", path.display());
    Ok(())
}

/// Removes the stats socket, if one was bound; called on the way out.
pub fn cleanup() {
    if let Some(guard) = BOUND.lock().unwrap_or_else(PoisonError::into_inner).take() {
        guard.cleanup();
    }
}

fn accept_loop(listener: UnixListener, snapshot: Snapshot) {
    let slots = Slots::new(MAX_CONNECTIONS);
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("stats API: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
        let Some(slot) = slots.take(&stream) else {
            respond(
                &stream,
                503,
                &error("too many stats requests in progress; retry"),
            );
            continue;
        };
        let snapshot = snapshot.clone();
        let spawned = std::thread::Builder::new()
            .name("stats-client".into())
            .spawn(move || serve_one(&stream, &snapshot, slot));
        if let Err(e) = spawned {
            log::warn!("stats API: could not start a connection thread: {e}");
        }
    }
}

fn error(message: &str) -> serde_json::Value {
    serde_json::json!({ "error": message })
}

fn serve_one(stream: &UnixStream, snapshot: &Snapshot, slot: Slot) {
    let reader = DeadlineReader {
        stream,
        deadline: Instant::now() + REQUEST_DEADLINE,
    };
    let (status, body) = match http::read_request(reader) {
        Ok(Some(request)) => {
            slot.handling();
            route(&request, snapshot)
        }
        Ok(None) => return,
        Err(e) => (e.status, error(&e.message)),
    };
    respond(stream, status, &body);
}

fn route(request: &http::Request, snapshot: &Snapshot) -> (u16, serde_json::Value) {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/stats") => (200, snapshot()),
        (_, "/stats") => (405, error("/stats only answers GET")),
        (_, path) => (
            404,
            error(&format!("no {path} here; the daemon serves GET /stats")),
        ),
    }
}

fn respond(stream: &UnixStream, status: u16, body: &serde_json::Value) {
    let allow = [("Allow", "GET".to_string())];
    let headers: &[(&str, String)] = if status == 405 { &allow } else { &[] };
    if let Err(e) = http::write_response(stream, status, headers, body) {
        log::debug!("stats API: writing a response failed: {e}");
    }
}

/// Reads until a deadline for the whole request, so a client trickling bytes runs out of time.
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream: &UnixStream = self.stream;
        stream.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn get(path: &Path, method: &str, target: &str) -> (u16, serde_json::Value) {
        let stream = UnixStream::connect(path).unwrap();
        let (status, body) = http::exchange(stream, method, target, None).unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn serves_stats_and_refuses_the_rest() {
        let _serial = socket::TEST_SERIAL
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let dir = std::env::temp_dir().join(format!("stats-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        // A stale socket file is replaced.
        drop(UnixListener::bind(&path).unwrap());
        start(&path, Arc::new(|| serde_json::json!({"n": 7}))).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            get(&path, "GET", "/stats"),
            (200, serde_json::json!({"n": 7}))
        );
        assert_eq!(get(&path, "PUT", "/stats").0, 405);
        assert_eq!(get(&path, "GET", "/vm").0, 404);
        assert!(matches!(
            socket::bind_replacing(&path, "--api-socket"),
            Err(SocketError::Live { .. })
        ));
        cleanup();
        assert!(!path.exists());
        let _ = std::fs::remove_dir(&dir);
    }
}
