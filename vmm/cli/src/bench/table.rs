//! What the benchmark tables share: rounding of the ratios and the rendering of one JSON cell.

use serde_json::Value;

/// Three decimals: enough for ratios such as exits per request.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One JSON value as a table cell: `-` for null, strings without their quotes.
/// (serde_json's Display ignores width, so cells are rendered before padding.)
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A figure of a row folded from several runs as `median (min-max)`; of one run, the value.
pub fn figure(row: &Value, key: &str) -> String {
    let median = cell(&row[key]);
    match (
        row["runs"].as_u64(),
        row["min"].get(key),
        row["max"].get(key),
    ) {
        (Some(runs), Some(min), Some(max)) if runs > 1 => {
            format!("{median} ({}-{})", cell(min), cell(max))
        }
        _ => median,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn figures_of_several_runs_show_their_range() {
        let row = json!({"runs": 3, "iops": 5, "min": {"iops": 4}, "max": {"iops": 9}});
        assert_eq!(figure(&row, "iops"), "5 (4-9)");
        assert_eq!(figure(&json!({"runs": 1, "iops": 5}), "iops"), "5");
        assert_eq!(figure(&row, "lat"), "-");
    }
}
