//! `splitvisor bench --paths blk-host` (issue 13): the bench process as the vhost-user frontend
//! of a real splitvisor-blk daemon, no VM and no /dev/kvm. Reads return the pattern the image
//! was filled with and leave the image alone, writes change it, and bad flags are refused
//! before anything starts, naming the flag. `--repeat`, `--qd` sweeps, `--output` (JSON,
//! CSV) and `--plot` (SVG) write what the BENCH line says.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
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

/// Flags every run gets unless it names them itself (one run each: these tests check the
/// data path; `repeated_sweeps_*` checks the repetition).
const DEFAULTS: [(&str, &str); 5] = [
    ("--repeat", "1"),
    ("--seconds", "1"),
    ("--qd", "4"),
    ("--size", "8M"),
    ("--image-size", "16M"),
];

/// Runs `splitvisor bench --paths blk-host --repeat 1 --seconds 1 --qd 4 EXTRA` against the workspace's
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
fn bad_flags_are_refused_naming_the_flag_before_anything_starts() {
    let dir = Workdir::new("bh-flags");
    let missing = dir.join("no-such-dir/x.json").display().to_string();
    let output = dir.join("never.json");
    let output_arg = output.display().to_string();
    for (flag, value) in [
        ("--bs", "1000"),
        ("--qd", "0"),
        ("--qd", "4,4"),
        ("--seconds", "0"),
        ("--repeat", "0"),
        ("--repeat", "1000"),
        ("--size", "1G"),
        ("--output", missing.as_str()),
        ("--plot", "chart.png"),
    ] {
        let label = format!("bad{}-{}", &flag[2..], value.len());
        // Each also asks for --output, which must not be written either.
        let mut extra = vec![flag, value];
        if flag != "--output" {
            extra.extend(["--output", output_arg.as_str()]);
        }
        let run = bench(&dir, &label, &extra);
        assert!(!run.success, "{flag} {value} accepted:\n{}", run.stdout);
        assert!(
            run.stderr.contains(&format!("{flag} {value}")),
            "{flag} not named:\n{}",
            run.stderr
        );
        assert!(!run.stderr.contains("filled"), "started before checking");
        assert!(!run.stderr.contains(" run 1/"), "started before checking");
        assert!(!output.exists(), "{flag} {value}: --output written");
    }
}

/// The six figures every blk-host result has, median and spread.
const FIGURES: [&str; 6] = [
    "iops",
    "mb_per_s",
    "lat_mean_us",
    "lat_p50_us",
    "lat_p99_us",
    "lat_p999_us",
];

#[test]
fn repeated_sweeps_write_json_and_svg_with_median_min_max() {
    let dir = Workdir::new("bh-sweep");
    let (json, svg) = (dir.join("results.json"), dir.join("chart.svg"));
    let (json_arg, svg_arg) = (json.display().to_string(), svg.display().to_string());
    let run = bench(
        &dir,
        "sweep",
        &[
            "--repeat", "2", "--qd", "1,4", "--output", &json_arg, "--plot", &svg_arg,
        ],
    );
    row(&run);
    for qd in [1, 4] {
        for i in 1..=2 {
            let progress = format!("bench: blk-host qd={qd} run {i}/2 ...");
            assert!(
                run.stderr.contains(&progress),
                "no '{progress}' in:\n{}",
                run.stderr
            );
        }
    }
    let text = std::fs::read_to_string(&json).expect("--output written");
    let results: Vec<Value> = serde_json::from_str(&text).expect("--output is a JSON array");
    assert_eq!(results.len(), 2, "{text}");
    for (result, qd) in results.iter().zip([1, 4]) {
        assert_eq!(result["path"], "blk-host", "{result}");
        assert_eq!((&result["qd"], &result["runs"]), (&json!(qd), &json!(2)));
        assert_eq!(
            (&result["status"], &result["bs"]),
            (&json!("pass"), &json!("4k"))
        );
        for key in FIGURES {
            let [min, median, max] =
                [&result["min"][key], &result[key], &result["max"][key]].map(|v| {
                    v.as_f64()
                        .unwrap_or_else(|| panic!("{key} missing: {result}"))
                });
            assert!(
                min <= median && median <= max,
                "{key}: {min} {median} {max}"
            );
            assert!(min > 0.0, "{key}: {result}");
        }
    }
    // The BENCH line holds the same results, and its headline row is the last --qd.
    let line = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .expect("BENCH");
    let summary: Value = serde_json::from_str(line).expect("BENCH is JSON");
    assert_eq!(summary["results"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        (&summary["qd"], &summary["qds"]),
        (&json!(4), &json!([1, 4]))
    );
    assert_eq!(summary["paths"]["blk-host"]["qd"], 4);
    assert_eq!(summary["paths"]["blk-host"]["iops"], results[1]["iops"]);
    // The table shows median (min-max).
    let iops = format!(
        "{} ({}-{})",
        results[1]["iops"], results[1]["min"]["iops"], results[1]["max"]["iops"]
    );
    assert!(
        run.stdout.contains(&iops),
        "no '{iops}' in:\n{}",
        run.stdout
    );
    let svg = std::fs::read_to_string(&svg).expect("--plot written");
    let doc = roxmltree::Document::parse(&svg).expect("the chart is XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    for label in ["blk-host", "blk-host p99", "queue depth"] {
        let found = doc
            .descendants()
            .any(|n| n.text().is_some_and(|t| t.trim() == label));
        assert!(found, "no '{label}' text in the chart");
    }
}

#[test]
fn csv_output_has_a_header_and_a_row_per_queue_depth() {
    let dir = Workdir::new("bh-csv");
    let csv = dir.join("results.csv");
    let csv_arg = csv.display().to_string();
    row(&bench(&dir, "csv", &["--qd", "1,2", "--output", &csv_arg]));
    let text = std::fs::read_to_string(&csv).expect("--output written");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "header and two rows:\n{text}");
    assert!(
        lines[0].starts_with("path,qd,rw,bs,seconds,runs,"),
        "{}",
        lines[0]
    );
    let columns = lines[0].split(',').count();
    let header: Vec<&str> = lines[0].split(',').collect();
    let iops = header
        .iter()
        .position(|c| *c == "iops")
        .expect("an iops column");
    for (line, qd) in lines[1..].iter().zip(["1", "2"]) {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), columns, "{line}");
        assert_eq!(
            &cells[..6],
            ["blk-host", qd, "randread", "4k", "1", "1"],
            "{line}"
        );
        assert!(cells[iops].parse::<u64>().is_ok_and(|n| n > 0), "{line}");
    }
}
