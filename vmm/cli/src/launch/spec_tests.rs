//! Unit tests of the launch description: flags, the TOML file, and the checks on both.

use super::*;
use crate::run::parse_subcommand;
use splitvisor_wire::host::error::error_chain;

fn launch_args(argv: &[&str]) -> LaunchArgs {
    parse_launch(["launch"].iter().chain(argv)).unwrap_or_else(|e| panic!("{e}"))
}

/// `launch`'s arguments parsed as `splitvisor launch` does (the first one is `launch`).
fn parse_launch<'a>(
    argv: impl IntoIterator<Item = &'a &'a str>,
) -> Result<LaunchArgs, clap::Error> {
    parse_subcommand("launch", argv)
}

/// A scratch directory with an image file in it, removed at drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("splitvisor-spec-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("disk.img"), [0u8; 512]).unwrap();
        Scratch(dir)
    }

    fn image(&self) -> String {
        self.0.join("disk.img").display().to_string()
    }

    fn file(&self, text: &str) -> PathBuf {
        let path = self.0.join("vm.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn flags_give_devices_default_ids_in_order() {
    let scratch = Scratch::new("flags");
    let disk = format!("image={},readonly,queues=2", scratch.image());
    let named = format!("image={},id=data", scratch.image());
    let args = launch_args(&[
        "--disk",
        &disk,
        "--disk",
        &named,
        "--net",
        "tap=tap7,mac=52:54:00:00:00:07",
        "--net",
        "switch=lan",
        "--memory",
        "512M",
        "--cmdline",
        "blk-verify",
    ]);
    let spec = LaunchSpec::from_args(&args).unwrap();
    assert_eq!(spec.vm.memory, ByteSize(512 << 20));
    assert_eq!(spec.vm.cmdline.as_deref(), Some("blk-verify"));
    assert_eq!(
        spec.disks,
        [
            DiskSpec {
                id: "disk0".into(),
                image: scratch.image().into(),
                readonly: true,
                queues: Some(2),
                options: DiskOptions::default(),
            },
            DiskSpec {
                id: "data".into(),
                image: scratch.image().into(),
                readonly: false,
                queues: None,
                options: DiskOptions::default(),
            },
        ]
    );
    assert_eq!(
        spec.nets,
        [
            NetSpec {
                id: "net0".into(),
                backend: NetBackend::Tap("tap7".into()),
                mac: Some("52:54:00:00:00:07".into()),
                options: NetOptions::default(),
            },
            NetSpec {
                id: "net1".into(),
                backend: NetBackend::Switch("lan".into()),
                mac: None,
                options: NetOptions::default(),
            },
        ]
    );
}

#[test]
fn bad_device_flags_name_the_flag_and_the_problem() {
    let cases = [
        ("--disk", "socket=/x", "unknown key 'socket'"),
        ("--disk", "readonly", "expected image=PATH"),
        ("--disk", "image=/x,queues=many", "queues=many"),
        (
            "--net",
            "tap=a,switch=b",
            "exactly one of tap=NAME or switch=NAME",
        ),
        ("--net", "mac=52:54:00:00:00:01", "exactly one of"),
        ("--net", "socket=/x", "unknown key 'socket'"),
    ];
    for (flag, value, expected) in cases {
        let err = parse_launch(&["launch", flag, value]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(flag) && text.contains(expected),
            "{flag} {value}: {text}"
        );
    }
}

#[test]
fn checks_reject_unsafe_ids_duplicates_bad_macs_and_missing_images() {
    let scratch = Scratch::new("checks");
    let image = format!("image={}", scratch.image());
    let cases: [(Vec<String>, &str); 5] = [
        (
            vec!["--disk".into(), format!("{image},id=../x")],
            "device id '../x' must be 1 to 32",
        ),
        (
            vec![
                "--disk".into(),
                format!("{image},id=a"),
                "--net".into(),
                "switch=s,id=a".into(),
            ],
            "device id 'a' is used twice",
        ),
        (
            vec!["--net".into(), "switch=lan,id=switch-lan".into()],
            "'switch-lan' is the name of switch 'lan''s daemon",
        ),
        (
            vec!["--net".into(), "tap=t0,mac=52:54".into()],
            "network card 'net0': mac = \"52:54\"",
        ),
        (
            vec!["--disk".into(), "image=/nonexistent/disk.img".into()],
            "disk 'disk0': cannot use image /nonexistent/disk.img",
        ),
    ];
    for (argv, expected) in cases {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let err = LaunchSpec::from_args(&launch_args(&argv)).unwrap_err();
        assert!(
            error_chain(&err).contains(expected),
            "{argv:?}: {}",
            error_chain(&err)
        );
    }
}

#[test]
fn toml_file_describes_the_vm_with_paths_relative_to_the_file() {
    let scratch = Scratch::new("toml");
    let path = scratch.file(
        r#"
memory = "512M"
vcpus = 2
cmdline = "blk-verify,seconds=30"
serial = "file=console.log"
prefault = true
stats = true
connect_timeout = 3
api_socket = "/run/vm-api.sock"

[[disk]]
image = "disk.img"
readonly = true
queues = 2

[[disk]]
id = "scratch"
image = "disk.img"

[[net]]
tap = "tap0"
mac = "52:54:00:12:34:56"

[[net]]
id = "lan0"
switch = "lan"
"#,
    );
    let spec = LaunchSpec::from_args(&launch_args(&["--config", path.to_str().unwrap()])).unwrap();
    let vm = &spec.vm;
    assert_eq!((vm.memory, vm.vcpus), (ByteSize(512 << 20), 2));
    assert_eq!(vm.cmdline.as_deref(), Some("blk-verify,seconds=30"));
    assert_eq!(vm.serial, SerialConfig::File(scratch.0.join("console.log")));
    assert!(vm.prefault && vm.stats);
    assert_eq!(vm.connect_timeout, 3);
    assert_eq!(vm.api_socket, Some(PathBuf::from("/run/vm-api.sock")));
    assert_eq!(vm.kernel, None);
    let ids: Vec<&str> = spec.disks.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["disk0", "scratch"]);
    assert_eq!(spec.disks[0].image, scratch.0.join("disk.img"));
    assert_eq!(
        (spec.disks[0].readonly, spec.disks[0].queues),
        (true, Some(2))
    );
    assert_eq!(spec.nets[0].backend, NetBackend::Tap("tap0".into()));
    assert_eq!(spec.nets[0].id, "net0");
    assert_eq!(spec.nets[1].backend, NetBackend::Switch("lan".into()));
}

#[test]
fn an_empty_toml_file_means_run_s_defaults() {
    let scratch = Scratch::new("empty");
    let path = scratch.file("");
    let spec = LaunchSpec::from_args(&launch_args(&["--config", path.to_str().unwrap()])).unwrap();
    let defaults = launch_args(&[]).vm;
    assert_eq!(spec.vm, defaults);
    assert!(spec.disks.is_empty() && spec.nets.is_empty());
}

#[test]
fn toml_errors_name_the_file_and_the_key() {
    let scratch = Scratch::new("toml-errors");
    let cases = [
        ("memroy = \"1G\"\n", "unknown field `memroy`"),
        (
            "[[disk]]\nimage = \"disk.img\"\nsize = 3\n",
            "unknown field `size`",
        ),
        ("[[net]]\nbridge = \"br0\"\n", "unknown field `bridge`"),
        (
            "memory = \"12X\"\n",
            "memory = \"12X\": '12X' is not a size",
        ),
        ("serial = \"tty\"\n", "serial = \"tty\""),
        ("vcpus = \"two\"\n", "vcpus"),
        (
            "[[disk]]\nreadonly = true\n",
            "disk 'disk0' needs image=PATH",
        ),
        (
            "[[net]]\nid = \"n\"\n",
            "network card 'n' needs exactly one of",
        ),
    ];
    for (text, expected) in cases {
        let path = scratch.file(text);
        let err =
            LaunchSpec::from_args(&launch_args(&["--config", path.to_str().unwrap()])).unwrap_err();
        let message = error_chain(&err);
        assert!(
            message.contains(&path.display().to_string()) && message.contains(expected),
            "{text:?}: {message}"
        );
    }
}

#[test]
fn a_config_file_cannot_be_combined_with_vm_or_device_flags() {
    for flag in [
        &["--memory", "1G"][..],
        &["--cmdline", "selftest"],
        &["--prefault"],
        &["--disk", "image=/x"],
        &["--net", "tap=t"],
        &["--api-socket", "/x"],
    ] {
        let argv = ["launch", "--config", "vm.toml"];
        let err = parse_launch(argv.iter().chain(flag)).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::ArgumentConflict,
            "{flag:?}"
        );
    }
    // Flags about launch itself still combine with a file.
    let argv = [
        "launch",
        "--config",
        "vm.toml",
        "--runtime-dir",
        "/tmp",
        "--socket-timeout",
        "3",
    ];
    assert!(parse_launch(&argv).is_ok());
}

#[test]
fn the_readme_example_uses_every_key_of_the_format() {
    let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));
    // The reference example (the runnable one before it is checked by tests/tests/readme.rs).
    let example = readme
        .split("```toml\n")
        .map(|rest| rest.split("```").next().unwrap_or_default())
        .find(|block| block.starts_with("# reference"))
        .expect("README has a reference toml example");
    let spec = LaunchSpec::from_toml(example, Path::new("/etc/vm/vm.toml")).unwrap();
    assert_eq!(spec.vm.kernel, Some(PathBuf::from("/etc/vm/vmlinuz")));
    assert_eq!(
        spec.vm.api_socket,
        Some(PathBuf::from("/etc/vm/vm-api.sock"))
    );
    assert_eq!(spec.disks[0].image, PathBuf::from("/etc/vm/disk.img"));
    assert_eq!(spec.nets[0].mac.as_deref(), Some("52:54:00:12:34:56"));
    assert_eq!(
        (spec.socket_timeout, spec.reconnect_timeout),
        (Some(10), Some(55))
    );
    // Every field of the format appears in the example (serde names them in its error).
    let toml_keys = |text: &str| {
        let err = LaunchSpec::from_toml(text, Path::new("x.toml")).unwrap_err();
        let message = err.to_string();
        let keys = message
            .split("expected one of ")
            .nth(1)
            .unwrap()
            .to_string();
        keys.split(", ")
            .map(|k| k.trim().trim_matches('`').to_string())
            .collect::<Vec<_>>()
    };
    let disk_keys = toml_keys("[[disk]]\nno_such_key = 1");
    let net_keys = toml_keys("[[net]]\nno_such_key = 1");
    assert!(
        disk_keys.contains(&"queue_size".to_string()),
        "{disk_keys:?}"
    );
    for key in toml_keys("no_such_key = 1")
        .into_iter()
        .chain(disk_keys)
        .chain(net_keys)
    {
        // serde lists aliases too; the example names them in comments.
        assert!(
            example.contains(&format!("\n{key} ="))
                || example.contains(&format!("[[{key}]]"))
                || example.contains(&format!("alias: {key}"))
                || example.contains(&format!("or: {key} =")),
            "{key} is missing from the README example"
        );
    }
    for table in ["id", "image", "readonly", "queues", "tap", "mac"] {
        assert!(example.contains(&format!("\n{table} =")), "{table}");
    }
}
