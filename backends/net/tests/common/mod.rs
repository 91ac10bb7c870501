//! This crate's daemon binary bound to the shared test harness (`splitvisor_tests`: the daemon
//! process, the test vhost-user frontend).

use std::ffi::OsStr;
use std::path::Path;

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
