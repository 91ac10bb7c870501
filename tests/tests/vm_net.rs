//! The network path end to end: guests with the project's virtio-net driver behind
//! `splitvisor-net`, talking to each other through its switch and to Linux's own network stack
//! through a TAP inside a network namespace of the test's own.

use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

use splitvisor_tests::interop::daemon::{workspace_bin, Daemon};
use splitvisor_tests::interop::{poll_until, Workdir};
use splitvisor_tests::vm::{require_kvm, RunningVm};

const GUEST_READY: Duration = Duration::from_secs(30);

fn net_daemon() -> std::path::PathBuf {
    workspace_bin("splitvisor-net", "splitvisor-net").expect("splitvisor-net binary")
}

/// Waits until the serving guest has brought its NIC up (it prints its address).
fn wait_serving(vm: &RunningVm, ip: &str) {
    poll_until("the guest to start serving", GUEST_READY, || {
        vm.stdout_so_far()
            .contains(&format!("ip {ip}/"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.stdout_so_far()));
}

#[test]
fn two_vms_ping_each_other_through_the_switch() {
    if !require_kvm("two_vms_ping_each_other_through_the_switch") {
        return;
    }
    let dir = Workdir::new("net-sw");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let args: Vec<&OsStr> = vec![
        "--switch".as_ref(),
        "--socket".as_ref(),
        a.as_os_str(),
        "--socket".as_ref(),
        b.as_os_str(),
    ];
    let mut switch = Daemon::start(&dir, "switch", &net_daemon(), &args, &b).expect("switch");
    poll_until("both switch sockets", Duration::from_secs(10), || {
        a.exists().then_some(())
    })
    .expect("socket a");

    let net_b = format!("socket={}", b.display());
    let server = RunningVm::spawn(
        [
            "run",
            "--net",
            &net_b,
            "--cmdline",
            "serve,seconds=20 ip=10.0.0.2/24",
        ],
        dir.path(),
        "vm-b",
    );
    wait_serving(&server, "10.0.0.2");

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

/// A network namespace that is removed when the test ends.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let ok = Command::new("ip").args(["netns", "add", name]).status();
        assert!(
            ok.is_ok_and(|s| s.success()),
            "ip netns add {name} (needs root and iproute2)"
        );
        Netns(name.to_string())
    }

    fn exec(&self, cmd: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(cmd)
            .output()
            .expect("ip netns exec")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn linux_pings_and_udp_echoes_the_guest_through_a_tap() {
    if !require_kvm("linux_pings_and_udp_echoes_the_guest_through_a_tap") {
        return;
    }
    let dir = Workdir::new("net-tap");
    let ns = Netns::new(&format!("svt{}", std::process::id()));
    let tap = format!("svtap{}", std::process::id() % 100_000);
    let socket = dir.join("tap.sock");
    // The daemon runs inside the namespace, so its TAP (and all test traffic) lives there.
    let daemon_args: Vec<&OsStr> = vec![
        "netns".as_ref(),
        "exec".as_ref(),
        ns.0.as_ref(),
        net_daemon().into_os_string().leak() as &OsStr,
        "--socket".as_ref(),
        socket.as_os_str(),
        "--tap".as_ref(),
        tap.as_ref(),
    ];
    let mut daemon =
        Daemon::start(&dir, "tap", "ip".as_ref(), &daemon_args, &socket).expect("daemon");
    for cmd in [
        vec!["ip", "addr", "add", "10.0.0.1/24", "dev", &tap],
        vec!["ip", "link", "set", &tap, "up"],
    ] {
        let out = ns.exec(&cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let net = format!("socket={}", socket.display());
    let guest = RunningVm::spawn(
        [
            "run",
            "--net",
            &net,
            "--cmdline",
            "serve,seconds=15 ip=10.0.0.2/24",
        ],
        dir.path(),
        "vm",
    );
    wait_serving(&guest, "10.0.0.2");

    let ping = ns.exec(&["ping", "-c", "5", "-W", "2", "10.0.0.2"]);
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
    let echo = ns.exec(&["/usr/bin/python3", "-c", &script]);
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
    daemon.stop().expect("daemon stops");
}
