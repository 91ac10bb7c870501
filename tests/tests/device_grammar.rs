//! The device grammar end to end (README, "One device grammar"): the daemons take the table's
//! flags and aliases, splitvisor-net rejects bad MACs and MTUs with the messages of the shared
//! table `backends/wire/testdata/device-values.txt` (the VMM's unit tests check the same table), and launch
//! passes the disk keys on to splitvisor-blk, whose errors come back through launch.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use splitvisor_tests::daemon::bin;
use splitvisor_tests::launch::Launch;
use splitvisor_tests::vm::{require_kvm, VmRun};
use splitvisor_tests::workdir::Workdir;

/// A daemon that fails its flags exits at once; this only catches one that does not.
const FLAG_TIMEOUT: Duration = Duration::from_secs(20);
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);

const CASES: &str = include_str!("../../backends/wire/testdata/device-values.txt");

/// Runs `program args`, killed (and a panic) if it is still running after FLAG_TIMEOUT.
fn run(program: &Path, args: &[&str]) -> VmRun {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let deadline = Instant::now() + FLAG_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{} {args:?} still ran after {FLAG_TIMEOUT:?}: {}",
                program.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    VmRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The table's rejected values: (flag, input, message).
fn bad_values() -> Vec<(&'static str, &'static str, &'static str)> {
    CASES
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let (kind, input, expected) = (fields.next()?, fields.next()?, fields.next()?);
            (expected != "ok").then_some((kind, input, expected))
        })
        .collect()
}

#[test]
fn net_daemon_rejects_bad_macs_and_mtus_with_the_shared_messages() {
    let net = bin("splitvisor-net");
    let workdir = Workdir::new("grammar-net");
    let socket = workdir.join("n.sock");
    let cases = bad_values();
    assert!(cases.len() >= 10, "{cases:?}");
    for (kind, input, expected) in cases {
        // `--flag=VALUE`: a value such as -1500 is not taken for a flag.
        let flag = format!("--{kind}={input}");
        let args = [
            "--log-level",
            "debug",
            "--switch",
            "--socket",
            socket.to_str().unwrap(),
            flag.as_str(),
        ];
        let out = run(&net, &args);
        assert_eq!(out.code(), Some(2), "{args:?}\n{out}");
        assert!(out.stderr.contains(expected), "{args:?}: {expected}\n{out}");
        assert!(!socket.exists(), "{args:?} created its socket");
    }
}

#[test]
fn net_daemon_help_lists_the_grammar_flags() {
    let out = run(&bin("splitvisor-net"), &["--help"]);
    assert_eq!(out.code(), Some(0), "{out}");
    for flag in [
        "--socket",
        "--tap",
        "--switch",
        "--mac",
        "--mtu",
        "--queues",
        "--log-level",
    ] {
        assert!(out.stdout.contains(flag), "{flag}\n{out}");
    }
    // --log-level parses: what is missing is --socket.
    let out = run(&bin("splitvisor-net"), &["--log-level", "warn", "--switch"]);
    assert!(out.stderr.contains("--socket"), "{out}");
}

#[test]
fn blk_daemon_takes_the_grammar_flags_and_aliases() {
    let blk = bin("splitvisor-blk");
    let out = run(&blk, &["--help"]);
    assert_eq!(out.code(), Some(0), "{out}");
    for flag in [
        "--image",
        "--path",
        "--readonly",
        "--ro",
        "--queues",
        "--queue-size",
        "--direct",
        "--serial",
        "--disk-id",
        "--log-level",
    ] {
        assert!(out.stdout.contains(flag), "{flag}\n{out}");
    }
    let workdir = Workdir::new("grammar-blk");
    let image = workdir.join("disk.img");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    let socket = workdir.join("b.sock");
    let base = [
        "--socket",
        socket.to_str().unwrap(),
        "--path",
        image.to_str().unwrap(),
        "--ro",
        "--direct",
        "--log-level",
        "debug",
    ];
    let cases: [(&[&str], &str); 2] = [
        (
            &["--disk-id", "a-disk-id-of-21-bytes"],
            "--serial is 21 bytes, at most 20 fit in a virtio-blk ID",
        ),
        (
            &["--queue-size", "3"],
            "--queue-size must be a power of two between 2 and 32768, got 3",
        ),
    ];
    for (extra, expected) in cases {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let out = run(&blk, &args);
        assert_eq!(out.code(), Some(1), "{args:?}\n{out}");
        assert!(out.stderr.contains(expected), "{args:?}\n{out}");
    }
}

/// launch hands the disk keys to splitvisor-blk: a bad value fails with the daemon's own
/// message, from the flags and from the file alike; a bad MTU fails with the shared message.
#[test]
fn launch_passes_disk_keys_to_the_daemon_and_reports_its_errors() {
    let workdir = Workdir::new("grammar-launch");
    let image = workdir.join("disk.img");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    let config = workdir.join("vm.toml");
    std::fs::write(
        &config,
        "[[disk]]\npath = \"disk.img\"\nro = true\nqueue_size = 1000\n",
    )
    .unwrap();
    let flag = format!("path={},ro,queue_size=1000", image.display());
    for args in [
        vec!["--disk", flag.as_str()],
        vec!["--config", config.to_str().unwrap()],
    ] {
        let run = Launch::run(&args, &workdir, "bad", LAUNCH_TIMEOUT);
        assert_eq!(run.run.code(), Some(1), "{args:?}\n{run}");
        for text in [
            "--queue-size 1000",
            "--queue-size must be a power of two between 2 and 32768, got 1000",
        ] {
            assert!(run.run.stderr.contains(text), "{args:?}: {text}\n{run}");
        }
        run.assert_nothing_left();
    }
    let mtu = "'67' is not an MTU: expected a number of bytes from 68 to 65535";
    let run = Launch::run(
        ["--net", "switch=lan,mtu=67"],
        &workdir,
        "mtu",
        LAUNCH_TIMEOUT,
    );
    assert_eq!(run.run.code(), Some(2), "{run}");
    assert!(run.run.stderr.contains(mtu), "{run}");
}

/// With KVM: the daemon options reach splitvisor-blk and the guest's disk works with them.
#[test]
fn launch_runs_a_disk_with_every_daemon_key() {
    if !require_kvm("launch_runs_a_disk_with_every_daemon_key") {
        return;
    }
    let workdir = Workdir::new("grammar-kvm");
    let image = workdir.join("disk.img");
    std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
    let flag = format!(
        "image={},queues=2,direct,queue_size=512,disk_id=grammar-1,id=root",
        image.display()
    );
    let run = Launch::run(
        ["--disk", &flag, "--cmdline", "blk-verify"],
        &workdir,
        "kvm",
        LAUNCH_TIMEOUT,
    );
    assert_eq!(run.run.code(), Some(0), "{run}");
    run.run.assert_passed();
    let daemon_line = run
        .run
        .stderr
        .lines()
        .find(|l| l.contains("splitvisor-blk") && l.contains("--image"))
        .unwrap_or_else(|| panic!("no splitvisor-blk command line\n{run}"));
    for part in [
        "--queues 2",
        "--direct",
        "--queue-size 512",
        "--serial grammar-1",
    ] {
        assert!(daemon_line.contains(part), "{part}: {daemon_line}");
    }
    run.assert_nothing_left();
}
