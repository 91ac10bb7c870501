//! The README's examples, run as written: every ```sh block (each in its own shell and process
//! group, in a scratch directory that has the README's `target/release/` pointing at the
//! binaries this test built) and every ```toml block that names its file (`# vm.toml - ...`,
//! written there first). What cannot run on this host is skipped and listed: commands that
//! need root, a Linux guest (which needs a VMX/SVM host), or that would rebuild or re-test the
//! whole workspace. `cargo build`/`cargo run` lines use the binaries already built.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use splitvisor_tests::daemon::workspace_bin;
use splitvisor_tests::vm::require_kvm;
use splitvisor_tests::workdir::Workdir;

/// One block runs a few VMs and benchmarks of seconds each; this is the hang detector.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a block's leftover background processes get to end after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines (or, for `Block`, whole blocks) that cannot run here, and why.
const SKIPS: &[(&str, Scope, &str)] = &[
    (
        "--initramfs",
        Scope::Block,
        "boots Linux: needs a host with VMX or SVM (this one is PVM)",
    ),
    (
        ".ci/install-deps.sh",
        Scope::Line,
        "installs packages as root and runs the whole test suite",
    ),
    (
        "net-tap",
        Scope::Line,
        "needs root: creates a network namespace and a TAP",
    ),
    ("tap=", Scope::Line, "needs root: creates a TAP"),
    ("--tap", Scope::Line, "needs root: creates a TAP"),
];

/// What `SKIPS` expects to skip in today's README; a new skip must be added here on purpose:
/// the install/test line, the root-only bench line, and the five Linux blocks ("Booting Linux"
/// and the four of "Linux guest with its backends"), which need a VMX/SVM host; the nested
/// tests (linux_boot, linux_devices) run the same kind of commands one level down.
const EXPECTED_SKIPS: usize = 7;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scope {
    Line,
    Block,
}

/// Uses the binaries this test built instead of a release build (printed, so it is visible).
const PRELUDE: &str = r#"set -e
cargo() {
    echo "readme test: 'cargo $*': using the binaries this test built in target/release/" >&2
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do shift; done
    if [ $# -gt 0 ]; then shift; exec target/release/splitvisor "$@"; fi
}
"#;

#[derive(Debug)]
struct Block {
    lang: String,
    heading: String,
    /// Logical lines: `\`-continued lines joined.
    lines: Vec<String>,
}

fn blocks(readme: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut current: Option<Block> = None;
    for line in readme.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(lang)) => {
                current = Some(Block {
                    lang: lang.trim().to_string(),
                    heading: heading.clone(),
                    lines: Vec::new(),
                })
            }
            (Some(_), Some(_)) => blocks.extend(current.take()),
            (Some(block), None) => match block.lines.last_mut() {
                Some(last) if last.ends_with('\\') => {
                    last.pop();
                    last.push_str(line.trim_start());
                }
                _ => block.lines.push(line.to_string()),
            },
            (None, None) if line.starts_with('#') => heading = line.to_string(),
            (None, None) => {}
        }
    }
    blocks
}

/// The block as a script, and what was skipped in it (`heading: command: reason`).
fn script(block: &Block) -> (Option<String>, Vec<String>) {
    let skip_of = |line: &str| {
        SKIPS
            .iter()
            .find(|(needle, _, _)| line.contains(needle) && !line.trim_start().starts_with('#'))
    };
    if let Some((_, _, reason)) = block
        .lines
        .iter()
        .filter_map(|l| skip_of(l))
        .find(|(_, scope, _)| *scope == Scope::Block)
    {
        return (
            None,
            vec![format!("{}: the whole block: {reason}", block.heading)],
        );
    }
    let mut skipped = Vec::new();
    let mut text = PRELUDE.to_string();
    for line in &block.lines {
        match skip_of(line) {
            Some((_, _, reason)) => {
                skipped.push(format!("{}: `{line}`: {reason}", block.heading));
                text.push_str(&format!(": skipped: {reason}\n"));
            }
            None => text.push_str(&format!("{line}\n")),
        }
    }
    (Some(text), skipped)
}

/// `target/release/{splitvisor,splitvisor-blk,splitvisor-net}` in `dir`, linked to the
/// binaries of this build.
fn link_binaries(dir: &Path) {
    let release = dir.join("target/release");
    std::fs::create_dir_all(&release).unwrap();
    for bin in ["splitvisor", "splitvisor-blk", "splitvisor-net"] {
        let path = workspace_bin(bin, bin).unwrap_or_else(|e| panic!("{bin}: {e}"));
        std::os::unix::fs::symlink(&path, release.join(bin)).unwrap();
    }
}

/// Runs one block in `dir`, in a process group of its own that is stopped afterwards.
fn run_block(dir: &Path, index: usize, text: &str) -> (Option<i32>, String) {
    let out = dir.join(format!("block{index}.out"));
    let file = std::fs::File::create(&out).unwrap();
    let mut child = Command::new("bash")
        .args(["-c", text])
        .current_dir(dir)
        .env("XDG_RUNTIME_DIR", dir.join("run"))
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .process_group(0)
        .spawn()
        .expect("cannot start bash");
    let group = child.id() as libc::pid_t;
    let deadline = Instant::now() + BLOCK_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            stop_group(group);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The block's background daemons and VMs.
    stop_group(group);
    (status, std::fs::read_to_string(&out).unwrap_or_default())
}

/// SIGTERM to the group, SIGKILL if it is still there after STOP_TIMEOUT.
fn stop_group(group: libc::pid_t) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    let alive = || unsafe { libc::kill(-group, 0) } == 0;
    // SAFETY: as above.
    unsafe { libc::kill(-group, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive() {
        // SAFETY: as above.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
}

/// A `*.pid` file left by `launch --daemonize --pidfile` names a launch that must have ended.
fn assert_no_daemonized_launch_left(dir: &Path) {
    let pidfiles: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pid"))
        .collect();
    for pidfile in pidfiles {
        let deadline = Instant::now() + STOP_TIMEOUT;
        while pidfile.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(text) = std::fs::read_to_string(&pidfile) {
            if let Ok(pid) = text.trim().parse::<libc::pid_t>() {
                // SAFETY: kill(2) on a pid; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            panic!("{} still names a running launch: {text}", pidfile.display());
        }
    }
}

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_readme_examples_run_as_written() {
    if !require_kvm("the_readme_examples_run_as_written") {
        return;
    }
    let workdir = Workdir::new("readme");
    let dir = workdir.path();
    std::fs::create_dir_all(dir.join("run")).unwrap();
    link_binaries(dir);
    let blocks = blocks(&readme());
    let mut skipped = Vec::new();
    for block in blocks.iter().filter(|b| b.lang == "toml") {
        let name = block.lines[0]
            .strip_prefix("# ")
            .and_then(|l| l.split_whitespace().next())
            .filter(|n| n.ends_with(".toml"));
        match name {
            Some(name) => std::fs::write(dir.join(name), block.lines.join("\n") + "\n").unwrap(),
            None => skipped.push(format!(
                "{}: the reference TOML example (a Linux kernel, a TAP: needs a VMX/SVM host and \
                 root; the_readme_example_uses_every_key_of_the_format parses it)",
                block.heading
            )),
        }
    }
    let mut failures = Vec::new();
    for (index, block) in blocks.iter().enumerate().filter(|(_, b)| b.lang == "sh") {
        let (text, mut block_skips) = script(block);
        skipped.append(&mut block_skips);
        let Some(text) = text else { continue };
        let (status, output) = run_block(dir, index, &text);
        eprintln!(
            "--- {} (block {index}): exit {status:?}\n{output}",
            block.heading
        );
        if status != Some(0) || output.contains("\"status\":\"fail\"") {
            failures.push(format!(
                "{} (block {index}) ended with {status:?}:\n{text}\n{output}",
                block.heading
            ));
        }
    }
    assert_no_daemonized_launch_left(dir);
    eprintln!("skipped ({}):\n  {}", skipped.len(), skipped.join("\n  "));
    assert!(
        failures.is_empty(),
        "README examples failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn only_what_cannot_run_here_is_skipped() {
    let blocks = blocks(&readme());
    let sh = blocks.iter().filter(|b| b.lang == "sh").count();
    assert!(sh >= 8, "{sh} sh blocks");
    let skipped: Vec<String> = blocks
        .iter()
        .filter(|b| b.lang == "sh")
        .flat_map(|b| script(b).1)
        .collect();
    eprintln!("skipped:\n  {}", skipped.join("\n  "));
    assert_eq!(skipped.len(), EXPECTED_SKIPS, "{skipped:#?}");
    // No example needs sudo, and the runnable TOML example names its file.
    assert!(!readme().contains("sudo "), "an example uses sudo");
    let named = blocks
        .iter()
        .filter(|b| b.lang == "toml" && b.lines[0].starts_with("# vm.toml"))
        .count();
    assert_eq!(named, 1);
}
