//! `splitvisor ctl NAME migrate ADDR`: asks the VM to migrate (`PUT /vm/migrate`) and shows
//! its progress (`GET /vm/migrate`) on stderr while it waits.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use splitvisor_vmm::api::types::{MigrateReport, MigrateRequest, MigrationStatus, API_PREFIX};

use super::CtlError;

/// Prints `GET /vm/migrate` on one stderr line every 250 ms until `done`.
fn show_progress(socket: &Path, done: &AtomicBool) {
    let path = format!("{API_PREFIX}/vm/migrate");
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let status: Result<MigrationStatus, _> =
            super::request_within(socket, "GET", &path, None, Duration::from_secs(2));
        if let (Ok(s), false) = (status, done.load(Ordering::Relaxed)) {
            if s.migrating {
                eprint!(
                    "\rmigrating to {}: {}, {} MiB sent, {} MiB/s ",
                    s.to.unwrap_or_default(),
                    s.phase.unwrap_or_default(),
                    s.sent_bytes >> 20,
                    s.rate_mib_s
                );
            }
        }
    }
}

/// `splitvisor ctl NAME migrate ADDR`: asks the VMM on `socket` to migrate its VM, showing on
/// stderr how long it has been at it until the answer, then the figures.
pub fn ctl_migrate(socket: &Path, to: &str, json: bool) -> Result<String, CtlError> {
    let to = match to.strip_prefix("unix:") {
        // The VMM resolves the path itself, so a relative one must not depend on its cwd.
        Some(path) => format!(
            "unix:{}",
            std::path::absolute(path)
                .unwrap_or_else(|_| path.into())
                .display()
        ),
        None => to.to_string(),
    };
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (done, socket) = (done.clone(), socket.to_path_buf());
        std::thread::spawn(move || show_progress(&socket, &done))
    };
    let body = json!(MigrateRequest { to });
    let answer: Result<MigrateReport, CtlError> = super::request(
        socket,
        "PUT",
        &format!("{API_PREFIX}/vm/migrate"),
        Some(&body),
    );
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let report = answer?;
    eprintln!(
        "\rsent {} MiB of {} MiB in {} ms ({} MiB/s), VM paused for {} ms",
        report.sent_bytes >> 20,
        report.memory_bytes >> 20,
        report.elapsed_ms,
        report.rate_mib_s,
        report.downtime_ms
    );
    super::show(json, &report, |r| {
        format!("VM migrated to {}; it runs there now", r.to)
    })
}
