//! The small part of HTTP/1.1 the VMM's control API, `splitvisor ctl` and the daemons' stats
//! sockets speak, both ways: one request per connection, bodies delimited by `Content-Length`
//! (no chunked encoding), JSON bodies, bounded sizes.

use std::io::{self, BufRead, BufReader, Read, Write};

/// Request line plus headers.
pub const MAX_HEAD: usize = 8 << 10;
/// Every body the API takes is a small JSON object.
pub const MAX_BODY: usize = 64 << 10;

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// A malformed or unacceptable message, with the status to answer it with.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// A read that failed: too slow (408), or a broken or short message (400).
fn read_failed(e: io::Error, what: &str) -> HttpError {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => HttpError::new(
            408,
            "the request did not arrive in time; send it whole at once",
        ),
        _ => HttpError::new(400, format!("{what}: {e}")),
    }
}

/// A message as read: its first line, its headers (lower-cased names), its body.
struct Message {
    first: String,
    body: Vec<u8>,
}

/// Reads one message; `Ok(None)` if the stream ended before its first line.
fn read_message<R: Read>(reader: &mut BufReader<R>) -> Result<Option<Message>, HttpError> {
    let mut head_len = 0;
    let mut read_line = |reader: &mut BufReader<R>| -> Result<Option<String>, HttpError> {
        let mut line = Vec::new();
        let n = reader
            .by_ref()
            .take((MAX_HEAD - head_len) as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| read_failed(e, "reading the request failed"))?;
        head_len += n;
        if head_len > MAX_HEAD {
            return Err(HttpError::new(431, "request head larger than 8 KiB"));
        }
        if n == 0 {
            return Ok(None);
        }
        let text = String::from_utf8(line)
            .map_err(|_| HttpError::new(400, "request head is not UTF-8"))?;
        Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()))
    };
    let Some(first) = read_line(reader)? else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?.ok_or_else(|| HttpError::new(400, "truncated head"))?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| HttpError::new(400, format!("malformed header line {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    if header("transfer-encoding").is_some() {
        return Err(HttpError::new(
            411,
            "chunked bodies are not supported; send Content-Length",
        ));
    }
    let length = match header("content-length") {
        None => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| HttpError::new(400, format!("bad Content-Length {v:?}")))?,
    };
    if length > MAX_BODY {
        return Err(HttpError::new(413, "body larger than 64 KiB"));
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| read_failed(e, "body shorter than Content-Length"))?;
    Ok(Some(Message { first, body }))
}

/// Reads one request; `Ok(None)` if the peer closed without sending one.
pub fn read_request<R: Read>(stream: R) -> Result<Option<Request>, HttpError> {
    let mut reader = BufReader::new(stream);
    let Some(Message { first, body }) = read_message(&mut reader)? else {
        return Ok(None);
    };
    let mut parts = first.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::new(
            400,
            format!("malformed request line {first:?}"),
        ));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::new(
            505,
            format!("{version} is not supported; use HTTP/1.1"),
        ));
    }
    if !path.starts_with('/') {
        return Err(HttpError::new(
            400,
            format!("request target {path:?} is not a path"),
        ));
    }
    Ok(Some(Request {
        method: method.to_string(),
        path: path.split('?').next().unwrap_or(path).to_string(),
        body,
    }))
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Writes a JSON response and ends the exchange (`Connection: close`).
pub fn write_response<W: Write>(
    mut stream: W,
    status: u16,
    extra_headers: &[(&str, String)],
    body: &serde_json::Value,
) -> io::Result<()> {
    let body = format!("{body}\n");
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// Client side: sends one request and returns the status and the body.
pub fn exchange<S: Read + Write>(
    mut stream: S,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> io::Result<(u16, Vec<u8>)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    stream.flush()?;
    let mut reader = BufReader::new(stream);
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    let Message { first, body } = read_message(&mut reader)
        .map_err(|e| invalid(e.message))?
        .ok_or_else(|| invalid("the VMM closed the connection without answering".into()))?;
    let status = first
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid(format!("malformed status line {first:?}")))?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<Request>, HttpError> {
        read_request(raw.as_bytes())
    }

    #[test]
    fn requests_with_and_without_bodies() {
        let r = parse("GET /vm HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/vm"));
        assert!(r.body.is_empty());
        let r = parse("PUT /devices/disk0/backend HTTP/1.1\r\nContent-Length: 4\r\n\r\n{}xy")
            .unwrap()
            .unwrap();
        assert_eq!(r.body, b"{}xy");
        assert_eq!(parse("").unwrap(), None, "peer closed");
    }

    #[test]
    fn malformed_requests_get_a_4xx() {
        let status = |raw: &str| parse(raw).unwrap_err().status;
        assert_eq!(status("GET /vm\r\n\r\n"), 400);
        assert_eq!(status("GET vm HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET /vm HTTP/2\r\n\r\n"), 505);
        assert_eq!(status("GET /vm HTTP/1.1\r\nbroken\r\n\r\n"), 400);
        assert_eq!(status("PUT /vm HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status("PUT /vm HTTP/1.1\r\nContent-Length: 10\r\n\r\nab"),
            400
        );
        assert_eq!(
            status("PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            status("PUT /vm HTTP/1.1\r\nContent-Length: 999999\r\n\r\n"),
            413
        );
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(&long), 431);
        assert_eq!(
            status("GET /vm HTTP/1.1\r\nHost: x\r\n"),
            400,
            "no blank line"
        );
    }

    /// A client too slow for the request deadline gets 408, not a generic 400.
    #[test]
    fn a_request_that_runs_out_of_time_gets_408() {
        struct Slow(&'static [u8]);
        impl Read for Slow {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                let n = self.0.len().min(buf.len()).min(3);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let err = read_request(Slow(b"GET /vm HTTP/1.1\r\nHost")).unwrap_err();
        assert_eq!(err.status, 408, "{err:?}");
        let err =
            read_request(Slow(b"PUT /vm HTTP/1.1\r\nContent-Length: 9\r\n\r\n{}")).unwrap_err();
        assert_eq!(err.status, 408, "{err:?}");
    }

    #[test]
    fn a_response_reads_back_through_the_client_side() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            409,
            &[("Allow", "GET".into())],
            &serde_json::json!({"error": "busy"}),
        )
        .unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"), "{text}");
        assert!(text.contains("Allow: GET\r\n"));
        // `exchange` writes its request into the Vec half and reads the response half.
        struct Duplex(Vec<u8>, std::io::Cursor<Vec<u8>>);
        impl Read for Duplex {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1.read(buf)
            }
        }
        impl Write for Duplex {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (status, body) = exchange(
            Duplex(Vec::new(), std::io::Cursor::new(out)),
            "GET",
            "/vm",
            None,
        )
        .unwrap();
        assert_eq!(status, 409);
        assert_eq!(body, b"{\"error\":\"busy\"}\n");
    }
}
