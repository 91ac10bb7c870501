//! The `splitvisor` command line: its subcommands, each with its flags from its own module
//! (`run::RunArgs`, `launch::LaunchArgs`, `ctl::CtlArgs`, `list::ListArgs`, `bench::BenchArgs`).

use clap::{Parser, Subcommand};

use crate::bench::BenchArgs;
use crate::ctl::CtlArgs;
use crate::list::ListArgs;
use crate::run::RunArgs;

const EXIT_STATUS_HELP: &str = exit_status_help();

const fn exit_status_help() -> &'static str {
    "Exit status:\n  \
     0-255  the status the guest wrote to the debug-exit port (0xf4); the project's guest uses\n         \
     0 = pass, 1 = fail, 2 = bad command line, 3 = CPU exception\n  \
     0      also: a Linux guest powered off (poweroff, ACPI S5)\n  \
     1      also: the VM could not be set up (the message says why)\n  \
     120    the guest rebooted (reboot, or a Linux panic with panic=N); start it again\n  \
     121    the guest triple-faulted or reset\n  \
     122    KVM could not run the guest (internal error / emulation failure)\n  \
     123    a vCPU thread failed\n  \
     130    stopped by SIGINT, SIGTERM, the control API (PUT /vm/shutdown) or Ctrl-A x\n\n\
     Environment:\n  \
     SPLITVISOR_KVM_DEVICE  the KVM device to open (default /dev/kvm)\n  \
     RUST_LOG               log level for the VMM's messages on stderr (default: warn)"
}

#[derive(Debug, Parser)]
#[command(
    name = "splitvisor",
    version,
    about = "A KVM virtual machine monitor whose disk and network devices run as separate vhost-user backend daemons",
    long_about = "A KVM virtual machine monitor whose disk and network devices run as separate \
                  vhost-user backend daemons. The VMM handles only CPU and memory through KVM; \
                  without --kernel it boots the project's own guest, embedded in this binary."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and run it until the guest exits; the exit status is the guest's.
    #[command(after_long_help = EXIT_STATUS_HELP)]
    Run(RunArgs),
    /// Measure guest block I/O through vhost-user-blk (a splitvisor-blk daemon) and through the
    /// emulated ATA disk, one after the other on the same image; prints a table and one line
    /// `BENCH {json}` with IOPS, MB/s, latency, and VM exits, kicks and interrupts per request.
    /// With `--paths net-switch,net-tap`: a guest UDP stream through splitvisor-net, VM to VM
    /// through its switch and guest to a TAP (as root, in a private network namespace), with
    /// packets/s, Gbit/s and kicks per packet, and Linux ping's round trip to the guest.
    /// Each configuration runs `--repeat` times (default 3; figures are medians, shown as
    /// `median (min-max)`), at each queue depth of `--qd` (e.g. `--qd 1,4,16,32`); paths are
    /// compared only at equal queue depth. `--output` writes every result as JSON or CSV,
    /// `--plot` draws them into an SVG. Flags are checked before anything starts; the exit
    /// status is 1 when a flag is refused or any run failed.
    Bench(BenchArgs),
    /// Start the backend daemons (splitvisor-blk, splitvisor-net) and the VMM from one
    /// description (flags or a TOML file) and supervise them until the guest exits; the exit
    /// status is the guest's.
    #[command(after_long_help = crate::launch::LAUNCH_HELP)]
    Launch(crate::launch::LaunchArgs),
    /// Talk to a running VM's control API, by its name (`splitvisor ctl NAME VERB`) or its
    /// socket (`splitvisor ctl --api-socket PATH VERB`): show its state, pause, resume or stop
    /// it, swap a device's backend, read its counters.
    Ctl(CtlArgs),
    /// Show every VM running on this host (started by `run` or `launch`, named with --name or
    /// not): name, VMM pid, state, vCPUs, memory, uptime, and each device with its backend's
    /// state. Entries of VMMs that are gone are removed.
    #[command(after_long_help = LIST_HELP)]
    List(ListArgs),
}

const LIST_HELP: &str = "\
Each VMM registers itself in $XDG_RUNTIME_DIR/splitvisor/NAME/ (else /run/splitvisor/NAME/):
vm.json (its pid and API socket) and, without --api-socket, the API socket api.sock. Device
states: connected, reconnecting (the backend went away and the VMM waits for it), failed,
needs-reset, busy (a swap or recovery in progress), emulated (inside the VMM).";

/// The statuses documented above, checked against the code that produces them.
#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use splitvisor_vmm::config::{ByteSize, KernelSource, SerialConfig};
    use splitvisor_vmm::vm_end;

    #[test]
    fn help_documents_every_vmm_status() {
        for status in [
            vm_end::STATUS_SHUTDOWN,
            vm_end::STATUS_INTERNAL_ERROR,
            vm_end::STATUS_VCPU_FAILED,
            vm_end::STATUS_INTERRUPTED,
            vm_end::STATUS_REBOOT,
        ] {
            assert!(
                EXIT_STATUS_HELP.contains(&format!("  {status} ")),
                "{status}"
            );
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_boot_the_embedded_guest() {
        let cli = Cli::try_parse_from(["splitvisor", "run", "--cmdline", "selftest"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        let config = args.to_config();
        assert_eq!(config.memory, ByteSize(256 << 20));
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.kernel, KernelSource::Embedded);
        assert_eq!(config.serial, SerialConfig::Stdio);
    }

    #[test]
    fn vm_args_survive_the_trip_through_run_flags() {
        // Every flag set away from its default, so a field missing from to_run_flags shows.
        let cli = Cli::try_parse_from([
            "splitvisor",
            "run",
            "--memory",
            "1G",
            "--prefault",
            "--vcpus",
            "3",
            "--kernel",
            "/boot/guest.elf",
            "--initramfs",
            "/boot/initrd.gz",
            "--acpi",
            "off",
            "--cmdline",
            "blk-verify,seconds=5 ip=10.0.0.2/24",
            "--serial",
            "file=/tmp/console.log",
            "--stats",
            "--connect-timeout",
            "4",
            "--api-socket",
            "/run/api.sock",
            "--seccomp",
            "log",
            "--live-upgrade",
            "off",
        ])
        .unwrap();
        let Command::Run(original) = cli.command else {
            panic!("parsed as another subcommand");
        };
        let defaults = Cli::try_parse_from(["splitvisor", "run"]).unwrap();
        let Command::Run(defaults) = defaults.command else {
            panic!("parsed as another subcommand");
        };
        let fields = format!("{:?}", original.vm);
        let default_fields = format!("{:?}", defaults.vm);
        let differing = fields
            .split(", ")
            .zip(default_fields.split(", "))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differing, fields.split(", ").count(), "{fields}");
        let argv = ["splitvisor".into(), "run".into()]
            .into_iter()
            .chain(original.vm.to_run_flags());
        let Command::Run(again) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(again.vm, original.vm);
    }

    #[test]
    fn launch_help_states_the_restart_policy_in_force() {
        use crate::launch::{RestartPolicy, LAUNCH_HELP};
        let p = RestartPolicy::DEFAULT;
        let socket_timeout = std::time::Duration::from_secs(10);
        for fact in [
            format!("after {} ms, doubling", p.first_backoff.as_millis()),
            format!(
                "within {} ms of its start), up to {} s",
                p.healthy_after.as_millis(),
                p.max_backoff.as_secs()
            ),
            format!("After {} failed runs in a row", p.max_failed_runs),
            format!("or {} restarts within a minute", p.max_restarts_per_window),
            format!("of 10 s: {} s)", p.reconnect_timeout_secs(socket_timeout)),
            format!(
                "then SIGKILL after {} s)",
                crate::launch::VMM_STOP_GRACE.as_secs()
            ),
        ] {
            assert!(LAUNCH_HELP.contains(&fact), "{fact}");
        }
        assert_eq!(p.window, std::time::Duration::from_secs(60));
    }

    #[test]
    fn names_go_with_every_way_of_describing_the_vm() {
        let cli = Cli::try_parse_from([
            "splitvisor",
            "launch",
            "--config",
            "vm.toml",
            "--name",
            "web",
            "--daemonize",
            "--pidfile",
            "/run/web.pid",
        ])
        .unwrap();
        let Command::Launch(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.name.as_deref(), Some("web"));
        assert!(args.daemonize && !args.daemon_child);
        let cli = Cli::try_parse_from(["splitvisor", "run", "--name", "web"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.name.as_deref(), Some("web"));
        // ctl takes a name or a socket, not both.
        let cli = Cli::try_parse_from(["splitvisor", "ctl", "web", "status"]).unwrap();
        let Command::Ctl(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.name.as_deref(), Some("web"));
        assert!(Cli::try_parse_from(["splitvisor", "ctl", "--api-socket", "/a", "status"]).is_ok());
        assert!(
            Cli::try_parse_from(["splitvisor", "ctl", "web", "--api-socket", "/a", "status"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["splitvisor", "ctl", "status"]).is_err());
    }

    #[test]
    fn bench_defaults_compare_both_paths() {
        let cli = Cli::try_parse_from(["splitvisor", "bench"]).unwrap();
        let Command::Bench(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.paths, ["virtio", "ata"]);
        assert_eq!(
            (args.rw.as_str(), args.bs.as_str(), args.qd.as_slice()),
            ("randread", "4k", [1, 32].as_slice())
        );
        assert_eq!(args.repeat, 3);
        assert!(Cli::try_parse_from(["splitvisor", "bench", "--paths", "nvme"]).is_err());
        assert_eq!(args.net_sizes, [64, 1500]);
    }

    #[test]
    fn bench_takes_net_paths_and_checks_sizes() {
        let cli = Cli::try_parse_from([
            "splitvisor",
            "bench",
            "--paths",
            "net-switch,net-tap",
            "--net-sizes",
            "64,512,1500",
        ])
        .unwrap();
        let Command::Bench(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.paths, ["net-switch", "net-tap"]);
        assert_eq!(args.net_sizes, [64, 512, 1500]);
        for bad in ["63", "1501", "x"] {
            let err = Cli::try_parse_from(["splitvisor", "bench", "--net-sizes", bad]).unwrap_err();
            assert!(err.to_string().contains("--net-sizes"), "{err}");
        }
    }

    #[test]
    fn bad_values_are_reported_with_the_flag() {
        let err = Cli::try_parse_from(["splitvisor", "run", "--memory", "12X"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--memory") && msg.contains("'12X' is not a size"),
            "{msg}"
        );
        let err = Cli::try_parse_from(["splitvisor", "run", "--vcpus", "300"]).unwrap_err();
        assert!(err.to_string().contains("--vcpus"), "{err}");
    }
}
