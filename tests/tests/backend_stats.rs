//! Live backend counters (issue 14, part 3): both daemons answer `GET /stats` on their
//! `--api-socket` while they serve a real guest, with counters that grow between two reads;
//! SIGUSR1 writes a STATS line to a serving daemon's log; under `splitvisor launch`,
//! `ctl metrics` shows the VMM's and every daemon's counters together.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use splitvisor_tests::api;
use splitvisor_tests::daemon::{bin, Daemon};
use splitvisor_tests::image;
use splitvisor_tests::launch::Launch;
use splitvisor_tests::vm::{ctl, require_kvm, serving_guest, RunningVm};
use splitvisor_tests::wait::poll_until;
use splitvisor_tests::workdir::{mode, Workdir};

/// Boot, daemons and handshakes; the guest prints its task's start within this.
const GUEST_START: Duration = Duration::from_secs(30);
/// How long counters may take to move (the guest does I/O all the time once started).
const PROGRESS: Duration = Duration::from_secs(20);
const VM_END: Duration = Duration::from_secs(60);

fn stats(socket: &Path) -> Value {
    api::get(socket, "/stats")
}

/// Polls `GET /stats` until `value` of it exceeds `above`; returns the answer.
fn stats_until_above(
    socket: &Path,
    what: &str,
    above: u64,
    value: impl Fn(&Value) -> u64,
) -> Value {
    poll_until(&format!("{what} to exceed {above}"), PROGRESS, || {
        let s = stats(socket);
        (value(&s) > above).then_some(s)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", stats(socket)))
}

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits");
    // SAFETY: kill takes no pointers; the pid is a daemon this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a counter"))
}

#[test]
fn blk_daemon_stats_grow_during_io_and_sigusr1_logs_them() {
    if !require_kvm("blk_daemon_stats_grow_during_io_and_sigusr1_logs_them") {
        return;
    }
    let dir = Workdir::new("stats-blk");
    let (image, socket, api_sock) = (
        dir.join("disk.img"),
        dir.join("blk.sock"),
        dir.join("blk.api"),
    );
    image::random(&image, 7, 4 << 20);
    let args: Vec<&OsStr> = vec![
        "--socket".as_ref(),
        socket.as_os_str(),
        "--image".as_ref(),
        image.as_os_str(),
        "--api-socket".as_ref(),
        api_sock.as_os_str(),
    ];
    let mut daemon =
        Daemon::start(&dir, "blk", &bin("splitvisor-blk"), &args, &api_sock).expect("blk");
    assert_eq!(mode(&api_sock), 0o600);
    let idle = stats(&api_sock);
    assert_eq!(
        (idle["daemon"].as_str(), idle["state"].as_str()),
        (Some("splitvisor-blk"), Some("waiting")),
        "{idle}"
    );
    assert_eq!(u(&idle["frontends"]), 0, "{idle}");
    assert_eq!(u(&idle["queues"][0]["requests"]), 0, "{idle}");

    let disk = format!("socket={}", socket.display());
    let vm = RunningVm::spawn(
        ["run", "--disk", &disk, "--cmdline", "blk-verify,seconds=20"],
        dir.path(),
        "vm",
    );
    vm.wait_stdout("running task `blk-verify", GUEST_START);
    let requests = |s: &Value| u(&s["queues"][0]["requests"]);
    let first = stats_until_above(&api_sock, "requests", 0, requests);
    assert_eq!(
        (first["state"].as_str(), u(&first["frontends"])),
        (Some("connected"), 1),
        "{first}"
    );
    let second = stats_until_above(&api_sock, "requests", requests(&first), requests);
    for counter in ["kicks", "read_bytes", "write_bytes"] {
        let (a, b) = (
            u(&first["queues"][0][counter]),
            u(&second["queues"][0][counter]),
        );
        assert!(b >= a, "{counter} went back: {first} then {second}");
    }
    assert!(
        u(&second["uptime_ms"]) > u(&first["uptime_ms"]) || requests(&second) > requests(&first)
    );

    // SIGUSR1 while the guest is still served: a STATS line, and the daemon goes on.
    let log_before = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        !log_before.contains("STATS "),
        "no STATS before the signal:\n{log_before}"
    );
    signal(daemon.pid(), libc::SIGUSR1);
    let line = poll_until("a STATS line after SIGUSR1", PROGRESS, || {
        let log = std::fs::read_to_string(&daemon.log).ok()?;
        log.lines()
            .find(|l| l.starts_with("STATS "))
            .map(str::to_string)
    })
    .unwrap();
    let dumped: Value = serde_json::from_str(&line["STATS ".len()..]).expect("STATS is JSON");
    assert!(
        u(&dumped["queues"][0]["requests"]) >= requests(&first),
        "{line}"
    );
    assert_eq!(
        stats(&api_sock)["state"],
        "connected",
        "still serving after SIGUSR1"
    );

    let run = vm.wait(VM_END);
    run.assert_passed();
    let after = poll_until("the daemon to see the VMM leave", PROGRESS, || {
        let s = stats(&api_sock);
        (s["state"] == "waiting").then_some(s)
    })
    .unwrap();
    assert_eq!(u(&after["frontends"]), 1, "{after}");
    daemon.stop().expect("blk stops");
    assert!(!api_sock.exists(), "the stats socket is removed at exit");
}

#[test]
fn net_daemon_stats_count_a_ping_between_two_guests_and_sigusr1_logs_them() {
    if !require_kvm("net_daemon_stats_count_a_ping_between_two_guests_and_sigusr1_logs_them") {
        return;
    }
    let dir = Workdir::new("stats-net");
    let (a, b, api_sock) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("net.api"));
    let args: Vec<&OsStr> = vec![
        "--switch".as_ref(),
        "--socket".as_ref(),
        a.as_os_str(),
        "--socket".as_ref(),
        b.as_os_str(),
        "--api-socket".as_ref(),
        api_sock.as_os_str(),
    ];
    let mut switch =
        Daemon::start(&dir, "switch", &bin("splitvisor-net"), &args, &api_sock).expect("switch");
    assert_eq!(mode(&api_sock), 0o600);
    let net_b = format!("socket={}", b.display());
    let server = serving_guest(dir.path(), "vm-b", &net_b, "10.0.0.2", 20, GUEST_START);
    let port_b = |s: &Value| s["ports"][1].clone();
    let before = stats(&api_sock);
    assert_eq!(before["daemon"], "splitvisor-net", "{before}");
    assert_eq!(port_b(&before)["state"], "connected", "{before}");
    assert_eq!(before["ports"][0]["state"], "waiting", "{before}");

    let net_a = format!("socket={}", a.display());
    let pinger = RunningVm::spawn(
        [
            "run",
            "--net",
            &net_a,
            "--cmdline",
            "ping=10.0.0.2,count=5 ip=10.0.0.1/24",
        ],
        dir.path(),
        "vm-a",
    );
    let tx = |s: &Value| u(&s["ports"][1]["queues"][0]["tx_frames"]);
    let during = stats_until_above(&api_sock, "the server's sent frames", tx(&before), tx);
    assert_eq!(during["state"], "connected", "{during}");
    let ping = pinger.wait(VM_END);
    assert_eq!(ping.assert_passed()["received"], 5, "{ping}");
    let after = stats(&api_sock);
    let q = |s: &Value, c: &str| u(&s["ports"][1]["queues"][0][c]);
    for counter in ["rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "tx_kicks"] {
        assert!(
            q(&after, counter) > q(&before, counter),
            "{counter} did not grow: {before} then {after}"
        );
    }
    assert!(
        after["ports"][1]["queues"][0]["drops"].is_object(),
        "{after}"
    );

    signal(switch.pid(), libc::SIGUSR1);
    let lines = poll_until("STATS lines after SIGUSR1", PROGRESS, || {
        let log = std::fs::read_to_string(&switch.log).ok()?;
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.starts_with("STATS "))
            .map(str::to_string)
            .collect();
        // One per port; port a's frontend left (its STATS line), so look for b's too.
        lines
            .iter()
            .any(|l| l.contains(b.to_str().unwrap()))
            .then_some(lines)
    })
    .unwrap();
    assert!(
        lines
            .iter()
            .all(|l| serde_json::from_str::<Value>(&l[6..]).is_ok()),
        "{lines:?}"
    );
    assert_eq!(
        stats(&api_sock)["ports"][1]["state"],
        "connected",
        "still serving"
    );
    server.wait(VM_END).assert_passed();
    switch.stop().expect("switch stops");
    assert!(!api_sock.exists(), "the stats socket is removed at exit");
}

#[test]
fn ctl_metrics_under_launch_shows_every_daemon_s_counters() {
    if !require_kvm("ctl_metrics_under_launch_shows_every_daemon_s_counters") {
        return;
    }
    let workdir = Workdir::new("stats-launch");
    let image = workdir.join("disk.img");
    image::random(&image, 9, 4 << 20);
    let vm_api = workdir.join("vm.api");
    let disk = format!("image={}", image.display());
    let launch = Launch::spawn(
        [
            "--api-socket",
            vm_api.to_str().unwrap(),
            "--disk",
            &disk,
            "--net",
            "switch=lan",
            "--cmdline",
            "blk-verify,seconds=20",
        ],
        &workdir,
        "launch",
    );
    launch.wait_for_stdout("running task `blk-verify", GUEST_START);
    for name in ["disk0", "switch-lan"] {
        let sock = launch.runtime_dir().join(format!("{name}.api.sock"));
        assert_eq!(mode(&sock), 0o600, "{}", sock.display());
    }
    // Both sides count on their own schedule (the daemon when it serves a request, the VMM
    // when it sees the used ring move): wait until both have counted.
    let metrics = poll_until(
        "the disk daemon and the VMM to count requests in ctl metrics",
        PROGRESS,
        || {
            let (code, out, _) = ctl(&vm_api, &["--json", "metrics"]);
            let m: Value = serde_json::from_str(&out).ok()?;
            let requests =
                m["backend_stats"]["disk0"]["stats"]["queues"][0]["requests"].as_u64()?;
            let completed = m["devices"]["disk0"]["completed_requests"].as_u64()?;
            (code == 0 && requests > 0 && completed > 0).then_some(m)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", ctl(&vm_api, &["--json", "metrics"]).1));
    let backends = &metrics["backend_stats"];
    assert_eq!(
        backends["disk0"]["stats"]["daemon"], "splitvisor-blk",
        "{metrics}"
    );
    assert_eq!(
        backends["disk0"]["stats"]["state"], "connected",
        "{metrics}"
    );
    assert_eq!(
        backends["net0"]["stats"]["daemon"], "splitvisor-net",
        "{metrics}"
    );
    assert_eq!(backends["net0"]["stats"]["state"], "connected", "{metrics}");
    assert!(
        backends["net0"]["stats"]["ports"][0]["queues"][0]["drops"].is_object(),
        "{metrics}"
    );
    assert!(
        metrics["devices"]["disk0"]["completed_requests"].as_u64() > Some(0),
        "{metrics}"
    );
    let (code, text, err) = ctl(&vm_api, &["metrics"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("backend disk0: splitvisor-blk connected, 1 frontend(s) served"),
        "{text}"
    );
    assert!(
        text.contains("backend net0: splitvisor-net connected"),
        "{text}"
    );
    assert!(text.contains("drops: none"), "{text}");
    let dir = launch.runtime_dir().to_path_buf();
    let run = launch.wait(VM_END);
    assert_eq!(run.run.code(), Some(0), "{run}");
    run.assert_nothing_left();
    assert!(
        !dir.exists(),
        "the runtime directory, stats sockets included, is removed\n{run}"
    );
}
