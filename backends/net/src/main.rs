//! `splitvisor-net`: vhost-user-net backend daemon (TAP, or a learning switch between VMs).
//! Parses flags and calls `daemon::run`.

mod backend;
mod daemon;
mod device;
mod live;
mod ring;
mod rxtx;
mod seccomp;
mod socket;
mod stats;
mod switch;
mod tap;
#[cfg(test)]
mod testutil;

// The fuzz targets' entry points, run over the committed corpus by `cargo test`.
#[cfg(test)]
mod fuzzing;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use splitvisor_confine::SeccompMode;
// Per-queue rate limiting of guest-caused log lines, the stats API, and the MAC and MTU
// checks (the VMM's too): the same as splitvisor-blk's and the VMM's.
use splitvisor_wire::device_values as values;
use splitvisor_wire::host::{loglimit, stats_server};

use crate::daemon::{Config, Mode};
use crate::switch::{MacAddr, MAX_PORTS};

/// Most queue pairs: the VMM's MAX_QUEUES in pairs.
const MAX_QUEUE_PAIRS: u16 = splitvisor_wire::MAX_QUEUES / 2;

#[derive(Parser, Debug)]
#[command(
    name = "splitvisor-net",
    version,
    about = "vhost-user-net backend: TAP or L2 switch"
)]
struct Args {
    /// vhost-user socket path (one in TAP mode; one per port with --switch).
    #[arg(long = "socket", required = true)]
    sockets: Vec<PathBuf>,
    /// TAP device to attach to (created if missing). Needs CAP_NET_ADMIN.
    #[arg(long, conflicts_with = "switch", required_unless_present = "switch")]
    tap: Option<String>,
    /// Number of RX/TX queue pairs (TAP mode; one TAP queue and one worker thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Switch frames between the sockets' frontends instead of using a TAP.
    #[arg(long)]
    switch: bool,
    /// MAC address to report to the guest (repeat once per socket). Default: 52:54:00:xx:xx:NN.
    #[arg(long = "mac", value_parser = values::parse_mac)]
    macs: Vec<MacAddr>,
    /// MTU to advertise (VIRTIO_NET_F_MTU), 68 to 65535.
    #[arg(long, value_parser = values::parse_mtu)]
    mtu: Option<u16>,
    /// seccomp filter once set-up is done: `on` kills the daemon with SIGSYS on a system call
    /// outside its allow-list (saying which), `log` lets it through but logs it in the kernel
    /// log (dmesg, type=1326), `off` does not filter. Capabilities are dropped in every mode.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompMode::On)]
    seccomp: SeccompMode,
    /// Log level: error, warn, info, debug, trace (RUST_LOG overrides it).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
    /// Serve `GET /stats` (the STATS counters of every socket, uptime, connection state) over
    /// HTTP on this Unix socket (mode 0600; a stale one is replaced, removed at exit).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum ArgsError {
    #[error("--queues must be between 1 and {MAX_QUEUE_PAIRS}")]
    Queues,
    #[error("TAP mode serves exactly one --socket")]
    TapSockets,
    #[error("--switch takes between 1 and {MAX_PORTS} sockets")]
    SwitchSockets,
    #[error("--switch has one queue pair per port; drop --queues")]
    SwitchQueues,
    #[error("give one --mac per socket (or none): {0} MACs for {1} sockets")]
    MacCount(usize, usize),
}

/// A stable locally administered default MAC: derived from the socket path and port index.
fn default_mac(path: &std::path::Path, index: usize) -> MacAddr {
    let hash = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
        });
    let [a, b, ..] = hash.to_le_bytes();
    [0x52, 0x54, 0x00, a, b, index as u8]
}

fn config(args: Args) -> Result<Config, ArgsError> {
    let mode = match args.tap {
        Some(name) if !args.switch => {
            if !(1..=MAX_QUEUE_PAIRS).contains(&args.queues) {
                return Err(ArgsError::Queues);
            }
            if args.sockets.len() != 1 {
                return Err(ArgsError::TapSockets);
            }
            Mode::Tap {
                name,
                queues: args.queues,
            }
        }
        _ => {
            if args.sockets.is_empty() || args.sockets.len() > MAX_PORTS {
                return Err(ArgsError::SwitchSockets);
            }
            if args.queues != 1 {
                return Err(ArgsError::SwitchQueues);
            }
            Mode::Switch
        }
    };
    let macs = if args.macs.is_empty() {
        let first = &args.sockets[0];
        (0..args.sockets.len())
            .map(|i| default_mac(first, i))
            .collect()
    } else if args.macs.len() == args.sockets.len() {
        args.macs
    } else {
        return Err(ArgsError::MacCount(args.macs.len(), args.sockets.len()));
    };
    Ok(Config {
        mode,
        sockets: args.sockets,
        macs,
        mtu: args.mtu,
        api_socket: args.api_socket,
    })
}

fn report(error: &dyn std::error::Error) -> ExitCode {
    splitvisor_wire::host::error::report("splitvisor-net", error);
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let args = Args::parse();
    seccomp::set_mode(args.seccomp);
    env_logger::Builder::new()
        .parse_filters(&args.log_level)
        .parse_env("RUST_LOG")
        .init();
    let config = match config(args) {
        Ok(config) => config,
        Err(e) => return report(&e),
    };
    match daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}
