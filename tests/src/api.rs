//! A raw client for the VMM's control API, written independently of `splitvisor ctl` so that
//! the tests check the wire format itself (status lines, headers, JSON bodies).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// One answer: status, headers (lower-cased names) and the body parsed as JSON.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `raw` bytes as they are and reads the whole answer (the VMM closes after it).
pub fn raw_request(socket: &Path, raw: &[u8]) -> Answer {
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(raw).expect("send the request");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read the answer");
    let text = String::from_utf8(answer).expect("the answer is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line:?}");
    let status = status_line[9..12].parse().expect("numeric status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .expect("a Content-Length header");
    assert_eq!(body.len(), length, "body length matches Content-Length");
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("body {body:?}: {e}"));
    Answer {
        status,
        headers,
        body,
    }
}

/// `METHOD path` with an optional JSON body.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Answer {
    let body = body.unwrap_or("");
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_request(socket, raw.as_bytes())
}

/// `GET path`, which must succeed.
pub fn get(socket: &Path, path: &str) -> Value {
    let answer = request(socket, "GET", path, None);
    assert_eq!(answer.status, 200, "GET {path}: {:?}", answer.body);
    answer.body
}

/// The first device's `completed_requests` counter from `GET /vm`, if it has one.
pub fn completed_requests(socket: &Path) -> Option<u64> {
    get(socket, "/vm")["devices"][0]["counters"]["completed_requests"].as_u64()
}
