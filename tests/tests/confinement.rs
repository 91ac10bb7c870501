//! Confinement of the real binaries: every thread of `splitvisor run` (but its live-upgrade
//! thread, see vmm/src/upgrade/exec.rs) and of both daemons runs under a seccomp filter
//! (`Seccomp: 2` in /proc), `splitvisor-net` holds no capability once
//! its TAP is open, and a system call outside an allow-list kills the process with SIGSYS in
//! `--seccomp on` but is only logged in `--seccomp log` (through the SPLITVISOR_SECCOMP_SELFTEST
//! hook, which makes a confined thread call `personality`, which no list allows).

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use splitvisor_tests::daemon::{bin, Daemon};
use splitvisor_tests::image;
use splitvisor_tests::vm::{require_kvm, run_with_env, RunningVm, VM_TIMEOUT};
use splitvisor_tests::wait::poll_until;
use splitvisor_tests::workdir::Workdir;

const SELFTEST_ENV: &str = "SPLITVISOR_SECCOMP_SELFTEST";
const WAIT: Duration = Duration::from_secs(20);

/// The value of `field` (e.g. `Seccomp`) in a /proc status file, if readable.
fn status_field(status_file: &Path, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(status_file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

/// Waits until `field` of `/proc/<pid>/status` reads `want` (set-up ends shortly after the
/// socket appears).
fn wait_field(pid: u32, field: &str, want: &str) {
    let file = PathBuf::from(format!("/proc/{pid}/status"));
    poll_until(&format!("{field}: {want} for pid {pid}"), WAIT, || {
        (status_field(&file, field).as_deref() == Some(want)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; it reads {:?}", status_field(&file, field)));
}

/// (thread name, Seccomp field) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .map(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let seccomp = status_field(&task.path().join("status"), "Seccomp").unwrap_or_default();
            (comm.trim().to_string(), seccomp)
        })
        .collect()
}

fn start_blk(dir: &Workdir) -> Daemon {
    let image = image::zeroed(dir.join("disk.img"), 4 << 20);
    Daemon::blk(dir, "blk", &dir.join("blk.sock"), &image, &[])
}

#[test]
fn every_vmm_and_daemon_thread_is_filtered_and_net_keeps_no_capability() {
    if !require_kvm("every_vmm_and_daemon_thread_is_filtered_and_net_keeps_no_capability") {
        return;
    }
    let dir = Workdir::new("seccomp-threads");
    let blk = start_blk(&dir);
    wait_field(blk.pid(), "Seccomp", "2");
    let net_socket = dir.join("net.sock");
    let args: Vec<&OsStr> = vec![
        "--switch".as_ref(),
        "--socket".as_ref(),
        net_socket.as_ref(),
    ];
    let net = Daemon::start(&dir, "net", &bin("splitvisor-net"), &args, &net_socket)
        .expect("splitvisor-net");
    wait_field(net.pid(), "Seccomp", "2");
    wait_field(net.pid(), "CapEff", "0000000000000000");

    let api = dir.join("api.sock");
    let disk = format!("socket={},id=disk0", blk.socket.display());
    let nic = format!("socket={},id=net0", net_socket.display());
    let vm = RunningVm::spawn(
        [
            "run".as_ref(),
            "--disk".as_ref(),
            OsStr::new(&disk),
            "--net".as_ref(),
            OsStr::new(&nic),
            "--api-socket".as_ref(),
            api.as_os_str(),
            "--cmdline".as_ref(),
            "serve,seconds=60 ip=10.0.0.2/24".as_ref(),
        ],
        dir.path(),
        "vmm",
    );
    let pid = vm.pid();
    // The main thread confines itself last, once every other thread is started. The live
    // upgrade's thread is the one exception, by design: a filter survives execve and would
    // confine the whole new VMM process (see vmm/src/upgrade/exec.rs).
    let seen = poll_until("every VMM thread to be filtered", WAIT, || {
        let threads = threads(pid);
        let filtered = |(name, s): &(String, String)| s == "2" || name == "upgrader";
        let main = threads.iter().any(|(_, s)| s == "2") && threads.iter().all(filtered);
        let vcpu = threads.iter().any(|(name, _)| name == "vcpu0");
        (main && vcpu).then_some(threads)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", threads(pid), vm.stderr_so_far()));
    let unfiltered: Vec<_> = seen.iter().filter(|(_, s)| s != "2").collect();
    assert!(
        unfiltered.len() == 1 && unfiltered[0].0 == "upgrader",
        "only the upgrader thread runs unfiltered: {seen:?}"
    );
    for kind in ["vcpu0", "events", "api", "signals", "vhost-deadline"] {
        assert!(
            seen.iter().any(|(name, _)| name == kind),
            "{kind}: {seen:?}"
        );
    }
    vm.signal(libc::SIGTERM);
    let run = vm.wait(VM_TIMEOUT);
    assert_eq!(run.status.signal(), None, "{run}");
    assert!(!run.stderr.contains("seccomp:"), "{run}");
    drop((blk, net));
}

#[test]
fn net_daemon_drops_every_capability_once_its_tap_is_open() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI must run this as root");
        eprintln!("SKIP: creating a TAP needs root");
        return;
    }
    let dir = Workdir::new("seccomp-tap");
    let socket = dir.join("tap.sock");
    let tap = format!("svsc{}", std::process::id() % 100_000);
    let args: Vec<&OsStr> = vec![
        "--socket".as_ref(),
        socket.as_os_str(),
        "--tap".as_ref(),
        tap.as_ref(),
    ];
    let net = Daemon::start(&dir, "tap", &bin("splitvisor-net"), &args, &socket).expect("daemon");
    wait_field(net.pid(), "Seccomp", "2");
    wait_field(net.pid(), "CapEff", "0000000000000000");
    let status = PathBuf::from(format!("/proc/{}/status", net.pid()));
    for field in ["CapPrm", "CapInh", "CapAmb", "CapBnd"] {
        assert_eq!(
            status_field(&status, field).as_deref(),
            Some("0000000000000000"),
            "{field}"
        );
    }
}

/// Starts a daemon with the self-test hook and `--seccomp mode`.
fn spawn_selftest(dir: &Workdir, package: &str, mode: &str, args: &[&OsStr]) -> (Child, PathBuf) {
    let log = dir.join(&format!("{package}-{mode}.log"));
    dir.log(&format!("{package} --seccomp {mode}"), &log);
    let file = std::fs::File::create(&log).expect("log");
    let child = Command::new(bin(package))
        .args(args)
        .args(["--seccomp", mode])
        .env(SELFTEST_ENV, "1")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("spawn daemon");
    (child, log)
}

/// In `on` mode the daemon dies of SIGSYS and says which call; in `log` mode it lives on.
fn check_daemon_selftest(package: &str, args: impl Fn(&Workdir, &str) -> Vec<PathBuf>) {
    let dir = Workdir::new(&format!("seccomp-selftest-{package}"));
    for mode in ["on", "log"] {
        let owned = args(&dir, mode);
        let args: Vec<&OsStr> = owned.iter().map(|p| p.as_os_str()).collect();
        let (mut child, log) = spawn_selftest(&dir, package, mode, &args);
        let read = || std::fs::read_to_string(&log).unwrap_or_default();
        if mode == "on" {
            let status = poll_until("the daemon to die", WAIT, || {
                child.try_wait().ok().flatten()
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", read()));
            assert_eq!(status.signal(), Some(libc::SIGSYS), "{}", read());
            assert!(read().contains("seccomp: the"), "{}", read());
            assert!(read().contains("made system call 135"), "{}", read());
        } else {
            poll_until("the daemon to survive the call", WAIT, || {
                read()
                    .contains("still alive after the forbidden call")
                    .then_some(())
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", read()));
            assert!(child.try_wait().expect("try_wait").is_none(), "{}", read());
            wait_field(child.id(), "Seccomp", "2");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn a_forbidden_call_kills_the_blk_daemon_only_in_on_mode() {
    check_daemon_selftest("splitvisor-blk", |dir, mode| {
        let image = dir.join(&format!("{mode}.img"));
        std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
        let socket = dir.join(&format!("{mode}.sock"));
        ["--socket".into(), socket, "--image".into(), image].into()
    });
}

#[test]
fn a_forbidden_call_kills_the_net_daemon_only_in_on_mode() {
    check_daemon_selftest("splitvisor-net", |dir, mode| {
        let socket = dir.join(&format!("{mode}.sock"));
        ["--switch".into(), "--socket".into(), socket].into()
    });
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_kills_the_vmm_only_in_on_mode() {
    if !require_kvm("a_forbidden_call_on_a_vcpu_thread_kills_the_vmm_only_in_on_mode") {
        return;
    }
    let env = [(SELFTEST_ENV, "vcpu")];
    let args = |mode| ["run", "--cmdline", "selftest", "--seccomp", mode];
    let on = run_with_env(args("on"), &env, VM_TIMEOUT);
    assert_eq!(on.status.signal(), Some(libc::SIGSYS), "{on}");
    assert!(
        on.stderr
            .contains("seccomp: the vcpu thread made system call 135"),
        "{on}"
    );
    let log = run_with_env(args("log"), &env, VM_TIMEOUT);
    assert_eq!(log.code(), Some(0), "{log}");
    log.assert_passed();
    assert!(
        log.stderr.contains("still alive after the forbidden call"),
        "{log}"
    );
}
