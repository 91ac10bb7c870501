//! `run(config)`: binds the sockets, opens the TAP or builds the switch, and serves frontends one
//! connection after another, printing a STATS line after each disconnect.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use vhost::vhost_user::Listener;

use crate::backend::{Engine, NetBackend, TapPair};
use crate::device::{DeviceModel, ALL_TAP_OFFLOADS};
use crate::live::Live;
use crate::socket::{self, BoundSocket, SocketError};
use crate::stats::PortStats;
use crate::stats_server::{self, StatsApiError};
use crate::switch::{MacAddr, Switch};
use crate::tap::{TapError, TapQueue};

/// What to serve.
#[derive(Clone, Debug)]
pub enum Mode {
    /// One socket, one TAP with `queues` queue pairs.
    Tap { name: String, queues: u16 },
    /// One port per socket, frames switched between them.
    Switch,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub sockets: Vec<PathBuf>,
    /// One MAC per socket.
    pub macs: Vec<MacAddr>,
    pub mtu: Option<u16>,
    /// Where to serve `GET /stats`, if anywhere.
    pub api_socket: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("failed to set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error("failed to bind the vhost-user socket")]
    Socket(#[from] SocketError),
    #[error("failed to set up the TAP device")]
    Tap(#[from] TapError),
    #[error("vhost-user daemon on {path}: {reason}")]
    Serve { path: PathBuf, reason: String },
    #[error(transparent)]
    StatsApi(#[from] StatsApiError),
    #[error("failed to start the thread for {0}")]
    SpawnPort(PathBuf, #[source] std::io::Error),
    #[error("failed to confine the daemon")]
    Confine(#[from] splitvisor_confine::ConfineError),
}

/// How to build one connection's backend on a port.
struct PortSpec {
    model: DeviceModel,
    stats: Arc<PortStats>,
    engine: Box<dyn Fn() -> Engine + Send>,
    on_disconnect: Box<dyn Fn() + Send>,
    /// Connection state for the stats API, and this port's index in it.
    live: Arc<Live>,
    port: usize,
}

pub fn run(config: Config) -> Result<(), DaemonError> {
    // The TAP before the socket: a daemon that cannot attach exits before its socket exists,
    // so a supervisor (launch) never mistakes it for one that started.
    let taps = match &config.mode {
        Mode::Tap { name, queues } => Some(TapQueue::open_all(name, usize::from(*queues))?),
        Mode::Switch => None,
    };
    let bound = config
        .sockets
        .iter()
        .map(|path| socket::bind(path))
        .collect::<Result<Vec<_>, _>>()?;
    let all_stats: Vec<Arc<PortStats>> = match &config.mode {
        Mode::Tap { queues, .. } => vec![port_stats(&bound[0], usize::from(*queues))],
        Mode::Switch => bound.iter().map(|b| port_stats(b, 1)).collect(),
    };
    let printed = all_stats.clone();
    socket::handle_termination(move || {
        for stats in &printed {
            eprintln!("STATS {}", stats.to_json());
        }
    })
    .map_err(DaemonError::Signals)?;
    let live = Arc::new(Live::new(&all_stats));
    let result = match (&config.mode, taps) {
        (Mode::Tap { name, queues }, Some(taps)) => {
            run_tap(&config, bound, all_stats, live, taps, name, *queues)
        }
        _ => run_switch(&config, bound, all_stats, live),
    };
    stats_server::cleanup();
    socket::cleanup();
    result
}

/// Serves `GET /stats` on `--api-socket`, if given. Called once the TAP is open, so that the
/// stats socket (which launch waits for) does not appear for a daemon that is about to fail.
fn start_stats_api(config: &Config, live: &Arc<Live>) -> Result<(), DaemonError> {
    if let Some(path) = &config.api_socket {
        let live = live.clone();
        stats_server::start(path, Arc::new(move || live.snapshot()))?;
    }
    Ok(())
}

fn port_stats(bound: &BoundSocket, pairs: usize) -> Arc<PortStats> {
    Arc::new(PortStats::new(bound.path.display().to_string(), pairs))
}

fn run_tap(
    config: &Config,
    mut bound: Vec<BoundSocket>,
    stats: Vec<Arc<PortStats>>,
    live: Arc<Live>,
    taps: Vec<TapQueue>,
    name: &str,
    queues: u16,
) -> Result<(), DaemonError> {
    start_stats_api(config, &live)?;
    let offloads = taps[0].set_offload(ALL_TAP_OFFLOADS).is_ok();
    if !offloads {
        log::warn!("TAP {name} refuses checksum/TSO offloads; not offering them");
    }
    if let Err(e) = taps[0].set_offload(0) {
        log::warn!("{e}");
    }
    log::info!("attached to TAP {name} with {queues} queue pair(s)");
    // The TAP is attached: CAP_NET_ADMIN and everything else can go.
    crate::seccomp::confine()?;
    let pairs = Arc::new(taps.into_iter().map(TapPair::new).collect::<Vec<_>>());
    let spec = PortSpec {
        model: DeviceModel {
            mac: config.macs[0],
            pairs: queues,
            mtu: config.mtu,
            offloads,
        },
        stats: stats[0].clone(),
        engine: Box::new(move || Engine::Tap(pairs.clone())),
        on_disconnect: Box::new(|| {}),
        live,
        port: 0,
    };
    serve(bound.remove(0), spec)
}

fn run_switch(
    config: &Config,
    bound: Vec<BoundSocket>,
    stats: Vec<Arc<PortStats>>,
    live: Arc<Live>,
) -> Result<(), DaemonError> {
    start_stats_api(config, &live)?;
    // Sockets bound, signal and stats threads started: the filter covers them all (TSYNC).
    crate::seccomp::confine()?;
    let switch = Arc::new(Switch::new(stats.clone()));
    let mut threads = Vec::new();
    for (port, sock) in bound.into_iter().enumerate() {
        let path = sock.path.clone();
        let (sw_engine, sw_detach) = (switch.clone(), switch.clone());
        let spec = PortSpec {
            model: DeviceModel {
                mac: config.macs[port],
                pairs: 1,
                mtu: config.mtu,
                offloads: false,
            },
            stats: stats[port].clone(),
            engine: Box::new(move || Engine::Switch {
                switch: sw_engine.clone(),
                port,
            }),
            on_disconnect: Box::new(move || sw_detach.detach(port)),
            live: live.clone(),
            port,
        };
        let handle = thread::Builder::new()
            .name(format!("port{port}"))
            .spawn(move || serve(sock, spec))
            .map_err(|e| DaemonError::SpawnPort(path, e))?;
        threads.push(handle);
    }
    // Ports serve forever; the first one to fail ends the daemon with its error.
    for handle in threads {
        if let Ok(Err(e)) = handle.join() {
            return Err(e);
        }
    }
    Ok(())
}

/// Accept frontends on one socket forever, a fresh device (and queue threads) per connection,
/// each served by the vhost-user server. In switch mode every port runs this on its own thread.
fn serve(bound: BoundSocket, spec: PortSpec) -> Result<(), DaemonError> {
    let path = bound.path.clone();
    let BoundSocket {
        listener,
        lock: _lock,
        ..
    } = bound;
    let mut listener = Listener::from(listener);
    loop {
        let device = Arc::new(NetBackend::new(
            spec.model.clone(),
            (spec.engine)(),
            spec.stats.clone(),
            spec.live.clone(),
            spec.port,
        ));
        log::info!("waiting for a frontend on {}", path.display());
        let end = splitvisor_vhost_server::serve_frontend(&mut listener, device).map_err(|e| {
            DaemonError::Serve {
                path: path.clone(),
                reason: format!("accepting a frontend: {e}"),
            }
        })?;
        match end.error {
            None => log::info!("frontend on {} disconnected", path.display()),
            Some(e) => log::warn!("connection on {} ended: {e}", path.display()),
        }
        spec.live.set_connected(spec.port, false);
        (spec.on_disconnect)();
        eprintln!("STATS {}", spec.stats.to_json());
    }
}
