//! `splitvisor bench --paths net-switch,net-tap`: the guest's UDP stream (`bench=net`) through
//! `splitvisor-net`, VM to VM through its `--switch` (one guest sends, one receives) and guest
//! to a TAP in a private network namespace (the kernel's own counters confirm what arrived),
//! plus Linux `ping` from that namespace to a serving guest for the host-to-guest round trip.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::daemon::{last_stats_line, sibling, Backend};
use super::netns::Netns;
use super::table::{cell, figure, round3};
use super::{BenchArgs, BenchError};

/// Addresses of the stream's two ends (the TAP side is the receiver at .1).
const RECEIVER_IP: &str = "10.0.0.1";
const SENDER_IP: &str = "10.0.0.2";
const PREFIX: u8 = 24;
/// The TAP's MTU: a 1500-byte UDP payload makes a 1528-byte IP packet.
const TAP_MTU: &str = "1600";
/// Host-to-guest ping: this many echo requests, this far apart (`ping -i`, needs root below 0.2).
const PING_COUNT: u32 = 20;
const PING_INTERVAL: &str = "0.01";
/// A guest's boot, plus its work, must end within its `seconds` plus this.
const VM_SLACK: Duration = Duration::from_secs(60);

/// One net measurement, keyed in the summary's `paths` as e.g. `net-switch-64`.
pub type NetRow = (String, Value);

/// Runs the requested net paths (`net-switch`, `net-tap`) for every `--net-sizes` entry.
pub fn run(args: &BenchArgs, path: &str, dir: &Path) -> Result<Vec<NetRow>, BenchError> {
    let backend = match &args.net_backend {
        Some(path) => path.clone(),
        None => sibling("splitvisor-net"),
    };
    if !backend.is_file() {
        return Err(BenchError::NoNetBackend(backend));
    }
    match path {
        "net-switch" => run_switch(args, &backend, dir),
        _ => run_tap(args, &backend, dir),
    }
}

fn stream_cmdline(args: &BenchArgs, dir: &str, size: u32, ip: &str, peer: &str) -> String {
    format!(
        "bench=net,dir={dir},peer={peer},size={size},seconds={} ip={ip}/{PREFIX}",
        args.seconds
    )
}

fn run_switch(args: &BenchArgs, backend: &Path, dir: &Path) -> Result<Vec<NetRow>, BenchError> {
    let mut rows = Vec::new();
    for &size in &args.net_sizes {
        eprintln!(
            "bench: net-switch: {size}-byte datagrams VM to VM for {} s ...",
            args.seconds
        );
        let (tx_sock, rx_sock) = (dir.join("sw-tx.sock"), dir.join("sw-rx.sock"));
        let log = dir.join(format!("switch-{size}.log"));
        let mut cmd = Command::new(backend);
        cmd.arg("--switch")
            .arg("--socket")
            .arg(&tx_sock)
            .arg("--socket")
            .arg(&rx_sock);
        let mut switch = Backend::start(cmd, &log, backend)?;
        switch.wait_ready(|| tx_sock.exists() && rx_sock.exists(), &rx_sock)?;
        let receiver = Guest::spawn(
            args,
            &rx_sock,
            &stream_cmdline(args, "rx", size, RECEIVER_IP, SENDER_IP),
            "rx",
        )?;
        receiver.wait_for("waiting for datagrams", Duration::from_secs(60))?;
        let sender = Guest::spawn(
            args,
            &tx_sock,
            &stream_cmdline(args, "tx", size, SENDER_IP, RECEIVER_IP),
            "tx",
        )?;
        let limit = Duration::from_secs(u64::from(args.seconds)) + VM_SLACK;
        let tx = sender.finish(limit)?;
        let rx = receiver.finish(limit)?;
        switch.stop();
        let stats = stats_lines(&log);
        let sent = tx["sent"].as_f64().unwrap_or(0.0).max(1.0);
        let backend_kicks = stats
            .iter()
            .find(|s| s["socket"].as_str() == Some(&tx_sock.display().to_string()))
            .and_then(|s| s["queues"][0]["tx_kicks"].as_u64());
        let pass = tx["status"] == "pass" && rx["status"] == "pass";
        rows.push((
            format!("net-switch-{size}"),
            json!({
                "status": if pass { "pass" } else { "fail" },
                "size": size,
                "frame_len": tx["frame_len"],
                "sent": tx["sent"],
                "received": rx["received"],
                "tx_packets_per_s": tx["packets_per_s"],
                "tx_gbit_per_s": tx["gbit_per_s"],
                "rx_packets_per_s": rx["packets_per_s"],
                "rx_gbit_per_s": rx["gbit_per_s"],
                "guest_kicks_per_packet": tx["stream_tx_kicks"].as_f64().map(|k| round3(k / sent)),
                "backend_kicks_per_packet": backend_kicks.map(|k| round3(k as f64 / sent)),
                "delivered": rx["received"].as_f64().map(|r| round3(r / sent)),
                "tx_error": tx["error"],
                "rx_error": rx["error"],
                "backend": stats,
            }),
        ));
    }
    Ok(rows)
}

/// The packets the kernel received on a TAP (frames the backend wrote into it).
fn tap_rx_packets(ns: &Netns, tap: &str) -> Option<u64> {
    let text = ns.ip(&["-s", "-j", "link", "show", "dev", tap]).ok()?;
    let links: Value = serde_json::from_str(&text).ok()?;
    links[0]["stats64"]["rx"]["packets"].as_u64()
}

fn run_tap(args: &BenchArgs, backend: &Path, dir: &Path) -> Result<Vec<NetRow>, BenchError> {
    let id = std::process::id();
    let ns = Netns::create(format!("svbench{id}"))?;
    let tap = format!("svb{}", id % 1_000_000);
    let mut rows = Vec::new();
    eprintln!("bench: net-tap: host ping to a serving guest ({PING_COUNT} requests) ...");
    rows.push((
        "net-tap-ping".to_string(),
        tap_ping(args, backend, dir, &ns, &tap)?,
    ));
    for &size in &args.net_sizes {
        eprintln!(
            "bench: net-tap: {size}-byte datagrams guest to TAP for {} s ...",
            args.seconds
        );
        let log = dir.join(format!("tap-{size}.log"));
        let (mut daemon, socket) = tap_daemon(backend, dir, &ns, &tap, &log)?;
        let before = tap_rx_packets(&ns, &tap).unwrap_or(0);
        let guest = Guest::spawn(
            args,
            &socket,
            &stream_cmdline(args, "tx", size, SENDER_IP, RECEIVER_IP),
            "tap",
        )?;
        let limit = Duration::from_secs(u64::from(args.seconds)) + VM_SLACK;
        let tx = guest.finish(limit);
        let after = tap_rx_packets(&ns, &tap);
        daemon.stop();
        let tx = tx?;
        let stats = last_stats_line(&log);
        let sent = tx["sent"].as_f64().unwrap_or(0.0).max(1.0);
        let tap_packets = after.map(|a| a.saturating_sub(before));
        rows.push((
            format!("net-tap-{size}"),
            json!({
                "status": tx["status"],
                "size": size,
                "frame_len": tx["frame_len"],
                "sent": tx["sent"],
                "tx_packets_per_s": tx["packets_per_s"],
                "tx_gbit_per_s": tx["gbit_per_s"],
                "guest_kicks_per_packet": tx["stream_tx_kicks"].as_f64().map(|k| round3(k / sent)),
                "backend_kicks_per_packet": stats.as_ref()
                    .and_then(|s| s["queues"][0]["tx_kicks"].as_u64())
                    .map(|k| round3(k as f64 / sent)),
                "tap_rx_packets": tap_packets,
                "delivered": tap_packets.map(|p| round3(p as f64 / sent)),
                "tx_error": tx["error"],
                "backend": stats,
            }),
        ));
    }
    Ok(rows)
}

/// Starts `splitvisor-net --tap` inside the namespace and brings its TAP up with the
/// receiver's address.
fn tap_daemon(
    backend: &Path,
    dir: &Path,
    ns: &Netns,
    tap: &str,
    log: &Path,
) -> Result<(Backend, PathBuf), BenchError> {
    let socket = dir.join("tap.sock");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()])
        .arg(backend)
        .arg("--socket")
        .arg(&socket)
        .args(["--tap", tap]);
    let mut daemon = Backend::start(cmd, log, backend)?;
    daemon.wait_ready(|| ns.ip(&["link", "show", "dev", tap]).is_ok(), &socket)?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{RECEIVER_IP}/{PREFIX}"),
        "dev",
        tap,
    ])?;
    ns.ip(&["link", "set", "dev", tap, "mtu", TAP_MTU, "up"])?;
    Ok((daemon, socket))
}

/// Linux `ping` from the namespace to a guest running `serve`; RTTs from ping's own output.
fn tap_ping(
    args: &BenchArgs,
    backend: &Path,
    dir: &Path,
    ns: &Netns,
    tap: &str,
) -> Result<Value, BenchError> {
    let log = dir.join("tap-ping.log");
    let (mut daemon, socket) = tap_daemon(backend, dir, ns, tap, &log)?;
    let guest = Guest::spawn(
        args,
        &socket,
        &format!("serve,seconds=10 ip={SENDER_IP}/{PREFIX}"),
        "serve",
    )?;
    guest.wait_for(&format!("ip {SENDER_IP}/"), Duration::from_secs(60))?;
    let count = PING_COUNT.to_string();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "ping",
            "-c",
            &count,
            "-i",
            PING_INTERVAL,
        ])
        .args(["-W", "2", SENDER_IP])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BenchError::Spawn {
            what: "ping (iputils-ping)".to_string(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    rtts.sort_by(f64::total_cmp);
    let served = guest.finish(Duration::from_secs(10) + VM_SLACK);
    daemon.stop();
    let served = served?;
    let pct = |p: usize| (!rtts.is_empty()).then(|| rtts[(rtts.len() - 1) * p / 100].round());
    Ok(json!({
        "status": if rtts.len() == PING_COUNT as usize && served["status"] == "pass" { "pass" } else { "fail" },
        "command": format!("ip netns exec NS ping -c {PING_COUNT} -i {PING_INTERVAL} -W 2 {SENDER_IP}"),
        "sent": PING_COUNT,
        "received": rtts.len(),
        "rtt_min_us": rtts.first().map(|r| r.round()),
        "rtt_p50_us": pct(50),
        "rtt_max_us": rtts.last().map(|r| r.round()),
        "guest_pings_answered": served["pings_answered"],
    }))
}

/// The latest `STATS {json}` line of each socket in a backend log (the daemon prints one per
/// port at each disconnect and again when it is stopped; the counters only grow).
fn stats_lines(log: &Path) -> Vec<Value> {
    let mut latest: Vec<Value> = Vec::new();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines = text
        .lines()
        .filter_map(|l| l.find("STATS {").map(|at| &l[at + 6..]))
        .filter_map(|j| serde_json::from_str::<Value>(j).ok());
    for stats in lines {
        match latest.iter_mut().find(|s| s["socket"] == stats["socket"]) {
            Some(slot) => *slot = stats,
            None => latest.push(stats),
        }
    }
    latest
}

/// A `splitvisor run` of the embedded guest whose console lines arrive over a channel.
struct Guest {
    child: Child,
    lines: Receiver<String>,
    output: std::cell::RefCell<String>,
    label: &'static str,
}

impl Guest {
    fn spawn(
        args: &BenchArgs,
        socket: &Path,
        cmdline: &str,
        label: &'static str,
    ) -> Result<Guest, BenchError> {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("splitvisor"));
        let mut child = Command::new(&exe)
            .args(["run", "--prefault", "--memory", &args.memory.to_string()])
            .arg("--net")
            .arg(format!("socket={}", socket.display()))
            .args(["--cmdline", cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| BenchError::Spawn {
                what: exe.display().to_string(),
                source,
            })?;
        let (send, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if send.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Guest {
            child,
            lines,
            output: Default::default(),
            label,
        })
    }

    /// Takes the next console line (echoing progress lines), `None` at EOF or deadline.
    fn next_line(&self, deadline: Instant) -> Option<String> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(wait) {
            Ok(line) => {
                if !line.starts_with("RESULT ") {
                    eprintln!("  [{}] {line}", self.label);
                }
                let mut out = self.output.borrow_mut();
                out.push_str(&line);
                out.push('\n');
                Some(line)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    fn wait_for(&self, text: &str, timeout: Duration) -> Result<(), BenchError> {
        let deadline = Instant::now() + timeout;
        while let Some(line) = self.next_line(deadline) {
            if line.contains(text) {
                return Ok(());
            }
        }
        Err(BenchError::NoResult {
            path: format!("net ({})", self.label),
            status: format!("no `{text}` within {timeout:?}"),
            output: self.output.borrow().clone(),
        })
    }

    /// Reads the rest of the output (killing the VM after `timeout`) and returns its RESULT.
    fn finish(mut self, timeout: Duration) -> Result<Value, BenchError> {
        let deadline = Instant::now() + timeout;
        while self.next_line(deadline).is_some() {}
        if Instant::now() >= deadline {
            let _ = self.child.kill();
        }
        let status = self
            .child
            .wait()
            .map(|s| s.to_string())
            .unwrap_or_else(|e| e.to_string());
        let output = self.output.borrow().clone();
        output
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .and_then(|json| serde_json::from_str(json).ok())
            .ok_or(BenchError::NoResult {
                path: format!("net ({})", self.label),
                status,
                output,
            })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The net rows as a table for people.
pub fn print_table(paths: &serde_json::Map<String, Value>) {
    let rows: Vec<_> = paths
        .iter()
        .filter(|(k, _)| k.starts_with("net-") && *k != "net-tap-ping")
        .collect();
    if !rows.is_empty() {
        println!(
            "{:<16} {:>6} {:>21} {:>19} {:>11} {:>11} {:>21} {:>19} {:>19}",
            "net path",
            "bytes",
            "tx pkt/s",
            "tx Gb/s",
            "kicks/pkt",
            "be kick/pkt",
            "rx pkt/s",
            "rx Gb/s",
            "delivered"
        );
        for (name, p) in rows {
            println!(
                "{:<16} {:>6} {:>21} {:>19} {:>11} {:>11} {:>21} {:>19} {:>19}",
                name,
                cell(&p["size"]),
                figure(p, "tx_packets_per_s"),
                figure(p, "tx_gbit_per_s"),
                cell(&p["guest_kicks_per_packet"]),
                cell(&p["backend_kicks_per_packet"]),
                figure(p, "rx_packets_per_s"),
                figure(p, "rx_gbit_per_s"),
                figure(p, "delivered"),
            );
        }
        println!("(bytes: UDP payload per datagram; Gb/s: UDP payload bits; rx of net-tap: see tap_rx_packets)");
    }
    if let Some(p) = paths.get("net-tap-ping") {
        println!(
            "host -> guest ping ({}): {}/{} replies, RTT min {} us, p50 {} us, max {} us",
            cell(&p["command"]),
            figure(p, "received"),
            cell(&p["sent"]),
            figure(p, "rtt_min_us"),
            figure(p, "rtt_p50_us"),
            figure(p, "rtt_max_us"),
        );
    }
}
