//! The network path end to end: guests with the project's virtio-net driver behind
//! `splitvisor-net`, talking to each other through its switch and to Linux's own network stack
//! through a TAP inside a network namespace of the test's own.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use splitvisor_tests::daemon::{bin, Daemon};
use splitvisor_tests::netns::{NetTools, Netns};
use splitvisor_tests::vm::{require_kvm, run_splitvisor, serving_guest, RunningVm, VM_TIMEOUT};
use splitvisor_tests::wait::poll_until;
use splitvisor_tests::workdir::Workdir;

const GUEST_READY: Duration = Duration::from_secs(30);

#[test]
fn two_vms_ping_each_other_through_the_switch() {
    if !require_kvm("two_vms_ping_each_other_through_the_switch") {
        return;
    }
    let dir = Workdir::new("net-sw");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut switch = Daemon::switch(&dir, &[&a, &b]);
    let net_b = format!("socket={}", b.display());
    let server = serving_guest(dir.path(), "vm-b", &net_b, "10.0.0.2", 20, GUEST_READY);

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
    let ping = pinger.wait(Duration::from_secs(60));
    let result = ping.assert_passed();
    assert_eq!(result["received"], 5, "{ping}");

    let serve = server.wait(Duration::from_secs(60));
    let result = serve.assert_passed();
    assert!(result["pings_answered"].as_u64() >= Some(5), "{serve}");
    switch.stop().expect("switch stops");
}

/// A TAP owned by `splitvisor-net --tap` inside a namespace of the test's own, up, with
/// 10.0.0.1/24 and an MTU that takes the stream's 1500-byte UDP payloads (1528-byte packets).
/// The daemon stops before the namespace goes (field order), taking the TAP with it.
struct TapNet {
    daemon: Daemon,
    socket: PathBuf,
    tap: String,
    ns: Netns,
}

impl TapNet {
    fn start(dir: &Workdir) -> TapNet {
        // Unique per test: tests of one binary run in parallel in one process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let tools = NetTools::find().unwrap_or_else(|missing| panic!("{}", missing.join("; ")));
        let ns = Netns::add(&tools, &format!("svt{pid}-{n}")).expect("ip netns add");
        // Interface names have at most 15 characters.
        let tap = format!("svtap{}-{n}", pid % 100_000);
        let socket = dir.join("tap.sock");
        let daemon = Self::start_daemon(dir, "tap", &ns, &tap, &socket);
        TapNet {
            daemon,
            socket,
            tap,
            ns,
        }
    }

    /// `start`, but with a TAP created persistent before the daemon: it and its packet
    /// counters outlive a killed daemon, and every new daemon attaches to it
    /// (`restart_keeping_tap`).
    fn start_persistent(dir: &Workdir) -> TapNet {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let tools = NetTools::find().unwrap_or_else(|missing| panic!("{}", missing.join("; ")));
        let ns = Netns::add(&tools, &format!("svp{pid}-{n}")).expect("ip netns add");
        let tap = format!("svptap{}-{n}", pid % 10_000);
        ns.run(&[
            "ip", "tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr",
        ])
        .expect("ip tuntap add");
        let socket = dir.join("tap.sock");
        let daemon = Self::start_daemon(dir, "tap", &ns, &tap, &socket);
        TapNet {
            daemon,
            socket,
            tap,
            ns,
        }
    }

    /// Kills the daemon with SIGKILL and starts a new one on the same socket and persistent
    /// TAP (which keeps its address and counters); returns once the new socket exists.
    fn restart_keeping_tap(&mut self, dir: &Workdir, name: &str) {
        self.daemon.kill().expect("kill the backend");
        let _ = std::fs::remove_file(&self.socket);
        self.daemon = Self::spawn_daemon(dir, name, &self.ns, &self.tap, &self.socket);
    }

    /// Starts `splitvisor-net --tap` inside the namespace, so its TAP (and all test traffic)
    /// lives there, and gives the TAP its address once the daemon has created it.
    fn start_daemon(dir: &Workdir, name: &str, ns: &Netns, tap: &str, socket: &Path) -> Daemon {
        let daemon = Self::spawn_daemon(dir, name, ns, tap, socket);
        // The socket is bound before the TAP is opened: wait for the TAP too.
        poll_until("the TAP device", Duration::from_secs(10), || {
            ns.output(&["ip", "link", "show", "dev", tap])
                .expect("ip netns exec")
                .status
                .success()
                .then_some(())
        })
        .expect("TAP created by the daemon");
        for cmd in [
            vec!["ip", "addr", "add", "10.0.0.1/24", "dev", tap],
            vec!["ip", "link", "set", "dev", tap, "mtu", "1600", "up"],
        ] {
            let out = ns.output(&cmd).expect("ip netns exec");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        daemon
    }

    /// Starts `splitvisor-net --tap` inside the namespace; returns once its socket exists.
    fn spawn_daemon(dir: &Workdir, name: &str, ns: &Netns, tap: &str, socket: &Path) -> Daemon {
        let bin = bin("splitvisor-net");
        let mut daemon_args = ns.exec_args(&bin);
        daemon_args.extend::<[&OsStr; 4]>([
            "--socket".as_ref(),
            socket.as_os_str(),
            "--tap".as_ref(),
            tap.as_ref(),
        ]);
        Daemon::start(dir, name, ns.ip(), &daemon_args, socket).expect("daemon")
    }

    /// Kills the daemon as a crash would (its TAP goes with it) and starts a new one on the
    /// same socket and TAP name.
    fn crash_and_restart(&mut self, dir: &Workdir) {
        self.daemon.kill().expect("kill the backend");
        let _ = std::fs::remove_file(&self.socket);
        self.daemon = Self::start_daemon(dir, "tap-restarted", &self.ns, &self.tap, &self.socket);
    }

    /// Packets the kernel received on the TAP: the frames the backend wrote into it.
    fn rx_packets(&self) -> u64 {
        let out = self
            .ns
            .output(&["ip", "-s", "-j", "link", "show", "dev", &self.tap])
            .expect("ip netns exec");
        let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ip -s -j link: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        links[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("no rx packet count in {links}"))
    }
}

#[test]
fn linux_pings_and_udp_echoes_the_guest_through_a_tap() {
    if !require_kvm("linux_pings_and_udp_echoes_the_guest_through_a_tap") {
        return;
    }
    let dir = Workdir::new("net-tap");
    let tap = TapNet::start(&dir);
    let (ns, socket) = (&tap.ns, &tap.socket);
    let net = format!("socket={}", socket.display());
    let guest = serving_guest(dir.path(), "vm", &net, "10.0.0.2", 15, GUEST_READY);

    let ping = ns
        .output(&["ping", "-c", "5", "-W", "2", "10.0.0.2"])
        .expect("ip netns exec");
    let ping_out = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success(),
        "ping failed:\n{ping_out}\n{}",
        guest.stdout_so_far()
    );
    assert!(ping_out.contains("5 received"), "{ping_out}");

    // A UDP datagram to the guest's echo port comes back byte-identical.
    let payload = "splitvisor-udp-echo-0123456789";
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\n\
         s.sendto(b'{payload}',('10.0.0.2',7))\nd,_=s.recvfrom(2048)\nsys.stdout.write(d.decode())"
    );
    // Debian's own Python (python3-minimal, installed by .ci/install-deps.sh).
    let echo = ns
        .output(&["/usr/bin/python3", "-c", &script])
        .expect("ip netns exec");
    assert_eq!(
        String::from_utf8_lossy(&echo.stdout),
        payload,
        "{}",
        String::from_utf8_lossy(&echo.stderr)
    );

    let serve = guest.wait(Duration::from_secs(60));
    let result = serve.assert_passed();
    assert!(result["pings_answered"].as_u64() >= Some(5), "{serve}");
    assert!(result["udp_echoed"].as_u64() >= Some(1), "{serve}");
    let mut tap = tap;
    tap.daemon.stop().expect("daemon stops");
}

/// Most ARP requests a `bench=net,dir=tx` guest sends while resolving its peer (one per 0.5 s,
/// 20 tries: the guest's ARP_TRIES).
const ARP_REQUESTS_MAX: u64 = 20;

#[test]
fn guest_udp_stream_to_a_tap_matches_the_tap_counters() {
    if !require_kvm("guest_udp_stream_to_a_tap_matches_the_tap_counters") {
        return;
    }
    let dir = Workdir::new("net-stream-tap");
    let mut tap = TapNet::start(&dir);
    let before = tap.rx_packets();
    let net = format!("socket={}", tap.socket.display());
    let run = run_splitvisor(
        [
            "run",
            "--prefault",
            "--net",
            &net,
            "--cmdline",
            "bench=net,dir=tx,peer=10.0.0.1,size=64,seconds=2 ip=10.0.0.2/24",
        ],
        VM_TIMEOUT,
    );
    let result = run.assert_passed();
    let delta = tap.rx_packets() - before;
    let sent = result["sent"].as_u64().expect("sent");
    let tx_frames = result["tx_frames"].as_u64().expect("tx_frames");
    assert!(
        sent > 1000,
        "a 2 s stream sends more than 1000 datagrams\n{run}"
    );
    assert_eq!(result["unconfirmed"], 0, "{run}");
    // Every frame the guest handed to the device reached the kernel: the TAP saw exactly the
    // guest's TX frames. Those are the stream's datagrams plus the frames the stack sent on its
    // own (ARP requests while resolving the peer, ARP/echo replies to Linux): that is the
    // allowance between the TAP's count and `sent`.
    assert_eq!(delta, tx_frames, "TAP rx packets vs guest tx_frames\n{run}");
    let own = ARP_REQUESTS_MAX
        + result["arp_replies"].as_u64().unwrap_or(0)
        + result["pings_answered"].as_u64().unwrap_or(0)
        + result["udp_echoed"].as_u64().unwrap_or(0);
    assert!(
        delta >= sent && delta - sent <= own,
        "TAP saw {delta} packets for {sent} datagrams sent (allowance {own})\n{run}"
    );
    assert!(
        result["packets_per_s"].as_u64() > Some(0) && result["stream_tx_kicks"].as_u64() > Some(0),
        "{run}"
    );
    // The kicks are batched: far fewer than one per datagram.
    let kicks = result["stream_tx_kicks"].as_u64().unwrap_or(u64::MAX);
    assert!(
        kicks * 4 < sent,
        "{kicks} kicks for {sent} datagrams\n{run}"
    );
    tap.daemon.stop().expect("daemon stops");
}

#[test]
fn killed_backend_shows_as_link_down_in_the_guest() {
    if !require_kvm("killed_backend_shows_as_link_down_in_the_guest") {
        return;
    }
    let dir = Workdir::new("net-kill");
    let socket = dir.join("net.sock");
    let mut switch = Daemon::switch(&dir, &[&socket]);
    let net = format!("socket={}", socket.display());
    let guest = serving_guest(dir.path(), "vm", &net, "10.0.0.2", 60, GUEST_READY);
    switch.kill().expect("kill the backend");
    let killed_at = Instant::now();
    // The guest checks the link every 100 ms: it ends long before its 60 s.
    let run = guest.wait(Duration::from_secs(20));
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "the guest took {:?} to notice\n{run}",
        killed_at.elapsed()
    );
    // The VMM survived and ended with the guest's own fail status, not a crash status.
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(run.stderr.contains("lost the backend"), "{run}");
    let result = run.result();
    assert_eq!(result["status"], "fail", "{run}");
    assert_eq!(result["link"], "down", "{run}");
    assert_eq!(
        result["link_up_bit"], false,
        "VIRTIO_NET_S_LINK_UP cleared\n{run}"
    );
    assert_eq!(result["needs_reset"], true, "{run}");
}

#[test]
fn udp_stream_between_two_vms_through_the_switch() {
    if !require_kvm("udp_stream_between_two_vms_through_the_switch") {
        return;
    }
    let dir = Workdir::new("net-stream-sw");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut switch = Daemon::switch(&dir, &[&a, &b]);
    let net_b = format!("socket={}", b.display());
    let receiver = RunningVm::spawn(
        [
            "run",
            "--prefault",
            "--net",
            &net_b,
            "--cmdline",
            "bench=net,dir=rx,peer=10.0.0.1,size=1500,seconds=2 ip=10.0.0.2/24",
        ],
        dir.path(),
        "rx",
    );
    poll_until("the receiver to listen", GUEST_READY, || {
        receiver
            .stdout_so_far()
            .contains("waiting for datagrams")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", receiver.stdout_so_far()));
    let net_a = format!("socket={}", a.display());
    let tx = run_splitvisor(
        [
            "run",
            "--prefault",
            "--net",
            &net_a,
            "--cmdline",
            "bench=net,dir=tx,peer=10.0.0.2,size=1500,seconds=2 ip=10.0.0.1/24",
        ],
        VM_TIMEOUT,
    );
    let sent = tx.assert_passed()["sent"].as_u64().expect("sent");
    let rx = receiver.wait(VM_TIMEOUT);
    let result = rx.assert_passed();
    let received = result["received"].as_u64().expect("received");
    assert!(
        received > 0 && received <= sent,
        "received {received} of {sent}\n{rx}"
    );
    assert_eq!(
        result["payload_bytes"].as_u64(),
        Some(received * 1500),
        "{rx}"
    );
    switch.stop().expect("switch stops");
}

#[test]
fn bench_net_rejects_bad_arguments() {
    if !require_kvm("bench_net_rejects_bad_arguments") {
        return;
    }
    for (cmdline, wanted) in [
        (
            "bench=net,dir=tx,peer=10.0.0.1,size=63 ip=10.0.0.2/24",
            "size=63",
        ),
        (
            "bench=net,dir=tx,peer=10.0.0.1,size=1501 ip=10.0.0.2/24",
            "size=1501",
        ),
        ("bench=net,dir=sideways ip=10.0.0.2/24", "dir=sideways"),
        ("bench=net,dir=tx,size=64 ip=10.0.0.2/24", "needs peer="),
    ] {
        let run = run_splitvisor(["run", "--cmdline", cmdline], VM_TIMEOUT);
        assert_eq!(run.code(), Some(2), "{cmdline}\n{run}");
        let result = run.result();
        assert_eq!(result["status"], "fail", "{run}");
        let error = result["error"].as_str().unwrap_or_default();
        assert!(error.contains(wanted), "{cmdline}: error {error:?}\n{run}");
    }
}

#[test]
fn serving_guest_answers_pings_again_after_its_backend_restarts() {
    if !require_kvm("serving_guest_answers_pings_again_after_its_backend_restarts") {
        return;
    }
    let dir = Workdir::new("net-restart");
    let mut tap = TapNet::start(&dir);
    let net = format!("socket={}", tap.socket.display());
    let api = dir.join("api.sock");
    let guest = RunningVm::spawn(
        [
            "run",
            "--net",
            &net,
            "--reconnect-timeout",
            "30",
            "--api-socket",
            api.to_str().unwrap(),
            "--cmdline",
            "serve,seconds=25 ip=10.0.0.2/24",
        ],
        dir.path(),
        "vm",
    );
    guest.wait_stdout("ip 10.0.0.2/", GUEST_READY);
    let ping = |tap: &TapNet, count: &str| {
        tap.ns
            .output(&["ping", "-c", count, "-W", "1", "10.0.0.2"])
            .expect("ip netns exec")
    };
    assert!(
        ping(&tap, "3").status.success(),
        "{}",
        guest.stdout_so_far()
    );

    tap.crash_and_restart(&dir);
    let restarted = Instant::now();
    // Pings during the outage may be lost; once the VMM has handed the rings to the new
    // daemon, they succeed again.
    poll_until("the guest to answer again", Duration::from_secs(15), || {
        ping(&tap, "1").status.success().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", guest.stdout_so_far()));
    eprintln!(
        "first ping answered {:?} after the restart",
        restarted.elapsed()
    );
    let after = ping(&tap, "5");
    assert!(
        String::from_utf8_lossy(&after.stdout).contains("5 received"),
        "{}",
        String::from_utf8_lossy(&after.stdout)
    );
    let backend = splitvisor_tests::api::get(&api, "/vm")["devices"][0]["backend"].clone();
    assert_eq!(backend["state"], "connected", "{backend}");
    assert_eq!(backend["recoveries"], 1, "{backend}");

    let run = guest.wait(Duration::from_secs(60));
    let result = run.assert_passed();
    // The guest looks at the link every 100 ms; an outage shorter than that may pass unseen.
    assert!(result["link_outages"].as_u64() <= Some(1), "{run}");
    assert!(run.stderr.contains("recovered"), "{run}");
    tap.daemon.stop().expect("daemon stops");
}

/// Backend kills while the guest streams to the TAP.
const KILLS: u64 = 10;

#[test]
fn guest_tx_stream_reaches_the_tap_at_most_once_across_ten_backend_kills() {
    if !require_kvm("guest_tx_stream_reaches_the_tap_at_most_once_across_ten_backend_kills") {
        return;
    }
    let dir = Workdir::new("net-kill-stream");
    let mut tap = TapNet::start_persistent(&dir);
    let before = tap.rx_packets();
    let net = format!("socket={}", tap.socket.display());
    let api = dir.join("api.sock");
    let guest = RunningVm::spawn(
        [
            "run",
            "--prefault",
            "--net",
            &net,
            "--reconnect-timeout",
            "30",
            "--api-socket",
            api.to_str().unwrap(),
            "--cmdline",
            "bench=net,dir=tx,peer=10.0.0.1,size=64,seconds=40,outages=wait ip=10.0.0.2/24",
        ],
        dir.path(),
        "vm",
    );
    poll_until("the guest to start streaming", GUEST_READY, || {
        guest.stdout_so_far().contains("streaming").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", guest.stdout_so_far()));
    let seed = splitvisor_tests::pattern::nonce();
    let backend = || splitvisor_tests::api::get(&api, "/vm")["devices"][0]["backend"].clone();
    for kill in 1..=KILLS {
        // A random moment under load: the guest keeps the TX ring busy.
        std::thread::sleep(Duration::from_millis(
            300 + splitvisor_tests::pattern::splitmix64(seed ^ kill) % 700,
        ));
        tap.restart_keeping_tap(&dir, &format!("tap-{kill}"));
        poll_until(
            "the VMM to hand the rings over",
            Duration::from_secs(15),
            || {
                let b = backend();
                (b["recoveries"] == kill && b["state"] == "connected").then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("kill {kill}: {e}\n{}", guest.stderr_so_far()));
    }
    let run = guest.wait(Duration::from_secs(120));
    let result = run.assert_passed();
    let delta = tap.rx_packets() - before;
    let tx_frames = result["tx_frames"].as_u64().expect("tx_frames");
    assert!(result["sent"].as_u64() > Some(1000), "{run}");
    assert_eq!(result["unconfirmed"], 0, "{run}");
    // No frame reached the TAP twice: the daemon that took over sent nothing again. A kill
    // can lose at most the one frame between its completion in the used ring and its TAP
    // write (TX completes first, so that a restart never re-sends; SIGKILL can land on any
    // return to user space, a timer interrupt's included, so that window is real).
    eprintln!("TAP rx packets {delta}, guest tx_frames {tx_frames}, {KILLS} kills");
    assert!(
        delta <= tx_frames && tx_frames - delta <= KILLS,
        "TAP rx packets {delta} vs guest tx_frames {tx_frames} over {KILLS} kills: \
         none may be sent twice, at most one lost per kill\n{run}"
    );
    tap.daemon.stop().expect("daemon stops");
}
