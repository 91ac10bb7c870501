//! The control API's endpoints (described in docs/api.yaml): which method and path does what,
//! and which status each outcome gets.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::http::Request;
use super::types::{
    ErrorReport, MigrateRequest, PingReport, SnapshotRequest, UpgradeRequest, VersionReport,
    API_PREFIX,
};
use crate::api::control::{ControlError, MigrateError, VmControl};
use crate::migration::send::SendError;
use crate::migration::wire::WireError;
use crate::vhost_user::manager::SwapError;
use crate::vm_end::VmEnd;

/// A response: status, extra headers, JSON body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Value,
    /// How the VM ends once this response is written (a snapshot with `then: stop`): ending
    /// it before would let the VMM exit before the client has its answer.
    pub then_end: Option<VmEnd>,
    /// A live upgrade to carry out on the request's connection (`PUT /vm/upgrade`): the
    /// new process answers, or on failure this response is replaced by the error.
    pub then_upgrade: Option<UpgradeRequest>,
}

impl Response {
    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            body,
            then_end: None,
            then_upgrade: None,
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: json!(ErrorReport {
                error: message.into()
            }),
            then_end: None,
            then_upgrade: None,
        }
    }
}

/// Every endpoint: method and path, as documented in docs/api.yaml (`{id}` is a device id).
/// Each is served under `/api/v1`; those with `legacy` also without the prefix, as the first
/// API had them.
pub const ROUTES: &[Route] = &[
    Route::new("GET", "/vm", true),
    Route::new("GET", "/metrics", true),
    Route::new("PUT", "/vm/pause", true),
    Route::new("PUT", "/vm/resume", true),
    Route::new("PUT", "/vm/shutdown", true),
    Route::new("PUT", "/vm/snapshot", true),
    Route::new("PUT", "/vm/upgrade", true),
    Route::new("PUT", "/vm/migrate", true),
    Route::new("GET", "/vm/migrate", true),
    Route::new("PUT", "/devices/{id}/backend", true),
    Route::new("GET", "/version", false),
    Route::new("GET", "/ping", false),
];

/// One endpoint of `ROUTES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    /// The path after `/api/v1`.
    pub path: &'static str,
    /// Also served without the `/api/v1` prefix.
    pub legacy: bool,
}

impl Route {
    const fn new(method: &'static str, path: &'static str, legacy: bool) -> Self {
        Self {
            method,
            path,
            legacy,
        }
    }

    /// The device id when `path` (without the prefix) is this route's, `Some("")` if it has no
    /// parameter.
    fn matches<'p>(&self, path: &'p str) -> Option<&'p str> {
        let mut id = "";
        let mut pattern = self.path.split('/');
        let mut segments = path.split('/');
        loop {
            match (pattern.next(), segments.next()) {
                (None, None) => return Some(id),
                (Some("{id}"), Some(segment)) if !segment.is_empty() => id = segment,
                (Some(p), Some(segment)) if p == segment => {}
                _ => return None,
            }
        }
    }
}

/// The routes `path` names and the device id in it; empty when no route has this path.
fn routes_for(path: &str) -> (Vec<&'static Route>, &str) {
    let trimmed = path.trim_end_matches('/');
    let (unprefixed, versioned) = match trimmed.strip_prefix(API_PREFIX) {
        Some(rest) if rest.starts_with('/') => (rest, true),
        _ => (trimmed, false),
    };
    let mut id = "";
    let routes = ROUTES
        .iter()
        .filter(|r| versioned || r.legacy)
        .filter(|r| match r.matches(unprefixed) {
            Some(found) => {
                id = found;
                true
            }
            None => false,
        })
        .collect();
    (routes, id)
}

/// Whether a request `method path` reaches an endpoint.
pub fn serves(method: &str, path: &str) -> bool {
    routes_for(path).0.iter().any(|r| r.method == method)
}

/// Routes one request.
pub fn handle(control: &VmControl, request: &Request) -> Response {
    let (routes, id) = routes_for(&request.path);
    if routes.is_empty() {
        return Response::error(
            404,
            format!(
                "no endpoint {}; see docs/api.yaml (under {API_PREFIX}: GET /vm, GET /metrics, PUT /vm/pause, PUT /vm/resume, PUT /vm/shutdown, PUT /vm/snapshot, PUT /vm/upgrade, PUT /vm/migrate, GET /vm/migrate, PUT /devices/{{id}}/backend, GET /version, GET /ping)",
                request.path
            ),
        );
    }
    let method = request.method.as_str();
    let Some(route) = routes.iter().find(|r| r.method == method) else {
        let allowed: Vec<&str> = routes.iter().map(|r| r.method).collect();
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
    };
    let result = match route.path {
        "/vm" => Ok(json!(control.status())),
        "/metrics" => Ok(json!(control.metrics())),
        "/vm/pause" => control.pause().map(|r| json!(r)),
        "/vm/resume" => control.resume().map(|r| json!(r)),
        "/vm/shutdown" => Ok(json!(control.shutdown())),
        "/version" => Ok(json!(VersionReport::current())),
        "/ping" => Ok(json!(PingReport {
            ok: true,
            pid: std::process::id(),
        })),
        "/vm/snapshot" => match snapshot_request(&request.body) {
            Ok(r) => match control.snapshot(std::path::Path::new(&r.dir), r.then) {
                Ok((report, then_end)) => {
                    let mut response = Response::ok(json!(report));
                    response.then_end = then_end;
                    return response;
                }
                Err(e) => Err(e),
            },
            Err(message) => return Response::error(400, message),
        },
        "/vm/upgrade" => match upgrade_request(&request.body) {
            Ok(upgrade) => {
                let mut response = Response::ok(Value::Null);
                response.then_upgrade = Some(upgrade);
                return response;
            }
            Err(message) => return Response::error(400, message),
        },
        "/vm/migrate" if method == "GET" => Ok(json!(control.migration_status())),
        "/vm/migrate" => match serde_json::from_slice::<MigrateRequest>(&request.body) {
            Ok(r) => match control.migrate(&r.to) {
                Ok((report, end)) => {
                    let mut response = Response::ok(json!(report));
                    response.then_end = Some(end);
                    return response;
                }
                Err(e) => Err(e),
            },
            Err(e) => {
                return Response::error(
                    400,
                    format!("{e}; send {{\"to\": \"unix:PATH\" or \"tcp:HOST:PORT\"}}"),
                )
            }
        },
        "/devices/{id}/backend" => match swap_target(&request.body) {
            Ok(socket) => control.swap(id, &socket).map(|r| json!(r)),
            Err(message) => return Response::error(400, message),
        },
        other => unreachable!("route {other} is in ROUTES but not handled"),
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

/// The body of `PUT /vm/snapshot`: `{"dir": PATH, "then": "resume"|"stop"}`.
fn snapshot_request(body: &[u8]) -> Result<SnapshotRequest, String> {
    let request: SnapshotRequest = serde_json::from_slice(body)
        .map_err(|e| format!("{e}; send {{\"dir\": PATH, \"then\": \"resume\" or \"stop\"}}"))?;
    if request.dir.is_empty() {
        return Err("\"dir\" must be a non-empty path (the snapshot directory)".into());
    }
    Ok(request)
}

/// The body of `PUT /vm/upgrade`: empty, `{}` or `{"binary": PATH}`.
fn upgrade_request(body: &[u8]) -> Result<UpgradeRequest, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(UpgradeRequest::default());
    }
    let request: UpgradeRequest = serde_json::from_slice(body)
        .map_err(|e| format!("{e}; send {{}} or {{\"binary\": PATH}}"))?;
    if request.binary.as_deref() == Some("") {
        return Err("\"binary\" must be a non-empty path (a splitvisor binary)".into());
    }
    Ok(request)
}

/// The answer to a failed `PUT /vm/upgrade`.
pub fn upgrade_failed(error: &ControlError) -> Response {
    Response::error(status_of(error), crate::error_chain(error))
}

fn status_of(error: &ControlError) -> u16 {
    match error {
        // Started with --live-upgrade off: the VM's state, not the request, is the reason.
        ControlError::UpgradeRefused(e)
            if matches!(**e, crate::upgrade::UpgradeError::NoUpgrader) =>
        {
            409
        }
        ControlError::UpgradeRefused(_) => 400,
        ControlError::Busy => 409,
        ControlError::Upgrade(_) => 500,
        ControlError::SnapshotUnsupported(_) => 409,
        ControlError::Snapshot(_) => 500,
        ControlError::Migrate(e) => match **e {
            MigrateError::Wire(WireError::ParseAddress(_)) => 400,
            MigrateError::Send(SendError::Refused(_))
            | MigrateError::Unsupported(_)
            | MigrateError::Busy => 409,
            _ => 502,
        },
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
    fn versioned_and_legacy_paths_reach_the_same_endpoints() {
        for path in ["/vm", "/api/v1/vm", "/api/v1/vm/", "/vm/"] {
            assert!(serves("GET", path), "{path}");
            assert!(!serves("PUT", path), "{path}");
        }
        let (routes, id) = routes_for("/api/v1/devices/net1/backend");
        assert_eq!((routes.len(), id), (1, "net1"));
        assert!(serves("PUT", "/devices/disk0/backend"));
        assert!(!serves("PUT", "/devices//backend"));
        assert!(serves("GET", "/api/v1/ping") && serves("GET", "/api/v1/version"));
        assert!(!serves("GET", "/ping"), "new endpoints are versioned only");
        assert!(!serves("GET", "/api/v1"));
        assert!(!serves("GET", "/api/v1vm"));
    }

    #[test]
    fn snapshot_bodies_are_checked() {
        let r = snapshot_request(br#"{"dir": "/s", "then": "stop"}"#).unwrap();
        assert_eq!((r.dir.as_str(), r.then.as_str()), ("/s", "stop"));
        let r = snapshot_request(br#"{"dir": "/s"}"#).unwrap();
        assert_eq!(r.then.as_str(), "resume", "resume is the default");
        for (body, expect) in [
            (&b"{"[..], "EOF"),
            (br#"{"then": "stop"}"#, "missing field `dir`"),
            (br#"{"dir": ""}"#, "non-empty"),
            (
                br#"{"dir": "/s", "then": "pause"}"#,
                "unknown variant `pause`",
            ),
            (br#"{"dir": "/s", "x": 1}"#, "unknown field `x`"),
        ] {
            let err = snapshot_request(body).unwrap_err();
            assert!(err.contains(expect), "{err}");
        }
    }

    #[test]
    fn upgrade_bodies_are_checked() {
        assert_eq!(upgrade_request(b"").unwrap().binary, None);
        assert_eq!(upgrade_request(b"{}").unwrap().binary, None);
        let r = upgrade_request(br#"{"binary": "/usr/bin/splitvisor"}"#).unwrap();
        assert_eq!(r.binary.as_deref(), Some("/usr/bin/splitvisor"));
        for (body, expect) in [
            (&br#"{"binary": ""}"#[..], "non-empty"),
            (br#"{"bin": "/x"}"#, "unknown field `bin`"),
            (b"[", "EOF"),
        ] {
            let err = upgrade_request(body).unwrap_err();
            assert!(err.contains(expect), "{err}");
        }
        assert!(serves("PUT", "/vm/upgrade") && serves("PUT", "/api/v1/vm/upgrade"));
    }

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
