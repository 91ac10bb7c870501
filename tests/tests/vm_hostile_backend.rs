//! The VMM against hostile vhost-user backends, under real KVM: backends that accept and stay
//! silent, send 5 bytes or half a reply, or relay a real daemon until a chosen message and
//! then go silent (at activation, during a swap). Every wait must end with an error naming the
//! socket, the message and the deadline; SIGTERM and `PUT /vm/shutdown` must end the VM while
//! a device waits; the API must answer meanwhile, also with slow clients holding connections;
//! the swap lock must come free so that a later swap succeeds and the guest's verification
//! passes.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use splitvisor_tests::api::{self, completed_requests, request};
use splitvisor_tests::daemon::Daemon;
use splitvisor_tests::hostile::{request as req, Behaviour, FakeBackend, StallingProxy};
use splitvisor_tests::image;
use splitvisor_tests::vm::{require_kvm, run_splitvisor, RunningVm, VM_TIMEOUT};
use splitvisor_tests::wait::poll_until;
use splitvisor_tests::workdir::Workdir;

/// The VMM's per-message deadline (`vhost_user::deadline::MESSAGE_TIMEOUT`).
const MESSAGE_DEADLINE: Duration = Duration::from_secs(5);
/// Loaded CI machines: a bound is this many times what the VMM should need.
const SLACK: u32 = 3;

fn swap(api: &Path, socket: &Path) -> api::Answer {
    let body = serde_json::json!({ "socket": socket }).to_string();
    request(api, "PUT", "/devices/disk0/backend", Some(&body))
}

fn error_of(answer: &api::Answer) -> String {
    answer.body["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `splitvisor run` against a backend that accepts and then says nothing useful ends with
/// an error naming the socket, the unanswered message and the deadline - in bounded time.
/// A daemon that already serves a VMM closes a second frontend's connection at once: the VMM
/// says the backend is busy, naming the socket, instead of a generic handshake failure.
#[test]
fn a_backend_that_hangs_up_at_once_is_reported_busy() {
    if !require_kvm("a_backend_that_hangs_up_at_once_is_reported_busy") {
        return;
    }
    let dir = Workdir::new("busy");
    let socket = dir.join("busy.sock");
    let fake = FakeBackend::spawn(&socket, Behaviour::CloseAtOnce);
    let run = run_splitvisor(
        [
            "run",
            "--disk",
            &format!("socket={}", socket.display()),
            "--connect-timeout",
            "1",
            "--cmdline",
            "exit=0",
        ],
        (Duration::from_secs(1) + MESSAGE_DEADLINE) * SLACK,
    );
    assert_eq!(run.code(), Some(1), "{run}");
    for needle in [socket.to_str().unwrap(), "is busy", "one VMM at a time"] {
        assert!(run.stderr.contains(needle), "no {needle:?}\n{run}");
    }
    // Turned away once, then tried again for the VMM's short busy grace (a daemon still
    // letting go of the VMM's own previous connection takes it within milliseconds).
    assert!(fake.accepted() >= 1, "{run}");
}

/// The same against a real splitvisor-blk serving another VM: the daemon closes the second
/// VMM's connection at once (it used to leave it unanswered in the listen backlog until the
/// message deadline said "no answer"), the second VMM says "busy", and the first VM's run is
/// unharmed.
#[test]
fn a_daemon_serving_another_vm_turns_the_second_away_as_busy() {
    if !require_kvm("a_daemon_serving_another_vm_turns_the_second_away_as_busy") {
        return;
    }
    let dir = Workdir::new("busy-daemon");
    let img = image::zeroed(dir.join("disk.img"), 8 << 20);
    let daemon = Daemon::shared_blk(&dir, "blk", &img);
    let disk = format!("socket={}", daemon.socket.display());
    let first = RunningVm::spawn(
        ["run", "--disk", &disk, "--cmdline", "blk-verify,seconds=10"],
        dir.path(),
        "first",
    );
    let daemon_log = || daemon.log_text();
    poll_until("the daemon to serve the first VM", VM_TIMEOUT, || {
        daemon_log().contains("frontend connected").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon_log()));
    let second = run_splitvisor(
        [
            "run",
            "--disk",
            &disk,
            "--connect-timeout",
            "1",
            "--cmdline",
            "exit=0",
        ],
        (Duration::from_secs(1) + MESSAGE_DEADLINE) * SLACK,
    );
    // "is busy" is the hang-up path; a daemon leaving it unanswered would have given the
    // message deadline's "did not answer" instead.
    assert_eq!(second.code(), Some(1), "{second}");
    for needle in [daemon.socket.to_str().unwrap(), "is busy"] {
        assert!(second.stderr.contains(needle), "no {needle:?}\n{second}");
    }
    assert!(daemon_log().contains("turned away"), "{}", daemon_log());
    first.wait(VM_TIMEOUT).assert_passed();
}

#[test]
fn silent_backends_end_the_run_with_an_error() {
    if !require_kvm("silent_backends_end_the_run_with_an_error") {
        return;
    }
    let dir = Workdir::new("silent");
    let connect_timeout = Duration::from_secs(1);
    for (name, behaviour) in [
        ("silent", Behaviour::Silent),
        ("five", Behaviour::Send(vec![1, 0, 0, 0, 5])),
        ("half", Behaviour::HalfReply),
    ] {
        let socket = dir.join(&format!("{name}.sock"));
        let fake = FakeBackend::spawn(&socket, behaviour);
        let bound = (connect_timeout + MESSAGE_DEADLINE) * SLACK;
        let started = Instant::now();
        let run = run_splitvisor(
            [
                "run",
                "--disk",
                &format!("socket={}", socket.display()),
                "--connect-timeout",
                "1",
                "--cmdline",
                "exit=0",
            ],
            bound,
        );
        let took = started.elapsed();
        assert_eq!(run.code(), Some(1), "{name}: {run}");
        for needle in [socket.to_str().unwrap(), "GET_FEATURES", "within 5s"] {
            assert!(run.stderr.contains(needle), "{name}: no {needle:?}\n{run}");
        }
        assert!(
            !run.stderr.contains("waiting for the backend"),
            "{name}: the backend was there at once\n{run}"
        );
        assert!(took >= MESSAGE_DEADLINE, "{name}: {took:?}: the deadline");
        assert_eq!(fake.accepted(), 1, "{name}");
    }
}

/// A backend that is not there yet is waited for, and the VMM says so once.
#[test]
fn waiting_for_a_late_backend_is_announced_once() {
    if !require_kvm("waiting_for_a_late_backend_is_announced_once") {
        return;
    }
    let dir = Workdir::new("late");
    let img = image::zeroed(dir.join("disk.img"), 8 << 20);
    let socket = dir.join("blk.sock");
    let vm = RunningVm::spawn(
        [
            "run",
            "--disk",
            &format!("socket={}", socket.display()),
            "--connect-timeout",
            "60",
            "--cmdline",
            "blk-verify,seconds=1",
        ],
        dir.path(),
        "vm",
    );
    let announcement = format!(
        "waiting for the backend on {} (up to 60s)",
        socket.display()
    );
    poll_until("the VMM to say it waits", Duration::from_secs(30), || {
        vm.stderr_so_far().contains(&announcement).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.stderr_so_far()));
    let daemon = Daemon::shared_blk(&dir, "blk", &img);
    assert_eq!(daemon.socket, socket);
    let run = vm.wait(VM_TIMEOUT);
    run.assert_passed();
    assert_eq!(
        run.stderr.matches("waiting for the backend").count(),
        1,
        "{run}"
    );
}

/// A VM on a real daemon behind a proxy that swallows GET_INFLIGHT_FD (the backend offers
/// INFLIGHT_SHMFD and never answers it): the vCPU stalls in the guest's DRIVER_OK write.
/// Returns once the stall began.
fn stalled_activation(dir: &Workdir) -> (RunningVm, StallingProxy, Daemon, PathBuf) {
    let img = image::zeroed(dir.join("disk.img"), 8 << 20);
    let daemon = Daemon::shared_blk(dir, "blk", &img);
    let proxy = StallingProxy::spawn(
        &dir.join("proxy.sock"),
        &daemon.socket,
        req::GET_INFLIGHT_FD,
        1,
    );
    let api = dir.join("api.sock");
    let vm = RunningVm::spawn(
        [
            "run",
            "--disk",
            &format!("socket={}", proxy.socket.display()),
            "--api-socket",
            api.to_str().unwrap(),
            "--cmdline",
            "blk-verify,seconds=30",
        ],
        dir.path(),
        "vm",
    );
    poll_until("the activation to stall", Duration::from_secs(30), || {
        (proxy.stalled() == 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.stderr_so_far()));
    (vm, proxy, daemon, api)
}

/// While the activation stalls, `GET /vm` answers (the device is reported busy) and SIGTERM
/// ends the VM at once with status 130, not after the message deadline.
#[test]
fn sigterm_ends_a_vm_whose_backend_stalls_at_activation() {
    if !require_kvm("sigterm_ends_a_vm_whose_backend_stalls_at_activation") {
        return;
    }
    let dir = Workdir::new("actterm");
    let (vm, _proxy, _daemon, api) = stalled_activation(&dir);
    let status = api::get(&api, "/vm");
    assert_eq!(status["devices"][0]["busy"], true, "{status}");
    let _ = api::get(&api, "/metrics");
    let started = Instant::now();
    vm.signal(libc::SIGTERM);
    let run = vm.wait(VM_TIMEOUT);
    assert_eq!(run.code(), Some(130), "{run}");
    assert!(run.stderr.contains("interrupted"), "{run}");
    assert!(
        started.elapsed() < MESSAGE_DEADLINE,
        "SIGTERM took {:?}\n{run}",
        started.elapsed()
    );
}

/// `PUT /vm/shutdown` during the stall ends the VM at once, with status 130.
#[test]
fn api_shutdown_ends_a_vm_whose_backend_stalls_at_activation() {
    if !require_kvm("api_shutdown_ends_a_vm_whose_backend_stalls_at_activation") {
        return;
    }
    let dir = Workdir::new("actstop");
    let (vm, _proxy, _daemon, api) = stalled_activation(&dir);
    let started = Instant::now();
    let stop = request(&api, "PUT", "/vm/shutdown", None);
    assert_eq!(stop.status, 200, "{:?}", stop.body);
    let run = vm.wait(VM_TIMEOUT);
    assert_eq!(run.code(), Some(130), "{run}");
    assert!(run.stderr.contains("PUT /vm/shutdown"), "{run}");
    assert!(
        started.elapsed() < MESSAGE_DEADLINE,
        "shutdown took {:?}\n{run}",
        started.elapsed()
    );
}

/// Left alone, the stalled activation fails after the deadline, with a message naming the
/// socket, GET_INFLIGHT_FD and the deadline.
#[test]
fn a_stalled_activation_fails_after_the_deadline() {
    if !require_kvm("a_stalled_activation_fails_after_the_deadline") {
        return;
    }
    let dir = Workdir::new("acttime");
    let (vm, proxy, _daemon, _api) = stalled_activation(&dir);
    let failed = poll_until("the activation to fail", MESSAGE_DEADLINE * SLACK, || {
        let stderr = vm.stderr_so_far();
        stderr.contains("activation failed").then_some(stderr)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.stderr_so_far()));
    for needle in [
        proxy.socket.to_str().unwrap(),
        "GET_INFLIGHT_FD",
        "within 5s",
    ] {
        assert!(failed.contains(needle), "no {needle:?}\n{failed}");
    }
    vm.signal(libc::SIGTERM);
    let run = vm.wait(VM_TIMEOUT);
    assert!(run.code().is_some(), "{run}");
}

/// Swaps that cannot complete fail within the deadline, name what went wrong, leave the old
/// backend serving and release the swap lock; the API answers throughout (also with slow
/// clients holding connections); a later swap to a good daemon succeeds and the guest's
/// verification passes.
#[test]
fn stalled_swaps_fail_and_leave_the_device_serving() {
    if !require_kvm("stalled_swaps_fail_and_leave_the_device_serving") {
        return;
    }
    let dir = Workdir::new("swapstall");
    let img = image::zeroed(dir.join("disk.img"), 8 << 20);
    let a = Daemon::shared_blk(&dir, "a", &img);
    let b = Daemon::shared_blk(&dir, "b", &img);
    let c = Daemon::shared_blk(&dir, "c", &img);
    let proxy = StallingProxy::spawn(&dir.join("p.sock"), &c.socket, req::SET_MEM_TABLE, 1);
    let silent = FakeBackend::spawn(&dir.join("q.sock"), Behaviour::Silent);
    let api = dir.join("api.sock");
    let vm = RunningVm::spawn(
        [
            "run",
            "--disk",
            &format!("socket={}", a.socket.display()),
            "--api-socket",
            api.to_str().unwrap(),
            "--cmdline",
            "blk-verify,seconds=20",
        ],
        dir.path(),
        "vm",
    );
    poll_until(
        "the guest to bring its disk up",
        Duration::from_secs(30),
        || (api.exists() && api::get(&api, "/vm")["devices"][0]["driver_ok"] == true).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.stderr_so_far()));

    // The socket the device already uses: refused at once.
    let started = Instant::now();
    let same = swap(&api, &a.socket);
    assert_eq!(same.status, 409, "{:?}", same.body);
    assert!(error_of(&same).contains("already uses"), "{:?}", same.body);
    assert!(started.elapsed() < MESSAGE_DEADLINE, "refused at once");

    slow_clients_do_not_lock_out_a_request(&api);

    // A backend that passes the handshake and stalls on SET_MEM_TABLE.
    let started = Instant::now();
    let stalled_swap = {
        let (api, socket) = (api.clone(), proxy.socket.clone());
        std::thread::spawn(move || swap(&api, &socket))
    };
    poll_until("the swap to stall", Duration::from_secs(30), || {
        (proxy.stalled() == 1).then_some(())
    })
    .unwrap();
    let status = api::get(&api, "/vm");
    assert!(
        !stalled_swap.is_finished(),
        "GET /vm answered during the stall"
    );
    assert_eq!(status["devices"][0]["busy"], true, "{status}");
    let busy = swap(&api, &b.socket);
    assert_eq!(busy.status, 409, "one switch at a time: {:?}", busy.body);
    let failed = stalled_swap.join().unwrap();
    assert!(started.elapsed() < (MESSAGE_DEADLINE + Duration::from_secs(1)) * SLACK);
    assert_eq!(failed.status, 409, "{:?}", failed.body);
    let message = error_of(&failed);
    for needle in [
        proxy.socket.to_str().unwrap(),
        "SET_MEM_TABLE",
        "within 5s",
        "keeps its backend",
    ] {
        assert!(message.contains(needle), "no {needle:?} in {message}");
    }

    // A backend that accepts and never answers.
    let started = Instant::now();
    let silent_swap = swap(&api, &silent.socket);
    assert!(started.elapsed() < (MESSAGE_DEADLINE + Duration::from_secs(1)) * SLACK);
    assert_eq!(silent_swap.status, 502, "{:?}", silent_swap.body);
    let message = error_of(&silent_swap);
    for needle in [silent.socket.to_str().unwrap(), "GET_FEATURES", "within 5s"] {
        assert!(message.contains(needle), "no {needle:?} in {message}");
    }

    // The old backend still serves, and the lock is free: a good swap succeeds.
    let backend = api::get(&api, "/vm")["devices"][0]["backend"].clone();
    assert_eq!(backend["socket"], a.socket.to_str().unwrap(), "{backend}");
    let before = completed_requests(&api).unwrap_or(0);
    poll_until(
        "guest progress after the failed swaps",
        Duration::from_secs(10),
        || (completed_requests(&api).unwrap_or(0) > before).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.stdout_so_far()));
    let good = swap(&api, &b.socket);
    assert_eq!(good.status, 200, "{:?}", good.body);
    assert_eq!(good.body["swap"]["to"], b.socket.to_str().unwrap());

    let run = vm.wait(VM_TIMEOUT);
    let result = run.assert_passed();
    assert_eq!(result["io_errors"], 0, "{run}");
    assert_eq!(result["mismatched_sectors"], 0, "{run}");
}

/// Clients that connect and send part of a request hold connections; more of them than the
/// API has slots must not turn a well-formed request away, and one that trickles its request
/// byte by byte runs out of time as a whole (408), not per read.
fn slow_clients_do_not_lock_out_a_request(api: &Path) {
    let slow: Vec<UnixStream> = (0..20)
        .map(|_| {
            let mut s = UnixStream::connect(api).expect("connect a slow client");
            s.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    let answer = request(api, "GET", "/vm", None);
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    drop(slow);

    let trickler = {
        let api = api.to_path_buf();
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(&api).expect("connect the trickler");
            let started = Instant::now();
            for byte in b"GET /vm HTTP/1.1\r\nHost: x\r\nX-Slow: yes".iter().cycle() {
                // Far inside the per-read timeout, far outside the whole-request deadline.
                if s.write_all(&[*byte]).is_err() || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            let mut answer = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut answer);
            (answer, started.elapsed())
        })
    };
    let (answer, took) = trickler.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// The device's own backend goes silent on GET_VRING_BASE when a swap stops its rings: the
/// swap fails within the deadline naming it, the silent backend is treated as lost and, when
/// it comes back on its socket, recovered (with its inflight region); `GET /vm` answers all
/// along; then a swap to a good daemon succeeds and the guest's verification passes.
#[test]
fn a_backend_silent_on_get_vring_base_is_recovered() {
    if !require_kvm("a_backend_silent_on_get_vring_base_is_recovered") {
        return;
    }
    let dir = Workdir::new("vringbase");
    let img = image::zeroed(dir.join("disk.img"), 8 << 20);
    let a = Daemon::shared_blk(&dir, "a", &img);
    let b = Daemon::shared_blk(&dir, "b", &img);
    let proxy = StallingProxy::spawn(&dir.join("p.sock"), &a.socket, req::GET_VRING_BASE, 1);
    let api = dir.join("api.sock");
    let vm = RunningVm::spawn(
        [
            "run",
            "--disk",
            &format!("socket={}", proxy.socket.display()),
            "--reconnect-timeout",
            "30",
            "--api-socket",
            api.to_str().unwrap(),
            "--cmdline",
            "blk-verify,seconds=20",
        ],
        dir.path(),
        "vm",
    );
    poll_until(
        "the guest to bring its disk up",
        Duration::from_secs(30),
        || (api.exists() && api::get(&api, "/vm")["devices"][0]["driver_ok"] == true).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.stderr_so_far()));

    let started = Instant::now();
    let stalled_swap = {
        let (api, socket) = (api.clone(), b.socket.clone());
        std::thread::spawn(move || swap(&api, &socket))
    };
    poll_until("the old backend to stall", Duration::from_secs(30), || {
        (proxy.stalled() == 1).then_some(())
    })
    .unwrap();
    let status = api::get(&api, "/vm");
    assert!(
        !stalled_swap.is_finished(),
        "GET /vm answered during the stall"
    );
    assert_eq!(status["devices"][0]["busy"], true, "{status}");
    let failed = stalled_swap.join().unwrap();
    assert!(started.elapsed() < (MESSAGE_DEADLINE + Duration::from_secs(1)) * SLACK);
    assert_eq!(failed.status, 409, "{:?}", failed.body);
    let message = error_of(&failed);
    for needle in [
        proxy.socket.to_str().unwrap(),
        "GET_VRING_BASE",
        "within 5s",
        "lost",
    ] {
        assert!(message.contains(needle), "no {needle:?} in {message}");
    }

    // The proxy takes the reconnection and relays it to the same daemon: recovered.
    let backend = poll_until("the recovery", Duration::from_secs(30), || {
        let backend = api::get(&api, "/vm")["devices"][0]["backend"].clone();
        (backend["state"] == "connected" && backend["recoveries"] == 1).then_some(backend)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.stderr_so_far()));
    assert_eq!(
        backend["socket"],
        proxy.socket.to_str().unwrap(),
        "{backend}"
    );
    assert_eq!(backend["history"][0]["inflight_region"], true, "{backend}");

    let good = swap(&api, &b.socket);
    assert_eq!(good.status, 200, "{:?}", good.body);
    let run = vm.wait(VM_TIMEOUT);
    let result = run.assert_passed();
    assert_eq!(result["io_errors"], 0, "{run}");
    assert_eq!(result["mismatched_sectors"], 0, "{run}");
}
