//! Supervisor tests with real processes: small shell scripts stand in for the daemons (a
//! daemon is "up" once its socket path exists, so a plain file serves as its socket here).

use super::*;

/// A scratch directory, removed at drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "splitvisor-supervisor-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A daemon running `sh -c script`, with `$S` its socket path and `$D` the directory.
    fn daemon(&self, name: &str, script: &str) -> DaemonSpec {
        let socket = self.0.join(format!("{name}.sock"));
        let script = format!(
            "S='{}'; D='{}'; {script}",
            socket.display(),
            self.0.display()
        );
        DaemonSpec {
            name: name.to_string(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            sockets: vec![socket],
            log: self.0.join(format!("{name}.log")),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; an unreaped zombie would show state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn tend_until(
    supervisor: &mut Supervisor,
    timeout: Duration,
    mut done: impl FnMut(&Supervisor) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done(supervisor) {
        assert!(Instant::now() < deadline, "timed out: {supervisor:?}");
        supervisor.tend();
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_killed_daemon_is_restarted_and_stop_all_ends_it() {
    let scratch = Scratch::new("restart");
    let spec = scratch.daemon("disk0", "echo serving; touch \"$S\"; exec sleep 60");
    let log = spec.log.clone();
    let mut supervisor =
        Supervisor::new(vec![spec], RestartPolicy::DEFAULT, Duration::from_secs(5));
    let signals = SignalWait::install().unwrap();
    supervisor.start_all(&signals).unwrap();
    let first = supervisor.pids();
    assert_eq!(first.len(), 1);
    assert!(!supervisor.had_trouble());
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(first[0] as i32, libc::SIGKILL) };
    tend_until(
        &mut supervisor,
        Duration::from_secs(5),
        |s| matches!(s.pids()[..], [pid] if pid != first[0]),
    );
    let second = supervisor.pids()[0];
    assert!(supervisor.had_trouble());
    // The new run writes its line soon after it starts (a file, not a socket, marks it up).
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.lines().filter(|l| *l == "serving").count() == 2 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        text.contains("--- launch (start)") && text.contains("--- launch (restart 1)"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| *l == "serving").count(),
        2,
        "{text}"
    );
    supervisor.stop_all();
    assert!(supervisor.pids().is_empty());
    assert!(!is_alive(first[0]) && !is_alive(second));
}

#[test]
fn a_daemon_that_exits_at_start_is_an_error_with_its_log() {
    let scratch = Scratch::new("exits");
    let good = scratch.daemon("disk0", "touch \"$S\"; exec sleep 60");
    let bad = scratch.daemon(
        "net0",
        "echo 'cannot open TAP tap9: Operation not permitted' >&2; exit 1",
    );
    let mut supervisor = Supervisor::new(
        vec![good, bad],
        RestartPolicy::DEFAULT,
        Duration::from_secs(5),
    );
    let signals = SignalWait::install().unwrap();
    let err = supervisor.start_all(&signals).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("the net0 backend exited with status 1 before creating")
            && text.contains("net0.sock")
            && text.contains("net0.log")
            && text.contains("cannot open TAP tap9"),
        "{text}"
    );
    let started = supervisor.pids();
    supervisor.stop_all();
    assert!(started.iter().all(|pid| !is_alive(*pid)));
}

#[test]
fn a_daemon_that_never_creates_its_socket_times_out() {
    let scratch = Scratch::new("timeout");
    let spec = scratch.daemon("disk0", "echo waiting forever; exec sleep 60");
    let mut supervisor = Supervisor::new(
        vec![spec],
        RestartPolicy::DEFAULT,
        Duration::from_millis(300),
    );
    let signals = SignalWait::install().unwrap();
    let err = supervisor.start_all(&signals).unwrap_err();
    assert!(matches!(err, StartError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("waiting forever"), "{err}");
    supervisor.stop_all();
}

#[test]
fn a_daemon_that_keeps_failing_to_restart_is_given_up_on() {
    let scratch = Scratch::new("crashloop");
    // The first run comes up; every later run fails before creating its socket.
    let spec = scratch.daemon(
        "disk0",
        "rm -f \"$S\"; if [ -e \"$D/ran\" ]; then echo broken; exit 3; fi; touch \"$D/ran\" \"$S\"; exec sleep 60",
    );
    let mut supervisor =
        Supervisor::new(vec![spec], RestartPolicy::DEFAULT, Duration::from_secs(5));
    let signals = SignalWait::install().unwrap();
    supervisor.start_all(&signals).unwrap();
    std::thread::sleep(RestartPolicy::DEFAULT.healthy_after);
    let pid = supervisor.pids()[0];
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let started = Instant::now();
    // Given up: nothing running and nothing scheduled.
    tend_until(&mut supervisor, Duration::from_secs(10), |s| {
        s.pids().is_empty() && s.daemons.iter().all(|d| matches!(d.phase, Phase::Done))
    });
    // Waits of 50 + 100 + 200 + 400 + 800 ms before the five tries.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(supervisor.daemons[0].history.restarts(), 5);
}

#[test]
fn stale_sockets_are_removed_but_other_files_are_not() {
    let scratch = Scratch::new("stale");
    let socket = scratch.0.join("x.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    remove_stale_socket(&socket).unwrap();
    assert!(!socket.exists());
    remove_stale_socket(&socket).unwrap();
    let file = scratch.0.join("file.sock");
    std::fs::write(&file, "x").unwrap();
    remove_stale_socket(&file).unwrap();
    assert!(file.exists());
}

#[test]
fn exits_are_described_by_status_or_signal() {
    let status = |raw| ExitStatus::from_raw(raw);
    assert_eq!(describe_exit(status(1 << 8)), "exited with status 1");
    assert_eq!(
        describe_exit(status(libc::SIGKILL)),
        "was killed by SIGKILL"
    );
    assert_eq!(human(Duration::from_millis(50)), "50 ms");
    assert_eq!(human(Duration::from_millis(12_345)), "12.3 s");
}

#[test]
fn an_interrupt_while_starting_is_reported_as_such() {
    let scratch = Scratch::new("interrupt");
    let spec = scratch.daemon("disk0", "exec sleep 60");
    let mut supervisor =
        Supervisor::new(vec![spec], RestartPolicy::DEFAULT, Duration::from_secs(30));
    let signals = SignalWait::install().unwrap();
    // SAFETY: SIGINT is blocked in this thread, so it stays pending until start_all takes it.
    unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGINT) };
    let err = supervisor.start_all(&signals).unwrap_err();
    assert!(
        matches!(err, StartError::Interrupted(libc::SIGINT)),
        "{err}"
    );
    let pids = supervisor.pids();
    supervisor.stop_all();
    assert!(pids.iter().all(|pid| !is_alive(*pid)));
}

#[test]
fn daemons_start_with_no_signal_blocked_and_stop_at_sigterm() {
    let scratch = Scratch::new("sigmask");
    let spec = scratch.daemon(
        "disk0",
        "grep SigBlk /proc/self/status > \"$D/mask\"; touch \"$S\"; exec sleep 60",
    );
    let mut supervisor =
        Supervisor::new(vec![spec], RestartPolicy::DEFAULT, Duration::from_secs(5));
    // launch blocks SIGINT, SIGTERM and SIGCHLD; its children must not inherit that.
    let signals = SignalWait::install().unwrap();
    supervisor.start_all(&signals).unwrap();
    let mask = std::fs::read_to_string(scratch.0.join("mask")).unwrap();
    assert_eq!(mask.trim(), "SigBlk:\t0000000000000000");
    let started = Instant::now();
    supervisor.stop_all();
    assert!(
        started.elapsed() < DAEMON_STOP_GRACE / 2,
        "{:?}",
        started.elapsed()
    );
    assert!(!supervisor.had_trouble());
}
