//! The blk-host table for people: one block per queue depth, ours beside the compared
//! backend (qemu-storage-daemon) with the ratio taken at that depth, and the memcpy ceiling.

use std::path::Path;

use serde_json::Value;

use super::blk_host::PATH;
use super::table::{cell, figure};

const FIGURES: [(&str, &str); 6] = [
    ("IOPS", "iops"),
    ("MB/s", "mb_per_s"),
    ("lat mean us", "lat_mean_us"),
    ("lat p50 us", "lat_p50_us"),
    ("lat p99 us", "lat_p99_us"),
    ("lat p99.9 us", "lat_p999_us"),
];

/// The blk-host rows side by side, one block per queue depth, with the ratio when there is a
/// comparison (taken at that queue depth).
pub fn print_table(summary: &Value) {
    let results = summary["results"].as_array().cloned().unwrap_or_default();
    let ours: Vec<&Value> = results.iter().filter(|r| r["path"] == PATH).collect();
    for row in &ours {
        let qd = &row["qd"];
        let qsd = results
            .iter()
            .find(|r| r["path"] == format!("{PATH}-qsd").as_str() && r["qd"] == *qd);
        let ratio = summary["ratios"]
            .as_array()
            .and_then(|all| all.iter().find(|r| r["ours"] == PATH && r["qd"] == *qd));
        print_block(summary, row, qsd, ratio);
    }
    let compare = &summary["blk_host_compare"];
    let memcpy = compare["memcpy_mb_per_s"].as_f64();
    if let (Some(memcpy), Some(of), Some(row)) =
        (memcpy, compare["of_memcpy"].as_f64(), ours.last())
    {
        println!(
            "one-core memcpy of bs-sized blocks: {memcpy} MB/s; {} reaches {:.1}% of it at QD {}",
            short_name(&row["backend"], 20),
            of * 100.0,
            cell(&row["qd"])
        );
    }
}

fn print_block(summary: &Value, ours: &Value, qsd: Option<&Value>, ratio: Option<&Value>) {
    println!(
        "{PATH}: {} bs={} qd={} queues=1, {} s, {} run(s)",
        cell(&summary["rw"]),
        cell(&summary["bs"]),
        cell(&ours["qd"]),
        cell(&summary["seconds"]),
        cell(&ours["runs"])
    );
    let head = |q: Option<&Value>| q.map(|v| short_name(&v["backend"], 34)).unwrap_or_default();
    println!(
        "{:<14} {:>26} {:>34} {:>8}",
        "figure",
        short_name(&ours["backend"], 26),
        head(qsd),
        if qsd.is_some() { "ratio" } else { "" }
    );
    for (label, key) in FIGURES {
        let theirs = qsd.map(|q| figure(q, key)).unwrap_or_default();
        let ratio = ratio
            .and_then(|r| r[key].as_f64())
            .map(|r| format!("{r}x"))
            .unwrap_or_default();
        println!(
            "{label:<14} {:>26} {theirs:>34} {ratio:>8}",
            figure(ours, key)
        );
    }
}

/// A backend's name for a table heading: a long --backend-cmd shortened to its program.
fn short_name(backend: &Value, width: usize) -> String {
    let name = cell(backend);
    if name.len() <= width {
        return name;
    }
    let program = name.split_whitespace().next().unwrap_or_default();
    let base = Path::new(program)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned());
    format!("{} ...", base.unwrap_or_default())
}
