//! `bench --paths blk-host`: a backend's own benchmark without a VM. The bench process is the
//! vhost-user frontend (`frontend`, loaded by `load`); the backend is splitvisor-blk (started
//! here on a tmpfs image filled with data), any other vhost-user-blk daemon (`--backend-cmd`),
//! and with `--compare qsd` also qemu-storage-daemon on the same image in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use splitvisor_vmm::config::ByteSize;

use super::check::{MAX_BS, MAX_SECONDS};
use super::daemon::{sibling, Backend};
use super::frontend::{BlkFrontend, FrontendError, Layout, MAX_QD};
use super::load::{self, fill_pattern, LoadError, Workload, FILL_TAG, SECTOR};
use super::stats;
use super::table::{cell, round3};
use super::{BenchArgs, BenchError};

/// The path's name in `--paths` and its row in BENCH; the comparison's rows get a suffix.
pub const PATH: &str = "blk-host";
const QSD: &str = "qemu-storage-daemon";
/// How long the one-core memcpy reference runs.
const MEMCPY_TIME: Duration = Duration::from_millis(500);
/// Set by SIGINT/SIGTERM while a blk-host run is under way: the run stops and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum BlkHostError {
    #[error("{flag} {value}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot create the private benchmark directory {}", .0.display())]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("cannot fill the benchmark image {}", .0.display())]
    Fill(PathBuf, #[source] std::io::Error),
    #[error("cannot read the size of the image {} (--image)", .0.display())]
    ImageSize(PathBuf, #[source] std::io::Error),
    #[error("{what} did not start serving {}; the end of its log:\n{log}", .socket.display())]
    Backend {
        what: String,
        socket: PathBuf,
        log: String,
    },
    #[error("cannot start {what}")]
    Start {
        what: String,
        #[source]
        source: Box<BenchError>,
    },
    #[error("frontend to {what} on {}", .socket.display())]
    Frontend {
        what: String,
        socket: PathBuf,
        #[source]
        source: FrontendError,
    },
    #[error("the load on {what} failed")]
    Load {
        what: String,
        #[source]
        source: LoadError,
    },
    #[error("cannot install the Ctrl-C handler")]
    Signals(#[source] std::io::Error),
    #[error("interrupted (Ctrl-C): the benchmark's image, sockets and daemons are removed")]
    Interrupted,
}

fn invalid(flag: &'static str, value: impl ToString, reason: &str) -> BlkHostError {
    BlkHostError::Invalid {
        flag,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// The flags of a blk-host run, checked.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub workload: Workload,
    pub image_size: u64,
}

/// Checks `--bs`, `--qd`, `--seconds`, `--queues`, `--size` and `--verify` before anything
/// starts; `image_len` is the size of `--image` if one is given. The workload's queue depth
/// is the first of `--qd`; a sweep sets each in turn.
pub fn validate(args: &BenchArgs, image_len: Option<u64>) -> Result<Params, BlkHostError> {
    let bs = args
        .bs
        .parse::<ByteSize>()
        .map_err(|_| invalid("--bs", &args.bs, "not a size (say 4k or 1M)"))?
        .0;
    if bs == 0 || !bs.is_multiple_of(SECTOR) || bs > MAX_BS {
        return Err(invalid(
            "--bs",
            &args.bs,
            "must be a multiple of 512 bytes, at most 1M",
        ));
    }
    if let Some(&qd) = args.qd.iter().find(|&&qd| qd == 0 || qd > MAX_QD) {
        let reason = format!(
            "must be 1 to {MAX_QD} (each request takes 3 descriptors of a ring of at most 1024)"
        );
        return Err(invalid("--qd", qd, &reason));
    }
    if args.seconds == 0 || args.seconds > MAX_SECONDS {
        return Err(invalid("--seconds", args.seconds, "must be 1 to 3600"));
    }
    if args.queues != 1 {
        return Err(invalid(
            "--queues",
            args.queues,
            "blk-host drives one queue; use --queues 1",
        ));
    }
    let image_size = image_len.unwrap_or(args.image_size.0);
    let region = args
        .size
        .parse::<ByteSize>()
        .map_err(|_| invalid("--size", &args.size, "not a size (say 64M)"))?
        .0;
    if region < bs || region > image_size {
        let reason = format!("must be at least --bs and at most the image's {image_size} bytes");
        return Err(invalid("--size", &args.size, &reason));
    }
    if args.verify && (image_len.is_some() || args.rw.contains("write")) {
        let reason = "checks reads against the pattern of the image blk-host fills itself: leave out --image and use --rw read or randread";
        return Err(invalid("--verify", "", reason));
    }
    Ok(Params {
        workload: Workload {
            write: args.rw.contains("write"),
            random: args.rw.starts_with("rand"),
            bs,
            qd: args.qd.first().copied().unwrap_or(1),
            region,
            seconds: args.seconds,
            verify: args.verify,
        },
        image_size,
    })
}

/// A directory of the run's own on tmpfs (image, sockets, logs), removed when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> Result<PrivateDir, BlkHostError> {
        use std::os::unix::fs::DirBuilderExt;
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("splitvisor-bench-host-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| BlkHostError::Dir(dir.clone(), e))?;
        Ok(PrivateDir(dir))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

extern "C" fn on_stop_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// SIGINT and SIGTERM set `INTERRUPTED` (a handler, not a blocked mask: the daemons started
/// later must not inherit blocked signals; exec resets handlers).
fn catch_stop_signals() -> Result<(), BlkHostError> {
    for signal in splitvisor_wire::host::signals::STOP {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
        // async-signal-safe. No SA_RESTART, so a wait in poll(2) returns at once.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(BlkHostError::Signals(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn interrupted() -> Result<(), BlkHostError> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        return Err(BlkHostError::Interrupted);
    }
    Ok(())
}

/// Writes the pattern over the whole image so that every read returns real, checkable data.
fn fill_image(path: &Path, size: u64) -> Result<(), BlkHostError> {
    use std::io::Write;
    let err = |e| BlkHostError::Fill(path.to_path_buf(), e);
    let mut file = std::fs::File::create(path).map_err(err)?;
    let mut chunk = vec![0u8; MAX_BS as usize];
    let mut at = 0;
    while at < size {
        interrupted()?;
        let len = (size - at).min(MAX_BS) as usize;
        fill_pattern(&mut chunk[..len], FILL_TAG, at / SECTOR);
        file.write_all(&chunk[..len]).map_err(err)?;
        at += len as u64;
    }
    Ok(())
}

/// Which backend a run drives.
#[derive(Clone, Debug)]
enum Target {
    Own(PathBuf),
    Cmd(String),
    Qsd(&'static str),
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::Own(_) => "splitvisor-blk".to_string(),
            Target::Cmd(cmd) => cmd.clone(),
            Target::Qsd(aio) => format!("{QSD} aio={aio}"),
        }
    }

    fn command(&self, socket: &Path, image: &Path) -> Command {
        match self {
            Target::Own(bin) => {
                let mut cmd = Command::new(bin);
                cmd.arg("--socket").arg(socket).arg("--image").arg(image);
                cmd.args(["--queues", "1"]);
                cmd
            }
            Target::Cmd(line) => {
                let line = line
                    .replace("{socket}", &socket.display().to_string())
                    .replace("{image}", &image.display().to_string());
                let mut cmd = Command::new("sh");
                // exec: the SIGTERM that stops the backend reaches it, not the shell.
                cmd.arg("-c").arg(format!("exec {line}"));
                cmd
            }
            Target::Qsd(aio) => {
                let mut cmd = Command::new(QSD);
                cmd.arg("--blockdev").arg(format!(
                    "driver=file,node-name=f,filename={},aio={aio},cache.direct=off",
                    image.display()
                ));
                cmd.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
                    socket.display()
                ));
                cmd
            }
        }
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    match lines.len() {
        0 => "(empty)".to_string(),
        n => lines[n.saturating_sub(10)..].join("\n"),
    }
}

/// Starts `target` and waits for its socket.
fn start(
    target: &Target,
    dir: &Path,
    image: &Path,
    tag: &str,
) -> Result<(Backend, PathBuf), BlkHostError> {
    let socket = dir.join(format!("{tag}.sock"));
    let log = dir.join(format!("{tag}.log"));
    let _ = std::fs::remove_file(&socket);
    let what = target.name();
    let mut backend = Backend::start(target.command(&socket, image), &log, Path::new(&what))
        .map_err(|source| BlkHostError::Start {
            what: what.clone(),
            source: Box::new(source),
        })?;
    if backend.wait_ready(|| socket.exists(), &socket).is_err() {
        return Err(BlkHostError::Backend {
            what,
            socket,
            log: log_tail(&log),
        });
    }
    Ok((backend, socket))
}

/// Starts qemu-storage-daemon with io_uring, or with threads where io_uring fails.
fn start_qsd(dir: &Path, image: &Path) -> Result<(Backend, PathBuf, Target), BlkHostError> {
    let uring = Target::Qsd("io_uring");
    match start(&uring, dir, image, "qsd") {
        Ok((backend, socket)) => Ok((backend, socket, uring)),
        Err(BlkHostError::Backend { log, .. }) => {
            eprintln!(
                "bench: {QSD} with aio=io_uring failed ({}); trying aio=threads",
                log.trim()
            );
            let threads = Target::Qsd("threads");
            start(&threads, dir, image, "qsd").map(|(b, s)| (b, s, threads))
        }
        Err(e) => Err(e),
    }
}

/// One measured run of `target`: its BENCH row.
fn measure(
    args: &BenchArgs,
    p: &Params,
    target: &Target,
    dir: &Path,
    image: &Path,
) -> Result<Value, BlkHostError> {
    interrupted()?;
    let (mut backend, socket, target) = match target {
        Target::Qsd(_) => start_qsd(dir, image)?,
        other => start(other, dir, image, "blk").map(|(b, s)| (b, s, other.clone()))?,
    };
    let what = target.name();
    eprintln!(
        "bench: {PATH}: {what}: {} bs={} qd={} for {} s ...",
        args.rw, args.bs, p.workload.qd, args.seconds
    );
    let failed = |source| BlkHostError::Frontend {
        what: what.clone(),
        socket: socket.clone(),
        source,
    };
    let mut front =
        BlkFrontend::connect(&socket, Layout::new(p.workload.qd, p.workload.bs)).map_err(failed)?;
    let event_idx = front.event_idx;
    let outcome = load::run(&mut front, &p.workload, &INTERRUPTED);
    let stopped = front.stop();
    backend.stop();
    let outcome = match outcome {
        Err(LoadError::Interrupted) => return Err(BlkHostError::Interrupted),
        other => other.map_err(|source| BlkHostError::Load {
            what: what.clone(),
            source,
        })?,
    };
    stopped.map_err(failed)?;
    let row = row(&what, &p.workload, &outcome, event_idx);
    eprintln!(
        "bench: {PATH}: {what}: {} IOPS, {} MB/s, mean {} us",
        cell(&row["iops"]),
        cell(&row["mb_per_s"]),
        cell(&row["lat_mean_us"])
    );
    Ok(row)
}

fn row(what: &str, w: &Workload, o: &load::Outcome, event_idx: bool) -> Value {
    let us = |v: Option<f64>| v.map(|x| (x * 10.0).round() / 10.0);
    let pass = o.requests > 0 && o.errors == 0 && o.verify_errors == 0;
    json!({
        "status": if pass { "pass" } else { "fail" },
        "backend": what,
        "iops": o.iops().round() as u64,
        "mb_per_s": ((o.iops() * w.bs as f64 / 1e6) * 10.0).round() / 10.0,
        "lat_mean_us": us(o.mean_us()),
        "lat_p50_us": us(o.quantile_us(0.5)),
        "lat_p99_us": us(o.quantile_us(0.99)),
        "lat_p999_us": us(o.quantile_us(0.999)),
        "requests": o.requests,
        "errors": o.errors,
        "verify": w.verify,
        "verify_errors": o.verify_errors,
        "kicks_per_request": round3(o.kicks as f64 / o.requests.max(1) as f64),
        "calls_waited_per_request": round3(o.wakeups as f64 / o.requests.max(1) as f64),
        "elapsed_s": round3(o.elapsed.as_secs_f64()),
        "ring_size": super::frontend::ring_size(w.qd),
        "event_idx": event_idx,
    })
}

/// The folded results (`{path, qd, ...}`, see `super::repeat_runs`) and `blk_host_compare`.
pub type HostRows = (Vec<Value>, Value);

/// The blk-host results (`blk-host`, and `blk-host-qsd` with `--compare qsd`) at every
/// `--qd`, `--repeat` runs each, and how they compare.
pub fn run(args: &BenchArgs) -> Result<HostRows, BenchError> {
    run_checked(args).map_err(BenchError::BlkHost)
}

fn run_checked(args: &BenchArgs) -> Result<HostRows, BlkHostError> {
    let image_len = match &args.image {
        Some(path) => Some(
            std::fs::metadata(path)
                .map_err(|e| BlkHostError::ImageSize(path.clone(), e))?
                .len(),
        ),
        None => None,
    };
    let params = validate(args, image_len)?;
    catch_stop_signals()?;
    let dir = PrivateDir::create()?;
    let image = match &args.image {
        Some(path) => path.clone(),
        None => {
            let image = dir.0.join("image.raw");
            let started = Instant::now();
            fill_image(&image, params.image_size)?;
            eprintln!(
                "bench: {PATH}: filled a {} MiB image on {} in {:.1} s",
                params.image_size >> 20,
                dir.0.display(),
                started.elapsed().as_secs_f64()
            );
            image
        }
    };
    let ours = our_target(args)?;
    let results = sweep(args, &params, &ours, &dir.0, &image)?;
    let compare = compare(&args.qd, &results, params.workload.bs);
    Ok((results, compare))
}

/// The backend measured: --backend-cmd, --backend, or the splitvisor-blk next to this binary.
fn our_target(args: &BenchArgs) -> Result<Target, BlkHostError> {
    let ours = match (&args.backend_cmd, &args.backend) {
        (Some(cmd), _) => Target::Cmd(cmd.clone()),
        (None, Some(bin)) => Target::Own(bin.clone()),
        (None, None) => Target::Own(sibling("splitvisor-blk")),
    };
    if let Target::Own(bin) = &ours {
        if !bin.is_file() {
            return Err(BlkHostError::Start {
                what: bin.display().to_string(),
                source: Box::new(BenchError::NoBackend(bin.clone())),
            });
        }
    }
    Ok(ours)
}

/// Every `--qd`, `--repeat` runs each, of ours and (with `--compare qsd`) the reference.
fn sweep(
    args: &BenchArgs,
    params: &Params,
    ours: &Target,
    dir: &Path,
    image: &Path,
) -> Result<Vec<Value>, BlkHostError> {
    let qsd = args.compare.iter().any(|c| c == "qsd");
    let mut results = Vec::new();
    for &qd in &args.qd {
        let p = Params {
            workload: Workload {
                qd,
                ..params.workload
            },
            ..*params
        };
        // Ours and the reference take turns run by run, so that a slow phase of the host
        // does not fall on one of them only.
        let once = || -> Result<Vec<(String, Value)>, BlkHostError> {
            let mut rows = vec![(PATH.to_string(), measure(args, &p, ours, dir, image)?)];
            if qsd {
                let theirs = measure(args, &p, &Target::Qsd("io_uring"), dir, image)?;
                rows.push((format!("{PATH}-qsd"), theirs));
            }
            Ok(rows)
        };
        results.extend(super::repeat_runs(args, PATH, Some(qd), once)?);
    }
    Ok(results)
}

/// `blk_host_compare`: the ratios to qemu-storage-daemon at the headline (last) queue depth,
/// and the ceiling for a copying backend, a one-core memcpy of the same request size.
fn compare(qds: &[u32], results: &[Value], bs: u64) -> Value {
    let headline = json!(qds.last().copied().unwrap_or_default());
    let at = |path: &str| {
        results
            .iter()
            .find(|r| r["path"] == path && r["qd"] == headline)
    };
    let mut compare = serde_json::Map::new();
    if let (Some(ours), Some(theirs)) = (at(PATH), at(&format!("{PATH}-qsd"))) {
        compare.insert("qsd".into(), Value::Object(stats::ratios(ours, theirs)));
    }
    let memcpy = load::memcpy_mb_per_s(bs as usize, MEMCPY_TIME);
    compare.insert("memcpy_mb_per_s".into(), json!(memcpy.round()));
    if let Some(mb) = at(PATH).and_then(|r| r["mb_per_s"].as_f64()) {
        compare.insert("of_memcpy".into(), json!(round3(mb / memcpy)));
    }
    Value::Object(compare)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        let mut argv = vec!["bench", "--paths", "blk-host"];
        argv.extend_from_slice(extra);
        Wrap::try_parse_from(argv).expect("flags parse").args
    }

    fn refused(extra: &[&str], flag: &str) {
        let err = validate(&args(extra), None)
            .expect_err("refused")
            .to_string();
        assert!(err.starts_with(flag), "{err}");
    }

    #[test]
    fn flags_are_checked_before_anything_starts() {
        refused(&["--bs", "1000"], "--bs");
        refused(&["--bs", "2M"], "--bs");
        refused(&["--bs", "x"], "--bs");
        refused(&["--qd", "0"], "--qd");
        refused(&["--qd", "342"], "--qd");
        refused(&["--qd", "4,342"], "--qd");
        refused(&["--seconds", "0"], "--seconds");
        refused(&["--queues", "2"], "--queues");
        refused(&["--size", "1G"], "--size");
        refused(&["--verify", "--rw", "randwrite"], "--verify");
        let p =
            validate(&args(&["--bs", "1M", "--qd", "341", "--rw", "write"]), None).expect("valid");
        assert_eq!((p.workload.bs, p.workload.qd), (1 << 20, 341));
        assert!(p.workload.write && !p.workload.random);
        assert!(
            validate(&args(&["--verify"]), Some(1 << 30)).is_err(),
            "no verify on --image"
        );
    }
}
