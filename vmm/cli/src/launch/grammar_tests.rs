//! The device grammar (README, "One device grammar"): every key of the table is accepted by
//! `run`, `launch` and the TOML file where it applies, aliases included, reaches the daemon's
//! command line, and a bad value gets the same message in each place.

use super::*;
use crate::launch::LaunchArgs;
use crate::run::{parse_subcommand, RunArgs};
use splitvisor_vmm::config::{DiskConfig, NetConfig};

const BAD_MAC: &str = "01:00:5e:00:00:01";
const ZERO_MAC: &str = "00:00:00:00:00:00";

fn launch(argv: &[&str]) -> Result<LaunchSpec, String> {
    let args: LaunchArgs =
        parse_subcommand("launch", ["launch"].iter().chain(argv)).map_err(|e| e.to_string())?;
    LaunchSpec::from_args(&args).map_err(|e| e.to_string())
}

fn run(argv: &[&str]) -> Result<splitvisor_vmm::config::VmConfig, String> {
    let args: RunArgs =
        parse_subcommand("run", ["run"].iter().chain(argv)).map_err(|e| e.to_string())?;
    let config = args.to_config();
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// A TOML file next to an image `disk.img`, parsed as `launch --config` does.
fn toml(name: &str, text: &str) -> Result<LaunchSpec, String> {
    let dir =
        std::env::temp_dir().join(format!("splitvisor-grammar-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("disk.img"), [0u8; 512]).unwrap();
    let path = dir.join("vm.toml");
    std::fs::write(&path, text).unwrap();
    let result = launch(&["--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn image() -> String {
    let path = std::env::temp_dir().join(format!("splitvisor-grammar-{}.img", std::process::id()));
    std::fs::write(&path, [0u8; 512]).unwrap();
    path.display().to_string()
}

#[test]
fn run_takes_the_disk_keys_and_their_aliases() {
    for value in [
        "image=/i.img,emulated=ata,readonly,id=d",
        "path=/i.img,emulated=ata,ro,id=d",
        "path=/i.img,emulated=ata,ro=on,id=d",
    ] {
        let disk: DiskConfig = value.parse().unwrap_or_else(|e| panic!("{value}: {e}"));
        let expected = DiskConfig::Ata {
            id: Some("d".into()),
            path: "/i.img".into(),
            readonly: true,
        };
        assert_eq!(disk, expected, "{value}");
    }
}

#[test]
fn launch_and_toml_take_every_disk_key_and_pass_it_to_the_daemon() {
    let image = image();
    let flag =
        format!("path={image},ro,queues=2,direct,queue_size=512,serial=boot-1,poll_us=0,id=root");
    let from_flag = launch(&["--disk", &flag]).unwrap();
    let from_file = toml(
        "disk",
        "[[disk]]\nid = \"root\"\npath = \"disk.img\"\nro = true\nqueues = 2\ndirect = true\n\
         queue_size = 512\nserial = \"boot-1\"\npoll_us = 0\n",
    )
    .unwrap();
    let canonical = toml(
        "disk-canonical",
        "[[disk]]\nid = \"root\"\nimage = \"disk.img\"\nreadonly = true\nqueues = 2\n\
         direct = true\nqueue_size = 512\ndisk_id = \"boot-1\"\npoll_us = 0\n",
    )
    .unwrap();
    let options = DiskOptions {
        direct: true,
        queue_size: Some(512),
        disk_id: Some("boot-1".into()),
        share: false,
        poll_us: Some(0),
    };
    for spec in [&from_flag, &from_file, &canonical] {
        let disk = &spec.disks[0];
        assert_eq!(disk.id, "root");
        assert!(disk.readonly);
        assert_eq!(disk.queues, Some(2));
        assert_eq!(disk.options, options);
    }
    let _ = std::fs::remove_file(&image);
}

#[test]
fn launch_and_toml_take_every_net_key() {
    let from_flag = launch(&[
        "--net",
        "tap=t0,mac=52:54:00:00:00:07,mtu=9000,queues=2,id=wan",
    ]);
    let from_file = toml(
        "net",
        "[[net]]\nid = \"wan\"\ntap = \"t0\"\nmac = \"52:54:00:00:00:07\"\nmtu = 9000\n\
         queues = 2\n",
    );
    for spec in [from_flag.unwrap(), from_file.unwrap()] {
        let net = &spec.nets[0];
        assert_eq!(net.id, "wan");
        assert_eq!(net.backend, NetBackend::Tap("t0".into()));
        assert_eq!(net.mac.as_deref(), Some("52:54:00:00:00:07"));
        assert_eq!(
            net.options,
            NetOptions {
                mtu: Some(9000),
                queues: Some(2)
            }
        );
    }
    let net: NetConfig = "socket=/n.sock,mac=52:54:00:00:00:07,id=wan"
        .parse()
        .unwrap();
    assert_eq!(net.mac, Some([0x52, 0x54, 0, 0, 0, 7]));
}

#[test]
fn a_bad_mac_gets_the_same_message_from_run_launch_and_the_file() {
    for mac in [BAD_MAC, ZERO_MAC, "52:54"] {
        let expected = splitvisor_vmm::device_values::parse_mac(mac).unwrap_err();
        let from_run = run(&["--net", &format!("socket=/n,mac={mac}")]).unwrap_err();
        let from_launch = launch(&["--net", &format!("switch=s,mac={mac}")]).unwrap_err();
        let from_file = toml(
            "mac",
            &format!("[[net]]\nswitch = \"s\"\nmac = \"{mac}\"\n"),
        )
        .unwrap_err();
        for message in [from_run, from_launch, from_file] {
            assert!(message.contains(&expected), "{mac}: {message}");
        }
    }
}

#[test]
fn a_bad_mtu_gets_the_same_message_from_launch_and_the_file() {
    for mtu in ["67", "65536", "0"] {
        let expected = splitvisor_vmm::device_values::parse_mtu(mtu).unwrap_err();
        let from_launch = launch(&["--net", &format!("switch=s,mtu={mtu}")]).unwrap_err();
        let from_file =
            toml("mtu", &format!("[[net]]\nswitch = \"s\"\nmtu = {mtu}\n")).unwrap_err();
        for message in [from_launch, from_file] {
            assert!(message.contains(&expected), "{mtu}: {message}");
        }
    }
}

#[test]
fn switch_cards_must_agree_on_the_mtu_and_have_no_queues() {
    let err = launch(&["--net", "switch=s,mtu=1500", "--net", "switch=s,mtu=9000"]).unwrap_err();
    assert!(
        err.contains("switch 's' already has mtu Some(1500)"),
        "{err}"
    );
    let err = toml("swq", "[[net]]\nswitch = \"s\"\nqueues = 2\n").unwrap_err();
    assert!(err.contains("queues applies to tap cards"), "{err}");
    let err = launch(&["--net", "switch=s,queues=2"]).unwrap_err();
    assert!(err.contains("queues applies to tap cards"), "{err}");
}

#[test]
fn the_file_takes_socket_and_reconnect_timeouts() {
    let spec = toml(
        "timeouts",
        "connect_timeout = 3\nsocket_timeout = 4\nreconnect_timeout = 40\n",
    )
    .unwrap();
    assert_eq!(spec.vm.connect_timeout, 3);
    assert_eq!(
        (spec.socket_timeout, spec.reconnect_timeout),
        (Some(4), Some(40))
    );
    let flags = launch(&[]).unwrap();
    assert_eq!(
        (flags.socket_timeout, flags.reconnect_timeout),
        (None, None)
    );
}

#[test]
fn a_bare_memory_number_gets_a_suggestion() {
    let err = run(&["--memory", "512"]).unwrap_err();
    assert_eq!(
        err,
        "--memory 512 is 512 bytes, too small for a guest (at least 16 MiB): did you mean 512M?"
    );
    // Still "too small" where a MiB reading does not help either.
    let err = run(&["--memory", "1M"]).unwrap_err();
    assert!(err.contains("is too small"), "{err}");
    assert!(run(&["--memory", "0"])
        .unwrap_err()
        .contains("is too small"));
    // The TOML file's number of bytes gets the same hint when launch checks the VMM's flags.
    let spec = toml("memory", "memory = 512\n").unwrap();
    assert!(spec.vm.to_run_flags().contains(&"512".into()));
}

#[test]
fn a_bad_switch_value_gets_the_same_message_from_run_and_launch() {
    let from_run = run(&["--disk", "path=/i,emulated=ata,ro=maybe"]).unwrap_err();
    let from_launch = launch(&["--disk", "image=/i,ro=maybe"]).unwrap_err();
    for message in [from_run, from_launch] {
        assert!(
            message.contains("readonly=maybe: expected on or off"),
            "{message}"
        );
    }
}

#[test]
fn an_unknown_key_error_lists_the_aliases() {
    let err = launch(&["--disk", "image=/i,colour=red"]).unwrap_err();
    assert!(
        err.contains("unknown key 'colour'; expected one of: image, readonly, queues, direct, \
             queue_size, disk_id, share, poll_us, id (aliases: path for image, ro for readonly, serial for disk_id)"),
        "{err}"
    );
    let err = run(&["--net", "socket=/n,colour=red"]).unwrap_err();
    assert!(
        err.contains("expected one of: socket, mac, id, stats\n"),
        "{err}"
    );
}

#[test]
fn a_queue_size_below_the_vmm_s_rings_is_refused_before_anything_starts() {
    let image = image();
    let expected = "queue_size = \"128\": the VMM offers the guest rings of 256 entries";
    let err = launch(&["--disk", &format!("image={image},queue_size=128")]).unwrap_err();
    assert!(err.contains(expected), "{err}");
    let err = toml("qs", "[[disk]]\nimage = \"disk.img\"\nqueue_size = 128\n").unwrap_err();
    assert!(err.contains(expected), "{err}");
    let _ = std::fs::remove_file(&image);
}
