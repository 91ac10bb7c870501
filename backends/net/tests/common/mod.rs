//! This crate's daemon binary bound to the shared test harness (`splitvisor_tests`: the daemon
//! process, the test vhost-user frontend).
// Each test file compiles this module and uses part of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use splitvisor_tests::daemon::Daemon;
use splitvisor_tests::workdir::Workdir;

/// `splitvisor-net ARGS...` (the binary cargo built for these tests), logging to
/// `DIR/daemon.log`, waited for until every socket in `sockets` exists.
pub fn start(dir: &Workdir, args: &[String], sockets: &[&Path]) -> Daemon {
    let bin = Path::new(env!("CARGO_BIN_EXE_splitvisor-net"));
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    Daemon::start_all(dir, "daemon", bin, &args, sockets)
        .unwrap_or_else(|e| panic!("splitvisor-net: {e}"))
}

/// `splitvisor-net --switch --socket S...` with one port per socket and `extra` flags, waited
/// for until every socket exists.
pub fn start_switch(dir: &Workdir, sockets: &[&Path], extra: &[&str]) -> Daemon {
    let mut args: Vec<String> = vec!["--switch".into()];
    for socket in sockets {
        args.push("--socket".into());
        args.push(socket.display().to_string());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    start(dir, &args, sockets)
}

/// `splitvisor-net --tap PREFIX<pid> --socket DIR/net.sock`, waited for: the daemon, its socket
/// and the TAP's name (unique per test process; at most 15 characters).
pub fn start_tap(dir: &Workdir, prefix: &str) -> (Daemon, PathBuf, String) {
    let sock = dir.join("net.sock");
    let tap = format!("{prefix}{}", std::process::id() % 100_000);
    let args: Vec<String> = vec![
        "--tap".into(),
        tap.clone(),
        "--socket".into(),
        sock.display().to_string(),
    ];
    (start(dir, &args, &[&sock]), sock, tap)
}

/// `ip link set dev TAP up`.
pub fn link_up(tap: &str) {
    let up = Command::new("ip")
        .args(["link", "set", "dev", tap, "up"])
        .status()
        .expect("run ip");
    assert!(up.success(), "ip link set dev {tap} up failed");
}
