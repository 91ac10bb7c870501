//! Named VMs, end to end under real KVM: two VMs started with `launch --daemonize --name`
//! show up in `splitvisor list` (table and JSON), `ctl NAME` reaches the VM of that name (told
//! apart by their vCPUs and memory, and by which one a swap moved), `ctl a shutdown` leaves no
//! process, socket or directory of `a`, a VMM killed with SIGKILL is gone from the next list,
//! and a name in use is refused. Each test has its own XDG_RUNTIME_DIR.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use splitvisor_tests::daemon::Daemon;
use splitvisor_tests::image;
use splitvisor_tests::named::{alive, exists, Host};
use splitvisor_tests::vm::require_kvm;
use splitvisor_tests::wait::poll_until;
use splitvisor_tests::workdir::mode;

/// How long a stopped VM's launch may take to stop its daemons and clean up.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Long enough to outlive the test; the VMs are stopped through the API.
const TASK: &str = "blk-verify,seconds=120";

/// `name`'s entry in `list --json`.
fn listed(host: &Host, name: &str) -> Value {
    host.list_json()
        .into_iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

/// Starts VMs `a` (1 vCPU, 256 MiB) and `b` (2 vCPUs, 128 MiB), each with a disk.
fn start_two(host: &mut Host) -> (PathBuf, PathBuf) {
    let (img_a, img_b) = (
        image::zeroed(host.dir.join("a.img"), 16 << 20),
        image::zeroed(host.dir.join("b.img"), 16 << 20),
    );
    let disk_a = format!("image={}", img_a.display());
    // Shared: b's disk is swapped to a second daemon on the same image.
    let disk_b = format!("image={},share", img_b.display());
    let out = host.launch("a", &["--disk", &disk_a, "--cmdline", TASK]);
    assert_eq!(out.code, Some(0), "launch a\n{out}");
    assert!(out.stderr.contains("launch: VM a is running"), "{out}");
    let out = host.launch(
        "b",
        &[
            "--disk",
            &disk_b,
            "--cmdline",
            TASK,
            "--vcpus",
            "2",
            "--memory",
            "128M",
        ],
    );
    assert_eq!(out.code, Some(0), "launch b\n{out}");
    (img_a, img_b)
}

#[test]
fn named_vms_are_listed_controlled_and_stopped() {
    if !require_kvm("named_vms_are_listed_controlled_and_stopped") {
        return;
    }
    let mut host = Host::new("list");
    let (_, img_b) = start_two(&mut host);
    let a = assert_both_listed(&host);

    // ctl NAME reaches that VM.
    let status = host.ctl("a", &["status"]);
    assert_eq!(status.code, Some(0), "{status}");
    assert!(
        status.stdout.starts_with("VM running: 1 vCPU(s), 256 MiB"),
        "{status}"
    );
    let status = host.ctl("b", &["status"]);
    assert!(
        status.stdout.starts_with("VM running: 2 vCPU(s), 128 MiB"),
        "{status}"
    );
    swap_reaches_b_only(&host, &img_b, &a);

    // Unknown names are answered with the running ones.
    let out = host.ctl("c", &["status"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("no running VM is named \"c\"; running: a, b"),
        "{out}"
    );
    shutdown_leaves_nothing_of_a(&host, &a);
    assert_eq!(host.names(), ["b"]);
}

/// Both VMs are listed, running, with their devices' backend state, in the JSON and the
/// table; the registry is private. Returns a's JSON entry.
fn assert_both_listed(host: &Host) -> Value {
    assert_eq!(host.names(), ["a", "b"]);
    let a = listed(host, "a");
    let b = listed(host, "b");
    for (vm, vcpus, memory) in [(&a, 1, 256u64 << 20), (&b, 2, 128 << 20)] {
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["vm"]["vcpus"], vcpus, "{vm}");
        assert_eq!(vm["vm"]["memory_bytes"], memory, "{vm}");
        assert_eq!(vm["vm"]["devices"][0]["id"], "disk0", "{vm}");
        assert_eq!(
            vm["vm"]["devices"][0]["backend"]["state"], "connected",
            "{vm}"
        );
        let pid = vm["pid"].as_u64().expect("pid") as u32;
        assert!(alive(pid), "VMM {pid} of {vm}");
    }
    let table = host.run(&["list"]);
    assert_eq!(table.code, Some(0), "{table}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("DEVICES"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("a ") && lines[1].contains("disk0:connected"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("b ") && lines[2].contains(" 128M "),
        "{table}"
    );

    // The registry is private: directories 0700, the API socket 0600.
    let registry = host.registry();
    assert_eq!(mode(&registry), 0o700);
    assert_eq!(mode(&registry.join("a")), 0o700);
    let socket_a = PathBuf::from(a["api_socket"].as_str().expect("api_socket"));
    assert_eq!(socket_a, registry.join("a").join("api.sock"));
    assert_eq!(mode(&socket_a), 0o600);
    a
}

/// A swap through `ctl b` moves b's disk, not a's.
fn swap_reaches_b_only(host: &Host, img_b: &Path, a: &Value) {
    let daemon = Daemon::shared_blk(&host.dir, "b2", img_b);
    let new_socket = daemon.socket.clone();
    let swap = host.ctl("b", &["swap", "disk0", new_socket.to_str().unwrap()]);
    assert_eq!(swap.code, Some(0), "{swap}");
    let moved = format!("disk0: now served by {}", new_socket.display());
    assert!(swap.stdout.contains(&moved), "{swap}");
    let backend = |vm: &Value| vm["vm"]["devices"][0]["backend"]["socket"].clone();
    assert_eq!(backend(&listed(host, "b")), new_socket.to_str().unwrap());
    assert_eq!(
        backend(&listed(host, "a")),
        backend(a),
        "a's disk was not moved"
    );
}

/// `ctl a shutdown`: a's launch stops its daemons; nothing of a is left.
fn shutdown_leaves_nothing_of_a(host: &Host, a: &Value) {
    let socket_a = PathBuf::from(a["api_socket"].as_str().expect("api_socket"));
    let launch_a = host.launch_pid("a").expect("a's pidfile");
    let vmm_a = a["pid"].as_u64().unwrap() as u32;
    let rundir_a = host.dir.join(&format!("splitvisor-launch-{launch_a}"));
    assert!(exists(&rundir_a.join("launch.log")), "launch's own log");
    let out = host.ctl("a", &["shutdown"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout.trim(), "VM stopping");
    poll_until("a's launch to clean up", STOP_TIMEOUT, || {
        (!alive(launch_a) && !exists(&rundir_a)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: launch {launch_a} alive {}", alive(launch_a)));
    assert!(!alive(vmm_a), "a's VMM {vmm_a} is left");
    assert!(
        !exists(&host.registry().join("a")),
        "a's registry entry is left"
    );
    assert!(!exists(&socket_a), "a's API socket is left");
    assert!(!exists(&host.dir.join("a.pid")), "a's pidfile is left");
    let daemons_of_a: Vec<_> = splitvisor_tests::launch::processes()
        .into_iter()
        .filter(|p| p.cmdline.contains(rundir_a.to_str().unwrap()))
        .collect();
    assert!(daemons_of_a.is_empty(), "{daemons_of_a:?}");
}

#[test]
fn a_killed_vm_is_gone_from_the_next_list() {
    if !require_kvm("a_killed_vm_is_gone_from_the_next_list") {
        return;
    }
    let mut host = Host::new("kill");
    start_two(&mut host);
    let b = listed(&host, "b");
    let vmm_b = b["pid"].as_u64().expect("pid") as libc::pid_t;
    // SAFETY: kill takes no pointers; vmm_b is the VMM this test's launch started.
    assert_eq!(unsafe { libc::kill(vmm_b, libc::SIGKILL) }, 0);
    poll_until("the VMM to die", STOP_TIMEOUT, || {
        (!alive(vmm_b as u32)).then_some(())
    })
    .expect("SIGKILL ends the VMM");
    // Its entry is still on disk until someone looks; the next list removes it.
    assert_eq!(host.names(), ["a"]);
    assert!(!exists(&host.registry().join("b")), "b's entry is left");
    let out = host.ctl("b", &["status"]);
    assert!(out.stderr.contains("running: a"), "{out}");
    // b's launch sees its VMM die and stops the daemons.
    let launch_b = host.launch_pid("b");
    poll_until("b's launch to end", STOP_TIMEOUT, || {
        (!launch_b.is_some_and(alive)).then_some(())
    })
    .expect("b's launch ends");
    let out = host.ctl("a", &["shutdown"]);
    assert_eq!(out.code, Some(0), "{out}");
}

#[test]
fn a_name_in_use_is_refused() {
    if !require_kvm("a_name_in_use_is_refused") {
        return;
    }
    let mut host = Host::new("twice");
    let img = image::zeroed(host.dir.join("a.img"), 16 << 20);
    let disk = format!("image={}", img.display());
    let out = host.launch("a", &["--disk", &disk, "--cmdline", TASK]);
    assert_eq!(out.code, Some(0), "{out}");
    let vmm = listed(&host, "a")["pid"].clone();
    let again = host.launch("a", &["--disk", &disk, "--cmdline", TASK]);
    assert_eq!(again.code, Some(1), "{again}");
    let expected = format!("a VM named \"a\" is already running (pid {vmm})");
    assert!(again.stderr.contains(&expected), "{again}");
    // The VMM itself refuses too (`run --name`), before touching the socket of the first.
    let run = host.run(&["run", "--name", "a", "--cmdline", "exit=0"]);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains(&expected), "{run}");
    assert_eq!(host.names(), ["a"]);
    assert_eq!(listed(&host, "a")["state"], "running");
    let bad = host.run(&["run", "--name", "../x", "--cmdline", "exit=0"]);
    assert_eq!(bad.code, Some(1), "{bad}");
    assert!(bad.stderr.contains("VM name \"../x\" must be"), "{bad}");
    let out = host.ctl("a", &["shutdown"]);
    assert_eq!(out.code, Some(0), "{out}");
}

#[test]
fn run_registers_under_its_name_and_cleans_up() {
    if !require_kvm("run_registers_under_its_name_and_cleans_up") {
        return;
    }
    let host = Host::new("run");
    let named = host.run(&["run", "--name", "solo", "--cmdline", "exit=0"]);
    assert_eq!(named.code, Some(0), "{named}");
    let socket = host.registry().join("solo").join("api.sock");
    let line = format!("splitvisor: VM solo, API socket {}", socket.display());
    assert!(named.stderr.contains(&line), "{named}");
    assert!(
        !exists(&host.registry().join("solo")),
        "the entry is removed at exit"
    );
    // Without --name: a generated name, printed at start.
    let unnamed = host.run(&["run", "--cmdline", "exit=0"]);
    assert_eq!(unnamed.code, Some(0), "{unnamed}");
    assert!(unnamed.stderr.contains("splitvisor: VM vm-"), "{unnamed}");
    let left: Vec<_> = std::fs::read_dir(host.registry())
        .expect("the registry")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
