//! `splitvisor launch`'s command line: the VM flags shared with `run`, the devices as images,
//! TAPs and switches (or a TOML file instead), and where launch keeps its runtime files.

use std::path::PathBuf;

use clap::Args;

use super::spec::{DiskFlag, NetFlag};
use crate::run::VmArgs;

/// The environment variable naming the directory with `splitvisor-blk` and `splitvisor-net`.
pub const ENV_BACKEND_DIR: &str = "SPLITVISOR_BACKEND_DIR";

pub const LAUNCH_HELP: &str = "\
Names:
  The VM is registered under --name (default vm-PID) in $XDG_RUNTIME_DIR/splitvisor/NAME/
  (else /run/splitvisor/NAME/), where its API socket is unless --api-socket says otherwise:
  `splitvisor list` shows it, `splitvisor ctl NAME VERB` controls it.

Runtime directory:
  launch creates a private directory (mode 0700) named splitvisor-launch-PID under
  --runtime-dir, else $XDG_RUNTIME_DIR, else /run/splitvisor, else /tmp, and prints its path on
  stderr at start. It holds each backend's socket (ID.sock), stats API socket (NAME.api.sock,
  given to the VMM as the device's stats= key, so `ctl NAME metrics` shows the backends'
  counters) and log (NAME.log: the daemon's stdout and stderr), and with --daemonize launch.log (launch's own messages, the VMM's and
  the guest console). It is removed at exit; only when a backend died while the VM ran are the
  logs kept there (launch says so).

Backends:
  --disk image=PATH       splitvisor-blk --socket RUNDIR/ID.sock --image PATH
                          --api-socket RUNDIR/ID.api.sock [--readonly] [--queues N] [--direct]
                          [--queue-size N] [--serial DISK_ID] [--share] [--poll-us N] (share:
                          another daemon may serve the image too, for swaps)
  --net tap=NAME          splitvisor-net --tap NAME --socket RUNDIR/ID.sock
                          --api-socket RUNDIR/ID.api.sock [--mtu N] [--queues N]
  --net switch=NAME       one splitvisor-net --switch --api-socket RUNDIR/switch-NAME.api.sock
                          --socket RUNDIR/ID.sock ... per switch name,
                          shared by every NIC that names it (its log: switch-NAME.log)
  The binaries are taken from --backend-dir, else $SPLITVISOR_BACKEND_DIR, else the directory of
  this executable. Each daemon runs in its own process group, so a terminal's Ctrl-C reaches
  launch and the VMM but not the daemons: launch stops them after the VMM.

Supervision:
  A backend that exits or dies is restarted on the same socket: after 50 ms, doubling after each
  failed run (one that died before its socket appeared or within 300 ms of its start), up to 2 s.
  After 5 failed runs in a row, or 60 restarts within a minute, launch gives up on it; the VMM
  then fails the device once its reconnect timeout ends. The VMM gets --reconnect-timeout set to
  the longest time launch may spend bringing a backend back (with the default --socket-timeout
  of 10 s: 55 s). Each restart and its timing is logged on stderr.

Signals and exit status:
  SIGINT or SIGTERM: launch stops the VMM (SIGTERM, then SIGKILL after 10 s), then the daemons
  (SIGTERM to each daemon's process group, then SIGKILL after 5 s), removes the runtime directory
  and exits with 130. When the VMM exits on its own, launch stops the daemons the same way and
  exits with the VMM's status (the guest's; 128+N if the VMM was killed by signal N). A backend
  that cannot start: launch stops what it started, removes the runtime directory, prints the
  daemon's last log lines and exits with 1.";

/// Flags of `splitvisor launch`.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// The VM's name, for `splitvisor list` and `splitvisor ctl NAME` (letters, digits, '.',
    /// '-', '_'); default: vm-PID, printed at start. A name in use by a running VM is refused.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Run in the background: return once the VM runs (exit status 0), or with launch's
    /// error if it does not come up. launch's own messages, the VMM's and the guest console
    /// (with --serial stdio) go to launch.log in the runtime directory. Stop the VM with
    /// `splitvisor ctl NAME shutdown` (launch then stops its daemons) or SIGTERM to launch.
    #[arg(long)]
    pub daemonize: bool,

    /// Write the pid of the supervising launch process to this file (removed when it exits).
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,

    /// Internal: this launch is the background half of --daemonize.
    #[arg(long, hide = true, requires = "daemonize")]
    pub daemon_child: bool,

    #[command(flatten)]
    pub vm: VmArgs,

    /// A disk served by its own splitvisor-blk (repeatable; ids default to disk0, disk1, ...):
    /// `image=PATH[,readonly][,queues=N][,id=NAME][,direct][,queue_size=N][,disk_id=ID][,share]`
    /// `[,poll_us=N]`
    /// (aliases: path= for image=, ro for readonly, serial= for disk_id=); `share` lets another
    /// splitvisor-blk open the image too (the target of a planned swap; splitvisor-blk --share).
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<DiskFlag>,

    /// A network card served by splitvisor-net (repeatable; ids default to net0, net1, ...):
    /// `tap=NAME[,mac=52:54:00:xx:xx:xx][,mtu=N][,queues=N][,id=NAME]` (a TAP device, created
    /// if missing; needs CAP_NET_ADMIN) or `switch=NAME[,mac=..][,mtu=N][,id=NAME]` (a virtual
    /// switch shared by every card of this launch that names it).
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<NetFlag>,

    /// Read the VM and its devices from a TOML file instead of the flags above (see the README,
    /// "Launching a VM with its backends"); it cannot be combined with them.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["VmArgs", "disk", "net"])]
    pub config: Option<PathBuf>,

    /// Where to create the runtime directory.
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,

    /// Directory with splitvisor-blk and splitvisor-net [env: SPLITVISOR_BACKEND_DIR; default:
    /// this executable's directory].
    #[arg(long, value_name = "DIR")]
    pub backend_dir: Option<PathBuf>,

    /// Seconds a backend daemon may take to create its socket(s), at start and after a restart.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub socket_timeout: u64,
}
