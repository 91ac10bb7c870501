//! `splitvisor bench --paths blk-host` (issue 13): the bench process as the vhost-user frontend
//! of a real splitvisor-blk daemon, no VM and no /dev/kvm. Reads return the pattern the image
//! was filled with and leave the image alone, writes change it, and bad flags are refused
//! before anything starts, naming the flag.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use splitvisor_tests::daemon::bin;
use splitvisor_tests::image;
use splitvisor_tests::vm::splitvisor;
use splitvisor_tests::workdir::Workdir;

/// A 1 s run, the image fill, daemon start-up and a debug build on a busy 2-core host.
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);
const IMAGE_LEN: usize = 16 << 20;

struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Flags every run gets unless it names them itself.
const DEFAULTS: [(&str, &str); 4] = [
    ("--seconds", "1"),
    ("--qd", "4"),
    ("--size", "8M"),
    ("--image-size", "16M"),
];

/// Runs `splitvisor bench --paths blk-host --seconds 1 --qd 4 EXTRA` against the workspace's
/// splitvisor-blk, bounded by `BENCH_TIMEOUT`.
fn bench(dir: &Workdir, label: &str, extra: &[&str]) -> Run {
    let out = dir.join(&format!("{label}.out"));
    let err = dir.join(&format!("{label}.err"));
    dir.log(&format!("{label} stderr"), &err);
    let file = |p: &Path| std::fs::File::create(p).expect("create an output file");
    let mut child = Command::new(splitvisor())
        .args(["bench", "--paths", "blk-host"])
        .args(
            DEFAULTS
                .iter()
                .filter(|(flag, _)| !extra.contains(flag))
                .flat_map(|(flag, value)| [flag, value]),
        )
        .arg("--backend")
        .arg(bin("splitvisor-blk"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(file(&out))
        .stderr(file(&err))
        .spawn()
        .expect("start splitvisor bench");
    let deadline = Instant::now() + BENCH_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for splitvisor bench") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("splitvisor bench {extra:?} did not end within {BENCH_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        success: status.success(),
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}

/// The blk-host row of the run's BENCH line.
fn row(run: &Run) -> Value {
    assert!(run.success, "bench failed:\n{}\n{}", run.stdout, run.stderr);
    let line = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .unwrap_or_else(|| panic!("no BENCH line in:\n{}", run.stdout));
    let summary: Value = serde_json::from_str(line).expect("BENCH is JSON");
    let row = summary["paths"]["blk-host"].clone();
    assert_eq!(row["status"], "pass", "{summary}");
    assert!(row["iops"].as_u64().unwrap_or(0) > 0, "{summary}");
    assert!(
        row["lat_p999_us"].as_f64().unwrap_or(0.0) > 0.0,
        "{summary}"
    );
    assert_eq!(row["errors"], 0, "{summary}");
    row
}

#[test]
fn reads_return_the_fill_pattern_and_its_directory_is_removed() {
    let dir = Workdir::new("bh-verify");
    let run = bench(&dir, "verify", &["--rw", "randread", "--verify"]);
    let row = row(&run);
    assert_eq!(row["verify"], true);
    assert_eq!(row["verify_errors"], 0, "{row}");
    assert_eq!(row["event_idx"], true, "splitvisor-blk offers EVENT_IDX");
    // "filled a 16 MiB image on DIR in ..." - and DIR is gone afterwards.
    let filled = run
        .stderr
        .lines()
        .find_map(|l| l.split(" image on ").nth(1))
        .and_then(|rest| rest.split(" in ").next())
        .unwrap_or_else(|| panic!("no fill line in:\n{}", run.stderr));
    assert!(!Path::new(filled).exists(), "{filled} left behind");
}

#[test]
fn randread_leaves_the_image_and_randwrite_changes_it() {
    let dir = Workdir::new("bh-image");
    let path = dir.join("disk.img");
    let bytes = image::random(&path, 13, IMAGE_LEN);
    let image_arg = path.display().to_string();
    row(&bench(
        &dir,
        "read",
        &["--rw", "randread", "--image", &image_arg],
    ));
    image::assert_image(&path, &bytes);
    row(&bench(
        &dir,
        "write",
        &["--rw", "randwrite", "--image", &image_arg],
    ));
    let after = std::fs::read(&path).expect("read the image back");
    assert_eq!(after.len(), bytes.len());
    let changed = after
        .chunks(4096)
        .zip(bytes.chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    assert!(changed > 0, "randwrite left every block as it was");
    assert_eq!(after[8 << 20..], bytes[8 << 20..], "writes stay in --size");
}

#[test]
fn a_bad_block_size_is_refused_naming_the_flag() {
    let dir = Workdir::new("bh-flags");
    for (flag, value) in [("--bs", "1000"), ("--qd", "0"), ("--seconds", "0")] {
        let run = bench(&dir, &format!("bad{}", &flag[2..]), &[flag, value]);
        assert!(!run.success, "{flag} {value} accepted:\n{}", run.stdout);
        assert!(
            run.stderr.contains(&format!("{flag} {value}")),
            "{flag} not named:\n{}",
            run.stderr
        );
        assert!(!run.stderr.contains("filled"), "started before checking");
    }
}
