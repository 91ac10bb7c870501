//! `bench --output FILE`: every result (one object per path and queue depth, with the median
//! figures and their `min`, `max` and `runs`) as a JSON array, or as CSV when FILE ends in
//! `.csv` (one row per result; `min_*`/`max_*` columns; nested counters only in JSON).

use std::path::Path;

use serde_json::{Map, Value};

use super::check::is_block;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write the file")]
    Write(#[source] std::io::Error),
    #[error("cannot write a CSV row")]
    WriteCsv(#[source] csv::Error),
}

/// Columns every CSV starts with, in this order; the others follow by name.
const FIRST: [&str; 6] = ["path", "qd", "rw", "bs", "seconds", "runs"];

/// The results with the workload they ran (`rw`, `bs`, `seconds` from the summary; the
/// network rows have no `rw`/`bs`), so that the file stands on its own.
pub fn rows(summary: &Value) -> Vec<Value> {
    let results = summary["results"].as_array().cloned().unwrap_or_default();
    results
        .into_iter()
        .map(|mut row| {
            let block = row["path"].as_str().is_some_and(is_block);
            if let Some(obj) = row.as_object_mut() {
                for key in ["rw", "bs"].into_iter().filter(|_| block) {
                    obj.insert(key.into(), summary[key].clone());
                }
                obj.insert("seconds".into(), summary["seconds"].clone());
            }
            row
        })
        .collect()
}

pub fn write(path: &Path, summary: &Value) -> Result<(), OutputError> {
    let rows = rows(summary);
    if path.extension().is_some_and(|e| e == "csv") {
        return write_csv(path, &rows);
    }
    let text = serde_json::to_string_pretty(&rows).unwrap_or_default();
    std::fs::write(path, text + "\n").map_err(OutputError::Write)
}

fn write_csv(path: &Path, rows: &[Value]) -> Result<(), OutputError> {
    let flat: Vec<Map<String, Value>> = rows.iter().map(flatten).collect();
    let columns = columns(&flat);
    let mut out = csv::Writer::from_path(path).map_err(OutputError::WriteCsv)?;
    out.write_record(&columns).map_err(OutputError::WriteCsv)?;
    for row in &flat {
        let record = columns.iter().map(|c| csv_cell(row.get(c)));
        out.write_record(record).map_err(OutputError::WriteCsv)?;
    }
    out.flush().map_err(OutputError::Write)
}

/// A result's scalar fields, with its `min`/`max` figures as `min_<key>`/`max_<key>`.
fn flatten(row: &Value) -> Map<String, Value> {
    let mut flat = Map::new();
    let Some(obj) = row.as_object() else {
        return flat;
    };
    for (key, value) in obj {
        match (key.as_str(), value) {
            ("min" | "max", Value::Object(figures)) => {
                for (figure, v) in figures {
                    flat.insert(format!("{key}_{figure}"), v.clone());
                }
            }
            (_, Value::Object(_) | Value::Array(_)) => {}
            _ => {
                flat.insert(key.clone(), value.clone());
            }
        }
    }
    flat
}

/// `FIRST`, then every other column any row has, by name (min_/max_ after the figures).
fn columns(rows: &[Map<String, Value>]) -> Vec<String> {
    let mut rest: Vec<String> = rows
        .iter()
        .flat_map(|r| r.keys())
        .filter(|k| !FIRST.contains(&k.as_str()))
        .cloned()
        .collect();
    let spread = |k: &String| k.starts_with("min_") || k.starts_with("max_");
    rest.sort_by_key(|k| (spread(k), k.clone()));
    rest.dedup();
    FIRST.iter().map(|c| c.to_string()).chain(rest).collect()
}

/// A CSV field: empty for null or missing, strings without their quotes.
fn csv_cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn summary() -> Value {
        json!({"rw": "randread", "bs": "4k", "seconds": 1, "results": [
            {"path": "blk-host", "qd": 4, "runs": 2, "iops": 10, "backend": "a, \"b\"",
             "min": {"iops": 9}, "max": {"iops": 11}},
            {"path": "net-switch-64", "qd": null, "runs": 2, "sent": 5, "backend": [{"x": 1}],
             "min": {"sent": 4}, "max": {"sent": 6}},
        ]})
    }

    #[test]
    fn rows_carry_their_workload() {
        let rows = rows(&summary());
        assert_eq!(
            (&rows[0]["rw"], &rows[0]["bs"]),
            (&json!("randread"), &json!("4k"))
        );
        assert!(rows[1].get("rw").is_none(), "a network row has no --rw");
        assert_eq!(rows[1]["seconds"], json!(1));
    }

    #[test]
    fn csv_has_a_header_and_one_row_per_result() {
        let dir = std::env::temp_dir().join(format!("sv-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("r.csv");
        write(&path, &summary()).expect("written");
        let text = std::fs::read_to_string(&path).expect("read back");
        let _ = std::fs::remove_dir_all(&dir);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            lines[0],
            "path,qd,rw,bs,seconds,runs,backend,iops,sent,max_iops,max_sent,min_iops,min_sent"
        );
        assert_eq!(
            lines[1],
            "blk-host,4,randread,4k,1,2,\"a, \"\"b\"\"\",10,,11,,9,"
        );
        assert_eq!(lines[2], "net-switch-64,,,,1,2,,,5,,6,,4");
    }
}
