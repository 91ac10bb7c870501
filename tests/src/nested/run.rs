//! What a nested run takes (files, options, extra disks) and what it gives back: the script's
//! output lines and exit status parsed from L1's serial console, with the console's tail in
//! every failure message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::l1::{MARKER_PREFIX, OUTPUT_PREFIX};
use crate::workdir::Workdir;

/// Environment variable overriding every nested run's timeout (seconds), for slow hosts.
pub const ENV_TIMEOUT: &str = "SPLITVISOR_NESTED_TIMEOUT_S";
/// Default time for one L1 boot, its script and power-off. L1 boots in ~5 s on an idle host;
/// TCG gets several times slower when the host is busy compiling.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Part of the timeout kept for L1's boot and power-off: the script is killed this much earlier,
/// so that its own output and L1's report still arrive.
pub const BOOT_MARGIN: Duration = Duration::from_secs(40);
/// How many lines of L1's console a failure message shows.
const TAIL_LINES: usize = 80;

/// A file for the test inside L1, at `/files/<name>` (read-only there; copy it to /tmp to
/// write it).
#[derive(Debug, Clone)]
pub struct NestedFile {
    pub(super) name: String,
    pub(super) source: Source,
}

#[derive(Debug, Clone)]
pub(super) enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>, u32),
}

impl NestedFile {
    /// A copy of the host file `path` (its permission bits kept).
    pub fn from_path(name: &str, path: &Path) -> NestedFile {
        NestedFile {
            name: name.to_string(),
            source: Source::Host(path.to_path_buf()),
        }
    }

    /// A file with these contents (mode 0644).
    pub fn from_bytes(name: &str, data: impl Into<Vec<u8>>) -> NestedFile {
        NestedFile {
            name: name.to_string(),
            source: Source::Bytes(data.into(), 0o644),
        }
    }

    /// A script or program with these contents (mode 0755).
    pub fn executable(name: &str, data: impl Into<Vec<u8>>) -> NestedFile {
        NestedFile {
            name: name.to_string(),
            source: Source::Bytes(data.into(), 0o755),
        }
    }
}

/// A writable raw disk image attached to L1 as a further virtio-blk disk. The n-th extra disk
/// (from 0) is `/dev/vd{b+n}` inside L1 (the files disk is `/dev/vda`), and its serial
/// (`/sys/block/vdX/serial`) is its `name`. Writes reach the host file by the time
/// [`super::NestedHost::run`] returns (L1 syncs before powering off).
#[derive(Debug, Clone)]
pub struct ExtraDisk {
    pub name: String,
    pub path: PathBuf,
}

/// How to run L1.
#[derive(Debug, Clone)]
pub struct NestedOptions {
    /// L1's memory in MiB (default 2048). An L2 guest with N MiB needs about N + 1.5 GiB.
    pub memory_mib: u32,
    /// The whole run's limit (default [`DEFAULT_TIMEOUT`]); [`ENV_TIMEOUT`] overrides it.
    pub timeout: Duration,
    /// Writable disks, `/dev/vdb` onwards.
    pub disks: Vec<ExtraDisk>,
    /// Further L1 modules (e.g. `tun`, `veth`), loaded with their dependencies before the
    /// script.
    pub modules: Vec<String>,
    /// Further host programs for `/bin` of the chroot (e.g. `/usr/sbin/ip`), with their
    /// libraries. Call them by full path (`/bin/ip`): Debian's busybox sh runs its own applet
    /// of the same name before anything in `PATH`.
    pub programs: Vec<PathBuf>,
}

impl Default for NestedOptions {
    fn default() -> Self {
        NestedOptions {
            memory_mib: 2048,
            timeout: DEFAULT_TIMEOUT,
            disks: Vec::new(),
            modules: Vec::new(),
            programs: Vec::new(),
        }
    }
}

impl NestedOptions {
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Attach the raw image `path` writable as the next `/dev/vdX`, serial `name`.
    pub fn disk(mut self, name: &str, path: &Path) -> Self {
        self.disks.push(ExtraDisk {
            name: name.to_string(),
            path: path.to_path_buf(),
        });
        self
    }

    pub fn module(mut self, name: &str) -> Self {
        self.modules.push(name.to_string());
        self
    }

    pub fn program(mut self, path: &Path) -> Self {
        self.programs.push(path.to_path_buf());
        self
    }

    /// The timeout in effect: [`ENV_TIMEOUT`] if set, else the option.
    pub fn effective_timeout(&self) -> Duration {
        std::env::var(ENV_TIMEOUT)
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(self.timeout, Duration::from_secs)
    }
}

/// A finished nested run. Keeps the run's work directory (L1 console log, QEMU log, the image)
/// alive: if the test panics while holding it, the logs' tails are printed and the directory
/// is kept.
#[derive(Debug)]
pub struct NestedRun {
    /// The script's output lines (stdout and stderr interleaved), in order, without `\r`.
    pub lines: Vec<String>,
    /// The script's exit status (137 when killed at the time bound).
    pub exit: i32,
    /// How long the whole run took on the host (image, L1 boot, script, power-off).
    pub elapsed: Duration,
    /// L1's uptime when the script started (the L1 boot time) and how long the script ran,
    /// as L1 measured them.
    pub boot: Option<Duration>,
    pub script: Option<Duration>,
    /// Everything L1 printed on its console.
    pub console: String,
    /// The script's time bound in L1 (the run's timeout less [`BOOT_MARGIN`]).
    pub bound: Duration,
    pub(super) workdir: Workdir,
}

impl NestedRun {
    /// The script's output as one string.
    pub fn output(&self) -> String {
        self.lines.join("\n")
    }

    /// All `SV:key=value` markers in the script's output, in order (a marker may follow other
    /// text on its line, e.g. kernel messages of an L2 guest).
    pub fn markers(&self) -> Vec<(&str, &str)> {
        self.lines
            .iter()
            .filter_map(|l| l.split_once("SV:").map(|(_, m)| m))
            .map(|m| m.split_once('=').unwrap_or((m, "")))
            .collect()
    }

    /// The value of the last marker `key`.
    pub fn marker(&self, key: &str) -> Option<&str> {
        self.markers()
            .into_iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// The value of marker `key`; panics with the output and L1's console tail if absent.
    pub fn expect(&self, key: &str) -> &str {
        self.marker(key)
            .unwrap_or_else(|| panic!("the script printed no SV:{key}= marker\n{}", self.report()))
    }

    /// Panic (with the output and L1's console tail) unless the script exited with 0.
    pub fn assert_success(&self) {
        assert_eq!(self.exit, 0, "the nested script failed\n{}", self.report());
    }

    /// The work directory of the run (logs, the image).
    pub fn workdir(&self) -> &Workdir {
        &self.workdir
    }

    /// The script's exit status, output and the tail of L1's console, for failure messages.
    pub fn report(&self) -> String {
        let killed = if self.exit == 137 {
            format!(" (SIGKILL: at the time bound of {:?}?)", self.bound)
        } else {
            String::new()
        };
        format!(
            "--- script exit status: {}{killed}\n--- script output:\n{}\n--- L1 console, last lines:\n{}",
            self.exit,
            self.output(),
            console_tail(&self.console, TAIL_LINES)
        )
    }
}

/// What L1's console says about the run.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Parsed {
    pub lines: Vec<String>,
    pub exit: Option<i32>,
    pub error: Option<String>,
    pub start: Option<Duration>,
    pub end: Option<Duration>,
}

pub(super) fn parse_console(console: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let secs = |v: &str| v.trim().parse::<f64>().ok().map(Duration::from_secs_f64);
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(out) = line.strip_prefix(OUTPUT_PREFIX) {
            parsed.lines.push(out.trim_end_matches('\r').to_string());
            continue;
        }
        let Some((key, value)) = line
            .strip_prefix(MARKER_PREFIX)
            .and_then(|m| m.split_once('='))
        else {
            continue;
        };
        match key {
            "exit" => parsed.exit = value.trim().parse().ok(),
            "error" => parsed.error = Some(value.to_string()),
            "uptime-start" => parsed.start = secs(value),
            "uptime-end" => parsed.end = secs(value),
            _ => {}
        }
    }
    parsed
}

/// The last `lines` lines of `console`.
pub(super) fn console_tail(console: &str, lines: usize) -> String {
    let all: Vec<&str> = console.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_parsing_separates_output_and_markers() {
        let console = "[    1.0] kernel noise\r\nSV:init=ready\nNESTED:kvm=ok\n\
                       NESTED:uptime-start=4.50\nNESTED> hello\r\nNESTED> SV:a=1\n\
                       NESTED> \nNESTED:uptime-end=6.25\nNESTED:exit=3\nSV:exit=3\n";
        let p = parse_console(console);
        assert_eq!(p.lines, ["hello", "SV:a=1", ""]);
        assert_eq!(p.exit, Some(3));
        assert_eq!(p.start, Some(Duration::from_millis(4500)));
        assert_eq!(p.end, Some(Duration::from_millis(6250)));
        assert_eq!(p.error, None);
        let p = parse_console("NESTED:error=no-dev-kvm\n");
        assert_eq!(p.error.as_deref(), Some("no-dev-kvm"));
        assert_eq!(p.exit, None);
    }
}
