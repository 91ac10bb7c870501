//! docs/api.yaml for the end-to-end tests: the document parsed, and the schema checker the
//! VMM's unit tests use (the same file, so both check with the same rules).

use serde_json::Value;

#[path = "../../vmm/src/api/schema_check.rs"]
mod schema_check;

pub use schema_check::{check, documented, resolve, response_schema, METHODS};

/// docs/api.yaml as JSON.
pub fn doc() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.yaml");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}
