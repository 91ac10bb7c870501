//! The control API's endpoints (described in docs/api.yaml): which method and path does what,
//! and which status each outcome gets.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::http::Request;
use crate::control::{ControlError, VmControl};
use crate::vhost_user::manager::SwapError;

/// A response: status, extra headers, JSON body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Value,
}

impl Response {
    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            body,
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: json!({ "error": message.into() }),
        }
    }
}

/// Routes one request.
pub fn handle(control: &VmControl, request: &Request) -> Response {
    let segments: Vec<&str> = request
        .path
        .trim_end_matches('/')
        .split('/')
        .skip(1)
        .collect();
    let method = request.method.as_str();
    let allowed: &[&str] = match segments.as_slice() {
        ["vm"] | ["metrics"] => &["GET"],
        ["vm", "pause" | "resume" | "shutdown"] => &["PUT"],
        ["devices", _, "backend"] => &["PUT"],
        _ => {
            return Response::error(
                404,
                format!(
                    "no endpoint {}; see docs/api.yaml (GET /vm, GET /metrics, PUT /vm/pause, PUT /vm/resume, PUT /vm/shutdown, PUT /devices/{{id}}/backend)",
                    request.path
                ),
            )
        }
    };
    if !allowed.contains(&method) {
        let mut response = Response::error(
            405,
            format!(
                "{} takes {}, not {method}",
                request.path,
                allowed.join(", ")
            ),
        );
        response.headers.push(("Allow", allowed.join(", ")));
        return response;
    }
    let result = match segments.as_slice() {
        ["vm"] => Ok(control.status()),
        ["metrics"] => Ok(control.metrics()),
        ["vm", "pause"] => control.pause(),
        ["vm", "resume"] => control.resume(),
        ["vm", "shutdown"] => Ok(control.shutdown()),
        ["devices", id, "backend"] => match swap_target(&request.body) {
            Ok(socket) => control.swap(id, &socket),
            Err(message) => return Response::error(400, message),
        },
        _ => unreachable!("every routed path is matched above"),
    };
    match result {
        Ok(body) => Response::ok(body),
        Err(e) => Response::error(status_of(&e), crate::error_chain(&e)),
    }
}

/// The body of `PUT /devices/{id}/backend`: `{"socket": "/path/to/backend.sock"}`.
fn swap_target(body: &[u8]) -> Result<PathBuf, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not valid JSON ({e}); send {{\"socket\": PATH}}"))?;
    let object = value
        .as_object()
        .ok_or("the body must be a JSON object {\"socket\": PATH}")?;
    if let Some(unknown) = object.keys().find(|k| *k != "socket") {
        return Err(format!(
            "unknown field {unknown:?}; the only field is \"socket\""
        ));
    }
    match object.get("socket") {
        Some(Value::String(path)) if !path.is_empty() => Ok(PathBuf::from(path)),
        Some(_) => Err("\"socket\" must be a non-empty string (a Unix socket path)".into()),
        None => Err("missing field \"socket\" (the new backend's Unix socket path)".into()),
    }
}

fn status_of(error: &ControlError) -> u16 {
    match error {
        ControlError::Stopping => 409,
        ControlError::PauseTimeout => 500,
        ControlError::UnknownDevice(_) => 404,
        ControlError::NotVhostUser(_) => 400,
        ControlError::Swap(swap) => match **swap {
            SwapError::Busy(_) | SwapError::SameBackend { .. } | SwapError::Switch { .. } => 409,
            SwapError::Connect { .. } => 502,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_bodies_are_checked() {
        assert_eq!(
            swap_target(br#"{"socket": "/run/b.sock"}"#).unwrap(),
            PathBuf::from("/run/b.sock")
        );
        for (body, expect) in [
            (&b"{"[..], "not valid JSON"),
            (b"[1]", "JSON object"),
            (b"{}", "missing field"),
            (br#"{"socket": 3}"#, "non-empty string"),
            (br#"{"socket": ""}"#, "non-empty string"),
            (br#"{"socket": "/a", "x": 1}"#, "unknown field"),
        ] {
            let err = swap_target(body).unwrap_err();
            assert!(err.contains(expect), "{err}");
        }
    }
}
