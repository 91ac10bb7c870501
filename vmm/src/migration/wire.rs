//! The migration stream: where it goes (`unix:PATH`, `tcp:HOST:PORT`), and its framing. Every
//! message is one frame, `[kind: u8][length: u64 little-endian][payload]`; JSON payloads for the
//! header, verdicts and the state, raw pages for memory. Every read and write on the stream has
//! a deadline (the socket's timeouts), so a peer that stops answering ends the migration.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// How long one read or write may block before the migration is given up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest JSON payload accepted (the state of a few vCPUs is well under 1 MiB).
const MAX_JSON: u64 = 16 << 20;
/// The largest page frame accepted: an address and 1 MiB of pages.
pub const MAX_PAGES: u64 = 8 + (1 << 20);

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source to destination: the `Hello` header.
    Hello = 1,
    /// Either way: a `Verdict` on what the other side sent.
    Verdict = 2,
    /// Source to destination: `[guest address: u64 LE][pages]`.
    Pages = 3,
    /// Source to destination: the snapshot manifest (vCPUs, interrupt controllers, devices).
    State = 4,
    /// Source to destination: the source closed its vhost-user connections; connect now.
    Handoff = 5,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Self> {
        [
            Kind::Hello,
            Kind::Verdict,
            Kind::Pages,
            Kind::State,
            Kind::Handoff,
        ]
        .into_iter()
        .find(|k| *k as u8 == byte)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0:?} is not a migration address; give unix:PATH or tcp:HOST:PORT")]
    ParseAddress(String),
    #[error(
        "could not connect to {address} (is `splitvisor run --incoming {address}` waiting there?)"
    )]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not listen on {address}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the peer did not answer within {}s", IO_TIMEOUT.as_secs())]
    Timeout,
    #[error("the peer closed the connection")]
    Closed,
    #[error("the migration stream failed")]
    Io(#[source] std::io::Error),
    #[error("the peer sent {found} where {expected} was expected")]
    Unexpected { expected: String, found: String },
    #[error("the peer sent a {kind:?} frame of {length} bytes (at most {max})")]
    TooLong { kind: Kind, length: u64, max: u64 },
    #[error("the peer's {0:?} frame is not valid")]
    Decode(Kind, #[source] serde_json::Error),
}

fn io_error(e: std::io::Error) -> WireError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => WireError::Timeout,
        ErrorKind::UnexpectedEof
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted => WireError::Closed,
        _ => WireError::Io(e),
    }
}

/// `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for Address {
    type Err = WireError;

    fn from_str(text: &str) -> Result<Self, WireError> {
        let bad = || WireError::ParseAddress(text.to_string());
        match text.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(Address::Unix(PathBuf::from(path))),
            Some(("tcp", host_port)) => match host_port.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Address::Tcp(host_port.to_string()))
                }
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp(host_port) => write!(f, "tcp:{host_port}"),
        }
    }
}

/// A connected migration stream, counting the bytes it sent (for progress reports).
pub struct Stream {
    conn: Conn,
    sent: Arc<AtomicU64>,
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn new(conn: Conn) -> Self {
        Self {
            conn,
            sent: Arc::default(),
        }
    }

    /// The bytes sent so far, readable from another thread.
    pub fn sent(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }

    /// Connects to `address`, trying for up to `wait` while nothing listens there yet.
    pub fn connect(address: &Address, wait: Duration) -> Result<Self, WireError> {
        let deadline = Instant::now() + wait;
        let connect_error = |source| WireError::Connect {
            address: address.to_string(),
            source,
        };
        loop {
            let attempt = match address {
                Address::Unix(path) => {
                    UnixStream::connect(path).map(|s| Stream::new(Conn::Unix(s)))
                }
                Address::Tcp(host_port) => {
                    tcp_connect(host_port, wait).map(|s| Stream::new(Conn::Tcp(s)))
                }
            };
            match attempt {
                Ok(stream) => return stream.with_timeouts().map_err(connect_error),
                Err(e) if Instant::now() < deadline && refused_or_absent(&e) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(connect_error(e)),
            }
        }
    }

    fn with_timeouts(self) -> std::io::Result<Self> {
        match &self.conn {
            Conn::Unix(s) => {
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                s.set_nodelay(true)?;
            }
        }
        Ok(self)
    }

    /// Sets how long a read may wait (longer than `IO_TIMEOUT` while the peer restores).
    pub fn set_read_timeout(&self, timeout: Duration) -> Result<(), WireError> {
        match &self.conn {
            Conn::Unix(s) => s.set_read_timeout(Some(timeout)),
            Conn::Tcp(s) => s.set_read_timeout(Some(timeout)),
        }
        .map_err(WireError::Io)
    }

    fn writer(&mut self) -> &mut dyn Write {
        match &mut self.conn {
            Conn::Unix(s) => s,
            Conn::Tcp(s) => s,
        }
    }

    fn reader(&mut self) -> &mut dyn Read {
        match &mut self.conn {
            Conn::Unix(s) => s,
            Conn::Tcp(s) => s,
        }
    }

    /// Sends one frame whose payload is `parts` back to back.
    pub fn send(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), WireError> {
        let length: usize = parts.iter().map(|p| p.len()).sum();
        let mut head = [0u8; 9];
        head[0] = kind as u8;
        head[1..].copy_from_slice(&(length as u64).to_le_bytes());
        let out = self.writer();
        out.write_all(&head).map_err(io_error)?;
        for part in parts {
            out.write_all(part).map_err(io_error)?;
        }
        self.sent
            .fetch_add((head.len() + length) as u64, Ordering::Relaxed);
        Ok(())
    }

    pub fn send_json<T: Serialize>(&mut self, kind: Kind, value: &T) -> Result<(), WireError> {
        let bytes = serde_json::to_vec(value).map_err(|e| WireError::Decode(kind, e))?;
        self.send(kind, &[&bytes])
    }

    /// Reads one frame into `buffer` (replacing its content); returns its kind.
    pub fn receive(&mut self, buffer: &mut Vec<u8>) -> Result<Kind, WireError> {
        let mut head = [0u8; 9];
        self.reader().read_exact(&mut head).map_err(io_error)?;
        let kind = Kind::from_byte(head[0]).ok_or_else(|| WireError::Unexpected {
            expected: "a frame".into(),
            found: format!("frame kind {}", head[0]),
        })?;
        let mut length_bytes = [0u8; 8];
        length_bytes.copy_from_slice(&head[1..]);
        let length = u64::from_le_bytes(length_bytes);
        let max = if kind == Kind::Pages {
            MAX_PAGES
        } else {
            MAX_JSON
        };
        if length > max {
            return Err(WireError::TooLong { kind, length, max });
        }
        buffer.resize(length as usize, 0);
        self.reader().read_exact(buffer).map_err(io_error)?;
        Ok(kind)
    }

    /// Reads one frame that must be `expected` and decodes its JSON.
    pub fn receive_json<T: DeserializeOwned>(&mut self, expected: Kind) -> Result<T, WireError> {
        let mut buffer = Vec::new();
        let kind = self.receive(&mut buffer)?;
        if kind != expected {
            return Err(WireError::Unexpected {
                expected: format!("{expected:?}"),
                found: format!("{kind:?}"),
            });
        }
        serde_json::from_slice(&buffer).map_err(|e| WireError::Decode(kind, e))
    }
}

fn refused_or_absent(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
}

fn tcp_connect(host_port: &str, wait: Duration) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(ErrorKind::NotFound, "the host name has no address");
    for address in host_port.to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, wait.max(Duration::from_secs(1))) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A listening destination.
pub enum Listener {
    /// The socket file is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    pub fn bind(address: &Address) -> Result<Self, WireError> {
        let listen_error = |source| WireError::Listen {
            address: address.to_string(),
            source,
        };
        match address {
            Address::Unix(path) => UnixListener::bind(path)
                .map(|l| Listener::Unix(l, path.clone()))
                .map_err(listen_error),
            Address::Tcp(host_port) => TcpListener::bind(host_port.as_str())
                .map(Listener::Tcp)
                .map_err(listen_error),
        }
    }

    /// Waits for the source to connect (for as long as it takes: the VM arrives when its
    /// owner migrates it).
    pub fn accept(&self) -> Result<Stream, WireError> {
        let stream = match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::new(Conn::Unix(s))),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::new(Conn::Tcp(s))),
        };
        stream
            .and_then(Stream::with_timeouts)
            .map_err(WireError::Io)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The other side's answer to a header or to the handoff.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Go on.
    Accept,
    /// Refused or failed, and why (shown to the user as is).
    Refuse(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_back() {
        for text in ["unix:/run/m.sock", "tcp:127.0.0.1:4444", "tcp:[::1]:80"] {
            let address: Address = text.parse().unwrap();
            assert_eq!(address.to_string(), text);
        }
        for bad in [
            "/run/m.sock",
            "unix:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "x:y",
        ] {
            let err = bad.parse::<Address>().unwrap_err().to_string();
            assert!(err.contains("unix:PATH or tcp:HOST:PORT"), "{err}");
        }
    }

    #[test]
    fn frames_round_trip_and_lengths_are_bounded() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Stream::new(Conn::Unix(a)), Stream::new(Conn::Unix(b)));
        a.send_json(Kind::Verdict, &Verdict::Refuse("no".into()))
            .unwrap();
        a.send(Kind::Pages, &[&1u64.to_le_bytes(), &[7u8; 4096]])
            .unwrap();
        // Two heads, `{"refuse":"no"}`, an address and a page.
        assert_eq!(a.sent().load(Ordering::Relaxed), 9 + 15 + 9 + 8 + 4096);
        let verdict: Verdict = b.receive_json(Kind::Verdict).unwrap();
        assert_eq!(verdict, Verdict::Refuse("no".into()));
        let mut buffer = Vec::new();
        assert_eq!(b.receive(&mut buffer).unwrap(), Kind::Pages);
        assert_eq!(buffer.len(), 8 + 4096);
        // A length beyond the limit is refused before anything is allocated.
        let mut head = vec![Kind::State as u8];
        head.extend_from_slice(&u64::MAX.to_le_bytes());
        a.writer().write_all(&head).unwrap();
        let err = b.receive(&mut buffer).unwrap_err();
        assert!(matches!(err, WireError::TooLong { .. }), "{err}");
        drop(a);
        assert!(matches!(b.receive(&mut buffer), Err(WireError::Closed)));
    }
}
