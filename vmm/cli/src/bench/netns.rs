//! The network namespace `bench`'s `net-tap` path works in (with its TAP inside), driven
//! with iproute2's `ip`, and deleted when dropped.

use std::process::{Command, Stdio};

use super::BenchError;

/// A network namespace of the bench's own, deleted when dropped (with the TAP inside it).
pub struct Netns(String);

impl Netns {
    pub fn create(name: String) -> Result<Netns, BenchError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(BenchError::NotRoot);
        }
        ip(&["netns", "add", &name])?;
        Ok(Netns(name))
    }

    /// The namespace's name, for `ip netns exec NAME ...`.
    pub fn name(&self) -> &str {
        &self.0
    }

    pub fn ip(&self, args: &[&str]) -> Result<String, BenchError> {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// Runs `ip ARGS`; its stdout, or an error with its stderr.
fn ip(args: &[&str]) -> Result<String, BenchError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BenchError::Spawn {
            what: "ip (iproute2)".to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(BenchError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
