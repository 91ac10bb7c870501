//! `GET /metrics`'s `backend_stats`: each backend daemon's `GET /stats`, fetched from its
//! `--api-socket` (the device's `stats=` key) with a short deadline, all devices at once, so
//! that a hung or dead daemon costs the metrics request at most `FETCH_TIMEOUT`.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::http;
use crate::api::types::{BackendStatsEntry, DaemonStats};

/// How long one daemon gets to answer (connect, request, answer).
pub const FETCH_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to the backend's stats socket {}: {source}; is the daemon running with --api-socket?", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the backend's stats socket {} did not answer GET /stats within {FETCH_TIMEOUT:?}: {source}", .path.display())]
    Exchange {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the backend's stats socket {} answered {status}", .path.display())]
    Status { path: PathBuf, status: u16 },
    #[error("fetching the counters from {} failed unexpectedly (its thread panicked)", .0.display())]
    Panicked(PathBuf),
    #[error("the backend's stats socket {} answered something that is not its counters: {source}", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// `GET /stats` of the daemon on `path`.
pub fn fetch(path: &Path) -> Result<DaemonStats, FetchError> {
    let stream = UnixStream::connect(path).map_err(|source| FetchError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let exchange_failed = |source| FetchError::Exchange {
        path: path.to_path_buf(),
        source,
    };
    stream
        .set_read_timeout(Some(FETCH_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(FETCH_TIMEOUT)))
        .map_err(exchange_failed)?;
    let (status, body) = http::exchange(&stream, "GET", "/stats", None).map_err(exchange_failed)?;
    if status != 200 {
        return Err(FetchError::Status {
            path: path.to_path_buf(),
            status,
        });
    }
    serde_json::from_slice(&body).map_err(|source| FetchError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Every device's entry, fetched in parallel.
pub fn fetch_all(sockets: &[(String, PathBuf)]) -> BTreeMap<String, BackendStatsEntry> {
    std::thread::scope(|scope| {
        let fetches: Vec<_> = sockets
            .iter()
            .map(|(id, path)| (id, path, scope.spawn(move || fetch(path))))
            .collect();
        fetches
            .into_iter()
            .map(|(id, path, handle)| {
                let result = handle
                    .join()
                    .unwrap_or_else(|_| Err(FetchError::Panicked(path.clone())));
                let (stats, error) = match result {
                    Ok(stats) => (Some(stats), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                let entry = BackendStatsEntry {
                    api_socket: path.display().to_string(),
                    stats,
                    error,
                };
                (id.clone(), entry)
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_missing_socket_gets_a_reason_and_an_answer_is_parsed() {
        let dir = std::env::temp_dir().join(format!("backend-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let live = dir.join("live.sock");
        let _ = std::fs::remove_file(&live);
        let listener = UnixListener::bind(&live).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0; 1024];
            let _ = s.read(&mut buf).unwrap();
            let body = r#"{"daemon":"splitvisor-blk","uptime_ms":5,"state":"waiting","frontends":0,"queues":[{"queue":0,"requests":3,"read_bytes":0,"write_bytes":0,"kicks":1,"interrupts":1}]}"#;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(body.as_bytes()).unwrap();
        });
        let all = fetch_all(&[
            ("disk0".into(), live.clone()),
            ("net0".into(), dir.join("absent.sock")),
        ]);
        server.join().unwrap();
        let disk = &all["disk0"];
        assert_eq!(disk.error, None);
        let stats = disk.stats.as_ref().unwrap();
        assert_eq!(stats.counters.queues.as_ref().unwrap()[0].requests, 3);
        let net = &all["net0"];
        assert!(net.stats.is_none());
        let error = net.error.as_deref().unwrap();
        assert!(
            error.contains("absent.sock") && error.contains("--api-socket"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
