//! Unit tests of the command lines launch builds.

use super::*;
use crate::launch::spec::{DiskOptions, DiskSpec, NetSpec};

/// A backend directory with (empty) binaries and a runtime directory, removed at drop.
struct Fixture {
    root: PathBuf,
    backends: BackendDir,
    rundir: Option<RuntimeDir>,
}

impl Fixture {
    fn new(name: &str, binaries: &[&str]) -> Fixture {
        let root =
            std::env::temp_dir().join(format!("splitvisor-plan-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bin")).unwrap();
        for binary in binaries {
            std::fs::write(root.join("bin").join(binary), "").unwrap();
        }
        let backends = BackendDir::locate(Some(&root.join("bin"))).unwrap();
        let rundir = RuntimeDir::create(Some(&root)).unwrap();
        Fixture {
            root,
            backends,
            rundir: Some(rundir),
        }
    }

    fn rundir(&self) -> &RuntimeDir {
        self.rundir.as_ref().unwrap()
    }

    fn run(&self, name: &str) -> String {
        self.rundir().path().join(name).display().to_string()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.rundir.take());
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn spec(disks: Vec<DiskSpec>, nets: Vec<NetSpec>) -> LaunchSpec {
    let args: crate::launch::LaunchArgs = crate::run::parse_subcommand(
        "launch",
        ["launch", "--cmdline", "blk-verify", "--vcpus", "2"],
    )
    .unwrap();
    LaunchSpec {
        vm: args.vm,
        disks,
        nets,
        socket_timeout: None,
        reconnect_timeout: None,
    }
}

fn strings(args: &[OsString]) -> Vec<String> {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

fn net(id: &str, backend: NetBackend, mac: Option<&str>) -> NetSpec {
    NetSpec {
        id: id.into(),
        backend,
        mac: mac.map(str::to_string),
        options: NetOptions::default(),
    }
}

#[test]
fn each_disk_and_tap_gets_a_daemon_and_each_switch_one_shared_daemon() {
    let fixture = Fixture::new("full", &[BLK_BINARY, NET_BINARY]);
    let spec = spec(
        vec![DiskSpec {
            id: "disk0".into(),
            image: "/images/a.img".into(),
            readonly: true,
            queues: Some(2),
            options: DiskOptions {
                share: true,
                ..DiskOptions::default()
            },
        }],
        vec![
            net("net0", NetBackend::Tap("tap0".into()), None),
            net(
                "net1",
                NetBackend::Switch("lan".into()),
                Some("52:54:00:00:00:01"),
            ),
            net("net2", NetBackend::Switch("lan".into()), None),
        ],
    );
    let plan = Plan::new(&spec, fixture.rundir(), &fixture.backends, 55).unwrap();
    let bin = |b: &str| fixture.root.join("bin").join(b);
    let daemons: Vec<(String, PathBuf, Vec<String>, usize)> = plan
        .daemons
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                d.program.clone(),
                strings(&d.args),
                d.sockets.len(),
            )
        })
        .collect();
    let (s0, s1, s2, s3) = (
        fixture.run("disk0.sock"),
        fixture.run("net0.sock"),
        fixture.run("net1.sock"),
        fixture.run("net2.sock"),
    );
    // Every daemon's stats API, in the runtime directory.
    let (a0, a1, a2) = (
        fixture.run("disk0.api.sock"),
        fixture.run("net0.api.sock"),
        fixture.run("switch-lan.api.sock"),
    );
    let expected: Vec<(String, PathBuf, Vec<String>, usize)> = vec![
        (
            "disk0".into(),
            bin(BLK_BINARY),
            strings(&[
                "--socket".into(),
                s0.clone().into(),
                "--image".into(),
                "/images/a.img".into(),
                "--api-socket".into(),
                a0.clone().into(),
                "--readonly".into(),
                "--queues".into(),
                "2".into(),
                "--share".into(),
            ]),
            2,
        ),
        (
            "net0".into(),
            bin(NET_BINARY),
            vec![
                "--tap".into(),
                "tap0".into(),
                "--socket".into(),
                s1.clone(),
                "--api-socket".into(),
                a1.clone(),
            ],
            2,
        ),
        (
            "switch-lan".into(),
            bin(NET_BINARY),
            vec![
                "--switch".into(),
                "--api-socket".into(),
                a2.clone(),
                "--socket".into(),
                s2.clone(),
                "--socket".into(),
                s3.clone(),
            ],
            3,
        ),
    ];
    assert_eq!(daemons, expected);
    assert_eq!(
        plan.daemons[2].log,
        fixture.rundir().path().join("switch-lan.log")
    );
    let vmm = strings(&plan.vmm_args);
    let tail = [
        "--disk".to_string(),
        format!("socket={s0},id=disk0,stats={a0}"),
        "--net".into(),
        format!("socket={s1},id=net0,stats={a1}"),
        "--net".into(),
        format!("socket={s2},id=net1,mac=52:54:00:00:00:01,stats={a2}"),
        "--net".into(),
        format!("socket={s3},id=net2,stats={a2}"),
        "--reconnect-timeout".into(),
        "55".into(),
    ];
    assert_eq!(vmm[0], "run");
    assert!(vmm.ends_with(&tail), "{vmm:?}");
    assert!(
        vmm.windows(2).any(|w| w == ["--cmdline", "blk-verify"]),
        "{vmm:?}"
    );
    assert!(vmm.windows(2).any(|w| w == ["--vcpus", "2"]), "{vmm:?}");
}

#[test]
fn a_missing_backend_binary_is_named_with_where_it_was_looked_for() {
    let fixture = Fixture::new("missing", &[BLK_BINARY]);
    let spec = spec(
        Vec::new(),
        vec![net("net0", NetBackend::Tap("tap0".into()), None)],
    );
    let err = Plan::new(&spec, fixture.rundir(), &fixture.backends, 55).unwrap_err();
    let expected = fixture.root.join("bin").join(NET_BINARY);
    assert!(
        err.to_string().contains(&format!(
            "{} does not exist (given by --backend-dir)",
            expected.display()
        )),
        "{err}"
    );
}

#[test]
fn settings_the_vmm_would_reject_are_reported_before_anything_starts() {
    let fixture = Fixture::new("reject", &[BLK_BINARY]);
    let mut spec = spec(Vec::new(), Vec::new());
    spec.vm.memory = splitvisor_vmm::config::ByteSize(1 << 20);
    let err = Plan::new(&spec, fixture.rundir(), &fixture.backends, 55).unwrap_err();
    assert!(
        err.to_string().contains("--memory 1M is too small"),
        "{err}"
    );
}

#[test]
fn a_bare_memory_number_gets_the_suggestion_before_anything_starts() {
    // `memory = 512` in the file, or `launch --memory 512`: bytes, surely meant as MiB.
    let fixture = Fixture::new("bare", &[BLK_BINARY]);
    let mut spec = spec(Vec::new(), Vec::new());
    spec.vm.memory = splitvisor_vmm::config::ByteSize(512);
    let err = Plan::new(&spec, fixture.rundir(), &fixture.backends, 55).unwrap_err();
    assert!(err.to_string().contains("did you mean 512M?"), "{err}");
}

#[test]
fn daemon_options_reach_the_daemons_command_lines() {
    let fixture = Fixture::new("options", &[BLK_BINARY, NET_BINARY]);
    let disk = DiskSpec {
        id: "disk0".into(),
        image: "/images/a.img".into(),
        readonly: false,
        queues: None,
        options: DiskOptions {
            direct: true,
            queue_size: Some(128),
            disk_id: Some("boot".into()),
            share: false,
            poll_us: Some(200),
        },
    };
    let mut tap = net("net0", NetBackend::Tap("tap0".into()), None);
    tap.options = NetOptions {
        mtu: Some(9000),
        queues: Some(2),
    };
    let mut port = net("net1", NetBackend::Switch("lan".into()), None);
    port.options.mtu = Some(1400);
    let plan = Plan::new(
        &spec(vec![disk], vec![tap, port]),
        fixture.rundir(),
        &fixture.backends,
        55,
    )
    .unwrap();
    let args: Vec<String> = plan
        .daemons
        .iter()
        .map(|d| strings(&d.args).join(" "))
        .collect();
    assert!(
        args[0].ends_with("--direct --queue-size 128 --serial boot --poll-us 200"),
        "{args:?}"
    );
    assert!(args[1].ends_with("--mtu 9000 --queues 2"), "{args:?}");
    assert!(
        args[2].starts_with("--switch --api-socket ") && args[2].contains(" --mtu 1400 --socket"),
        "{args:?}"
    );
}
