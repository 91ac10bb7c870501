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
