//! The interactive console, end to end: what is written to the VMM's stdin (a pipe, or a pty
//! standing in for the user's terminal) reaches the guest's serial port, where the guest's
//! `console-echo` task prints it back; a terminal is raw while the guest runs, Ctrl-A x quits
//! with status 130, and the terminal's settings come back after a quit and after SIGTERM.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use splitvisor_tests::vm::{require_kvm, RunningVm, VM_TIMEOUT};
use splitvisor_tests::workdir::Workdir;

/// Long enough for a loaded host; every wait below ends as soon as its condition holds.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// `splitvisor run ARGS` with its stdin and stdout on `stdin` and `stdout` (RUST_LOG=info:
/// the console's messages are info lines), its stderr in `<dir>/<name>.stderr`.
fn spawn_vmm(args: &[&str], stdin: Stdio, stdout: Stdio, dir: &Workdir, name: &str) -> RunningVm {
    let args = std::iter::once("run").chain(args.iter().copied());
    let env = [("RUST_LOG", "info")];
    RunningVm::spawn_with(args, dir.path(), name, stdin, stdout, &env)
}

/// Both ends of a new pseudo-terminal; the master is non-blocking (the test polls it).
fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: the out-pointers are valid; name, termios and winsize may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and nothing else owns them; F_SETFL on our
    // own master changes only its status flags.
    unsafe {
        libc::fcntl(master, libc::F_SETFL, libc::O_NONBLOCK);
        (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave))
    }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: termios is plain data, filled in by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is valid for writes and `fd` is open.
    let rc = unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) };
    assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
    t
}

fn is_raw(t: &libc::termios) -> bool {
    t.c_lflag & (libc::ECHO | libc::ICANON | libc::ISIG) == 0 && t.c_iflag & libc::ICRNL == 0
}

/// Asserts two terminal settings are the same (flags and control characters).
fn assert_same_settings(before: &libc::termios, after: &libc::termios) {
    let flags = |t: &libc::termios| (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_cc);
    assert_eq!(
        flags(before),
        flags(after),
        "terminal settings not restored"
    );
}

/// Reads the pty master into `seen` until it contains `text` (panics after STEP_TIMEOUT).
fn wait_for_output(master: &OwnedFd, seen: &mut String, text: &str, vmm: &RunningVm) {
    let mut file = File::from(master.try_clone().expect("dup master"));
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut buf = [0u8; 4096];
    while !seen.contains(text) {
        assert!(
            Instant::now() < deadline,
            "no `{text}` on the terminal within {STEP_TIMEOUT:?}\nterminal:\n{seen}\nstderr:\n{}",
            vmm.stderr_so_far()
        );
        match file.read(&mut buf) {
            Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Waits (bounded) until the terminal on `slave` is raw, i.e. splitvisor took it over.
fn wait_until_raw(slave: &OwnedFd, vmm: &RunningVm) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !is_raw(&termios(slave)) {
        assert!(
            Instant::now() < deadline,
            "the terminal never went raw\nstderr:\n{}",
            vmm.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A VMM on a fresh pty, past the point where the guest waits for input and the terminal is
/// raw; returns the pty, its settings before, the terminal output so far and the VMM.
fn vmm_on_a_pty(dir: &Workdir, name: &str) -> (OwnedFd, OwnedFd, libc::termios, String, RunningVm) {
    let (master, slave) = openpty();
    let before = termios(&slave);
    assert!(!is_raw(&before), "a new pty starts cooked");
    let stdio = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup slave"));
    let vmm = spawn_vmm(
        &["--cmdline", "console-echo,lines=3,seconds=120"],
        stdio(&slave),
        stdio(&slave),
        dir,
        name,
    );
    let mut seen = String::new();
    wait_for_output(&master, &mut seen, "console-echo: waiting", &vmm);
    wait_until_raw(&slave, &vmm);
    (master, slave, before, seen, vmm)
}

#[test]
fn piped_stdin_reaches_the_guest() {
    if !require_kvm("piped_stdin_reaches_the_guest") {
        return;
    }
    let dir = Workdir::new("console-pipe");
    let mut vmm = spawn_vmm(
        &["--cmdline", "console-echo"],
        Stdio::piped(),
        Stdio::piped(),
        &dir,
        "pipe",
    );
    let mut stdin = vmm.child().stdin.take().expect("piped");
    let mut stdout = vmm.child().stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    stdin.write_all(b"hello splitvisor\n").expect("write stdin");
    // Kept open: the guest must see the line without waiting for the end of the input.
    let run = vmm.wait(VM_TIMEOUT);
    drop(stdin);
    let out = reader.join().expect("stdout reader");
    assert!(
        out.lines().any(|l| l == "ECHO hello splitvisor"),
        "{out}\n{}",
        run.stderr
    );
    assert!(
        out.contains(r#""task":"console-echo","status":"pass""#),
        "{out}"
    );
    assert_eq!(run.code(), Some(0), "{out}\n{}", run.stderr);
}

#[test]
fn serial_file_leaves_stdin_alone() {
    if !require_kvm("serial_file_leaves_stdin_alone") {
        return;
    }
    let dir = Workdir::new("console-file");
    let log = dir.join("serial.log");
    let (read, mut write) = std::io::pipe().expect("pipe");
    write.write_all(b"not for the guest\n").expect("write");
    let mut unread = File::from(OwnedFd::from(read.try_clone().expect("dup pipe")));
    let serial = format!("file={}", log.display());
    let vmm = spawn_vmm(
        &["--cmdline", "console-echo,seconds=2", "--serial", &serial],
        Stdio::from(OwnedFd::from(read)),
        Stdio::null(),
        &dir,
        "file",
    );
    let run = vmm.wait(VM_TIMEOUT);
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(run.code(), Some(1), "the guest got no line\n{console}");
    assert!(console.contains(r#""lines":0"#), "{console}");
    // Nobody read stdin: the bytes are all still in the pipe.
    drop(write);
    let mut left = String::new();
    unread.read_to_string(&mut left).expect("read pipe");
    assert_eq!(left, "not for the guest\n");
}

#[test]
fn a_terminal_is_raw_while_the_guest_runs_and_ctrl_a_x_quits() {
    if !require_kvm("a_terminal_is_raw_while_the_guest_runs_and_ctrl_a_x_quits") {
        return;
    }
    let dir = Workdir::new("console-pty");
    let (master, slave, before, mut seen, vmm) = vmm_on_a_pty(&dir, "pty");
    let mut keyboard = File::from(master.try_clone().expect("dup master"));
    // Enter on a raw terminal is CR; no echo from the terminal, only the guest's ECHO line.
    keyboard.write_all(b"hello pty\r").expect("type");
    wait_for_output(&master, &mut seen, "ECHO hello pty", &vmm);
    assert_eq!(
        seen.matches("hello pty").count(),
        1,
        "only the guest's ECHO, no echo from the terminal: {seen:?}"
    );
    // Ctrl-C is a byte for the guest, not SIGINT; Ctrl-A Ctrl-A is one Ctrl-A.
    keyboard.write_all(b"c\x03\x01\x01d\r").expect("type");
    wait_for_output(&master, &mut seen, "ECHO c\\x03\\x01d", &vmm);
    keyboard.write_all(b"\x01x").expect("type Ctrl-A x");
    let run = vmm.wait(STEP_TIMEOUT);
    let stderr = run.stderr;
    assert_eq!(run.status.code(), Some(130), "{stderr}\nterminal:\n{seen}");
    assert!(stderr.contains("quit from the console"), "{stderr}");
    assert_same_settings(&before, &termios(&slave));
}

#[test]
fn sigterm_while_raw_restores_the_terminal() {
    if !require_kvm("sigterm_while_raw_restores_the_terminal") {
        return;
    }
    let dir = Workdir::new("console-sigterm");
    let (_master, slave, before, _seen, vmm) = vmm_on_a_pty(&dir, "sigterm");
    assert!(vmm.signal(libc::SIGTERM), "SIGTERM to the VMM");
    let run = vmm.wait(STEP_TIMEOUT);
    let stderr = run.stderr;
    assert_eq!(run.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_same_settings(&before, &termios(&slave));
}
