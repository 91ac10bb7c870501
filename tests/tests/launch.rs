//! `splitvisor launch` end to end: real daemons, real KVM. The guest's status comes back as
//! launch's; a terminal's Ctrl-C (SIGINT to launch's process group) or a SIGTERM stops guest,
//! VMM and daemons and leaves no process, socket or directory behind; a daemon killed with
//! SIGKILL comes back on its socket; bad input fails clearly and leaves nothing behind.

use std::path::Path;
use std::time::Duration;

use splitvisor_tests::launch::{Launch, LaunchRun};
use splitvisor_tests::pattern::nonce;
use splitvisor_tests::pattern::{self, SECTOR};
use splitvisor_tests::vm::{require_kvm, run_splitvisor};
use splitvisor_tests::workdir::Workdir;

/// A launch with a short task finishes in seconds; this is the hang detector.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest may take to reach its task (boot, daemons, handshakes).
const GUEST_START: Duration = Duration::from_secs(30);
/// How long a killed daemon may take to be serving again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(10);
const IMAGE_LEN: usize = 4 << 20;

fn image(workdir: &Workdir, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let path = workdir.join("disk.img");
    let bytes = splitvisor_tests::image::random(&path, seed, IMAGE_LEN);
    (path, bytes)
}

fn disk_flag(image: &Path) -> String {
    format!("image={}", image.display())
}

/// No `splitvisor-launch-*` directory remains in the work directory.
fn assert_no_runtime_dir(workdir: &Workdir, run: &LaunchRun) {
    let left: Vec<_> = std::fs::read_dir(workdir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("splitvisor-launch-")
        })
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "runtime directories left: {left:?}\n{run}");
}

#[test]
fn launch_runs_blk_verify_on_its_disk_and_leaves_nothing_behind() {
    if !require_kvm("launch_runs_blk_verify_on_its_disk_and_leaves_nothing_behind") {
        return;
    }
    let workdir = Workdir::new("launch-ok");
    let (path, before) = image(&workdir, nonce());
    let run = Launch::run(
        [
            "--disk",
            &disk_flag(&path),
            "--cmdline",
            "blk-verify,size=256K",
        ],
        &workdir,
        "launch",
        LAUNCH_TIMEOUT,
    );
    let result = run.run.assert_passed();
    assert_eq!(result["dev"], "virtio", "{run}");
    assert_eq!(
        result["capacity_sectors"],
        (IMAGE_LEN as u64) / SECTOR,
        "{run}"
    );
    // The guest's pattern is in the image, the rest is untouched.
    let after = std::fs::read(&path).unwrap();
    let written = 256 << 10;
    assert!(
        after[..written] == pattern::sectors(pattern::DEFAULT_SEED, 0, written)[..],
        "pattern"
    );
    assert!(
        after[written..] == before[written..],
        "bytes beyond the guest's region changed"
    );
    // The VMM got exactly the daemon's socket and a reconnect timeout.
    let dir = run.runtime_dir.clone().expect("runtime directory printed");
    let socket = dir.join("disk0.sock");
    let stats = dir.join("disk0.api.sock");
    let stderr = &run.run.stderr;
    assert!(
        stderr.contains(&format!(
            "splitvisor-blk --socket {} --image {} --api-socket {}",
            socket.display(),
            path.display(),
            stats.display()
        )),
        "{run}"
    );
    assert!(
        stderr.contains(&format!(
            "--disk socket={},id=disk0,stats={} --reconnect-timeout 55",
            socket.display(),
            stats.display()
        )),
        "{run}"
    );
    run.assert_nothing_left();
    assert_no_runtime_dir(&workdir, &run);
}

#[test]
fn launch_from_a_toml_file_returns_the_guest_s_status() {
    if !require_kvm("launch_from_a_toml_file_returns_the_guest_s_status") {
        return;
    }
    let workdir = Workdir::new("launch-toml");
    image(&workdir, 1);
    // Paths in the file are relative to it; two cards share one switch daemon.
    let config = workdir.join("vm.toml");
    std::fs::write(
        &config,
        r#"
memory = "128M"
cmdline = "exit=7"

[[disk]]
id = "root"
image = "disk.img"
readonly = true

[[net]]
switch = "lan"

[[net]]
switch = "lan"
mac = "52:54:00:00:00:42"
"#,
    )
    .unwrap();
    let run = Launch::run(
        ["--config", config.to_str().unwrap()],
        &workdir,
        "launch",
        LAUNCH_TIMEOUT,
    );
    assert_eq!(run.run.code(), Some(7), "{run}");
    let dir = run.runtime_dir.clone().expect("runtime directory printed");
    let stderr = &run.run.stderr;
    let sock = |id: &str| dir.join(format!("{id}.sock")).display().to_string();
    for expected in [
        format!(
            "--socket {} --image {} --api-socket {} --readonly",
            sock("root"),
            workdir.join("disk.img").display(),
            sock("root.api")
        ),
        format!(
            "splitvisor-net --switch --api-socket {} --socket {} --socket {}",
            sock("switch-lan.api"),
            sock("net0"),
            sock("net1")
        ),
        format!(
            "--net socket={},id=net1,mac=52:54:00:00:00:42,stats={}",
            sock("net1"),
            sock("switch-lan.api")
        ),
        "--memory 128M".to_string(),
        "the VMM exited with status 7".to_string(),
    ] {
        assert!(stderr.contains(&expected), "{expected:?}\n{run}");
    }
    assert_eq!(
        stderr.matches("splitvisor-net --switch").count(),
        1,
        "{run}"
    );
    run.assert_nothing_left();
}

#[test]
fn ctrl_c_to_the_process_group_stops_guest_vmm_and_daemons() {
    if !require_kvm("ctrl_c_to_the_process_group_stops_guest_vmm_and_daemons") {
        return;
    }
    let workdir = Workdir::new("launch-int");
    let (path, _) = image(&workdir, 2);
    let launch = Launch::spawn(
        [
            "--disk",
            &disk_flag(&path),
            "--net",
            "switch=lan",
            "--cmdline",
            "blk-verify,seconds=60",
        ],
        &workdir,
        "launch",
    );
    launch.wait_for_stdout("running task `blk-verify", GUEST_START);
    let daemons = launch.daemons();
    let vmm = launch.vmm().expect("the VMM runs");
    assert_eq!(daemons.len(), 2, "{daemons:?}");
    assert!(launch.socket("disk0").exists() && launch.socket("net0").exists());
    launch.interrupt_group();
    let run = launch.wait(LAUNCH_TIMEOUT);
    assert_eq!(run.run.code(), Some(130), "{run}");
    assert!(
        run.run
            .stderr
            .contains("launch: SIGINT received; stopping the VMM"),
        "{run}"
    );
    // The guest was stopped mid-task: no RESULT.
    assert!(!run.run.stdout.contains("RESULT "), "{run}");
    for pid in daemons.iter().map(|d| d.pid).chain([vmm.pid]) {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} remains\n{run}"
        );
    }
    run.assert_nothing_left();
    assert_no_runtime_dir(&workdir, &run);
}

#[test]
fn sigterm_to_launch_alone_stops_the_vmm_first_then_the_daemons() {
    if !require_kvm("sigterm_to_launch_alone_stops_the_vmm_first_then_the_daemons") {
        return;
    }
    let workdir = Workdir::new("launch-term");
    let (path, _) = image(&workdir, 3);
    let launch = Launch::spawn(
        [
            "--disk",
            &disk_flag(&path),
            "--cmdline",
            "blk-verify,seconds=60",
        ],
        &workdir,
        "launch",
    );
    launch.wait_for_stdout("running task `blk-verify", GUEST_START);
    launch.terminate();
    let run = launch.wait(LAUNCH_TIMEOUT);
    assert_eq!(run.run.code(), Some(130), "{run}");
    let stderr = &run.run.stderr;
    // launch's SIGTERM made the VMM stop the VM in order (its own status 130).
    let stopping = stderr
        .find("launch: SIGTERM received")
        .expect("interrupt logged");
    let vmm_done = stderr
        .find("launch: the VMM exited with status 130")
        .expect("VMM stopped");
    assert!(stopping < vmm_done, "{run}");
    run.assert_nothing_left();
}

#[test]
fn a_daemon_killed_with_sigkill_is_restarted_on_its_socket() {
    if !require_kvm("a_daemon_killed_with_sigkill_is_restarted_on_its_socket") {
        return;
    }
    let workdir = Workdir::new("launch-kill");
    let (path, _) = image(&workdir, 4);
    // The guest serves on its NIC, so it does not depend on the disk whose daemon is killed.
    let launch = Launch::spawn(
        [
            "--disk",
            &disk_flag(&path),
            "--net",
            "switch=lan",
            "--cmdline",
            "serve,seconds=60 ip=10.0.0.2/24",
        ],
        &workdir,
        "launch",
    );
    launch.wait_for_stdout("ip 10.0.0.2/", GUEST_START);
    // As many kills as the crash-recovery test does, but the guest does not use the disk: this
    // is about launch bringing the daemon back, not about the I/O across it.
    let kills: u32 = 20;
    let seed = nonce();
    let mut pid = launch.wait_serving("disk0", None, RESTART_TIMEOUT);
    for restart in 1..=kills {
        assert_eq!(launch.kill_daemon("disk0"), pid);
        let next = launch.wait_serving("disk0", Some(pid), RESTART_TIMEOUT);
        let stderr = launch.wait_for_stderr(
            &format!("launch: the disk0 backend (pid {next}) is serving"),
            RESTART_TIMEOUT,
        );
        let died = format!("launch: the disk0 backend (pid {pid}) was killed by SIGKILL after");
        let line = stderr.lines().find(|l| l.starts_with(&died));
        assert!(
            line.is_some_and(|l| l.ends_with(&format!("(restart {restart})"))),
            "{stderr}"
        );
        pid = next;
        // Kills 0.5 to 1 s apart: crashes under load, not a crash loop, so no give-up.
        let jitter = pattern::splitmix64(seed ^ u64::from(restart)) % 500;
        std::thread::sleep(Duration::from_millis(500 + jitter));
    }
    let dir = launch.runtime_dir().to_path_buf();
    launch.interrupt_group();
    let run = launch.wait(LAUNCH_TIMEOUT);
    assert_eq!(run.run.code(), Some(130), "{run}");
    assert!(run.leftovers().is_empty(), "{:?}\n{run}", run.leftovers());
    // A backend died while the VM ran: its log stays, nothing else does.
    let mut kept: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["disk0.log", "switch-lan.log"], "{run}");
    let log = std::fs::read_to_string(dir.join("disk0.log")).unwrap();
    assert_eq!(
        log.matches("--- launch (").count(),
        kills as usize + 1,
        "{log}"
    );
    assert!(!run.run.stderr.contains("giving up"), "{run}");
    assert!(
        run.run
            .stderr
            .contains(&format!("its log is kept in {}", dir.display())),
        "{run}"
    );
}

#[test]
fn bad_input_fails_clearly_and_leaves_nothing_behind() {
    if !require_kvm("bad_input_fails_clearly_and_leaves_nothing_behind") {
        return;
    }
    let workdir = Workdir::new("launch-bad");
    let (path, _) = image(&workdir, 5);
    let config = workdir.join("vm.toml");
    std::fs::write(&config, "[[disk]]\nimage = \"disk.img\"\nbootindex = 1\n").unwrap();
    let disk = disk_flag(&path);
    let cases: [(Vec<&str>, Vec<String>); 4] = [
        (
            vec!["--disk", "image=/nonexistent/disk.img"],
            vec!["disk 'disk0': cannot use image /nonexistent/disk.img".into()],
        ),
        (
            vec!["--config", config.to_str().unwrap()],
            vec![
                config.display().to_string(),
                "unknown field `bootindex`".into(),
            ],
        ),
        (
            vec!["--disk", &disk, "--backend-dir", "/nonexistent"],
            vec!["backend binary /nonexistent/splitvisor-blk does not exist".into()],
        ),
        // "lo" exists and is no TAP: splitvisor-net cannot attach. The disk daemon started
        // beside it must be stopped again.
        (
            vec!["--disk", &disk, "--net", "tap=lo", "--cmdline", "exit=0"],
            vec![
                "the net0 backend exited with status 1 before creating".into(),
                "net0.log ends with:".into(),
                "TAP lo".into(),
            ],
        ),
    ];
    for (args, expected) in cases {
        let run = Launch::run(&args, &workdir, "bad", LAUNCH_TIMEOUT);
        assert_eq!(run.run.code(), Some(1), "{args:?}\n{run}");
        for text in &expected {
            assert!(
                run.run.stderr.contains(text.as_str()),
                "{args:?}: {text:?}\n{run}"
            );
        }
        assert!(
            !run.run.stdout.contains("RESULT"),
            "the VM must not start\n{run}"
        );
        run.assert_nothing_left();
        assert_no_runtime_dir(&workdir, &run);
    }
}

#[test]
fn launch_help_documents_flags_runtime_dir_restarts_and_signals() {
    let run = run_splitvisor(["launch", "--help"], Duration::from_secs(30));
    assert_eq!(run.code(), Some(0), "{run}");
    for text in [
        "--disk <SPEC>",
        "image=PATH[,readonly][,queues=N][,id=NAME]",
        "--net <SPEC>",
        "tap=NAME",
        "switch=NAME",
        "--config <FILE>",
        "--runtime-dir <DIR>",
        "--backend-dir <DIR>",
        "--socket-timeout <SECONDS>",
        "--memory <SIZE>",
        "--vcpus <N>",
        "--kernel <PATH>",
        "--cmdline <STRING>",
        "--serial <DEST>",
        "--prefault",
        "--stats",
        "--connect-timeout <SECONDS>",
        "--api-socket <PATH>",
        "Runtime directory:",
        "Supervision:",
        "Signals and exit status:",
        "SPLITVISOR_BACKEND_DIR",
    ] {
        assert!(
            run.stdout.contains(text),
            "{text:?} missing from launch --help\n{run}"
        );
    }
}
