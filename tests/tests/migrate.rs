//! Live migration end to end under real KVM: pre-copy with KVM's and splitvisor-blk's dirty
//! logs, then the rest with the VM paused.
//!
//! - The project's guest running `blk-verify` (write-then-verify rounds) on a real
//!   splitvisor-blk is migrated `UNIX_MIGRATIONS` times over Unix sockets (alternating between
//!   two listening addresses, a new destination process each time) and `TCP_MIGRATIONS` times
//!   over TCP on 127.0.0.1 while its I/O runs: each must pre-copy, each source must exit 0
//!   saying where the VM went, each destination's device must complete requests on the same daemon, and at the
//!   end every verification must have passed with no I/O error and the image must hold
//!   exactly the guest's last round.
//! - A destination started with another `--memory` refuses the VM with the flag to change; the
//!   source keeps running and its I/O goes on.
//! - A destination that disappears in the middle of the memory, and one that disappears after
//!   the source let its backends go (the source must reconnect to them): the source keeps
//!   running, and the guest still passes.
//! - At the switch-over, the destination's memory is the source's (a digest of both), for a
//!   guest without devices and for one reading and writing its disk hard during pre-copy.
//! - Figures (printed, not asserted): downtime and total time of an idle and a disk-busy
//!   1 GiB guest over a Unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ChildStdin;
use std::time::Duration;

use serde_json::Value;
use splitvisor_tests::api;
use splitvisor_tests::daemon::Daemon;
use splitvisor_tests::image;
use splitvisor_tests::pattern::{self, BLK_VERIFY_REGION};
use splitvisor_tests::vm::{ctl, require_kvm, spawn_run, RunningVm, VmRun, VM_TIMEOUT};
use splitvisor_tests::wait::poll_until;
use splitvisor_tests::workdir::Workdir;

const UNIX_MIGRATIONS: usize = 10;
const TCP_MIGRATIONS: usize = 2;
/// The guest's verification time: longer than the migrations take, so it is mid-I/O at each.
const VERIFY_SECONDS: u32 = 30;
const IMAGE_LEN: u64 = 16 << 20;
/// Long enough for a loaded host; every wait ends as soon as its condition holds.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// What a destination prints once it listens.
const LISTENING: &str = "waiting for a VM to migrate in on";

/// `splitvisor run ARGS --api-socket DIR/NAME.sock` with a piped stdin (the guest's serial
/// input) and its stdout in `DIR/NAME.stdout`.
fn spawn(dir: &Workdir, name: &str, args: &[&str]) -> (RunningVm, ChildStdin) {
    spawn_run(dir, name, args, &[])
}

/// A destination `run --incoming ADDR ARGS`, once it listens.
fn destination(dir: &Workdir, name: &str, address: &str, args: &[&str]) -> (RunningVm, ChildStdin) {
    destination_env(dir, name, address, args, &[])
}

/// `destination` with environment variables.
fn destination_env(
    dir: &Workdir,
    name: &str,
    address: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (RunningVm, ChildStdin) {
    let mut argv = vec!["--incoming", address];
    argv.extend(args);
    let (vm, stdin) = spawn_run(dir, name, &argv, env);
    poll_until("the destination to listen", STEP_TIMEOUT, || {
        vm.stderr_so_far().contains(LISTENING).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.stderr_so_far()));
    (vm, stdin)
}

/// `ctl --api-socket API --json migrate TO`: exit code, answer, stderr.
fn migrate(api: &Path, to: &str) -> (i32, String, String) {
    ctl(api, &["--json", "migrate", to])
}

/// Migrates the VM behind `api` to `to`, which must succeed; the source must exit 0 saying so.
fn migrate_ok(api: &Path, to: &str, source: RunningVm) -> Value {
    let (code, out, err) = migrate(api, to);
    assert_eq!(code, 0, "ctl migrate failed: {out}{err}");
    assert!(
        err.contains("MiB/s"),
        "no progress figures on stderr: {err}"
    );
    let run = source.wait(STEP_TIMEOUT);
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(
        run.stderr.contains(&format!("the VM was migrated to {to}")),
        "{run}"
    );
    assert!(!run.stdout.contains("RESULT"), "finished too early\n{run}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl --json answer ({e}): {out}"))
}

/// Requests the disk completed in this VMM (`GET /vm`), once it is above `above`.
fn completed_above(api_socket: &Path, above: u64, vm: &RunningVm) -> u64 {
    poll_until("the guest's disk I/O to progress", STEP_TIMEOUT, || {
        if !api_socket.exists() {
            return None; // the VMM is still starting
        }
        let vm = api::get(api_socket, "/vm");
        let done = vm["devices"][0]["counters"]["completed_requests"].as_u64()?;
        (done > above).then_some(done)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", vm.stdout_so_far(), vm.stderr_so_far()))
}

/// A TCP port nothing listens on now (the destination binds it right after).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    listener.local_addr().expect("local address").port()
}

/// The guest passed with no I/O error and the image holds exactly its last round.
fn assert_verified(run: &VmRun, img: &Path) {
    let result = run.assert_passed();
    assert_eq!(result["io_errors"], 0, "{run}");
    assert_eq!(result["mismatched_sectors"], 0, "{run}");
    let last_seed = u64::from_str_radix(result["pattern_seed"].as_str().unwrap_or(""), 16)
        .unwrap_or_else(|e| panic!("pattern_seed ({e})\n{run}"));
    let bytes = std::fs::read(img).expect("read the image");
    assert!(
        bytes[..BLK_VERIFY_REGION] == pattern::sectors(last_seed, 0, BLK_VERIFY_REGION)[..],
        "the image differs from the guest's last round"
    );
    assert!(bytes[BLK_VERIFY_REGION..].iter().all(|&b| b == 0));
}

/// A disk-verifying guest on splitvisor-blk, started; returns its image, daemon and VM.
fn disk_guest(dir: &Workdir, memory: &str) -> (std::path::PathBuf, Daemon, RunningVm, String) {
    let img = image::zeroed(dir.join("disk.img"), IMAGE_LEN);
    let socket = dir.join("blk.sock");
    let daemon = Daemon::blk(dir, "blk", &socket, &img, &[]);
    dir.log("splitvisor-blk", &daemon.log);
    let disk = format!("socket={}", socket.display());
    let task = format!("blk-verify,seconds={VERIFY_SECONDS}");
    let (vm, _stdin) = spawn(
        dir,
        "vm0",
        &["--memory", memory, "--disk", &disk, "--cmdline", &task],
    );
    (img, daemon, vm, disk)
}

#[test]
fn a_disk_verifying_guest_survives_migrations_over_unix_and_tcp() {
    if !require_kvm("a_disk_verifying_guest_survives_migrations_over_unix_and_tcp") {
        return;
    }
    let dir = Workdir::new("migblk");
    let (img, _daemon, mut vm, _disk) = disk_guest(&dir, "256M");
    let mut api_socket = dir.join("vm0.sock");
    completed_above(&api_socket, 0, &vm);
    let mut figures = Vec::new();
    for step in 1..=UNIX_MIGRATIONS + TCP_MIGRATIONS {
        let to = if step <= UNIX_MIGRATIONS {
            // Two listening addresses in turn, each a new destination process.
            let side = if step % 2 == 0 { "a" } else { "b" };
            format!(
                "unix:{}",
                dir.join(&format!("migrate-{side}.sock")).display()
            )
        } else {
            format!("tcp:127.0.0.1:{}", free_port())
        };
        let name = format!("vm{step}");
        let (next, _stdin) = destination(&dir, &name, &to, &[]);
        let report = migrate_ok(&api_socket, &to, vm);
        // The backend logs its writes: memory is pre-copied while the guest's I/O runs.
        assert!(report["precopy_rounds"].as_u64() >= Some(1), "{report}");
        figures.push((
            report["downtime_ms"].as_u64(),
            report["elapsed_ms"].as_u64(),
        ));
        vm = next;
        api_socket = dir.join(&format!("{name}.sock"));
        // The device's rings run on the same daemon again: requests complete.
        completed_above(&api_socket, 0, &vm);
    }
    eprintln!(
        "FIGURE migrations of a disk-busy 256 MiB guest (downtime ms, total ms): {figures:?}"
    );
    assert_verified(&vm.wait(VM_TIMEOUT), &img);
}

#[test]
fn a_destination_with_other_memory_is_refused_and_the_source_runs_on() {
    if !require_kvm("a_destination_with_other_memory_is_refused_and_the_source_runs_on") {
        return;
    }
    let dir = Workdir::new("migmem");
    let (img, _daemon, vm, disk) = disk_guest(&dir, "256M");
    let api_socket = dir.join("vm0.sock");
    let done = completed_above(&api_socket, 0, &vm);
    let to = format!("unix:{}", dir.join("m.sock").display());
    let (other, _stdin) = destination(&dir, "other", &to, &["--memory", "512M", "--disk", &disk]);
    let (code, out, err) = migrate(&api_socket, &to);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("refused") && err.contains("--memory 256M"),
        "the refusal does not say what to change: {err}"
    );
    let refused = other.wait(STEP_TIMEOUT);
    assert_ne!(refused.code(), Some(0), "{refused}");
    assert!(refused.stderr.contains("--memory 256M"), "{refused}");
    // The source was never paused for it: its I/O goes on, and its guest passes.
    completed_above(&api_socket, done, &vm);
    assert_verified(&vm.wait(VM_TIMEOUT), &img);
}

/// A fake destination on `socket` that accepts the header, reads frames until it has seen
/// `frames` of them (counting the header) or the handoff, then hangs up. Returns whether it
/// saw the handoff.
fn vanishing_destination(socket: &Path, frames: usize) -> std::thread::JoinHandle<bool> {
    let listener = UnixListener::bind(socket).expect("bind the fake destination");
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept the source");
        stream
            .set_read_timeout(Some(STEP_TIMEOUT))
            .expect("read timeout");
        let mut seen = 0;
        let mut head = [0u8; 9];
        while seen < frames && stream.read_exact(&mut head).is_ok() {
            let mut length = [0u8; 8];
            length.copy_from_slice(&head[1..]);
            let mut payload = vec![0u8; u64::from_le_bytes(length) as usize];
            stream.read_exact(&mut payload).expect("a whole frame");
            seen += 1;
            if seen == 1 {
                // Verdict (2): accept.
                let verdict = br#""accept""#;
                let mut frame = vec![2u8];
                frame.extend_from_slice(&(verdict.len() as u64).to_le_bytes());
                frame.extend_from_slice(verdict);
                stream.write_all(&frame).expect("send the verdict");
            }
            if head[0] == 5 {
                return true; // the handoff: the source has let its backends go
            }
        }
        false
    })
}

#[test]
fn a_destination_that_disappears_leaves_the_source_running() {
    if !require_kvm("a_destination_that_disappears_leaves_the_source_running") {
        return;
    }
    let dir = Workdir::new("miggone");
    let (img, _daemon, vm, _disk) = disk_guest(&dir, "256M");
    let api_socket = dir.join("vm0.sock");
    let mut done = completed_above(&api_socket, 0, &vm);
    // Gone after two page frames; then gone right after the handoff, when the source has
    // already closed its vhost-user connection and must connect to its daemon again.
    for (attempt, frames) in [3, usize::MAX].into_iter().enumerate() {
        let socket = dir.join(&format!("gone{attempt}.sock"));
        let fake = vanishing_destination(&socket, frames);
        let (code, out, err) = migrate(&api_socket, &format!("unix:{}", socket.display()));
        let handoff = fake.join().expect("the fake destination");
        assert_eq!(handoff, attempt == 1, "attempt {attempt}: {err}");
        assert_ne!(code, 0, "attempt {attempt}: {out}{err}");
        assert!(err.contains("continues here"), "attempt {attempt}: {err}");
        done = completed_above(&api_socket, done, &vm);
    }
    let status = api::get(&api_socket, "/vm");
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(
        status["devices"][0]["backend"]["state"], "connected",
        "{status}"
    );
    assert_verified(&vm.wait(VM_TIMEOUT), &img);
}

/// The digest `SPLITVISOR_MIGRATION_DIGEST` makes `side` print.
fn digest(stderr: &str, side: &str) -> String {
    let prefix = format!("migration digest ({side}) ");
    stderr
        .lines()
        .find_map(|l| Some(l.split_once(&prefix)?.1.to_string()))
        .unwrap_or_else(|| panic!("no {side} digest in:\n{stderr}"))
}

/// At the switch-over the destination's memory is the source's, page for page (a digest of
/// every page holding data, printed by both with `SPLITVISOR_MIGRATION_DIGEST`): for a guest
/// without backends, pre-copied with KVM's dirty log, and for a guest reading and writing its
/// disk hard, pre-copied with KVM's log and splitvisor-blk's (the pages it writes).
#[test]
fn the_destination_has_the_sources_memory_at_switch_over() {
    if !require_kvm("the_destination_has_the_sources_memory_at_switch_over") {
        return;
    }
    let env = [("SPLITVISOR_MIGRATION_DIGEST", "1")];
    let dir = Workdir::new("migdigest");
    let args = ["--cmdline", "console-echo,lines=2,seconds=100"];
    let (echo, mut stdin) = spawn_run(&dir, "echo0", &args, &env);
    writeln!(stdin, "before").expect("write the guest's input");
    echo.wait_stdout("ECHO before\n", STEP_TIMEOUT);
    let to = format!("unix:{}", dir.join("echo.sock").display());
    let (next, mut next_stdin) = destination_env(&dir, "echo1", &to, &[], &env);
    let source_err = dir.join("echo0.stderr");
    let report = migrate_ok(&dir.join("echo0.sock"), &to, echo);
    assert!(report["precopy_rounds"].as_u64() >= Some(1), "{report}");
    let source = std::fs::read_to_string(&source_err).expect("the source's stderr");
    assert_eq!(
        digest(&source, "source"),
        digest(&next.stderr_so_far(), "destination")
    );
    writeln!(next_stdin, "after").expect("write the guest's input");
    assert_eq!(next.wait(STEP_TIMEOUT).assert_passed()["lines"], 2);

    let img = image::zeroed(dir.join("disk.img"), IMAGE_LEN);
    let socket = dir.join("blk.sock");
    let daemon = Daemon::blk(&dir, "blk", &socket, &img, &[]);
    dir.log("splitvisor-blk", &daemon.log);
    let disk = format!("socket={}", socket.display());
    let task = format!("blk-verify,seconds={VERIFY_SECONDS}");
    let (busy, _stdin) = spawn_run(&dir, "busy0", &["--disk", &disk, "--cmdline", &task], &env);
    completed_above(&dir.join("busy0.sock"), 0, &busy);
    let to = format!("unix:{}", dir.join("busy.sock").display());
    let (next, _stdin) = destination_env(&dir, "busy1", &to, &[], &env);
    let report = migrate_ok(&dir.join("busy0.sock"), &to, busy);
    assert!(report["precopy_rounds"].as_u64() >= Some(1), "{report}");
    // The backend was given the dirty log (VHOST_USER_PROTOCOL_F_LOG_SHMFD) for it.
    let blk_log = std::fs::read_to_string(&daemon.log).expect("the daemon's log");
    assert!(blk_log.contains("dirty log of"), "{blk_log}");
    let source = std::fs::read_to_string(dir.join("busy0.stderr")).expect("the source's stderr");
    assert_eq!(
        digest(&source, "source"),
        digest(&next.stderr_so_far(), "destination")
    );
    assert_verified(&next.wait(VM_TIMEOUT), &img);
}

/// Downtime and total time of one migration of a 1 GiB guest over a Unix socket, idle
/// (waiting for console input) and disk-busy: printed, not asserted.
#[test]
fn figures_for_a_1g_guest() {
    if !require_kvm("figures_for_a_1g_guest") {
        return;
    }
    let dir = Workdir::new("migfig");
    let (mut idle, mut stdin) = spawn(
        &dir,
        "idle0",
        &[
            "--memory",
            "1G",
            "--cmdline",
            "console-echo,lines=2,seconds=100",
        ],
    );
    writeln!(stdin, "before").expect("write the guest's input");
    idle.wait_stdout("ECHO before\n", STEP_TIMEOUT);
    let to = format!("unix:{}", dir.join("idle.sock").display());
    let (next, mut next_stdin) = destination(&dir, "idle1", &to, &["--memory", "1G"]);
    let report = migrate_ok(&dir.join("idle0.sock"), &to, idle);
    idle = next;
    writeln!(next_stdin, "after").expect("write the guest's input");
    idle.wait_stdout("ECHO after\n", STEP_TIMEOUT);
    eprintln!("FIGURE idle 1 GiB guest: {report}");
    assert!(idle.wait(STEP_TIMEOUT).assert_passed()["lines"] == 2);
    let (_img, _daemon, busy, _disk) = disk_guest(&dir, "1G");
    // The guest writes its disk right after it starts: migrated in the middle of that.
    completed_above(&dir.join("vm0.sock"), 0, &busy);
    let to = format!("unix:{}", dir.join("busy.sock").display());
    let (next, _stdin) = destination(&dir, "busy1", &to, &["--memory", "1G"]);
    let report = migrate_ok(&dir.join("vm0.sock"), &to, busy);
    completed_above(&dir.join("busy1.sock"), 0, &next);
    eprintln!("FIGURE disk-busy 1 GiB guest: {report}");
    assert_verified(&next.wait(VM_TIMEOUT), &dir.join("disk.img"));
}

/// Ctrl-C (SIGINT) to a destination still waiting for its VM ends it with a message and
/// leaves nothing behind: not the listening socket, not its API socket.
#[test]
fn an_interrupted_destination_leaves_nothing_behind() {
    if !require_kvm("an_interrupted_destination_leaves_nothing_behind") {
        return;
    }
    let dir = Workdir::new("migrate-int");
    let socket = dir.join("in.sock");
    let address = format!("unix:{}", socket.display());
    let (vm, _stdin) = destination(&dir, "dest", &address, &[]);
    assert!(
        socket.exists(),
        "the destination listens on {}",
        socket.display()
    );
    assert!(vm.signal(libc::SIGINT), "SIGINT delivered");
    let run = vm.wait(STEP_TIMEOUT);
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(
        run.stderr.contains(&format!(
            "SIGINT while waiting for a VM to migrate in on {address}"
        )),
        "{run}"
    );
    assert!(!socket.exists(), "the listening socket is removed");
    assert!(!dir.join("dest.sock").exists(), "the API socket is removed");
}
